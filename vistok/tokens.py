"""The bookkeeping that travels with the tokens through a patched model.

The tokens themselves (``x``, ``[B, N, C]``) flow through the model's blocks as plain tensors, exactly as
upstream. Beside them, a :class:`TokenLayout` says what each of the ``N`` positions stands for:

* ``source``  ``[B, N]`` long: the index of the original token (in the model's own sequence order, prefix
  tokens first) that this position carries; ``None`` while the sequence is still the original one.
* ``valid``   ``[B, N]`` bool: ``False`` for padding. Images of one batch keep different numbers of tokens;
  the batch is padded to the largest count. ``None`` means every position is valid.
* ``sizes``   ``[B, N]`` float: how many original patches a token stands for (merging); ``None`` means 1.
  With ``proportional`` (default) attention adds ``log(size)`` to a token's key logit, so a token merged
  from ``s`` equal tokens is attended to as those ``s`` tokens were. ``fused``: an ATS fusion sized the tokens,
  and attention stays proportional whatever a later merge asks.
* ``num_prefix``: the class, distillation and register tokens at the front. No method drops, merges or
  moves them: positions ``0 .. num_prefix - 1`` always hold them.
* ``has_class_token``: whether position 0 is a class token.
* ``grid_size``: the original patch grid, ``(h, w)`` for images, ``(t, h, w)`` for video (``None`` when the
  model's input did not match it, e.g. a dynamic image size): with ``source`` it gives every token's original
  grid position (:meth:`TokenLayout.grid_positions`).
* ``owner`` ``[B, N0]`` long, only when source tracing is on: for each of the ``N0`` original tokens, the
  position of the token that now stands for it (a merged token stands for several), ``-1`` once dropped.
  :meth:`TokenLayout.members` turns it into the ``[B, N, N0]`` mask on demand.

A layout never holds the token values, so keeping the layouts of every block (for visualisation and
measurement) costs ``O(B * N0)`` integers per block, with tracing too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .errors import PatchStateError
from .ops.gather import gather_tokens
from .ops.merging import Matching, size_dtype

__all__ = ["TokenLayout"]


def _follow(owner: Tensor, moved: Tensor) -> Tensor:
    """``owner`` ``[B, N0]`` after every old position ``p`` moved to ``moved[:, p]`` (``-1``: dropped)."""
    return torch.where(owner >= 0, moved.gather(1, owner.clamp_min(0)), owner)


@dataclass(frozen=True)
class TokenLayout:
    """What each token position of a ``[B, N, C]`` sequence stands for (see the module docstring)."""

    batch_size: int
    num_tokens: int
    num_prefix: int
    has_class_token: bool
    source: Tensor | None = None
    valid: Tensor | None = None
    sizes: Tensor | None = None
    owner: Tensor | None = None
    proportional: bool = True
    grid_size: tuple[int, ...] | None = None
    fused: bool = False

    @classmethod
    def original(cls, x: Tensor, num_prefix: int, has_class_token: bool, trace: bool = False,
                 grid_size: tuple[int, ...] | None = None) -> TokenLayout:
        """The layout of an unreduced sequence ``x`` of shape ``[B, N, C]`` (``trace``: track ``owner``) on a
        patch grid of ``grid_size`` (dropped when ``N - num_prefix`` is not its size)."""
        batch_size, num_tokens = x.shape[:2]
        owner = torch.arange(num_tokens, device=x.device).expand(batch_size, -1) if trace else None
        if grid_size is not None and math.prod(grid_size) != num_tokens - num_prefix:
            grid_size = None
        return cls(batch_size, num_tokens, num_prefix, has_class_token, owner=owner,
                   grid_size=None if grid_size is None else tuple(grid_size))

    @property
    def is_original(self) -> bool:
        """True while no token has been dropped, merged or padded."""
        return self.source is None and self.valid is None and self.sizes is None

    @property
    def num_patches(self) -> int:
        """Positions after the prefix (valid or not)."""
        return self.num_tokens - self.num_prefix

    def source_index(self, device: torch.device | None = None) -> Tensor:
        """``[B, N]`` original token index of every position (materialised if still the identity)."""
        if self.source is not None:
            return self.source
        return torch.arange(self.num_tokens, device=device).expand(self.batch_size, -1)

    def valid_mask(self, device: torch.device | None = None) -> Tensor:
        """``[B, N]`` bool, True for real tokens."""
        if self.valid is not None:
            return self.valid
        return torch.ones(self.batch_size, self.num_tokens, dtype=torch.bool, device=device)

    def num_valid(self, device: torch.device | None = None) -> Tensor:
        """``[B]`` number of real tokens per image, prefix included."""
        if self.valid is None:
            return torch.full((self.batch_size,), self.num_tokens, dtype=torch.long, device=device)
        return self.valid.sum(dim=1)

    def select(self, index: Tensor, valid: Tensor | None) -> TokenLayout:
        """The layout after keeping positions ``index`` (``[B, K]``) of this one.

        ``valid`` (``[B, K]`` or ``None``) marks which entries of ``index`` are real; padding entries may
        point anywhere. The prefix must be kept at positions ``0 .. num_prefix - 1``.
        """
        source = gather_tokens(self.source_index(index.device), index)
        sizes = None if self.sizes is None else gather_tokens(self.sizes, index)
        owner = None
        if self.owner is not None:
            kept = torch.arange(index.shape[1], device=index.device).expand_as(index)
            target = index if valid is None else index.masked_fill(~valid, self.num_tokens)  # padding: a spare slot
            moved = torch.full((self.batch_size, self.num_tokens + 1), -1, dtype=torch.long, device=index.device)
            owner = _follow(self.owner, moved.scatter_(1, target, kept)[:, :-1])
        return replace(self, num_tokens=index.shape[1], source=source, valid=valid, sizes=sizes, owner=owner)

    def token_weights(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``[B, N]`` size of every position, 0 for padding."""
        weights = torch.ones(self.batch_size, self.num_tokens, dtype=dtype, device=device) \
            if self.sizes is None else self.sizes.to(dtype)
        return weights if self.valid is None else weights * self.valid.to(dtype)

    def rearrange_merged(self, matching: Matching, weights: Tensor) -> TokenLayout:
        """The layout of ``merge_weighted``'s output over the non-prefix positions: laid out in
        ``matching.order`` (prefix first), sizes ``weights`` ``[B, N]`` (prefix included), valid where the
        weight is positive. A merged token keeps the source of the token it merged into. Follow with
        ``select`` to drop the merged-away positions."""
        prefix = self.num_prefix
        device = weights.device
        order = torch.cat([torch.arange(prefix, device=device), matching.order + prefix])
        source = self.source_index(device)[:, order]
        owner = None
        if self.owner is not None:
            moved = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=device))
            moved = moved.expand(self.batch_size, -1).clone()
            partner = prefix + len(matching.a_positions) + matching.target  # new position of each A token's target
            a_old = prefix + matching.a_positions
            moved[:, a_old] = torch.where(matching.merged, partner, moved[:, a_old])
            owner = _follow(self.owner, moved)
        return replace(self, source=source, valid=weights > 0, sizes=weights, owner=owner)

    def fuse(self, target: Tensor, weights: Tensor) -> TokenLayout:
        """The layout after every position ``p`` merged into position ``target[:, p]`` (itself where it stays),
        with sizes ``weights`` ``[B, N]`` (0 where merged away); follow with ``select`` to drop those positions.
        A fused token keeps its own source, and attention counts sizes from here on (proportional attention, which
        fusion always uses, also after a merge that turned it off)."""
        owner = None if self.owner is None else _follow(self.owner, target)
        return replace(self, sizes=weights, owner=owner, proportional=True, fused=True)

    def members(self) -> Tensor:
        """``[B, N, N0]`` bool: which original tokens each position stands for (needs ``owner``, i.e. source
        tracing; ``O(N x N0)`` memory, so only for inspection)."""
        if self.owner is None:
            raise PatchStateError("members need source tracing (e.g. vistok.patch(model, 'merge', trace_source=True))")
        positions = torch.arange(self.num_tokens, device=self.owner.device)
        return self.owner[:, None, :] == positions[None, :, None]

    def grid_positions(self, device: torch.device | None = None) -> Tensor:
        """``[B, N, D]`` long: the original grid coordinates (``(t, h, w)`` or ``(h, w)``) of the token at each
        position (for a merged token, the source of the token it merged into); ``-1`` for prefix tokens."""
        if self.grid_size is None:
            raise PatchStateError("this layout has no patch grid (the input did not match the model's grid)")
        patch = self.source_index(device) - self.num_prefix
        coordinates = []
        for size in reversed(self.grid_size):
            coordinates.append(patch % size)
            patch = patch // size
        positions = torch.stack(coordinates[::-1], dim=-1)
        return positions.masked_fill((self.source_index(device) < self.num_prefix)[..., None], -1)

    def key_bias(self, dtype: torch.dtype) -> Tensor | None:
        """Additive attention bias ``[B, 1, 1, N]`` over keys: ``-inf`` for padding, ``log(size)`` for
        merged tokens (proportional attention). ``None`` when neither applies, so SDPA runs unmasked."""
        sizes = self.sizes if self.proportional else None
        if self.valid is None and sizes is None:
            return None
        if sizes is not None:
            bias = sizes.log().to(dtype)  # the log of the exact count (bfloat16 would round a size of 257 to 256)
        else:
            bias = torch.zeros(self.valid.shape, dtype=dtype, device=self.valid.device)
        if self.valid is not None:
            bias = bias.masked_fill(~self.valid, float("-inf"))
        return bias[:, None, None, :]

    def mean_over(self, tokens: Tensor, start: int) -> Tensor:
        """The mean of ``tokens`` ``[B, N - start, C]`` (this layout's positions ``start:``) over the patches they
        stand for: each token weighted by its size, padding left out; ``[B, C]``. Summed in at least float32 (a
        bfloat16 sum of sizes rounds past 256), returned in ``tokens``' dtype."""
        if self.valid is None and self.sizes is None:
            return tokens.mean(dim=1)
        work = size_dtype(tokens.dtype)
        weights = self.token_weights(work, tokens.device)[:, start:, None]
        return ((tokens.to(work) * weights).sum(dim=1) / weights.sum(dim=1)).to(tokens.dtype)
