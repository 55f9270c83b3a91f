"""The exceptions vistok raises. All derive from :class:`VistokError`.

Each also derives from the built-in exception a Python user would expect (``TypeError`` for a model of
the wrong kind, ``ValueError`` for a bad parameter or input), so existing ``except`` clauses keep working.
"""

from __future__ import annotations

__all__ = [
    "VistokError",
    "UnsupportedModelError",
    "UnknownMethodError",
    "InvalidConfigError",
    "AlreadyPatchedError",
    "InputShapeError",
    "PatchStateError",
]


class VistokError(Exception):
    """Base class of every error vistok raises on purpose."""


class UnsupportedModelError(VistokError, TypeError):
    """The model (or one of its parts) is of a kind vistok cannot patch correctly; nothing was changed."""


class UnknownMethodError(VistokError, ValueError):
    """The method name is not registered (see :func:`vistok.list_methods`)."""


class InvalidConfigError(VistokError, ValueError):
    """A method option is out of range or does not fit the model."""


class AlreadyPatchedError(VistokError, RuntimeError):
    """The model (or one of its blocks) is already patched by vistok."""


class InputShapeError(VistokError, ValueError):
    """The input tensor does not have the shape the patched model accepts."""


class PatchStateError(VistokError, RuntimeError):
    """A patched model was used in a way vistok cannot follow (e.g. tokens replaced between blocks)."""
