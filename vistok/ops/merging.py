"""Bipartite soft matching and size-weighted merging (the algorithm of Token Merging, Bolya et al.,
ICLR 2023, written here from the paper's description)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputShapeError, InvalidConfigError
from . import sync
from .gather import add_to_tokens, gather_tokens

__all__ = ["Matching", "bipartite_soft_matching", "merge_weighted", "merge_into_nearest", "size_dtype", "group_means"]


def size_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype token sizes are counted in for tokens of ``dtype``: at least float32, since bfloat16 holds whole
    numbers exactly only up to 256 (a token of 300 patches plus one would stay 300)."""
    return torch.promote_types(dtype, torch.float32)


def group_means(x: Tensor, group: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Each group's mean and size: ``x`` ``[B, N, D]`` and ``group`` ``[B, N]`` (long, in ``[0, groups)``) ->
    means ``[B, groups, D]`` in ``x``'s dtype and sizes ``[B, groups]``, both summed in :func:`size_dtype` (sums
    of bfloat16 lose too much). An empty group's mean is 0."""
    counted = size_dtype(x.dtype)
    sizes = torch.zeros(group.shape[0], groups, dtype=counted, device=x.device).scatter_add_(
        1, group, torch.ones_like(group, dtype=counted))
    sums = torch.zeros(group.shape[0], groups, x.shape[-1], dtype=counted, device=x.device).scatter_add_(
        1, group[..., None].expand(-1, -1, x.shape[-1]), x.to(counted))
    return (sums / sizes.clamp_min(1)[..., None]).to(x.dtype), sizes


@dataclass(frozen=True)
class Matching:
    """Which tokens of a ``[B, N]`` sequence merge where. Set A is the even positions, set B the odd ones.

    ``a_positions`` ``[Na]`` and ``b_positions`` ``[Nb]``: the positions of the two sets; ``target``
    ``[B, Na]``: each A token's most similar B token (an index into set B); ``merged`` ``[B, Na]`` bool:
    whether the A token merges into its target.
    """

    a_positions: Tensor
    b_positions: Tensor
    target: Tensor
    merged: Tensor

    @property
    def order(self) -> Tensor:
        """``[Na + Nb]``: the positions in the order :func:`merge_weighted` lays tokens out (A, then B)."""
        return torch.cat([self.a_positions, self.b_positions])


def bipartite_soft_matching(metric: Tensor, r: int | Tensor, valid: Tensor | None = None) -> Matching:
    """Match each token of set A (even positions) to its most similar token of set B (odd positions) by
    cosine similarity of ``metric``, and mark the ``r`` best-matched A tokens of each image to merge.

    Args:
        metric: ``[B, N, d]`` (ToMe uses the keys averaged over heads).
        r: tokens to remove per image, an int or ``[B]``; each at most the number of A tokens.
        valid: ``[B, N]`` bool. Padding is never matched while a real token is available, and is ranked
            last, so with ``r <= n_valid // 2`` only real tokens merge, into real tokens, provided each row's real
            tokens come first (as :func:`~vistok.ops.keep_mask_to_index` lays them out): real tokens spread
            among padding can find fewer real partners than ``r`` in the other set.

    Returns:
        The :class:`Matching`. Deterministic (stable sort on ties).
    """
    batch, n, _ = metric.shape
    device = metric.device
    a_positions = torch.arange(0, n, 2, device=device)
    b_positions = torch.arange(1, n, 2, device=device)
    if isinstance(r, bool) or not isinstance(r, (int, Tensor)) or isinstance(r, Tensor) \
            and (r.is_floating_point() or r.is_complex() or r.dtype == torch.bool):
        raise InvalidConfigError(f"bipartite_soft_matching: r must be an int or an integer tensor, got {r!r}")
    if n < 2:
        raise InputShapeError(f"bipartite_soft_matching: metric {tuple(metric.shape)} has {n} token(s) per image; "
                              "matching needs at least 2 (one in each set)")
    if isinstance(r, int):
        out_of_range = not 0 <= r <= len(a_positions)
    else:  # a tensor r is read (checked) only where reading is free
        out_of_range = sync.reads_are_free(r.device) and bool(((r < 0) | (r > len(a_positions))).any())
    if out_of_range:
        shown = r if isinstance(r, int) else r.tolist()
        raise InvalidConfigError(f"bipartite_soft_matching: r={shown} must be in [0, {len(a_positions)}] for N={n}")
    # An int becomes a tensor by a fill on the device: a copy from the host would wait for the device's queue.
    r = torch.full((batch,), r, device=device) if isinstance(r, int) else r.expand(batch)
    metric = F.normalize(metric.float(), dim=-1)
    scores = metric[:, a_positions] @ metric[:, b_positions].transpose(1, 2)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, b_positions], float("-inf"))
        scores = scores.masked_fill(~valid[:, a_positions, None], float("-inf"))
    best, target = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(len(a_positions), device=device)
                                            .expand_as(order))
    return Matching(a_positions, b_positions, target, rank < r[:, None])


def merge_weighted(x: Tensor, weights: Tensor, matching: Matching) -> tuple[Tensor, Tensor]:
    """Merge ``x`` ``[B, N, *rest]`` by ``matching``, each token weighted by ``weights`` ``[B, N]`` (its
    size; 0 for padding): a merged token is the weighted mean of its parts and weighs their sum. The means are
    computed in :func:`size_dtype` (at least float32) and returned in ``x``'s dtype, the summed weights in
    ``weights``' (keep sizes in :func:`size_dtype`).

    Returns:
        Tokens ``[B, N, *rest]`` and weights ``[B, N]`` laid out in ``matching.order`` (set A, then set
        B). Merged-away A tokens keep their value but get weight 0; drop them with
        ``keep_mask_to_index(weights > 0)``. A B token that receives no weight keeps its value.
    """
    trailing = (1,) * (x.dim() - 2)
    a_index = matching.a_positions.expand(x.shape[0], -1)
    b_index = matching.b_positions.expand(x.shape[0], -1)
    a_weight = gather_tokens(weights, a_index)
    moved = a_weight * matching.merged
    work = size_dtype(x.dtype)  # half precision overflows a sum of size-weighted tokens (300 x 300 > 65504)
    weighted = x.to(work) * weights.to(work).reshape(*weights.shape, *trailing)
    b_sum = add_to_tokens(gather_tokens(weighted, b_index), matching.target,
                          gather_tokens(weighted, a_index) * matching.merged.reshape(*moved.shape, *trailing))
    b_weight = gather_tokens(weights, b_index).scatter_add(1, matching.target, moved)
    denominator = b_weight.to(work).reshape(*b_weight.shape, *trailing)
    b_tokens = torch.where(denominator > 0, (b_sum / denominator.clamp_min(torch.finfo(work).tiny)).to(x.dtype),
                           gather_tokens(x, b_index))
    tokens = torch.cat([gather_tokens(x, a_index), b_tokens], dim=1)
    return tokens, torch.cat([a_weight - moved, b_weight], dim=1)


def merge_into_nearest(x: Tensor, metric: Tensor, weights: Tensor, keep: Tensor, candidates: Tensor
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Merge every real token that is not kept into the candidate whose ``metric`` is most similar (cosine),
    size-weighted: ATS with fusion, where the tokens a block does not sample join the kept ones.

    Args:
        x: ``[B, N, C]``; metric: ``[B, N, d]`` (e.g. the keys averaged over heads); weights: ``[B, N]`` sizes
            (0 for padding; counted in :func:`size_dtype`, as the means are); keep:
            ``[B, N]`` bool, the tokens that stay; candidates: ``[B, N]`` bool, the kept tokens others may merge
            into (the kept patch tokens: never a prefix token).

    Returns:
        ``x`` with each candidate the weighted mean of itself and the tokens merged into it (the others
        unchanged), the new ``weights`` (0 where a token merged away), and ``target`` ``[B, N]`` long: the
        position each token now lives at (itself when it stays or is padding).
    """
    positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    unit = F.normalize(metric.float(), dim=-1)
    similarity = (unit @ unit.transpose(1, 2)).masked_fill(~candidates[:, None, :], float("-inf"))
    moving = ~keep & (weights > 0) & candidates.any(dim=1, keepdim=True)
    target = torch.where(moving, similarity.argmax(dim=-1), positions)
    merged_weights = torch.zeros_like(weights).scatter_add(1, target, weights)
    work = size_dtype(x.dtype)  # as merge_weighted: half precision overflows the size-weighted sums
    summed = add_to_tokens(torch.zeros_like(x, dtype=work), target, x.to(work) * weights.to(work)[..., None])
    received = merged_weights > weights  # only a token that others joined changes: the rest stays bit for bit
    denominator = merged_weights.to(work)[..., None].clamp_min(torch.finfo(work).tiny)
    merged = torch.where(received[..., None], (summed / denominator).to(x.dtype), x)
    return merged, merged_weights, target
