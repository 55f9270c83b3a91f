"""Validation of sampler parameters (a Python number, or one value per row) and of logits tensors."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .._checks import is_integer_tensor, is_real
from ..errors import InvalidConfigError
from .errors import InvalidLogitsError

__all__ = ["RowParam", "PARAM_BOUNDS", "row_param", "checked", "broadcast_param", "check_logits", "check_row_max",
           "work_dtype", "check_token_ids"]

RowParam = float | int | Tensor

#: each sampler parameter's range, written once: the functions, the processors and SamplingConfig check with it
PARAM_BOUNDS: dict[str, dict] = {
    "temperature": dict(low=0.0, high=math.inf, high_open=True),
    "top_k": dict(low=-math.inf, high=math.inf, integer=True),
    "top_p": dict(low=0.0, high=1.0),
    "min_p": dict(low=0.0, high=1.0),
    "typical_p": dict(low=0.0, high=1.0),
    "epsilon": dict(low=0.0, high=1.0, high_open=True),
    "eta": dict(low=0.0, high=1.0, high_open=True),
    "top_h": dict(low=0.0, high=1.0, low_open=True),
}


def checked(value: RowParam, name: str) -> RowParam:
    """:func:`row_param` with ``name``'s bounds from :data:`PARAM_BOUNDS`."""
    return row_param(value, name, **PARAM_BOUNDS[name])


def row_param(value: RowParam, name: str, *, low: float, high: float, low_open: bool = False,
              high_open: bool = False, integer: bool = False) -> RowParam:
    """Validate a parameter given as a Python number or a 1-D tensor (one value per row).

    Returns the number (as ``int``/``float``) or the tensor, unchanged. Bounds are inclusive unless
    ``low_open``/``high_open``.

    Raises:
        InvalidConfigError: wrong type, NaN, or out of range (the message names ``name`` and the range).
    """
    lo, hi = ("(" if low_open else "[") + f"{low}", f"{high}" + (")" if high_open else "]")
    what = f"{name} must be {'an integer' if integer else 'a number'} in {lo}, {hi}"
    if isinstance(value, np.generic) and value.ndim == 0 and value.dtype.kind in "iuf":  # np.float32(0.9), ...
        value = value.item()
    if isinstance(value, Tensor):
        if value.dim() != 1 or value.numel() == 0:
            raise InvalidConfigError(f"{name}: a per-row tensor must be 1-D and non-empty, got shape "
                                     f"{tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool or (integer and value.is_floating_point()):
            raise InvalidConfigError(f"{what}; got a {value.dtype} tensor")
        values = value.double()
    elif not is_real(value) or (integer and not isinstance(value, int)):
        raise InvalidConfigError(f"{what}, got {value!r}")
    else:  # a Python number: checked without creating tensors (this runs once per decoding step)
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float: out of every range here
            raise InvalidConfigError(f"{what}, got {value!r}") from None
        if math.isnan(number) or (number <= low if low_open else number < low) or (
                number >= high if high_open else number > high):
            raise InvalidConfigError(f"{what}, got {value!r}")
        return value
    bad = torch.isnan(values) | (values <= low if low_open else values < low) | (values >= high if high_open
                                                                               else values > high)
    if bool(bad.any()):
        raise InvalidConfigError(f"{what}, got {value[bad.nonzero()[0, 0]].item()!r}")
    return value


def check_token_ids(ids: object, name: str, error: type[Exception] = InvalidConfigError) -> Tensor:
    """``ids`` (a 1-D integer tensor or a sequence of ints) as a ``[M]`` long tensor of token ids ``>= 0``; else
    ``error`` naming ``name`` (a float id would be silently truncated)."""
    if not isinstance(ids, Tensor):
        if any(isinstance(i, bool) for i in (ids if isinstance(ids, (list, tuple)) else [])):
            raise error(f"{name} must be token ids, got {ids!r} (a bool is no token id)")
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError):
            raise error(f"{name} must be token ids (a 1-D integer tensor or a list of ints), got {ids!r}") from None
        if ids.numel() == 0:  # an empty list: no dtype to judge
            return ids.long().reshape(0)
    if ids.dim() != 1 or not is_integer_tensor(ids):
        raise error(f"{name} must be token ids (a 1-D integer tensor or a list of ints), got a {ids.dtype} tensor "
                    f"of shape {tuple(ids.shape)}")
    if ids.numel() and int(ids.min()) < 0:
        raise error(f"{name} holds a negative token id ({int(ids.min())})")
    return ids.long()


def broadcast_param(value: RowParam, logits: Tensor, name: str, dtype: torch.dtype | None = None) -> RowParam:
    """A per-row tensor as ``[B, 1]`` on the logits' device (checking ``B``); numbers pass through."""
    if not isinstance(value, Tensor):
        return value
    if value.shape[0] != logits.shape[0]:
        raise InvalidConfigError(f"{name} has {value.shape[0]} values but the logits have {logits.shape[0]} rows")
    return value.to(device=logits.device, dtype=dtype or value.dtype)[:, None]


def check_logits(logits: Tensor) -> None:
    """Raise unless ``logits`` is a ``[B, V]`` floating tensor with ``B, V >= 1``."""
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise InvalidLogitsError(f"logits must be a floating [batch, vocab] tensor, got {shape}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise InvalidLogitsError(f"logits must have at least one row and one token, got {tuple(logits.shape)}")


def check_row_max(row_max: Tensor) -> Tensor:
    """Given the ``[B, 1]`` row maxima of some logits, raise on NaN or ``+inf`` (``max`` propagates both) and
    return the ``[B, 1]`` bool mask of empty rows (every logit ``-inf``)."""
    if not bool(torch.isfinite(row_max).all()):
        bad = torch.isnan(row_max) | (row_max == math.inf)
        if bool(bad.any()):
            rows = bad.flatten().nonzero().flatten().tolist()
            raise InvalidLogitsError(f"logits contain NaN or +inf in row(s) {rows[:8]}"
                                     f"{' ...' if len(rows) > 8 else ''}: they do not define a distribution")
    return row_max == -math.inf


def work_dtype(logits: Tensor) -> Tensor:
    """Logits in the precision the decisions are made in: float32/float64 as given (so the same arithmetic as
    Hugging Face's processors), half types upcast to float32."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
