"""Batched gathers along the token axis, and turning keep masks into gather indices."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gather_tokens", "gather_head_tokens", "keep_mask_to_index", "gather_rope"]


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


def keep_mask_to_index(keep: Tensor) -> tuple[Tensor, Tensor | None]:
    """Indices of the kept tokens of each image, in their original order, padded to the largest count.

    Args:
        keep: ``[B, N]`` bool.

    Returns:
        ``index`` ``[B, K]`` long with ``K = max(keep.sum(1))``, and ``valid`` ``[B, K]`` bool marking the
        real entries, or ``None`` when every image keeps ``K`` tokens. Padding entries point at dropped
        tokens (finite values, never read as real).
    """
    counts = keep.sum(dim=1)
    width = int(counts.max())
    # A stable sort of "dropped" flags puts kept positions first, in their original order.
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    index = order[:, :width]
    if bool((counts == width).all()):
        return index, None
    valid = torch.arange(width, device=keep.device)[None, :] < counts[:, None]
    return index, valid


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
