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
    """Keep ``min(k, valid patch tokens)`` patch tokens per image, uniformly at random.

    Every call draws from a fresh generator seeded with ``seed``: the same batch keeps the same tokens on every
    call (a reproducible baseline), and concurrent calls share no generator state.
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
        keep_count = counts.clamp(max=self.k) if isinstance(self.k, int) else (counts * self.k).round().clamp_min(1)
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.rand(valid.shape, generator=generator).to(view.q.device).masked_fill(~valid, -1.0)
        rank = noise.argsort(dim=1, descending=True).argsort(dim=1)
        keep = rank < keep_count[:, None]
        if bool(keep.all()):
            return None
        return torch.cat([torch.ones(keep.shape[0], prefix, dtype=torch.bool, device=keep.device), keep], dim=1)


@dataclass
class RandomDropConfig(MethodConfig):
    """``vistok.patch(model, "random_drop", k=..., blocks=..., seed=0)``: ``k`` and ``blocks`` as for ATS.
    Block ``b`` draws from a generator seeded with ``seed + b`` afresh on every call."""

    k: int | float | Sequence[int | float] = 0.5
    blocks: Sequence[int] | None = None
    seed: int = 0

    name: ClassVar[str] = "random_drop"

    def __post_init__(self) -> None:  # what needs no model; build() checks the rest against it
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**62:
            raise InvalidConfigError(f"random_drop: seed must be an int in [0, 2**62), got {self.seed!r}")
        for k in self.k if isinstance(self.k, Sequence) and not isinstance(self.k, str) else [self.k]:
            check_k(k, None, "random_drop")

    def build(self, info: BackboneInfo) -> dict[int, TokenReducer]:
        blocks = resolve_block_indices(self.blocks, info.num_blocks, default_ats_blocks(info.num_blocks))
        ks = list(self.k) if isinstance(self.k, Sequence) else [self.k] * len(blocks)
        if len(ks) != len(blocks):
            raise InvalidConfigError(f"random_drop: k has {len(ks)} values but {len(blocks)} blocks are patched")
        return {block: RandomDropper(check_k(k, info.num_patches, "random_drop"), self.seed + block)
                for block, k in zip(blocks, ks, strict=True)}
