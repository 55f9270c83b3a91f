"""A baseline, not a method to use: keep ``k`` patch tokens chosen at random in each chosen block. It answers
"is the method's choice of tokens better than chance at the same token count?"."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .._checks import is_int
from ..backbones.base import BackboneInfo
from ..errors import InvalidConfigError
from ..ops import hashed_noise
from ..tokens import TokenLayout
from .ats import check_k, default_ats_blocks
from .base import AttentionView, MethodConfig, TokenReducer, is_sequence_option, resolve_block_indices

__all__ = ["RandomDropConfig", "RandomDropper"]


class RandomDropper(TokenReducer):
    """Keep ``min(k, valid patch tokens)`` patch tokens per image, uniformly at random.

    The draw is a hash of ``(seed, image's position in the batch, token position)`` (``vistok.ops.hashed_noise``):
    the same batch keeps the same tokens on every call and every device (a reproducible baseline), concurrent
    calls share no state, and nothing is drawn on the host, so it compiles and never waits for a GPU.
    """

    def __init__(self, k: int | float, seed: int) -> None:
        self.k = k
        self.seed = seed

    def __repr__(self) -> str:
        return f"RandomDropper(k={self.k}, seed={self.seed})"

    def select(self, view: AttentionView) -> Tensor | None:
        layout = view.layout
        prefix = layout.num_prefix
        valid = layout.valid_mask(view.q.device)[:, prefix:]
        counts = valid.sum(dim=1)
        if layout.valid is None and self._max_patches(layout.num_patches) == layout.num_patches:
            return None  # keeps every token, known without looking at them
        # in float64, as max_kept's Python arithmetic: a float32 product can round the other way at .5
        keep_count = counts.clamp(max=self.k) if isinstance(self.k, int) \
            else (counts.double() * self.k).round().long().clamp_min(1)
        noise = hashed_noise(self.seed, *valid.shape, device=valid.device).masked_fill(~valid, -1)
        rank = noise.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        keep = rank < keep_count[:, None]
        return torch.cat([torch.ones(keep.shape[0], prefix, dtype=torch.bool, device=keep.device), keep], dim=1)

    def max_kept(self, layout: TokenLayout) -> int:
        return layout.num_prefix + self._max_patches(layout.num_patches)

    def keeps_exactly(self, layout: TokenLayout) -> bool:
        return layout.valid is None  # every image has all its patches, so each keeps the bound

    def _max_patches(self, patches: int) -> int:
        """The most patch tokens an image with at most ``patches`` of them keeps."""
        return min(patches, self.k) if isinstance(self.k, int) else min(patches, max(1, round(patches * self.k)))


@dataclass
class RandomDropConfig(MethodConfig):
    """``vistok.patch(model, "random_drop", k=..., blocks=..., seed=0)``: ``k`` and ``blocks`` as for ATS, but ``k``
    defaults to 0.5, half of the patch tokens each block receives, which compounds over the blocks (ViT-S keeps 1
    patch token after blocks 3..11, where ATS's default keeps at most 108 in each): pass the same ``k`` to compare.
    Block ``b`` draws with seed ``seed + b``, afresh on every call (the same tokens for the same batch)."""

    k: int | float | Sequence[int | float] = 0.5
    blocks: Sequence[int] | None = None
    seed: int = 0

    name: ClassVar[str] = "random_drop"

    def __post_init__(self) -> None:  # what needs no model; build() checks the rest against it
        if not is_int(self.seed) or not 0 <= self.seed < 2**62:
            raise InvalidConfigError(f"random_drop: seed must be an int in [0, 2**62), got {self.seed!r}")
        for k in self.k if is_sequence_option(self.k) else [self.k]:
            check_k(k, None, "random_drop")

    def build(self, info: BackboneInfo) -> dict[int, TokenReducer]:
        blocks = resolve_block_indices(self.blocks, info.num_blocks, default_ats_blocks(info.num_blocks))
        ks = list(self.k) if is_sequence_option(self.k) else [self.k] * len(blocks)
        if len(ks) != len(blocks):
            raise InvalidConfigError(f"random_drop: k has {len(ks)} values but {len(blocks)} blocks are patched")
        return {block: RandomDropper(check_k(k, info.patch_bound(), "random_drop"), self.seed + block)
                for block, k in sorted(zip(blocks, ks, strict=True))}
