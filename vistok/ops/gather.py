"""Batched gathers along the token axis, and turning keep masks into gather indices."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gather_tokens", "gather_head_tokens", "keep_mask_to_index", "kept_count_summary", "gather_rope"]


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Pick tokens per image: ``x`` ``[B, N, *rest]``, ``index`` ``[B, K]`` -> ``[B, K, *rest]``."""
    if index.dim() != 2 or x.shape[0] != index.shape[0]:
        raise ValueError(f"gather_tokens: expected x [B, N, ...] and index [B, K], got {tuple(x.shape)} "
                         f"and {tuple(index.shape)}")
    expanded = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, expanded)


def gather_head_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Pick tokens per image in a per-head tensor: ``x`` ``[B, H, N, D]``, ``index`` ``[B, K]`` ->
    ``[B, H, K, D]``."""
    batch, heads, _, dim = x.shape
    expanded = index[:, None, :, None].expand(batch, heads, -1, dim)
    return torch.gather(x, 2, expanded)


def keep_mask_to_index(keep: Tensor, width: int | None = None, uniform: bool = False) -> tuple[Tensor, Tensor | None]:
    """Indices of the kept tokens of each image, in their original order, padded to a common width.

    Args:
        keep: ``[B, N]`` bool.
        width: the padded width ``K``, at least every image's kept count, when the caller knows one without
            reading ``keep`` (on a GPU reading it back waits for every queued kernel). ``None``: the largest
            kept count, read from ``keep``.
        uniform: the caller guarantees that every image keeps exactly ``width`` tokens.

    Returns:
        ``index`` ``[B, K]`` long, and ``valid`` ``[B, K]`` bool marking the real entries, or ``None`` when
        every image keeps ``K`` tokens. Padding entries point at dropped tokens (finite values, never read as
        real).
    """
    counts = keep.sum(dim=1)
    if width is None:
        width, uniform, _ = kept_count_summary(keep)
    width = min(width, keep.shape[1])
    # A stable sort of "dropped" flags puts kept positions first, in their original order.
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    index = order[:, :width]
    if uniform:
        return index, None
    valid = torch.arange(width, device=keep.device)[None, :] < counts[:, None]
    return index, valid


def kept_count_summary(keep: Tensor, num_prefix: int = 0) -> tuple[int, bool, bool]:
    """``(largest kept count, whether every image keeps that many, whether every prefix token is kept)`` of a
    ``[B, N]`` keep mask, in one read from the device."""
    counts = keep.sum(dim=1)
    largest = counts.max()
    prefix_kept = keep[:, :num_prefix].all()  # True when num_prefix is 0
    width, uniform, prefix_ok = torch.stack([largest, (counts == largest).all().long(), prefix_kept.long()]).tolist()
    return int(width), bool(uniform), bool(prefix_ok)


def gather_rope(rope: Tensor, positions: Tensor) -> Tensor:
    """Rotary embeddings for the given patch positions.

    Args:
        rope: ``[N, D]`` (shared by all heads) or ``[H, N, D]`` (per head), one row per original patch.
        positions: ``[B, M]`` patch indices (0-based, prefix excluded).

    Returns:
        ``[B, 1, M, D]`` or ``[B, H, M, D]``, broadcastable against ``[B, H, M, head_dim]`` queries.
    """
    if rope.dim() == 2:
        return rope[positions].unsqueeze(1)
    if rope.dim() == 3:
        return rope[:, positions].transpose(0, 1)
    raise ValueError(f"gather_rope: expected rope of shape [N, D] or [H, N, D], got {tuple(rope.shape)}")
