"""Batched gathers along the token axis, and turning keep masks into gather indices."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputShapeError

__all__ = ["gather_tokens", "gather_head_tokens", "add_to_tokens", "keep_mask_to_index", "kept_count_summary",
           "gather_rope"]


# Two ways to move tokens. On the CPU, ``index_select`` / ``index_add`` over the flattened batch copy whole
# rows: a [32, 197, 384] gather took 0.13 ms instead of 1.6 ms with ``gather`` on an index expanded to every
# element. On an H200 (bf16) the row version made the patched ViT-S slower end to end (it must first copy
# permuted q/k to contiguous memory), so other devices keep ``gather`` / ``scatter_add``.


def _by_rows(x: Tensor) -> bool:
    return x.device.type == "cpu"


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Pick tokens per image: ``x`` ``[B, N, *rest]``, ``index`` ``[B, K]`` -> ``[B, K, *rest]``."""
    if index.dim() != 2 or x.shape[0] != index.shape[0]:
        raise InputShapeError(f"gather_tokens: expected x [B, N, ...] and index [B, K], got {tuple(x.shape)} "
                         f"and {tuple(index.shape)}")
    batch, n = x.shape[:2]
    if _by_rows(x):
        return x.reshape(batch * n, *x.shape[2:]).index_select(0, _flat_rows(index, n)).reshape(
            *index.shape, *x.shape[2:])
    return torch.gather(x, 1, _expand_index(index, x))


def gather_head_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Pick tokens per image in a per-head tensor: ``x`` ``[B, H, N, D]``, ``index`` ``[B, K]`` ->
    ``[B, H, K, D]``."""
    batch, heads, n, dim = x.shape
    if _by_rows(x):
        per_head = index[:, None, :].expand(batch, heads, -1).reshape(batch * heads, -1)
        return x.reshape(batch * heads * n, dim).index_select(0, _flat_rows(per_head, n)).reshape(
            batch, heads, -1, dim)
    return torch.gather(x, 2, index[:, None, :, None].expand(batch, heads, -1, dim))


def add_to_tokens(x: Tensor, index: Tensor, source: Tensor) -> Tensor:
    """``x`` ``[B, N, *rest]`` plus ``source`` ``[B, K, *rest]`` added at token ``index`` ``[B, K]`` of each image
    (repeated indices accumulate); a new tensor, like ``scatter_add`` along the token axis."""
    batch, n = x.shape[:2]
    if _by_rows(x):
        rows = x.reshape(batch * n, *x.shape[2:]).index_add(0, _flat_rows(index, n),
                                                             source.reshape(-1, *source.shape[2:]))
        return rows.reshape(x.shape)
    return x.scatter_add(1, _expand_index(index, source), source)


def _flat_rows(index: Tensor, n: int) -> Tensor:
    """``[G, K]`` indices into groups of ``n`` rows -> ``[G * K]`` indices into the flattened rows."""
    offsets = torch.arange(index.shape[0], device=index.device)[:, None] * n
    return (index + offsets).reshape(-1)


def _expand_index(index: Tensor, like: Tensor) -> Tensor:
    """``[B, K]`` -> ``[B, K, *like.shape[2:]]`` (a view)."""
    return index.reshape(*index.shape, *([1] * (like.dim() - 2))).expand(-1, -1, *like.shape[2:])


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
    if width is None:
        width, uniform, _ = kept_count_summary(keep)
    width = min(width, keep.shape[1])
    # A stable sort of "dropped" flags puts kept positions first, in their original order.
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    index = order[:, :width]
    if uniform:
        return index, None
    valid = torch.arange(width, device=keep.device)[None, :] < keep.sum(dim=1)[:, None]
    return index, valid


def kept_count_summary(keep: Tensor, num_prefix: int = 0) -> tuple[int, bool, bool]:
    """``(largest kept count, whether every image keeps that many, whether every prefix token is kept)`` of a
    ``[B, N]`` keep mask, in one read from the device (an empty batch: ``(0, True, True)``)."""
    if keep.shape[0] == 0:
        return 0, True, True
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
    raise InputShapeError(f"gather_rope: expected rope of shape [N, D] or [H, N, D], got {tuple(rope.shape)}")
