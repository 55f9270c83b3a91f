"""Running a model in eval mode for a while and putting every module's own mode back afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["evaluating"]


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
        for module, training in modes.items():  # parents first (modules() order): each child's own mode last
            module.train(training)
