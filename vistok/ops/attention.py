"""Attention pieces shared by every backbone: fused attention with a key bias, and the attention row of a
single probe query (the CLS row ATS needs) without forming the ``N x N`` matrix."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["attend", "probe_attention", "probe_query"]


def attend(q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor | None, dropout_p: float = 0.0) -> Tensor:
    """``softmax(q k^T / sqrt(d) + key_bias) v`` by ``F.scaled_dot_product_attention``.

    Args:
        q: ``[B, H, M, d]`` queries (``M`` may be smaller than ``N``: only the kept rows).
        k, v: ``[B, H, N, d]``.
        key_bias: ``[B, 1, 1, N]`` additive bias (``-inf`` masks a key) or ``None``.

    Returns:
        ``[B, H, M, d]``.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias, dropout_p=dropout_p)


def probe_attention(probe: Tensor, k: Tensor, key_bias: Tensor | None) -> Tensor:
    """Attention weights of one query per image and head over all keys, in ``O(N d)``.

    Args:
        probe: ``[B, H, 1, d]``.
        k: ``[B, H, N, d]``.
        key_bias: ``[B, 1, 1, N]`` or ``None``.

    Returns:
        ``[B, H, N]``, each row summing to one over the unmasked keys.
    """
    logits = (probe @ k.transpose(-2, -1)) * k.shape[-1] ** -0.5
    if key_bias is not None:
        logits = logits + key_bias
    return logits.softmax(dim=-1).squeeze(2)


def probe_query(q: Tensor, valid: Tensor | None, has_class_token: bool) -> Tensor:
    """The query whose attention row scores the tokens: the class token's (position 0) when the model has
    one, else the mean of the valid queries (a documented stand-in for CLS-free models).

    Args:
        q: ``[B, H, N, d]``.
        valid: ``[B, N]`` bool or ``None``.

    Returns:
        ``[B, H, 1, d]``.
    """
    if has_class_token:
        return q[:, :, :1]
    if valid is None:
        return q.mean(dim=2, keepdim=True)
    weights = valid.to(q.dtype)[:, None, :, None]
    return (q * weights).sum(dim=2, keepdim=True) / weights.sum(dim=2, keepdim=True).clamp_min(1.0)
