"""Mass quantiles without a full sort: the cut-off of top-p and locally typical sampling.

Both keep the tokens whose *priority* (the logit for top-p, minus the distance to the entropy for typical
sampling) is at least a threshold ``u*``: the largest priority value such that the tokens at or above it hold
at least a target probability mass. Sorting the vocabulary finds it in O(V log V); here a histogram of the
priorities (one pass, ``scatter_add``) finds the bin holding ``u*``, and only that bin's tokens are sorted
(``topk``). A bin that holds too many tokens is split again. The result is exact: every token is placed
relative to ``u*`` by comparing values, never by bin membership alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["mass_threshold"]

_BINS = 2048
_SPAN = 32.0  # priorities more than this below the row maximum share the last bin (their mass is negligible)
_SORT_LIMIT = 4096  # a boundary bin with more tokens than this is split again
_MAX_SPLITS = 4


def mass_threshold(priority: Tensor, weight: Tensor, fraction: float | Tensor) -> Tensor:
    """Per row, the largest priority value ``u`` with ``sum(weight[priority >= u]) >= fraction * sum(weight)``.

    Args:
        priority: ``[B, V]`` float, may hold ``-inf`` (such tokens must have zero weight).
        weight: ``[B, V]`` non-negative float, the (unnormalised) probability of each token.
        fraction: a number or ``[B, 1]`` tensor in ``[0, 1]``: the share of the total weight to reach.

    Returns:
        ``[B, 1]`` thresholds: keep ``priority >= threshold``. ``-inf`` where the total weight falls short of
        the target (rounding) or is zero: every token is kept then.
    """
    batch = priority.shape[0]
    top = priority.amax(dim=1, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)  # rows without any finite priority
    span = torch.full_like(top, _SPAN)
    mass_above = torch.zeros_like(top)
    target = short = None
    previous_count = priority.shape[1] + 1
    for split in range(_MAX_SPLITS + 1):
        # Bin 0 holds the highest priorities; priorities below top - span fall into the last bin.
        bins = (top - priority).mul_(_BINS / span).clamp_(0, _BINS - 1).long()
        bin_mass = torch.zeros(batch, _BINS, dtype=weight.dtype, device=weight.device)
        cumulative = bin_mass.scatter_add_(1, bins, weight).cumsum_(dim=1).add_(mass_above)
        total = cumulative[:, -1:]
        if target is None:
            target = total * fraction
            short = total < target
        target = torch.minimum(target, total)  # rounding can leave a zoomed bin a little short
        boundary = (cumulative < target).sum(dim=1, keepdim=True).clamp_(max=_BINS - 1)
        below = cumulative.gather(1, (boundary - 1).clamp_(min=0))
        mass_above = torch.where(boundary > 0, below, mass_above)
        in_bin = bins == boundary
        count = int(in_bin.sum(dim=1).max())
        if count <= _SORT_LIMIT or 2 * count > previous_count or split == _MAX_SPLITS:
            break
        # Too many tokens in the boundary bin: zoom into it. Ties cannot be split; the guard above stops then.
        previous_count = count
        priority = priority.masked_fill(~in_bin, -math.inf)
        weight = weight.masked_fill(~in_bin, 0)
        new_top = priority.amax(dim=1, keepdim=True)
        new_top = torch.where(torch.isinf(new_top), top, new_top)
        bottom = top - span * (boundary + 1) / _BINS
        last = boundary == _BINS - 1  # the last bin is open below: keep a full span under the new top
        span = torch.where(last, torch.full_like(span, _SPAN), new_top - bottom)
        span = span.clamp_min(torch.finfo(span.dtype).eps * new_top.abs().clamp_min(1))
        top = new_top
    count = max(count, 1)
    values, index = priority.masked_fill(~in_bin, -math.inf).topk(count, dim=1)
    reached = weight.gather(1, index).cumsum_(dim=1).add_(mass_above) >= target
    position = (~reached).sum(dim=1, keepdim=True)
    position = torch.minimum(position, (in_bin.sum(dim=1, keepdim=True) - 1).clamp_(min=0))
    threshold = values.gather(1, position)
    return threshold.masked_fill_(short, -math.inf)
