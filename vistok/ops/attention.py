"""Attention pieces shared by every backbone: fused attention with a key bias (two paths), and the attention row
of a single probe query (the CLS row ATS needs) without forming the ``N x N`` matrix.

The paths of :func:`attend`, all computing the same thing:

* ``"sdpa"``: ``F.scaled_dot_product_attention``. Without a key bias this is the model's own fused (flash) kernel;
  with one, the bias goes in as an additive mask, which on a GPU leaves the flash kernel for a slower one.
* ``"flex"``: ``torch.nn.attention.flex_attention`` with the bias added to each score (``score_mod``), so a biased
  attention stays one fused kernel. Fused only under ``torch.compile`` on a GPU; in eager mode it runs PyTorch's
  reference implementation (correct, slow), and torch 2.14's compiled CPU kernels cannot read a bias computed in
  the same graph. It has no dropout, and no backward pass on the CPU: with attention dropout active, or on the CPU
  while recording gradients (through the queries, keys, values or bias), ``"sdpa"`` runs.
* ``"auto"``: ``"flex"`` where a bias is present and the call is being compiled for a CUDA device with heads of 16
  or more dimensions (inductor's CUDA flex kernel takes no narrower ones), else ``"sdpa"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InvalidConfigError

__all__ = ["ATTENTION_PATHS", "attend", "attention_path", "check_attention_path", "class_token_attention",
           "probe_attention", "probe_query", "received_attention"]

ATTENTION_PATHS = ("auto", "sdpa", "flex")


def check_attention_path(path: object) -> str:
    """``path`` if it names an attention path, else ``InvalidConfigError``."""
    if path not in ATTENTION_PATHS:
        raise InvalidConfigError(f"attention must be one of {ATTENTION_PATHS}, got {path!r}")
    return path


def attention_path(requested: str, q: Tensor, key_bias: Tensor | None, dropout_p: float,
                   keys_values: tuple[Tensor, ...] = ()) -> str:
    """The path (``"sdpa"`` or ``"flex"``) :func:`attend` takes for this call when ``requested`` is asked for.
    ``keys_values``: the call's ``k`` and ``v``, whose gradients count as the queries' do (a tower trained only in
    its value projections records gradients through ``v`` alone)."""
    recording = any(t is not None and t.requires_grad for t in (q, key_bias, *keys_values))
    if key_bias is None or dropout_p > 0 or q.shape[0] == 0 or (q.device.type == "cpu" and recording):
        return "sdpa"
    if requested == "auto":
        # inductor's CUDA flex kernel takes head dimensions of 16 and more only (it raises NotImplementedError)
        narrowest = min(t.shape[-1] for t in (q, *keys_values) if t is not None)
        return "flex" if q.is_cuda and torch.compiler.is_compiling() and narrowest >= 16 else "sdpa"
    return requested


def attend(q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor | None, dropout_p: float = 0.0,
           path: str = "auto") -> Tensor:
    """``softmax(q k^T / sqrt(d) + key_bias) v`` on the ``path`` of the module docstring.

    Args:
        q: ``[B, H, M, d]`` queries (``M`` may be smaller than ``N``: only the kept rows).
        k, v: ``[B, H, N, d]``.
        key_bias: ``[B, 1, 1, N]`` additive bias (``-inf`` masks a key) or ``None``.
        path: ``"auto"``, ``"sdpa"`` or ``"flex"``.

    Returns:
        ``[B, H, M, d]``.
    """
    if attention_path(path, q, key_bias, dropout_p, (k, v)) == "flex":
        # a contiguous [B, N] copy, not a view: inductor's CUDA lowering has failed on view-captured score buffers
        return _flex_attend(q, k, v, key_bias[:, 0, 0, :].contiguous())
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias, dropout_p=dropout_p)


def _flex_attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """FlexAttention with ``bias`` ``[B, N]`` added to every query's score of key ``n``."""
    from torch.nn.attention.flex_attention import flex_attention

    def add_key_bias(score: Tensor, batch: Tensor, head: Tensor, query: Tensor, key: Tensor) -> Tensor:
        return score + bias[batch, key]

    return flex_attention(q, k, v, score_mod=add_key_bias)


def received_attention(query: Tensor, keys: Tensor) -> Tensor:
    """``[B, N]``: the attention each token receives (``query``, ``keys`` ``[B, H, N, d]``, softmax over the keys),
    averaged over every query and head: a tower without a class token ranks its patches by it (vistok's choice
    for SigLIP; VisionZip's released code reads CLIP's class token only). One head at a time, so no
    ``[B, H, N, N]`` is held."""
    wide = _scoring_dtype(query.dtype)
    total = query.new_zeros(query.shape[0], keys.shape[2], dtype=wide)
    for head in range(query.shape[1]):
        logits = (query[:, head].to(wide) @ keys[:, head].to(wide).transpose(1, 2)) * keys.shape[-1] ** -0.5
        total += logits.softmax(dim=-1).mean(dim=1)
    return total / query.shape[1]


def class_token_attention(query: Tensor, keys: Tensor, prefix: int) -> Tensor:
    """``[B, N - prefix]``: the attention the class token's ``query`` ``[B, H, 1, d]`` gives each token of ``keys``
    ``[B, H, N, d]`` after the first ``prefix``, heads averaged; the dominance score of the vision-LLM boundary
    methods. Computed in float32 at least, as :func:`received_attention` (not on the in-tower hot path)."""
    wide = _scoring_dtype(query.dtype)
    return probe_attention(query.to(wide), keys.to(wide), None).mean(dim=1)[:, prefix:]


def _scoring_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64: a score computed in bf16 / fp16 ties many patches."""
    return torch.promote_types(dtype, torch.float32)


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
    # summed wide (not multiplied wide: no float32 copy of q): a half-precision sum over hundreds of tokens
    # overflows where the mean does not, and a bf16 count rounds (577 to 576)
    wide = _scoring_dtype(q.dtype)
    total = (q * valid.to(q.dtype)[:, None, :, None]).sum(dim=2, keepdim=True, dtype=wide)
    count = valid.sum(dim=1, dtype=wide)[:, None, None, None]
    return (total / count.clamp_min(1.0)).to(q.dtype)
