"""FLOPs that count attention.

``torch.utils.flop_counter.FlopCounterMode`` has formulas for matmuls and for the CUDA fused-attention
kernels, but none for the CPU kernel (``aten._scaled_dot_product_flash_attention_for_cpu``), so on CPU the
attention of every modern timm ViT counts as zero. :func:`count_flops` adds that formula (the same two
matmuls the unfused path performs). FLOPs are ``2 x`` multiply-accumulates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ..errors import InputShapeError

__all__ = ["count_flops", "flop_counter"]

_aten = torch.ops.aten


def _sdpa_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                   **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _custom_mapping() -> dict:
    mapping = {}
    forward = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None:
        mapping[forward] = _sdpa_forward
    if backward is not None:
        mapping[backward] = _sdpa_backward
    return mapping


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` (no printout) that also counts CPU fused attention."""
    return FlopCounterMode(display=False, custom_mapping=_custom_mapping())


@contextmanager
def _counted_attention(model: nn.Module):
    """Patched blocks on the ``"sdpa"`` path while counting: the counter has no formula for FlexAttention's
    operator (and fails on it), and both paths compute the same attention."""
    from ..patching import PatchHandle, get_handle

    flex = [handle for module in model.modules()
            if isinstance(handle := get_handle(module), PatchHandle) and handle.attention == "flex"]
    for handle in flex:
        handle.attention = "sdpa"
    try:
        yield
    finally:
        for handle in flex:
            handle.attention = "flex"


@contextmanager
def _unfused_multihead_attention():
    """``nn.MultiheadAttention`` on its composite path while counting: under ``no_grad`` with an even head count
    (open_clip's towers) it takes a fused fast path, one operator the counter has no formula for, so its
    projections and attention counted zero. Both paths compute the same function."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def count_flops(model: nn.Module, images: Tensor | Iterable[Tensor],
                forward: Callable[[nn.Module, Tensor], Any] | None = None) -> float:
    """FLOPs per image (2 x MACs), attention included, averaged over ``images``.

    A vistok-patched model keeps a different number of tokens for each image, and a batch is padded to the
    largest count; so each image is counted on its own (batch of one), which gives the FLOPs that image
    needs, not those of its padding. An unpatched model is counted in one batch. Test views ``[B, V, C, T, H, W]``
    to a :class:`~vistok.video.VideoClassifier` are counted view by view too, and summed per clip.

    While it counts, the model's parameters have ``requires_grad`` off (restored after, errors included): torch's
    FLOP counter fails on attention-pool heads otherwise. Blocks patched with ``attention="flex"`` are counted on
    the ``"sdpa"`` path (the same attention; the counter has no formula for FlexAttention), switched meanwhile. Do
    not count a model another thread is running.

    Args:
        model: any module taking ``[B, C, H, W]`` images.
        images: ``[B, C, H, W]`` tensor, or an iterable of such batches.
        forward: how to run the model (default ``model(images)``), e.g. ``lambda m, x: m.encode_image(x)`` for a
            CLIP model whose ``forward`` wants text too.
    """
    from ..patching import find_handle

    batches = [images] if isinstance(images, Tensor) else list(images)
    adaptive = find_handle(model) is not None
    total, count = 0, 0
    # FlopCounterMode's module tracker registers backward hooks that fail inside no_grad on a module whose
    # parameters require grad but whose inputs do not (timm's attention-pool heads); counting needs no gradients
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        with torch.no_grad(), _counted_attention(model), _unfused_multihead_attention():
            for batch in batches:
                pieces = batch.split(1) if adaptive else [batch]
                if adaptive and _takes_views(model, batch):  # a clip's views run as one padded batch
                    pieces = [view for piece in pieces for view in piece.unbind(1)]
                for piece in pieces:
                    with flop_counter() as counter:
                        model(piece) if forward is None else forward(model, piece)
                    total += counter.get_total_flops()
                count += batch.shape[0]
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    if count == 0:
        raise InputShapeError("count_flops: no images given")
    return total / count


def _takes_views(model: nn.Module, batch: Tensor) -> bool:
    from ..video.classifier import VideoClassifier

    return isinstance(model, VideoClassifier) and batch.dim() == 6
