"""Token merging (ToMe; Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023), training-free.

In each chosen block, after the attention residual and before the MLP, the patch tokens are split into
alternating sets A and B, each A token is matched to its most similar B token (cosine similarity of the
keys averaged over heads), and the ``r`` best-matched A tokens are merged into their B partners by a
size-weighted average. Sizes are tracked, and attention adds ``log(size)`` to each key (proportional
attention) so a merged token weighs as much as the tokens it replaced. Prefix tokens never merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor

from .._checks import is_int
from ..backbones.base import BackboneInfo
from ..errors import InvalidConfigError, UnsupportedModelError
from ..ops import sync
from ..ops.gather import gather_tokens, keep_mask_to_index
from ..ops.merging import bipartite_soft_matching, merge_weighted, size_dtype
from ..tokens import TokenLayout
from .base import MethodConfig, TokenReducer, is_sequence_option, resolve_block_indices

__all__ = ["MergeConfig", "TokenMerger", "merge_schedule"]

_SCHEDULES = ("constant", "decreasing")


class TokenMerger(TokenReducer):
    """ToMe in one block: each image removes ``r`` tokens, or half of its patch tokens if that is fewer."""

    def __init__(self, r: int, proportional_attention: bool = True, trace_source: bool = False) -> None:
        self.r = r
        self.proportional_attention = proportional_attention
        self.traces_members = trace_source

    def __repr__(self) -> str:
        return f"TokenMerger(r={self.r})"

    def merge(self, x: Tensor, keys: Tensor, layout: TokenLayout) -> tuple[Tensor, TokenLayout] | None:
        prefix = layout.num_prefix
        if layout.num_patches < 2:  # no pair left to merge, known from the shape alone
            return None
        if layout.valid is None:  # every image has the same tokens: r is known without reading the device
            r = min(self.r, (layout.num_tokens - prefix) // 2)
            if r == 0:
                return None
        else:
            r = torch.clamp((layout.num_valid(x.device) - prefix) // 2, max=self.r)
            if sync.reads_are_free(x.device) and not bool((r > 0).any()):
                return None
        weights = layout.token_weights(size_dtype(x.dtype), x.device)
        valid = None if layout.valid is None else layout.valid[:, prefix:]
        matching = bipartite_soft_matching(keys.mean(dim=1)[:, prefix:], r, valid)
        merged, merged_weights = merge_weighted(x[:, prefix:], weights[:, prefix:], matching)
        weights = torch.cat([weights[:, :prefix], merged_weights], dim=1)
        arranged = layout.rearrange_merged(matching, weights)
        if isinstance(r, int):
            index, valid = keep_mask_to_index(arranged.valid, layout.num_tokens - r, uniform=True)
        elif sync.reads_are_free(x.device):
            index, valid = keep_mask_to_index(arranged.valid)
        else:  # the widest an image can stay: a full one removes the fewest tokens relative to its count
            index, valid = keep_mask_to_index(arranged.valid, layout.num_tokens - min(self.r, layout.num_patches // 2))
        x = gather_tokens(torch.cat([x[:, :prefix], merged], dim=1), index)
        new_layout = arranged.select(index, valid)
        # tokens an earlier ATS fusion sized keep their log(size) bias (fusion always uses it)
        return x, replace(new_layout, proportional=self.proportional_attention or layout.fused)


def merge_schedule(r: int, num_blocks: int, schedule: str) -> list[int]:
    """Tokens to merge in each of ``num_blocks`` blocks: ``"constant"`` (``r`` each) or ``"decreasing"``
    (linearly from ``2 r`` in the first block to 0 in the last, about the same total)."""
    if schedule == "constant" or num_blocks == 1:
        return [r] * num_blocks
    return [round(2 * r * (num_blocks - 1 - i) / (num_blocks - 1)) for i in range(num_blocks)]


@dataclass
class MergeConfig(MethodConfig):
    """Options of ``vistok.patch(model, "merge", ...)``.

    Attributes:
        r: tokens each block removes: an int, or one int per patched block. At most half of the model's
            patch tokens; at run time a block never removes more than half of the patch tokens it has.
        blocks: indices of the merging blocks; ``None``: every block.
        schedule: ``"constant"`` or ``"decreasing"`` (from ``2 r`` down to 0; an int ``r`` only).
        proportional_attention: add ``log(size)`` to attention logits (ToMe's default). After an ATS fusion,
            which always does, attention stays proportional for every token.
        trace_source: track which original patches each token stands for (``TokenLayout.owner``), for
            visualisation.
    """

    r: int | Sequence[int] = 8
    blocks: Sequence[int] | None = None
    schedule: str = "constant"
    proportional_attention: bool = True
    trace_source: bool = False

    name: ClassVar[str] = "merge"

    def __post_init__(self) -> None:  # what needs no model; build() checks the rest against it
        if self.schedule not in _SCHEDULES:
            raise InvalidConfigError(f"merge: schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        listed = is_sequence_option(self.r)
        if listed and self.schedule != "constant":
            raise InvalidConfigError("merge: give either a list of r or a schedule, not both")
        for r in self.r if listed else [self.r]:
            _check_r(r, None)
        for option in ("proportional_attention", "trace_source"):
            if not isinstance(getattr(self, option), bool):
                raise InvalidConfigError(f"merge: {option} must be a bool, got {getattr(self, option)!r}")

    def build(self, info: BackboneInfo) -> dict[int, TokenReducer]:
        if info.rotary:
            raise UnsupportedModelError(
                f"merge: {info.model_class} uses rotary position embeddings, and a merged token has no single "
                "position to rotate by; vistok refuses rather than pick one. Use 'ats' on this model.")
        blocks = resolve_block_indices(self.blocks, info.num_blocks, list(range(info.num_blocks)))
        if is_sequence_option(self.r):
            if len(self.r) != len(blocks):
                raise InvalidConfigError(f"merge: r has {len(self.r)} values but {len(blocks)} blocks are patched")
            values = [_check_r(r, info) for r in self.r]
        else:  # the schedule runs from the first patched block to the last
            blocks = sorted(blocks)
            values = merge_schedule(_check_r(self.r, info), len(blocks), self.schedule)
            limit = info.num_patches // 2
            if info.patch_bound() is not None and values[0] > limit:
                raise InvalidConfigError(
                    f"merge: schedule='decreasing' merges 2 r = {values[0]} tokens in its first block, more than "
                    f"{limit} (half of the model's {info.num_patches} patch tokens); give r <= {limit // 2}")
        return {block: TokenMerger(r, self.proportional_attention, self.trace_source)
                for block, r in sorted(zip(blocks, values, strict=True))}


def _check_r(r: object, info: BackboneInfo | None) -> int:
    if not is_int(r):
        raise InvalidConfigError(f"merge: r must be an int, got {type(r).__name__} {r!r}")
    if r < 0:
        raise InvalidConfigError(f"merge: r must be >= 0, got {r}")
    if info is None or info.patch_bound() is None:
        return r
    limit = info.num_patches // 2
    if r > limit:
        raise InvalidConfigError(
            f"merge: r={r} exceeds {limit}, the most a block can merge (half of the model's {info.num_patches} "
            "patch tokens); merging more would have to take the prefix tokens")
    return r
