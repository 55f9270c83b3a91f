"""What a token-reduction method is to the engine: a config that builds one reducer per chosen block."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from .._checks import is_int
from ..backbones.base import BackboneInfo, BlockOps
from ..errors import InvalidConfigError
from ..tokens import TokenLayout

__all__ = ["AttentionView", "TokenReducer", "MethodConfig", "is_sequence_option", "resolve_block_indices"]


@dataclass(frozen=True)
class AttentionView:
    """What a block exposes to a method, just before its attention runs.

    ``q``, ``k``, ``v``: ``[B, H, N, d]`` after the model's own q/k norms and rotary embedding.
    ``key_bias``: ``[B, 1, 1, N]`` additive bias the block's attention uses (padding, sizes) or ``None``.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    layout: TokenLayout
    key_bias: Tensor | None


class TokenReducer:
    """The per-block part of a method. A block calls ``select`` before its attention, ``attend`` in place of
    its attention, and ``merge`` after the attention residual (before the MLP); each returns ``None`` to
    leave the block as it is."""

    #: whether the method needs ``TokenLayout.owner`` (which position stands for each original token)
    traces_members: bool = False
    #: the tokens ``select`` does not keep are not dropped before attention: attention runs over every token,
    #: then each of them merges into the kept token whose key is most similar (size-weighted), before the MLP
    fuses: bool = False
    #: ``attend`` needs every patch token on the grid (nothing dropped, merged or padded before it)
    needs_whole_grid: bool = False

    @property
    def merges(self) -> bool:
        """Whether :meth:`merge` may merge, so the block must keep the keys until after attention."""
        return type(self).merge is not TokenReducer.merge

    #: ``torch.jit.trace`` may record :meth:`select`: which tokens it keeps, and how many, never depend on their
    #: values (a reducer that keeps a fixed set); a tracing of one that selects and is not traceable is refused
    traceable: bool = False

    @property
    def selects(self) -> bool:
        """Whether :meth:`select` may drop tokens before attention (which ones, and how many, may depend on their
        values)."""
        return type(self).select is not TokenReducer.select

    def select(self, view: AttentionView) -> Tensor | None:
        """``[B, N]`` bool keep mask over the block's input tokens (prefix positions must be True,
        padding False), or ``None`` to keep everything. Only kept tokens are computed from here on."""
        return None

    def max_kept(self, layout: TokenLayout) -> int | None:
        """The most tokens (prefix included) ``select`` can keep per image, known without looking at the tokens,
        or ``None``. On a GPU the block pads to this bound instead of reading the kept counts back, which would
        wait for every queued kernel. A reducer that gives a bound must keep every prefix token."""
        return None

    def keeps_exactly(self, layout: TokenLayout) -> bool:
        """Whether every image keeps exactly :meth:`max_kept` tokens, known without looking at the tokens: the
        block then needs no padding mask (and attention keeps its unmasked fused kernel)."""
        return False

    def attend(self, ops: BlockOps, h: Tensor, layout: TokenLayout, path: str = "auto") -> Tensor | None:
        """Compute the block's attention another way: normalised tokens ``h`` ``[B, N, C]`` -> the per-head
        attention output ``[B, H, N, d]`` (before the output projection), using the block's own ``ops`` and the
        handle's attention ``path`` (:func:`vistok.ops.attention.attend`); ``None`` for the usual attention. A
        block that overrides this cannot also select or merge."""
        return None

    def merge(self, x: Tensor, keys: Tensor, layout: TokenLayout) -> tuple[Tensor, TokenLayout] | None:
        """Merge tokens after attention: ``x`` ``[B, N, C]``, their keys ``[B, H, N, d]`` and layout ->
        fewer tokens and their layout, or ``None``. Prefix positions must stay in front, unchanged."""
        return None


@dataclass
class MethodConfig(ABC):
    """Base of the dataclass configs (``vistok.ATSConfig``, ...). ``name`` is the registry key."""

    name: ClassVar[str]

    def check(self) -> None:
        """Check again what the config checked when it was made (its ``__post_init__``), so that a field set since
        then is checked too; ``vistok.patch`` calls it before ``build``.

        Raises:
            InvalidConfigError: an option is invalid.
        """
        post_init = getattr(self, "__post_init__", None)
        if post_init is not None:
            post_init()

    @abstractmethod
    def build(self, info: BackboneInfo) -> dict[int, TokenReducer]:
        """Validate against the model and return ``{block index: reducer}``.

        Raises:
            InvalidConfigError: an option is out of range or does not fit the model.
        """


def is_sequence_option(value: object) -> bool:
    """Whether an option's ``value`` is a sequence of values (one per block, or ``(h, w)``); text and bytes are
    single values, which the option's own check refuses."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))


def resolve_block_indices(blocks: Sequence[int] | None, depth: int, default: Sequence[int]) -> list[int]:
    """Validate block indices against a model of ``depth`` blocks; negative indices count from the end.

    Returns the indices, non-negative, in the order given (``default`` when ``blocks`` is ``None``): a method's
    per-block values (``k=[...]``, ``r=[...]``) pair with them in that order.

    Raises:
        InvalidConfigError: not a sequence of ints, empty, out of range, or repeated.
    """
    if blocks is None:
        blocks = default
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence):
        raise InvalidConfigError(f"blocks must be a sequence of block indices, got {blocks!r}")
    if len(blocks) == 0:
        raise InvalidConfigError("blocks is empty: there is nothing to patch")
    resolved = []
    for block in blocks:
        if not is_int(block):
            raise InvalidConfigError(f"blocks must hold ints, got {block!r}")
        if not -depth <= block < depth:
            raise InvalidConfigError(f"block index {block} is out of range: the model has {depth} blocks")
        resolved.append(block % depth)
    if len(set(resolved)) != len(resolved):
        raise InvalidConfigError(f"blocks {list(blocks)} name the same block twice")
    return resolved
