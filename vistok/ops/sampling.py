"""Inverse transform sampling of tokens from significance scores (the sampling step of ATS)."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from ..errors import InputShapeError, InvalidConfigError
from . import sync

__all__ = ["inverse_transform_sampling", "significance_scores"]


def significance_scores(probe_attn: Tensor, v: Tensor, num_prefix: int) -> Tensor:
    """ATS significance of every non-prefix token: attention from the probe (CLS) query summed over heads,
    times the norm of the token's value vector (all heads concatenated). Not normalised.

    Args:
        probe_attn: ``[B, H, N]`` attention weights of the probe query.
        v: ``[B, H, N, d]`` values.
        num_prefix: tokens at the front that are not scored.

    Returns:
        ``[B, N - num_prefix]`` non-negative scores, in float32 at least: a half-precision norm over every head's
        values overflows to ``inf`` for finite values (about 2.4e3 RMS on a 768-wide model in float16).
    """
    dtype = torch.promote_types(v.dtype, torch.float32)
    value_norm = v.transpose(1, 2).flatten(2).to(dtype).norm(dim=-1)
    return (probe_attn.sum(dim=1).to(dtype) * value_norm)[:, num_prefix:]


def inverse_transform_sampling(
    scores: Tensor,
    num_levels: int | Tensor,
    valid: Tensor | None = None,
    min_keep: int = 0,
    max_levels: int | None = None,
) -> Tensor:
    """Pick tokens by inverse transform sampling of their normalised scores (Fayyaz et al., ECCV 2022).

    Per image: normalise the scores of the valid tokens to sum to one; sort them in ascending order; form
    the cumulative distribution and rescale it to ``[0, 1]`` (the lowest token sits at 0); place
    ``num_levels`` evenly spaced levels from the smallest positive CDF value up to 1; keep, for each level,
    the token whose CDF value is nearest (ties go to the lower position); drop duplicates. An image therefore
    keeps at most ``num_levels`` tokens, fewer when its scores are concentrated. Deterministic.

    If fewer than ``min(min_keep, number of valid tokens)`` tokens are kept, the highest-scoring unkept
    tokens are added until that many are kept (so ``min_keep >= N`` keeps every valid token).

    Args:
        scores: ``[B, N]`` finite non-negative scores (not checked: a model's NaN would be the model's).
        num_levels: levels per image, an int or a ``[B]`` long tensor, each ``>= 1``.
        valid: ``[B, N]`` bool; invalid (padding) tokens are never kept. ``None``: all valid.
        min_keep: lower bound on the number of kept tokens.
        max_levels: an upper bound on a tensor ``num_levels``, which the caller vouches for. It spares reading
            the levels back from the device (on a GPU that waits for every queued kernel); ``None``: read them.

    Returns:
        ``[B, N]`` bool keep mask.
    """
    if scores.dim() != 2:
        raise InputShapeError(f"inverse_transform_sampling: scores must be [B, N], got {tuple(scores.shape)}")
    batch, n = scores.shape
    device = scores.device
    if isinstance(num_levels, Tensor) and (num_levels.is_floating_point() or num_levels.is_complex()) \
            or not isinstance(num_levels, (Tensor, numbers.Integral)) or isinstance(num_levels, bool):
        raise InvalidConfigError(f"inverse_transform_sampling: num_levels must be an int or an integer tensor, "
                                 f"got {num_levels!r}")
    if isinstance(num_levels, Tensor) and num_levels.dim() > 1 \
            or isinstance(num_levels, Tensor) and num_levels.numel() not in (1, batch):
        raise InputShapeError(f"inverse_transform_sampling: num_levels must be an int or [B] = [{batch}], got "
                              f"{tuple(num_levels.shape)}")
    if valid is not None and (valid.shape != scores.shape or valid.dtype != torch.bool):
        raise InputShapeError(f"inverse_transform_sampling: valid must be bool {tuple(scores.shape)} like scores, "
                              f"got {valid.dtype} {tuple(valid.shape)}")
    if not isinstance(min_keep, numbers.Integral) or isinstance(min_keep, bool) or min_keep < 0:
        raise InvalidConfigError(f"inverse_transform_sampling: min_keep must be an int >= 0, got {min_keep!r}")
    if batch == 0 or n == 0:
        return torch.zeros(batch, n, dtype=torch.bool, device=device)
    if valid is None:
        valid = torch.ones(batch, n, dtype=torch.bool, device=device)
    if not isinstance(num_levels, Tensor):
        lowest = width = int(num_levels)
    elif max_levels is None:
        lowest, width = torch.stack([num_levels.min(), num_levels.max()]).tolist()
    else:  # the caller vouches for the levels; they are checked where reading them back costs no wait
        lowest = int(num_levels.min()) if sync.reads_are_free(device) else 1
        width = max_levels
    if lowest < 1:
        raise InvalidConfigError(f"inverse_transform_sampling: num_levels must be >= 1, got {lowest}")
    levels = torch.full((batch,), lowest, device=device) if not isinstance(num_levels, Tensor) \
        else num_levels.long().expand(batch)  # a fill, not a copy from the host (which would wait for the device)

    probs = _normalise(scores, valid)
    n_valid = valid.sum(dim=1)

    # Ascending order with padding first: padding gets key -1, below every probability.
    sorted_key, order = probs.masked_fill(~valid, -1.0).sort(dim=1, stable=True)
    cdf = sorted_key.clamp_min(0.0).cumsum(dim=1)
    first_valid = n - n_valid
    cdf_low = cdf.gather(1, first_valid.clamp(max=n - 1)[:, None])
    span = (cdf[:, -1:] - cdf_low).clamp_min(torch.finfo(cdf.dtype).tiny)
    position = torch.arange(n, device=device)[None, :]
    ncdf = ((cdf - cdf_low) / span).masked_fill(position < first_valid[:, None], float("-inf"))

    # Levels: evenly spaced from the smallest positive CDF value up to 1 (a single level sits at 1).
    start = ncdf.masked_fill(ncdf <= 0, float("inf")).amin(dim=1, keepdim=True)
    start = torch.where(torch.isinf(start), torch.ones_like(start), start)
    step_index = torch.arange(width, device=device, dtype=ncdf.dtype)[None, :]
    step = (1.0 - start) / (levels[:, None] - 1).clamp_min(1).to(ncdf.dtype)
    targets = torch.where(levels[:, None] == 1, torch.ones_like(step_index), start + step_index * step)
    in_use = step_index < levels[:, None]

    picked = _nearest_sorted(ncdf, targets)
    picked = torch.where(in_use, picked, torch.full_like(picked, n))
    keep_sorted = torch.zeros(batch, n + 1, dtype=torch.bool, device=device)
    keep_sorted.scatter_(1, picked, True)
    keep_sorted = keep_sorted[:, :n] & (position >= first_valid[:, None])

    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return _top_up(keep, probs, valid, min_keep)


def _normalise(scores: Tensor, valid: Tensor) -> Tensor:
    """Scores of valid tokens divided by their sum, in fp32 at least; uniform where all are zero."""
    dtype = torch.promote_types(scores.dtype, torch.float32)
    masked = scores.to(dtype).clamp_min(0.0) * valid
    total = masked.sum(dim=1, keepdim=True)
    uniform = valid.to(dtype) / valid.sum(dim=1, keepdim=True).clamp_min(1)
    return torch.where(total > 0, masked / total.clamp_min(torch.finfo(dtype).tiny), uniform)


def _nearest_sorted(values: Tensor, targets: Tensor) -> Tensor:
    """For each target, the first position of the value nearest to it in each ascending row of
    ``values`` (ties between a lower and a higher value go to the lower)."""
    n = values.shape[1]
    above = torch.searchsorted(values, targets).clamp(max=n - 1)
    below = (above - 1).clamp(min=0)
    value_above = values.gather(1, above)
    value_below = values.gather(1, below)
    # Equal values form plateaus: the nearest *first* position of the lower plateau is where it starts.
    below = torch.searchsorted(values, value_below)
    take_above = (value_above - targets).abs() < (targets - value_below).abs()
    return torch.where(take_above, above, below)


def _top_up(keep: Tensor, probs: Tensor, valid: Tensor, min_keep: int) -> Tensor:
    """Add the highest-scoring unkept valid tokens until ``min(min_keep, n_valid)`` are kept."""
    if min_keep <= 0:
        return keep
    need = valid.sum(dim=1).clamp(max=min_keep) - keep.sum(dim=1)
    if sync.reads_are_free(keep.device) and not bool((need > 0).any()):
        return keep
    candidates = probs.masked_fill(~valid | keep, -1.0)
    order = candidates.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=keep.device)
                                            .expand_as(order))
    return keep | (rank < need.clamp_min(0)[:, None])
