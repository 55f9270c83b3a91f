"""Type checks shared by the config validators. ``bool`` is an ``int`` in Python; no option of vistok's takes
``True`` for a count, so these refuse it."""

from __future__ import annotations

import torch

__all__ = ["is_int", "is_int64", "is_real", "is_integer_tensor"]


def is_int(value: object, minimum: int | None = None) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``), and at least ``minimum`` when one is given."""
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def is_int64(value: object) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``) that an int64 tensor holds."""
    return is_int(value) and -(2**63) <= value < 2**63


def is_integer_tensor(value: object) -> bool:
    """Whether ``value`` is a tensor of an integer dtype (not floating, complex or bool): seeds, counters, ids."""
    return isinstance(value, torch.Tensor) and not (value.is_floating_point() or value.is_complex()
                                                    or value.dtype == torch.bool)


def is_real(value: object) -> bool:
    """Whether ``value`` is an ``int`` or ``float`` (not a ``bool``); NaN and infinities count as real here."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
