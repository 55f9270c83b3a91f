"""What the engine needs from one model family. A backbone knows its family and nothing about methods."""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor, nn

from ..errors import PatchStateError, UnsupportedModelError

if TYPE_CHECKING:
    from ..tokens import TokenLayout

__all__ = ["BackboneInfo", "BlockOps", "Backbone", "LayoutSource", "require_known_parts", "nothing_to_undo",
           "refuse_feature_maps", "replace_on_instance", "install_all", "undo_all", "note_features", "NO_MASKS"]

NO_MASKS = ("a vistok-patched block takes no attention mask or causal flag (vistok masks padding itself); "
            "remove the patch to run the model with attention masks")


@dataclass(frozen=True)
class BackboneInfo:
    """Static facts about a patchable model."""

    family: str
    model_class: str
    num_blocks: int
    num_prefix: int
    has_class_token: bool
    grid_size: tuple[int, ...]
    rotary: bool = False
    other_sizes: bool = False  # set up to take inputs of other sizes (timm's dynamic_img_size): more patches

    def patch_bound(self) -> int | None:
        """The most patch tokens an input can have, which bounds integer options (``k``, ``r``, ``min_tokens``):
        the native count, or ``None`` (no bound known before the call) for a model set up for other sizes."""
        return None if self.other_sizes else self.num_patches

    @property
    def num_patches(self) -> int:
        """Patch tokens: the product of the grid's sides (``(h, w)`` for images, ``(t, h, w)`` for video)."""
        return math.prod(self.grid_size)

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches


class BlockOps(ABC):
    """One transformer block's own modules, exposed as the steps of a pre-norm block:

    ``x = x + attn_residual(attn_out(attention(qkv(norm1(x))), norm1(x)))``;
    ``x = x + mlp_residual(x)``. Every step calls the block's modules; none re-implements them.
    """

    @abstractmethod
    def norm1(self, x: Tensor) -> Tensor:
        """``[B, N, C]`` -> ``[B, N, C]``."""

    @abstractmethod
    def qkv(self, h: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised input ``[B, N, C]`` -> ``q, k, v`` ``[B, H, N, d]`` after q/k norms and rotary
        embedding (``rope`` already matches the token positions, prefix excluded)."""

    @abstractmethod
    def attn_out(self, o: Tensor, h: Tensor) -> Tensor:
        """Attention output ``[B, H, M, d]`` and the normalised input of those ``M`` tokens ``[B, M, C]``
        (for output gates) -> ``[B, M, C]`` after the output norm, gate, projection and dropout."""

    @abstractmethod
    def attn_residual(self, y: Tensor) -> Tensor:
        """Layer scale and drop-path of the attention branch."""

    @abstractmethod
    def mlp_residual(self, x: Tensor) -> Tensor:
        """The whole MLP branch: ``drop_path(layer_scale(mlp(norm2(x))))``."""

    @property
    @abstractmethod
    def dropout_p(self) -> float:
        """Attention dropout probability in the module's current mode."""

    def bypassed(self) -> tuple[nn.Module, ...]:
        """The block's modules whose own ``forward`` the steps never call (they call its parts): hooks on them
        would not run. By default the attention module, ``self.attn``."""
        return (self.attn,)


class LayoutSource(Protocol):
    """What pooling may ask about the current forward pass (the patch's tracker)."""

    def current(self) -> TokenLayout | None: ...

    def current_tokens(self) -> Tensor | None: ...

    def note_features(self, features: Tensor) -> None: ...

    def is_current(self, tokens: Tensor) -> bool: ...


class GridSink(Protocol):
    """Where the input check tells the patch the patch grid of this call's input (the patch's tracker)."""

    def note_grid(self, grid: tuple[int, ...] | None) -> None: ...


class Backbone(ABC):
    """A supported model, ready to be patched. Construction checks everything and changes nothing.

    ``model`` is the vision tower whose blocks are patched (for a CLIP model, its image tower).
    """

    info: BackboneInfo
    model: nn.Module
    #: the model classes this family accepts as they are
    model_classes: tuple[type, ...] = ()

    @classmethod
    def unwrap(cls, model: nn.Module) -> nn.Module | None:
        """The inner vision tower if ``model`` is a wrapper this family knows (e.g. a CLIP model), else
        ``None``. Raises ``UnsupportedModelError`` for a known wrapper vistok cannot patch."""
        return None

    @abstractmethod
    def block_inputs(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        """The arguments of one call of a block's ``forward`` (the family's signature) -> the tokens
        ``[B, N, C]`` and the rotary embedding (or ``None``). Arguments vistok cannot honour (attention masks,
        ...) raise ``PatchStateError``."""

    @property
    @abstractmethod
    def grad_checkpointing(self) -> bool:
        """Whether the model currently re-runs blocks for gradient checkpointing."""

    @abstractmethod
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, in order."""

    @abstractmethod
    def block_ops(self, index: int) -> BlockOps:
        """Access to block ``index``'s own modules."""

    @abstractmethod
    def install_pooling(self, tracker: LayoutSource) -> Callable[[], None]:
        """Make the model's pooling respect padding and token sizes; returns the undo function.
        ``tracker.current()`` gives the layout of the tokens the blocks produced last (in this call),
        ``tracker.current_tokens()`` those tokens.

        What it installs and returns must survive ``copy.deepcopy`` and ``pickle`` with the model: bound
        methods and ``functools.partial`` of them, never closures."""

    @abstractmethod
    def install_input_check(self, sink: GridSink) -> Callable[[], None]:
        """Check input shapes with a clear error, and tell ``sink`` the patch grid of each call's input (``None``
        where its tokens are not known to lie on a grid); returns the undo function (a bound method or partial,
        as for :meth:`install_pooling`)."""


def require_known_parts(module: nn.Module, known: set[str], what: str) -> None:
    """Refuse a module that has children, parameters or buffers vistok does not know about: they could
    change what the module computes, and vistok would silently compute something else.

    Raises:
        UnsupportedModelError: naming the unknown parts.
    """
    names = {name for name, _ in module.named_children()}
    names |= {name for name, _ in module.named_parameters(recurse=False)}
    names |= {name for name, _ in module.named_buffers(recurse=False)}
    unknown = sorted(names - known)
    if unknown:
        raise UnsupportedModelError(
            f"{what} ({type(module).__module__}.{type(module).__name__}) has parts vistok does not know: "
            f"{unknown}. Refusing to patch rather than compute something different from the model.")


def refuse_feature_maps(model: nn.Module) -> Callable[[], None]:
    """Make ``model.forward_intermediates`` (timm, open_clip; timm's ``get_intermediate_layers`` goes through it)
    refuse feature maps (``output_fmt="NCHW"``, the default) while patched: reduced tokens are no grid, and a
    reshape would scramble them (or fail with a bare error). Token lists (``output_fmt="NLC"``) are given as
    ``forward_features`` gives its tokens, padded. Returns the undo function."""
    if not hasattr(type(model), "forward_intermediates"):
        return nothing_to_undo
    return replace_on_instance(model, "forward_intermediates", partial(_token_intermediates, model))


def _token_intermediates(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    original = type(model).forward_intermediates
    arguments = inspect.signature(original).bind(model, *args, **kwargs)
    arguments.apply_defaults()
    if arguments.arguments.get("output_fmt") == "NCHW":
        raise PatchStateError(
            "a patched model's intermediates are tokens, not feature maps: after a block drops or merges tokens "
            "they lie on no grid. Pass output_fmt='NLC' (get_intermediate_layers: reshape=False); the token lists "
            "are padded as forward_features' output is (handle.layouts[block].valid marks the real tokens)")
    return original(*arguments.args, **arguments.kwargs)


def note_features(tracker: LayoutSource, norm: nn.Module, args: tuple, output: Tensor) -> None:
    """A forward hook for a model's final norm: note its output as this pass's features when its input is what the
    patched blocks last produced (no other call of the norm), so pooling can tell them from other tokens."""
    if args and args[0] is tracker.current_tokens():
        tracker.note_features(output)


def install_all(installs: list[Callable[[], Callable[[], None]]]) -> Callable[[], None]:
    """Run ``installs`` in order (each returns its undo function) and return the undo of them all; if one fails
    (a refusal), the ones before it are undone first, so nothing is left half-installed."""
    undos: list[Callable[[], None]] = []
    try:
        for install in installs:
            undos.append(install())
    except BaseException:
        undo_all(undos)
        raise
    return partial(undo_all, undos)


def undo_all(steps: list[Callable[[], None]]) -> None:
    """The undo function of several installations (use as ``partial(undo_all, [...])``)."""
    for step in steps:
        step()


def replace_on_instance(owner: object, name: str, replacement: Any) -> Callable[[], None]:
    """Set ``owner.name`` to ``replacement`` on the instance and return the undo (which deletes it, so that the
    class's method shows again). An instance that already has its own ``name`` (set by the user or another library)
    is refused with ``UnsupportedModelError``: vistok's replacement calls the class's method and would bypass
    it, and the undo would delete it."""
    if name in vars(owner):
        raise UnsupportedModelError(
            f"{type(owner).__name__}.{name} is replaced on this instance (by your code or another library); vistok "
            f"replaces it while patched and would bypass yours. Remove it (del obj.{name}) before patching")
    setattr(owner, name, replacement)
    return partial(delattr, owner, name)


def nothing_to_undo() -> None:
    """The undo function of an installation that changed nothing."""
