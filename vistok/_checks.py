"""Type checks shared by the config validators. ``bool`` is an ``int`` in Python; no option of vistok's takes
``True`` for a count, so these refuse it."""

from __future__ import annotations

__all__ = ["is_int", "is_real"]


def is_int(value: object, minimum: int | None = None) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``), and at least ``minimum`` when one is given."""
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def is_real(value: object) -> bool:
    """Whether ``value`` is an ``int`` or ``float`` (not a ``bool``); NaN and infinities count as real here."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
