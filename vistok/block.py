"""One transformer block over reduced tokens, built from the block's own modules (see ``BlockOps``)."""

from __future__ import annotations

from torch import Tensor

from .backbones.base import BlockOps
from .errors import PatchStateError
from .methods.base import AttentionView, TokenReducer
from .ops import attend, gather_head_tokens, gather_rope, gather_tokens, keep_mask_to_index
from .tokens import TokenLayout

__all__ = ["run_block"]


def run_block(
    ops: BlockOps,
    x: Tensor,
    layout: TokenLayout,
    reducer: TokenReducer | None = None,
    rope: Tensor | None = None,
) -> tuple[Tensor, TokenLayout]:
    """Run one pre-norm block on ``x`` ``[B, N, C]`` whose positions are described by ``layout``.

    Padding never serves as a key; merged tokens count as their size (proportional attention). If
    ``reducer`` keeps a subset of tokens, attention outputs, residuals and the MLP are computed for that
    subset only (every valid token still serves as a key); if it merges tokens after attention, the MLP
    runs on the merged tokens.

    Args:
        rope: the model's rotary embedding for its original patch grid (``[N0, D]`` or ``[H, N0, D]``);
            it is gathered to the positions the tokens came from.

    Returns:
        The block output ``[B, M, C]`` and its layout (``M <= N``).
    """
    h = ops.norm1(x)
    o = None if reducer is None else reducer.attend(ops, h, layout)
    out_keys = None  # a replaced attention exposes no keys; methods never merge after one
    if o is None:
        q, k, v = ops.qkv(h, _rope_for(rope, layout))
        key_bias = layout.key_bias(q.dtype)
        out_keys = k
        if reducer is not None:
            keep = reducer.select(AttentionView(q, k, v, layout, key_bias))
            if keep is not None and not bool(keep[:, : layout.num_prefix].all()):
                raise PatchStateError(f"{type(reducer).__name__} dropped a prefix token; prefix tokens must stay")
            if keep is not None and not bool(keep.all()):
                index, valid = keep_mask_to_index(keep)
                q, x, h = gather_head_tokens(q, index), gather_tokens(x, index), gather_tokens(h, index)
                out_keys = gather_head_tokens(k, index)
                layout = layout.select(index, valid)
        o = attend(q, k, v, key_bias, ops.dropout_p)
    x = x + ops.attn_residual(ops.attn_out(o, h))
    if out_keys is not None and reducer is not None:
        merged = reducer.merge(x, out_keys, layout)
        if merged is not None:
            x, layout = merged
    x = x + ops.mlp_residual(x)
    return x, layout


def _rope_for(rope: Tensor | None, layout: TokenLayout) -> Tensor | None:
    if rope is None or layout.source is None:
        return rope
    positions = layout.source[:, layout.num_prefix:] - layout.num_prefix
    return gather_rope(rope, positions)
