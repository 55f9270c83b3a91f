"""Adaptive Token Sampling (Fayyaz et al., "Adaptive Token Sampling For Efficient Vision Transformers",
ECCV 2022), training-free and differentiable through the kept tokens.

In each chosen block, every patch token is scored by the attention the class token pays it (summed over
heads) times the norm of its value vector; scores are normalised, and :func:`inverse_transform_sampling`
keeps at most ``k`` tokens per image, fewer when the scores are concentrated. The block then computes its
attention output, residuals and MLP only for the kept tokens (all tokens still serve as keys). With ``fusion``
the others are not thrown away: after the attention residual each merges into its most similar kept token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .._checks import is_int, is_real
from ..backbones.base import BackboneInfo
from ..errors import InvalidConfigError, UnsupportedModelError
from ..ops import inverse_transform_sampling, probe_attention, probe_query, significance_scores
from ..tokens import TokenLayout
from .base import AttentionView, MethodConfig, TokenReducer, is_sequence_option, resolve_block_indices

__all__ = ["ATSConfig", "AdaptiveTokenSampler", "default_ats_blocks", "check_k", "PAPER_KEEP_FRACTION"]

# The paper's multi-stage DeiT-S keeps at most K = 108 of its 196 patch tokens in each of blocks 3..11.
PAPER_KEEP_FRACTION = 108 / 196
DEFAULT_MIN_TOKENS = 8  # the floor ATSConfig keeps by default


def default_ats_blocks(depth: int) -> list[int]:
    """The paper's multi-stage placement (blocks 3..11 of 12), scaled: from ``depth / 4`` rounded half up (at least
    block 1, at most the last block: a one-block model samples in it) to the end."""
    start = min(max(1, math.floor(depth / 4 + 0.5)), depth - 1)
    return list(range(start, depth))


class AdaptiveTokenSampler(TokenReducer):
    """ATS in one block.

    Args:
        k: the most patch tokens the block keeps: an int, or a float in (0, 1] meaning that fraction of
            the image's current valid patch tokens (rounded, at least 1). It is the number of CDF levels.
        min_tokens: the block keeps at least ``min(min_tokens, current patch tokens)`` patch tokens.
        trace_source: track which original patches each token stands for (``TokenLayout.owner``).
    """

    def __init__(self, k: int | float, min_tokens: int, fusion: bool = False, trace_source: bool = False) -> None:
        self.k = k
        self.min_tokens = min_tokens
        self.fuses = fusion
        self.traces_members = trace_source

    def __repr__(self) -> str:
        fusion = ", fusion=True" if self.fuses else ""
        return f"AdaptiveTokenSampler(k={self.k}, min_tokens={self.min_tokens}{fusion})"

    def select(self, view: AttentionView) -> Tensor | None:
        layout = view.layout
        prefix = layout.num_prefix
        probe = probe_query(view.q, layout.valid, layout.has_class_token)
        scores = significance_scores(probe_attention(probe, view.k, view.key_bias), view.v, prefix)
        valid = None if layout.valid is None else layout.valid[:, prefix:]
        keep = inverse_transform_sampling(scores, self._levels(scores, valid), valid, self.min_tokens,
                                          max_levels=self._max_levels(scores.shape[1]))
        keep_prefix = torch.ones(keep.shape[0], prefix, dtype=torch.bool, device=keep.device)
        return torch.cat([keep_prefix, keep], dim=1)

    def max_kept(self, layout: TokenLayout) -> int:
        patches = layout.num_tokens - layout.num_prefix
        return layout.num_prefix + min(patches, max(self._max_levels(patches), self.min_tokens))

    def keeps_exactly(self, layout: TokenLayout) -> bool:
        patches = layout.num_tokens - layout.num_prefix
        return layout.valid is None and self.min_tokens >= self._max_levels(patches)  # a fixed budget

    def _max_levels(self, patches: int) -> int:
        """The most levels an image with at most ``patches`` patch tokens gets."""
        return self.k if isinstance(self.k, int) else max(1, round(patches * self.k))

    def _levels(self, scores: Tensor, valid: Tensor | None) -> int | Tensor:
        if isinstance(self.k, int):
            return self.k
        counts = torch.full((scores.shape[0],), scores.shape[1], device=scores.device) if valid is None \
            else valid.sum(dim=1)
        return (counts.double() * self.k).round().long().clamp_min(1)  # float64: as _max_levels rounds


@dataclass
class ATSConfig(MethodConfig):
    """Options of ``vistok.patch(model, "ats", ...)``.

    Attributes:
        k: the most patch tokens a block keeps. An int (1 .. the model's patch count), a float in (0, 1]
            (fraction of the block's current patch tokens), or a sequence with one value per block.
            ``None``: the paper's setting, ``round(108 / 196 * patch count)`` in every block (108 on a
            224 px /16 model; at least ``min_tokens``), the count of the model's native grid whatever the input's
            size.
        blocks: indices of the blocks that sample. ``None``: the paper's multi-stage placement, blocks
            3..11 on a 12-block model, scaled to other depths (``default_ats_blocks``).
        min_tokens: a block never keeps fewer than this many patch tokens (nor more than it has; up to 8, the
            default, it is capped at the patch count of a model of fewer patches; above 8 and above the patch
            count it is refused). An int ``k``
            below it is refused (the floor would override it); a fractional ``k`` gives way to it.
            ``k = min_tokens = patch count`` keeps every token: the patched model then computes exactly
            what the unpatched one does.
        fusion: the tokens a block does not sample are merged into the kept patch token whose key is most
            similar (size-weighted, with proportional attention from then on, as merging does) instead of
            being dropped. The block's attention then runs over every token; the MLP over the kept ones.
        trace_source: track which original patches each token stands for (``TokenLayout.owner``), for
            visualisation (``vistok.viz``): with fusion, the patches fused into a kept token.
    """

    k: int | float | Sequence[int | float] | None = None
    blocks: Sequence[int] | None = None
    min_tokens: int = DEFAULT_MIN_TOKENS
    fusion: bool = False
    trace_source: bool = False

    name: ClassVar[str] = "ats"

    def __post_init__(self) -> None:  # what needs no model; build() checks the rest against it
        for k in self._k_values():
            check_k(k, None)
        if not is_int(self.min_tokens, 1):
            raise InvalidConfigError(f"ats: min_tokens must be an int >= 1, got {self.min_tokens!r}")
        below = [k for k in self._k_values() if isinstance(k, int) and k < self.min_tokens]
        if below:  # the floor would win, and k would not be the most a block keeps
            raise InvalidConfigError(
                f"ats: k={below[0]} is below min_tokens={self.min_tokens}: a block would keep {self.min_tokens} patch "
                f"tokens, not at most {below[0]}; pass min_tokens={below[0]} or less (its default is 8)")
        for option in ("fusion", "trace_source"):
            if not isinstance(getattr(self, option), bool):
                raise InvalidConfigError(f"ats: {option} must be a bool, got {getattr(self, option)!r}")

    def _k_values(self) -> list[object]:
        """The ``k`` values given: none, one, or one per block."""
        if self.k is None:
            return []
        return list(self.k) if is_sequence_option(self.k) else [self.k]

    def build(self, info: BackboneInfo) -> dict[int, TokenReducer]:
        blocks = resolve_block_indices(self.blocks, info.num_blocks, default_ats_blocks(info.num_blocks))
        budgets = self._per_block_k(info, len(blocks))
        bound = info.patch_bound()
        min_tokens = self.min_tokens
        if bound is not None and is_int(min_tokens) and min_tokens <= DEFAULT_MIN_TOKENS:
            min_tokens = min(min_tokens, bound)  # a floor up to the default's on a grid of fewer patches: all of them
        if not is_int(min_tokens, 1) or bound is not None and min_tokens > bound:
            limit = "[1, the input's patch tokens]" if bound is None else f"[1, {bound}] (the model's patch tokens)"
            raise InvalidConfigError(f"ats: min_tokens must be an int in {limit}, got {min_tokens!r}")
        if self.fusion and info.rotary:
            raise UnsupportedModelError(f"ats: fusion on {info.model_class}, which uses rotary position embeddings: a "
                                        "fused token has no single position to rotate by (use fusion=False)")
        return {block: AdaptiveTokenSampler(k, min_tokens, self.fusion, self.trace_source)
                for block, k in sorted(zip(blocks, budgets, strict=True))}

    def _per_block_k(self, info: BackboneInfo, num_blocks: int) -> list[int | float]:
        if self.k is None:  # at least min_tokens, which would win over it otherwise (on grids of 13 patches or fewer)
            return [min(info.num_patches, max(round(PAPER_KEEP_FRACTION * info.num_patches), self.min_tokens))
                    ] * num_blocks
        if is_sequence_option(self.k):
            if len(self.k) != num_blocks:
                raise InvalidConfigError(
                    f"ats: k has {len(self.k)} values but {num_blocks} blocks are patched; give one k or "
                    "one per block")
            return [check_k(k, info.patch_bound()) for k in self.k]
        return [check_k(self.k, info.patch_bound())] * num_blocks


def check_k(k: object, num_patches: int | None, method: str = "ats") -> int | float:
    """``k`` as an int in ``[1, num_patches]`` or a fraction in ``(0, 1]`` (``num_patches=None``: no upper bound
    for an int: not known yet, or the model takes inputs of other sizes)."""
    if not is_real(k):
        raise InvalidConfigError(f"{method}: k must be an int or a float, got {type(k).__name__} {k!r}")
    if isinstance(k, int):
        if num_patches is None:
            if k < 1:
                raise InvalidConfigError(f"{method}: k={k} is outside [1, the model's patch tokens]")
        elif not 1 <= k <= num_patches:
            raise InvalidConfigError(
                f"{method}: k={k} is outside [1, {num_patches}]: the model has {num_patches} patch tokens (a "
                "fractional k scales with the input)")
        return k
    if not 0.0 < k <= 1.0:
        raise InvalidConfigError(f"{method}: a fractional k must be in (0, 1], got {k}")
    return float(k)
