"""The bookkeeping that travels with the tokens through a patched model.

The tokens themselves (``x``, ``[B, N, C]``) flow through the model's blocks as plain tensors, exactly as
upstream. Beside them, a :class:`TokenLayout` says what each of the ``N`` positions stands for:

* ``source``  ``[B, N]`` long: the index of the original token (in the model's own sequence order, prefix
  tokens first) that this position carries; ``None`` while the sequence is still the original one.
* ``valid``   ``[B, N]`` bool: ``False`` for padding. Images of one batch keep different numbers of tokens;
  the batch is padded to the largest count. ``None`` means every position is valid.
* ``sizes``   ``[B, N]`` float: how many original patches a token stands for (merging); ``None`` means 1.
  With ``proportional`` (default) attention adds ``log(size)`` to a token's key logit, so a token merged
  from ``s`` equal tokens is attended to as those ``s`` tokens were.
* ``num_prefix``: the class, distillation and register tokens at the front. No method drops, merges or
  moves them: positions ``0 .. num_prefix - 1`` always hold them.
* ``has_class_token``: whether position 0 is a class token.
* ``members`` ``[B, N, N0]`` bool, only when source tracing is on: which of the ``N0`` original tokens each
  position stands for (a merged token stands for several).

A layout never holds the token values, so keeping the layouts of every block (for visualisation and
measurement) costs ``O(B * N)`` integers per block.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .ops.gather import gather_tokens
from .ops.merging import Matching, merge_weighted

__all__ = ["TokenLayout"]


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
    members: Tensor | None = None
    proportional: bool = True

    @classmethod
    def original(cls, x: Tensor, num_prefix: int, has_class_token: bool, trace: bool = False) -> TokenLayout:
        """The layout of an unreduced sequence ``x`` of shape ``[B, N, C]`` (``trace``: track members)."""
        batch_size, num_tokens = x.shape[:2]
        members = None
        if trace:
            members = torch.eye(num_tokens, dtype=torch.bool, device=x.device).expand(batch_size, -1, -1)
        return cls(batch_size, num_tokens, num_prefix, has_class_token, members=members)

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
        members = None if self.members is None else gather_tokens(self.members, index)
        return replace(self, num_tokens=index.shape[1], source=source, valid=valid, sizes=sizes, members=members)

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
        members = None
        if self.members is not None:
            ones = torch.ones(self.members.shape[:2], device=device)[:, prefix:]
            merged = merge_weighted(self.members[:, prefix:].float(), ones, matching)[0] > 0
            members = torch.cat([self.members[:, :prefix], merged], dim=1)
        return replace(self, source=source, valid=weights > 0, sizes=weights, members=members)

    def key_bias(self, dtype: torch.dtype) -> Tensor | None:
        """Additive attention bias ``[B, 1, 1, N]`` over keys: ``-inf`` for padding, ``log(size)`` for
        merged tokens (proportional attention). ``None`` when neither applies, so SDPA runs unmasked."""
        sizes = self.sizes if self.proportional else None
        if self.valid is None and sizes is None:
            return None
        if sizes is not None:
            bias = sizes.to(dtype).log()
        else:
            bias = torch.zeros(self.valid.shape, dtype=dtype, device=self.valid.device)
        if self.valid is not None:
            bias = bias.masked_fill(~self.valid, float("-inf"))
        return bias[:, None, None, :]

    def pooling_weights(self, dtype: torch.dtype, start: int) -> Tensor | None:
        """``[B, N - start, 1]`` weights for averaging positions ``start:``: size for valid tokens, 0 for
        padding. ``None`` when a plain mean is right."""
        if self.valid is None and self.sizes is None:
            return None
        weights = self.valid.to(dtype) if self.sizes is None else self.sizes.to(dtype)
        if self.sizes is not None and self.valid is not None:
            weights = weights * self.valid.to(dtype)
        return weights[:, start:, None]
