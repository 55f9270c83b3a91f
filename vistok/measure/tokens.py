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
    how to run the model (default ``model(images)``; see :func:`count_flops`); where it runs the blocks more than
    once (image by image, several views), the mean over every image of every run."""
    from ..patching import find_handle

    handle = find_handle(model)
    backbone = _backbone_inside(model if handle is None else handle.model)
    blocks = list(backbone.blocks())
    run = (lambda: model(images)) if forward is None else (lambda: forward(model, images))
    counts: list[float] = []  # unpatched: each block's output length, block after block, run after run
    runs: list[tuple[int, list[float]]] = []  # (images in the run, its per-block means)

    def count(_module: nn.Module, _inputs: Any, out: Any) -> None:
        counts.append(float(_first_tensor(out).shape[1]))

    def finish(_module: nn.Module, _inputs: Any, out: Any) -> None:  # the last block ran: one run is complete
        per_block = handle.tokens_per_block() if handle is not None else counts[-len(blocks):]
        runs.append((_first_tensor(out).shape[0], per_block))

    hooks = [] if handle is not None else [block.register_forward_hook(count) for block in blocks]
    hooks.append(blocks[-1].register_forward_hook(finish))
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    if not runs:  # the vision transformer found inside is not the one the forward ran
        raise UnsupportedModelError(f"tokens_per_block: the forward of {type(model).__name__} did not run "
                                    f"through the blocks of the {backbone.info.model_class} inside it")
    total = sum(size for size, _ in runs)
    if total == 0:
        return runs[-1][1]
    return [sum(size * per_block[i] for size, per_block in runs) / total for i in range(len(blocks))]


def _first_tensor(out: Any) -> Tensor:
    """A block's output tensor (Hugging Face layers may return a tuple whose first entry it is)."""
    return out if isinstance(out, Tensor) else out[0]


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
