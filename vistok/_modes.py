"""Running a model in eval mode for a while and putting every module's own mode back afterwards; running a step
without autocast."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

__all__ = ["evaluating", "autocast_off"]


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; on leaving, each module gets back its own ``training`` flag (a model
    partly in train mode, e.g. frozen layers kept in eval mode while fine-tuning, stays as it was; ``model.train(
    was_training)`` would set them all alike)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():  # each its own flag (train() would recurse into shared children)
            module.training = training


def autocast_off(device: torch.device) -> AbstractContextManager:
    """Autocast disabled on ``device``'s type, where autocast exists (``meta`` has none: ``torch.autocast`` refuses
    it, and a model run on ``meta`` for its shapes must run as it does unpatched)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()
