"""Temperature: divide the logits by ``T`` (``T < 1`` sharpens, ``T > 1`` flattens); ``T = 0`` is greedy."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._params import RowParam, broadcast_param, check_logits, checked, work_dtype
from ._processor import LogitsFilter

__all__ = ["temperature_scale", "Temperature"]


def temperature_scale(logits: Tensor, temperature: RowParam) -> Tensor:
    """``logits / temperature``, per row; a row with temperature ``0`` keeps only its first top token (greedy
    decoding, the limit ``T -> 0``), its other logits set to ``-inf``.

    Same arithmetic as Hugging Face's ``TemperatureLogitsWarper`` for ``T > 0`` (which refuses ``T = 0``).
    Non-finite logits pass through unchanged (the truncation filters and the sampling step refuse NaN/+inf).

    Half-precision logits are divided in float32 and returned as float32: the scaled logits of a legal float16
    row need not be float16 numbers (``6e4 / 0.7``, or any logit over ``1e-4``), and rounding them to ``inf``
    would refuse a valid distribution. Every other function here judges half types in float32 anyway.

    Args:
        logits: ``[B, V]``, any float dtype.
        temperature: a number or ``[B]`` tensor, ``>= 0``.

    Returns:
        ``[B, V]`` in ``logits``' dtype, float32 for float16 / bfloat16.
    """
    check_logits(logits)
    temperature = checked(temperature, "temperature")
    logits = work_dtype(logits)
    if not isinstance(temperature, Tensor):
        # as the per-row form, which casts to the logits' dtype: a temperature that rounds to 0 there is greedy
        rounds_to_zero = temperature == 0 or (logits.dtype == torch.float32 and temperature <= 2.0**-150)
        return _greedy(logits) if rounds_to_zero else _divide(logits, temperature)
    temperature = broadcast_param(temperature, logits, "temperature", logits.dtype)
    greedy = temperature == 0
    scaled = _divide(logits, torch.where(greedy, torch.ones_like(temperature), temperature))
    if not bool(greedy.any()):
        return scaled
    return torch.where(greedy, _greedy(logits), scaled)


def _divide(logits: Tensor, temperature: float | Tensor) -> Tensor:
    """``logits / temperature``; a row of finite logits whose quotient overflows (a tiny ``T``: its maximum turns
    ``+inf``, or ``-inf`` when every logit is negative) is divided after subtracting its maximum, the same
    distribution, whose top tokens stay finite (0)."""
    scaled = logits / temperature
    top = logits.amax(dim=1, keepdim=True)
    overflow = top.isfinite() & ~scaled.amax(dim=1, keepdim=True).isfinite()
    if not bool(overflow.any()):
        return scaled
    return torch.where(overflow, (logits - top) / temperature, scaled)


def _greedy(logits: Tensor) -> Tensor:
    top = logits.argmax(dim=1, keepdim=True)
    return torch.full_like(logits, -math.inf).scatter_(1, top, logits.gather(1, top))


class Temperature(LogitsFilter):
    """Processor form of :func:`temperature_scale`."""

    def __init__(self, temperature: RowParam) -> None:
        self.temperature = checked(temperature, "temperature")

    def apply(self, scores: Tensor) -> Tensor:
        return temperature_scale(scores, self.temperature)
