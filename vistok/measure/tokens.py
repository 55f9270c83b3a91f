"""How many tokens each block of a (patched or unpatched) model processes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError

__all__ = ["tokens_per_block"]


def tokens_per_block(model: nn.Module, images: Tensor,
                     forward: Callable[[nn.Module, Tensor], Any] | None = None) -> list[float]:
    """Mean number of tokens each block outputs for ``images`` ``[B, C, H, W]`` (prefix included, padding
    excluded), one entry per block. Works on unpatched models too (every block keeps all tokens). ``forward``:
    how to run the model (default ``model(images)``; see :func:`count_flops`)."""
    from ..patching import find_handle

    handle = find_handle(model)
    run = (lambda: model(images)) if forward is None else (lambda: forward(model, images))
    with torch.no_grad():
        if handle is not None:
            run()
            return handle.tokens_per_block()
        counts: list[float] = []
        backbone = _backbone_inside(model)
        hooks = [block.register_forward_hook(lambda _m, _i, out: counts.append(float(out.shape[1])))
                 for block in backbone.blocks()]
        try:
            run()
        finally:
            for hook in hooks:
                hook.remove()
        if not counts:  # the vision transformer found inside is not the one the forward ran
            raise UnsupportedModelError(f"tokens_per_block: the forward of {type(model).__name__} did not run "
                                        f"through the blocks of the {backbone.info.model_class} inside it")
        return counts


def _backbone_inside(model: nn.Module):
    """The backbone of ``model``, or of the first module inside it vistok can patch (a wrapper such as
    :class:`~vistok.video.VideoClassifier`, as the patched branch finds its handle inside one)."""
    from ..backbones import resolve_backbone

    try:
        return resolve_backbone(model)
    except UnsupportedModelError as refused:
        for module in model.modules():
            if module is not model:
                try:
                    return resolve_backbone(module)
                except UnsupportedModelError:
                    continue
        raise refused from None
