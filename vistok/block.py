"""One transformer block over reduced tokens, built from the block's own modules (see ``BlockOps``)."""

from __future__ import annotations

import torch
from torch import Tensor

from .backbones.base import BlockOps
from .errors import PatchStateError
from .methods.base import AttentionView, TokenReducer
from .ops import attend, gather_head_tokens, gather_rope, gather_tokens, keep_mask_to_index, kept_count_summary, sync
from .ops.merging import merge_into_nearest, size_dtype
from .tokens import TokenLayout

__all__ = ["run_block"]


def run_block(
    ops: BlockOps,
    x: Tensor,
    layout: TokenLayout,
    reducer: TokenReducer | None = None,
    rope: Tensor | None = None,
    attention: str = "auto",
) -> tuple[Tensor, TokenLayout]:
    """Run one pre-norm block on ``x`` ``[B, N, C]`` whose positions are described by ``layout``.

    Padding never serves as a key; merged tokens count as their size (proportional attention). If
    ``reducer`` keeps a subset of tokens, attention outputs, residuals and the MLP are computed for that
    subset only (every valid token still serves as a key); if it merges tokens after attention, the MLP
    runs on the merged tokens. An empty batch (``B = 0``) runs the block as it is: there is nothing to reduce.

    Args:
        rope: the model's rotary embedding for its original patch grid (``[N0, D]`` or ``[H, N0, D]``);
            it is gathered to the positions the tokens came from.
        attention: the attention path (``vistok.ops.attention``): ``"auto"``, ``"sdpa"`` or ``"flex"``.

    Returns:
        The block output ``[B, M, C]`` and its layout (``M <= N``).
    """
    if x.shape[0] == 0:
        reducer = None
    x, layout, keys, fusion = _attention_residual(ops, x, layout, reducer, rope, attention)
    if fusion is not None:  # after the attention's frame: its queries, values and normalised tokens are gone
        x, layout = _fuse(x, layout, *fusion)
        del fusion
    if keys is not None:
        merged = reducer.merge(x, keys, layout)
        del keys  # the MLP is the block's memory peak: nothing of the attention may live through it
        if merged is not None:
            x, layout = merged
    return x + ops.mlp_residual(x), layout


def _attention_residual(
    ops: BlockOps,
    x: Tensor,
    layout: TokenLayout,
    reducer: TokenReducer | None,
    rope: Tensor | None,
    attention: str,
) -> tuple[Tensor, TokenLayout, Tensor | None, tuple[Tensor, tuple[Tensor, Tensor | None], Tensor] | None]:
    """``x + attention(norm1(x))`` for the tokens the reducer keeps, their layout, their keys ``[B, H, M, d]`` if
    the reducer merges after attention (else ``None``), and what :func:`_fuse` needs if it fuses (else ``None``):
    the keep mask, the kept positions and the fusion metric ``[B, N, d]``. Queries, values and the normalised
    tokens die with this frame, before fusion and the MLP run."""
    merges = reducer is not None and reducer.merges
    h = ops.norm1(x)
    o = None if reducer is None else reducer.attend(ops, h, layout, attention)
    keys = None  # a replaced attention exposes no keys; methods never merge after one
    fusion = None
    if o is None:
        q, k, v = ops.qkv(h, _rope_for(rope, layout))
        key_bias = layout.key_bias(q.dtype)
        keys = k if merges else None
        if reducer is not None:
            _refuse_tracing(reducer)
            keep = reducer.select(AttentionView(q, k, v, layout, key_bias))
            kept = None if keep is None else _kept_positions(keep, layout, reducer)
            if kept is not None and reducer.fuses:
                fusion = keep, kept, k.mean(dim=1)  # every token attends; the dropped ones merge afterwards
            elif kept is not None:
                index, valid = kept
                q, x, h = gather_head_tokens(q, index), gather_tokens(x, index), gather_tokens(h, index)
                keys = gather_head_tokens(k, index) if merges else None
                layout = layout.select(index, valid)
        o = attend(q, k, v, key_bias, ops.dropout_p, attention)
    return x + ops.attn_residual(ops.attn_out(o, h)), layout, keys, fusion


def _refuse_tracing(reducer: TokenReducer) -> None:
    """Refuse ``torch.jit.trace`` through a reducer that selects tokens: the tokens it keeps (and how many) depend
    on their values, which a trace would freeze at the example input's (unless the reducer says it is
    ``traceable``: a fixed set)."""
    if torch.jit.is_tracing() and reducer.selects and not reducer.traceable:
        raise PatchStateError(f"torch.jit.trace cannot record {type(reducer).__name__}: which tokens it keeps, and "
                              "how many, depend on the input's values, and a trace would freeze them; use "
                              "torch.compile or torch.export, which follow them (a reducer whose choice never "
                              "depends on the values may set traceable = True)")


def _fuse(x: Tensor, layout: TokenLayout, keep: Tensor, kept: tuple[Tensor, Tensor | None], metric: Tensor
          ) -> tuple[Tensor, TokenLayout]:
    """The tokens ``keep`` leaves out merged into their most similar kept patch token, then dropped."""
    candidates = keep.clone()
    candidates[:, : layout.num_prefix] = False
    sizes = layout.token_weights(size_dtype(x.dtype), x.device)
    x, weights, target = merge_into_nearest(x, metric, sizes, keep, candidates)
    index, valid = kept
    return gather_tokens(x, index), layout.fuse(target, weights).select(index, valid)


def _kept_positions(keep: Tensor, layout: TokenLayout, reducer: TokenReducer) -> tuple[Tensor, Tensor | None] | None:
    """``keep_mask_to_index`` of a reducer's keep mask, or ``None`` when it keeps every token.

    On the CPU reading tensors is free: the exact width is read and the prefix checked. Elsewhere a reducer's
    static bound (``max_kept``) is the width, so nothing is read back and the host never waits for the device.
    """
    bound = reducer.max_kept(layout)
    if bound is not None and not sync.reads_are_free(keep.device):
        return keep_mask_to_index(keep, bound, uniform=reducer.keeps_exactly(layout))
    width, uniform, prefix_kept = kept_count_summary(keep, layout.num_prefix)
    if not prefix_kept:
        raise PatchStateError(f"{type(reducer).__name__} dropped a prefix token; prefix tokens must stay")
    if uniform and width == layout.num_tokens:
        return None
    return keep_mask_to_index(keep, width, uniform)


def _rope_for(rope: Tensor | None, layout: TokenLayout) -> Tensor | None:
    if rope is None or layout.source is None:
        return rope
    positions = layout.source[:, layout.num_prefix:] - layout.num_prefix
    return gather_rope(rope, positions)
