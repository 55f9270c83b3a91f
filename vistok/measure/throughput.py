"""Wall-clock throughput: warm-up, repeated timed forward passes, median."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import InvalidConfigError

__all__ = ["Timing", "time_models", "synchronize", "allow_recompiles"]

_RECOMPILE_LIMITS = ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit")  # the names differ between torch releases


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a no-op off CUDA), so a timer around a call times the call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allow_recompiles(entries: int) -> None:
    """Let dynamo keep at least ``entries`` compiled graphs per code object. Every compiled copy of one model class
    adds an entry on the same ``forward``; past the default limit (8) dynamo would fall back to eager code."""
    for limit in _RECOMPILE_LIMITS:
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(entries, getattr(torch._dynamo.config, limit)))


@dataclass(frozen=True)
class Timing:
    """Seconds per forward pass of one batch, over the timed runs."""

    batch_size: int
    seconds: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def images_per_s(self) -> float:
        return self.batch_size / self.median_s


def time_models(
    models: Mapping[str, nn.Module | Callable[[Tensor], object]],
    images: Tensor,
    warmup: int = 3,
    runs: int = 10,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Timing]:
    """Time each model's forward pass (or any callable of ``images``) on ``images`` under
    ``torch.inference_mode``.

    Runs are interleaved (model A, model B, model A, ...) so that drifts of the machine's speed affect
    every model alike; each model gets ``warmup`` untimed runs first. ``progress`` is called after every
    run with a short description.
    """
    if runs < 1 or warmup < 0:
        raise InvalidConfigError(f"time_models: need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    seconds: dict[str, list[float]] = {label: [] for label in models}
    with torch.inference_mode():
        for step in range(warmup + runs):
            for label, model in models.items():
                synchronize(images.device)
                start = time.perf_counter()
                model(images)
                synchronize(images.device)
                elapsed = time.perf_counter() - start
                if step >= warmup:
                    seconds[label].append(elapsed)
                if progress is not None:
                    phase = "warm-up" if step < warmup else f"run {step - warmup + 1}/{runs}"
                    progress(f"{label}: {phase}")
    return {label: Timing(images.shape[0], tuple(values)) for label, values in seconds.items()}
