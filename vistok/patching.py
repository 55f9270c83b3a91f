"""``vistok.patch``: one call to make a model spend fewer tokens, one call (``handle.remove()``) to undo it.

How it works: from the first block a method acts on to the last block, each block's ``forward`` is
replaced (on the instance, not the class) by :func:`vistok.block.run_block` over the block's own modules.
A tracker carries the :class:`TokenLayout` from block to block beside the token tensor, per call (per thread),
so the model's own ``forward``, ``forward_features``, ``nn.Sequential`` loop and hooks are left as they are. The
model's ``pool`` is replaced by one that ignores padding and weighs tokens by size, and a pre-hook on the
patch embedding turns a wrong input shape into a clear error. Parameters and buffers are never touched.

Everything installed is a plain object or a bound method (never a closure), and the handle lives on the model:
``copy.deepcopy`` and ``pickle`` therefore give an independent patched model with its own handle.
"""

from __future__ import annotations

import copy
import gc
import operator
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .backbones import Backbone, resolve_backbone
from .backbones.base import BlockOps
from .block import run_block
from .errors import AlreadyPatchedError, InvalidConfigError, PatchStateError, UnsupportedModelError, VistokError
from .methods import MethodConfig, MethodSpec, TokenReducer, create_config
from .ops import check_attention_path
from .tokens import TokenLayout

__all__ = ["PatchHandle", "patch", "unpatch", "get_handle", "find_handle"]

# The handle lives on the patched module itself (a reference cycle the garbage collector handles), so a
# patched model that is dropped is freed with its handle.
_HANDLE_ATTR = "_vistok_handle"
# What a patch installed on the vision tower whose blocks it patched, and how to undo it (an _Installed).
_INSTALLED_ATTR = "_vistok_installed"


@dataclass
class _CallState:
    """What one forward pass carries from block to block: the layout after each block, and the latest layout and
    a weak reference to the latest output in ``latest``.

    Blocks update it through its dicts only: under ``torch.compile`` (torch 2.14), an attribute written between two
    FlexAttention calls is lost from the traced program, an item written into a dict is not.
    """

    input_tokens: int = 0
    layouts: dict[int, TokenLayout] = field(default_factory=dict)
    latest: dict[str, Any] = field(default_factory=dict)

    @property
    def layout(self) -> TokenLayout | None:
        return self.latest.get("layout")

    @property
    def last_output(self) -> weakref.ref | None:
        return self.latest.get("output")


class _LayoutTracker:
    """Carries the token layout from one patched block to the next during a forward pass.

    The layout belongs to the call, not to the model: each thread keeps its own (a forward pass runs in one
    thread), so concurrent calls of one model never see each other's tokens, and a copied or unpickled model
    starts with none.
    """

    def __init__(self, backbone: Backbone, first_block: int, trace: bool, attention: str) -> None:
        self._backbone = backbone
        self.info = backbone.info
        self.first_block = first_block
        self.trace = trace
        self.attention = attention  # the attention path of every patched block (vistok.ops.attention)
        self._calls = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(vars(self))
        del state["_calls"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self._calls = threading.local()

    def last_call(self) -> _CallState:
        """The state of this thread's current or last forward pass (empty before the first)."""
        call = getattr(self._calls, "state", None)
        return _CallState() if call is None else call

    def enter(self, block: int, x: Tensor) -> TokenLayout:
        if block == self.first_block:
            if self._backbone.grad_checkpointing and torch.is_grad_enabled():
                raise PatchStateError(
                    "gradient checkpointing re-runs blocks out of order in the backward pass, which vistok cannot "
                    "follow; while the model is patched and records gradients, call "
                    "model.set_grad_checkpointing(False) (timm, open_clip) or model.gradient_checkpointing_disable() "
                    "(Hugging Face); under torch.no_grad() it runs")
            info = self.info
            grid = getattr(self._calls, "grid", info.grid_size)  # this call's, from the input check
            layout = TokenLayout.original(x, info.num_prefix, info.has_class_token, self.trace, grid)
            self._calls.state = _CallState(input_tokens=x.shape[1], latest={"layout": layout})
            return layout
        call = self.last_call()
        if call.layout is None or call.last_output is None or call.last_output() is not x:
            raise PatchStateError(
                f"block {block} received tokens that are not the ones block {block - 1} returned (shape "
                f"{tuple(x.shape)}). vistok carries which tokens were kept from block to block; run the blocks "
                "in order, and do not replace their outputs (e.g. with forward hooks) while patched.")
        return call.layout

    def note_grid(self, grid: tuple[int, ...] | None) -> None:
        """The patch grid of this thread's current input (the backbone's input check calls it as a pass begins:
        the last pass's layouts go, also when this one stops before the first patched block)."""
        self._calls.grid = grid
        self._calls.state = None

    def leave(self, block: int, x: Tensor, layout: TokenLayout) -> None:
        call = self.last_call()
        call.layouts[block] = layout
        call.latest.update(layout=layout, output=weakref.ref(x))

    def current(self) -> TokenLayout | None:
        """The layout of the tokens the blocks last produced in this thread."""
        return self.last_call().layout

    def note_features(self, features: Tensor) -> None:
        """The model's features after the blocks (its final norm's output) in this thread's current pass."""
        self.last_call().latest["features"] = weakref.ref(features)

    def is_current(self, tokens: Tensor) -> bool:
        """Whether ``tokens`` are what the patched blocks last produced in this thread, or the features noted after
        them (so that pooling uses their own pass's padding and sizes)."""
        latest = self.last_call().latest
        return any(reference is not None and reference() is tokens
                   for reference in (latest.get("output"), latest.get("features")))

    def current_tokens(self) -> Tensor | None:
        """The tokens the last patched block produced in this thread, while they are alive."""
        reference = self.last_call().last_output
        return None if reference is None else reference()

    def clear(self) -> None:
        """Forget every thread's state."""
        self._calls = threading.local()


class _PartOfPatch:
    """What vistok installs on a module instance of a patched model (a block's ``forward``, a vision-LLM's
    ``get_image_features``): :func:`unpatch` given a part of that model finds it and refuses."""


def refuse_bypassed_hooks(ops: BlockOps, index: int, error: type[VistokError], when: str) -> None:
    """Refuse hooks on a module of block ``index`` whose ``forward`` the patched block never calls: they would
    silently not run (a hook that reads or edits the attention's output, an adapter)."""
    for module in ops.bypassed():
        hooked = any(_is_users_hook(hook) for hooks in (module._forward_hooks, module._forward_pre_hooks,
                                                        module._backward_hooks, module._backward_pre_hooks)
                     for hook in hooks.values())
        if hooked or "forward" in vars(module):  # accelerate's hooks replace the instance's forward
            raise error(f"block {index}'s {type(module).__name__} has hooks (or a forward replaced on the instance, "
                        f"as accelerate's hooks do), which {when}: the patched block runs that module's parts over "
                        "the kept tokens and never calls the module itself, so they would not run; remove them, or "
                        "hook the block, its norms, MLP or projections, which do run")


def _is_users_hook(hook: Callable) -> bool:
    """Whether a module hook is anyone's but transformers' output recorder: transformers hooks its attention
    modules to record attention weights for ``output_attentions`` (the hooks stay, idle, once it was asked for),
    which vistok refuses on its own."""
    return getattr(hook, "__module__", None) != "transformers.utils.output_capturing"


class _Installed(_PartOfPatch):
    """What one patch installed on a vision tower (block forwards, pooling, input check) and how to undo it,
    kept on the tower beside what it undoes. A tower copied or pickled out of a patched model (a CLIP model's
    ``vision_model``) takes it along without the handle, which stays with the model that was patched:
    :func:`unpatch` given that copy undoes it (``orphaned``).
    """

    def __init__(self, handle: PatchHandle) -> None:
        self.undo: list[Callable[[], None]] = []
        self.owner: weakref.ref | None = weakref.ref(handle)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(vars(self))
        state["owner"] = None  # a copied handle links its copy again (PatchHandle.__setstate__)
        return state

    @property
    def orphaned(self) -> bool:
        """Whether no handle owns this any more: the tower was copied without its patched model, or that model
        was deleted (and collected: a patched model and its handle form a cycle, which ``gc.collect()`` frees)."""
        return self.owner is None or self.owner() is None

    def orphaned_after_collecting(self) -> bool:
        """:attr:`orphaned`, after collecting garbage if an owner still seems alive: the last reference to the
        patched model may be gone while the cycle waits for the collector."""
        if not self.orphaned:
            gc.collect()
        return self.orphaned

    def restore(self) -> None:
        while self.undo:
            self.undo.pop()()


class _PatchedBlockForward(_PartOfPatch):
    """A patched block's ``forward``: the family's call signature in, :func:`run_block` over the block's own
    modules out. A plain object rather than a closure, so that ``copy.deepcopy`` and ``pickle`` copy it along
    with the block, the tracker and the handle it belongs to (a closure would be shared with the original)."""

    def __init__(self, index: int, backbone: Backbone, reducer: TokenReducer | None,
                 tracker: _LayoutTracker) -> None:
        self.index = index
        self.backbone = backbone
        self.ops = backbone.block_ops(index)
        self.reducer = reducer
        self.tracker = tracker

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        refuse_bypassed_hooks(self.ops, self.index, PatchStateError, "was added after patching")
        x, rope = self.backbone.block_inputs(*args, **kwargs)
        layout = self.tracker.enter(self.index, x)
        x, layout = run_block(self.ops, x, layout, self.reducer, rope, self.tracker.attention)
        self.tracker.leave(self.index, x, layout)
        return x


class PatchHandle:
    """A patched model. ``remove()`` (or leaving a ``with`` block) restores the original model exactly.

    Attributes:
        model: the patched model.
        config: the method's validated config.
        info: what vistok found out about the model (family, blocks, prefix tokens, patch grid).
        reducers: ``{block index: per-block reducer}`` for the blocks the method acts on.
        owner: the vision-LLM's handle when this patches its tower as part of it (``None`` otherwise).
    """

    def __init__(self, model: nn.Module, config: MethodConfig, backbone: Backbone,
                 reducers: dict[int, TokenReducer], attention: str = "auto") -> None:
        self.model = model
        self.config = config
        self.owner: object | None = None
        self.info = backbone.info
        self.reducers = reducers
        first = min(reducers)
        trace = any(reducer.traces_members for reducer in reducers.values())
        self._tracker = _LayoutTracker(backbone, first, trace, check_attention_path(attention))
        self._installed = _Installed(self)
        undo = self._installed.undo
        tower = backbone.model
        blocks = backbone.blocks()
        forwards = {index: _PatchedBlockForward(index, backbone, reducers.get(index), self._tracker)
                    for index in range(first, len(blocks))}
        for index, forward in forwards.items():  # before anything is installed: refused whole
            refuse_bypassed_hooks(forward.ops, index, UnsupportedModelError, "vistok cannot patch")
        try:
            setattr(tower, _INSTALLED_ATTR, self._installed)
            undo.append(partial(delattr, tower, _INSTALLED_ATTR))
            for index, forward in forwards.items():
                blocks[index].forward = forward
                undo.append(partial(delattr, blocks[index], "forward"))
            undo.append(backbone.install_pooling(self._tracker))
            undo.append(backbone.install_input_check(self._tracker))
        except BaseException:
            self._restore()
            raise
        setattr(model, _HANDLE_ATTR, self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_installed" not in state:  # pickled before the undo list moved into _Installed (kept on the handle only)
            installed = _Installed.__new__(_Installed)
            installed.undo = state.pop("_undo")
            state["_installed"] = installed
        vars(self).update(state)
        self._installed.owner = weakref.ref(self)

    @property
    def active(self) -> bool:
        """False once :meth:`remove` has run."""
        return get_handle(self.model) is self

    @property
    def attention(self) -> str:
        """The attention path of the patched blocks: ``"auto"`` (default), ``"sdpa"`` or ``"flex"``; settable.
        See the README's "Compiled, and on GPUs" for which runs when; every path computes the same outputs."""
        return self._tracker.attention

    @attention.setter
    def attention(self, path: str) -> None:
        self._tracker.attention = check_attention_path(path)

    @property
    def layouts(self) -> dict[int, TokenLayout]:
        """The token layout after each patched block, from this thread's last forward pass."""
        return dict(self._tracker.last_call().layouts)

    def tokens_per_block(self) -> list[float]:
        """Mean number of tokens (prefix included, padding excluded) each block output in this thread's last
        forward pass, one entry per block of the model. Blocks before the first patched one keep their input."""
        call = self._tracker.last_call()
        if not call.layouts:
            raise PatchStateError("no forward pass has run through the patched blocks yet (in this thread)")
        if call.layouts[min(call.layouts)].batch_size == 0:
            raise PatchStateError("the last forward pass (in this thread) had an empty batch: no tokens to count")
        counts = [float(call.input_tokens)] * self._tracker.first_block
        counts += [float(call.layouts[i].num_valid().float().mean()) for i in sorted(call.layouts)]
        return counts

    def remove(self) -> None:
        """Restore the model. Calling it again does nothing."""
        if not self.active:
            return
        self._restore()
        delattr(self.model, _HANDLE_ATTR)

    def _restore(self) -> None:
        self._installed.restore()
        self._tracker.clear()

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return (f"PatchHandle({self.config!r} on {self.info.model_class}, blocks "
                f"{sorted(self.reducers)}, {state})")


def patch(model: nn.Module, method: MethodSpec | list[MethodSpec], *, attention: str = "auto",
          **options: Any) -> PatchHandle:
    """Make ``model`` spend fewer tokens with ``method``; reversible with ``handle.remove()``.

    Args:
        model: a supported vision transformer (see the README's table), in any mode and on any device, or a
            supported vision-LLM (``LlavaForConditionalGeneration``) with a boundary method (``merge_to_budget``,
            ``region_merge``, ``dominant``, ``pool``, ``random_select``): then a
            :class:`vistok.adapters.vlm.VisionLLMHandle`.
        method: a registered name (``vistok.list_methods()``), a config object such as
            ``vistok.ATSConfig(k=108)``, or a list of names / ``(name, options)`` pairs / configs applied
            together, e.g. ``[("ats", {"k": 120, "blocks": [3]}), ("merge", {"r": 8, "blocks": [6, 7]})]``.
        attention: how the patched blocks run attention over reduced tokens: ``"auto"``, ``"sdpa"`` or ``"flex"``
            (``vistok.ops.attention``; the same outputs on every path). Vision towers only.
        **options: the method's options when ``method`` is a name, e.g. ``k=108, blocks=range(3, 12)``.

    Returns:
        A :class:`PatchHandle`; also a context manager that removes the patch on exit.

    Raises:
        UnknownMethodError: ``method`` is not registered.
        InvalidConfigError: an option is invalid or does not fit the model.
        UnsupportedModelError: vistok cannot patch this model correctly (nothing is changed).
        AlreadyPatchedError: the model is already patched.
    """
    # a copy: a config object edited after patching (and reused for another model) would change what runs here
    config = copy.deepcopy(create_config(method, **options))
    config.check()
    existing = get_handle(model) if isinstance(model, nn.Module) else None
    if existing is not None:
        raise AlreadyPatchedError(
            f"this {type(model).__name__} is already patched ({existing!r}); call handle.remove() or "
            "vistok.unpatch(model) first")
    from .adapters.vlm import patch_vision_llm, vision_llm_family

    check_attention_path(attention)
    family = vision_llm_family(model)
    if family is not None:
        if attention != "auto":
            raise InvalidConfigError(f"attention={attention!r} applies to vision towers; a vision-LLM's boundary "
                                     "methods run no attention of their own")
        return patch_vision_llm(model, config, family)
    backbone = resolve_backbone(model)
    _check_blocks_unpatched(model, backbone)
    reducers = _checked_reducers(config.build(backbone.info), config, backbone.info.num_blocks)
    return PatchHandle(model, config, backbone, reducers, attention)


def _checked_reducers(reducers: object, config: MethodConfig, depth: int) -> dict[int, TokenReducer]:
    """What a (user's) config's ``build`` returned, with int keys, if it is ``{block index in [0, depth): reducer}``
    with at least one block (numpy ints are indices too): an empty dict was a bare ``min()`` error, an index past
    the last block was ignored.

    Raises:
        InvalidConfigError: anything else.
    """
    name = type(config).__name__
    if not isinstance(reducers, dict) or not reducers:
        raise InvalidConfigError(f"{name}.build must return {{block index: TokenReducer}} for at least one block, got "
                                 f"{reducers!r}")
    checked = {}
    for index, reducer in reducers.items():
        try:
            position = operator.index(index) if not isinstance(index, bool) else -1
        except TypeError:
            position = -1
        if not 0 <= position < depth or not isinstance(reducer, TokenReducer):
            raise InvalidConfigError(f"{name}.build returned {{{index!r}: {type(reducer).__name__}}}: keys must be "
                                     f"block indices in [0, {depth}) and values TokenReducer objects")
        checked[position] = reducer
    return checked


def _check_blocks_unpatched(model: nn.Module, backbone: Backbone) -> None:
    """Refuse a tower that runs patched already, or whose block list holds one module twice (a patched forward
    is installed per module, so a block at two positions would run as one of them)."""
    tower = backbone.model
    installed = vars(tower).get(_INSTALLED_ATTR)
    if isinstance(installed, _Installed):
        if installed.orphaned_after_collecting():
            raise AlreadyPatchedError(
                f"this {type(tower).__name__} still runs patched: it was copied (or pickled) out of a model "
                "vistok patched, without that model's handle, or the patched model was deleted; "
                "vistok.unpatch(it) restores it")
        raise AlreadyPatchedError(f"this {type(tower).__name__} runs patched ({installed.owner()!r}); remove that "
                                  "patch first")
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    seen: dict[int, int] = {}
    for index, block in enumerate(backbone.blocks()):
        name = names.get(id(block), f"block {index}")
        if "forward" in vars(block):
            raise AlreadyPatchedError(f"{type(model).__name__}'s {name} already has a replaced forward "
                                      "(another patch?)")
        if id(block) in seen:
            raise UnsupportedModelError(
                f"blocks {seen[id(block)]} and {index} of {type(model).__name__} are one module ({name}): "
                "vistok replaces a block's forward per module and cannot patch a block that runs at two positions")
        seen[id(block)] = index


def get_handle(model: nn.Module) -> PatchHandle | None:
    """The active handle of a patched model, or ``None`` (also for anything that is not a module)."""
    return vars(model).get(_HANDLE_ATTR) if isinstance(model, nn.Module) else None


def find_handle(model: nn.Module) -> PatchHandle | None:
    """The handle of ``model`` or of the first patched module inside it (e.g. a patched model in a wrapper such
    as :class:`vistok.video.VideoClassifier`), or ``None``."""
    return next((handle for module in model.modules() if (handle := get_handle(module)) is not None), None)


def unpatch(model: nn.Module) -> None:
    """Remove vistok's patch from ``model``, or from the patched models inside it (a wrapper such as
    :class:`vistok.video.VideoClassifier`), or from an image tower copied out of a patched CLIP-style model
    (``CLIPModel``, ``SiglipModel``, open_clip's ``CLIP``) without its handle; a no-op where nothing is patched (or
    ``model`` is no module).

    Raises:
        PatchStateError: ``model`` is a part of a patched model (its blocks run patched, but the handle is the
            whole model's): unpatch the model that was patched.
    """
    if not isinstance(model, nn.Module):  # as get_handle: nothing there is patched
        return
    handles = [handle for module in model.modules() if (handle := get_handle(module)) is not None]
    records = [installed for module in model.modules()
               if isinstance(installed := vars(module).get(_INSTALLED_ATTR), _Installed)]
    orphans = [installed for installed in records if installed.orphaned]
    if not handles and records and not orphans:  # a deleted patched model may be waiting for the collector
        orphans = [installed for installed in records if installed.orphaned_after_collecting()]
    found = {id(handle) for handle in handles}
    owned = any((owner := getattr(handle, "owner", None)) is not None and id(owner) not in found for handle in handles)
    if owned or not handles and not orphans and any(isinstance(value, _PartOfPatch) for module in model.modules()
                                                    for value in vars(module).values()):
        raise PatchStateError(f"unpatch: this {type(model).__name__} is a part of a patched model; unpatch the "
                              "model vistok.patch was given (or call its handle's remove())")
    for handle in handles:
        handle.remove()
    for installed in orphans:
        installed.restore()

