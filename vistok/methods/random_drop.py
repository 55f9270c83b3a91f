"""A baseline, not a method to use: keep ``k`` patch tokens chosen at random in each chosen block. It answers
"is the method's choice of tokens better than chance at the same token count?"."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..backbones.base import BackboneInfo
from ..errors import InvalidConfigError
from .ats import check_k, default_ats_blocks
from .base import AttentionView, MethodConfig, TokenReducer, resolve_block_indices

__all__ = ["RandomDropConfig", "RandomDropper"]


class RandomDropper(TokenReducer):
    """Keep ``min(k, valid patch tokens)`` patch tokens per image, uniformly at random (seeded)."""

    def __init__(self, k: int | float, seed: int) -> None:
        self.k = k
        self.generator = torch.Generator().manual_seed(seed)

    def select(self, view: AttentionView) -> Tensor | None:
        layout = view.layout
        prefix = layout.num_prefix
        valid = layout.valid_mask(view.q.device)[:, prefix:]
        counts = valid.sum(dim=1)
        keep_count = counts.clamp(max=self.k) if isinstance(self.k, int) else (counts * self.k).round().clamp_min(1)
        noise = torch.rand(valid.shape, generator=self.generator).to(view.q.device).masked_fill(~valid, -1.0)
        rank = noise.argsort(dim=1, descending=True).argsort(dim=1)
        keep = rank < keep_count[:, None]
        if bool(keep.all()):
            return None
        return torch.cat([torch.ones(keep.shape[0], prefix, dtype=torch.bool, device=keep.device), keep], dim=1)


@dataclass
class RandomDropConfig(MethodConfig):
    """``vistok.patch(model, "random_drop", k=..., blocks=..., seed=0)``: ``k`` and ``blocks`` as for ATS."""

    k: int | float | Sequence[int | float] = 0.5
    blocks: Sequence[int] | None = None
    seed: int = 0

    name: ClassVar[str] = "random_drop"

    def build(self, info: BackboneInfo) -> dict[int, TokenReducer]:
        blocks = resolve_block_indices(self.blocks, info.num_blocks, default_ats_blocks(info.num_blocks))
        ks = list(self.k) if isinstance(self.k, Sequence) else [self.k] * len(blocks)
        if len(ks) != len(blocks):
            raise InvalidConfigError(f"random_drop: k has {len(ks)} values but {len(blocks)} blocks are patched")
        return {block: RandomDropper(check_k(k, info.num_patches, "random_drop"), self.seed + block)
                for block, k in zip(blocks, ks, strict=True)}
