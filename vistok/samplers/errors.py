"""The exceptions the samplers add to :mod:`vistok.errors`. All derive from :class:`vistok.VistokError`."""

from __future__ import annotations

from ..errors import InvalidConfigError, VistokError

__all__ = ["InvalidLogitsError", "VocabularyMismatchError", "ModelFileNotFoundError"]


class InvalidLogitsError(VistokError, ValueError):
    """Logits that do not define a distribution: NaN or ``+inf`` entries, a row with no token left to sample
    (every logit ``-inf``), or a tensor of the wrong shape or dtype."""


class VocabularyMismatchError(InvalidConfigError):
    """A draft model (or a vocabulary map) and its target disagree on the vocabulary."""


class ModelFileNotFoundError(VistokError, FileNotFoundError):
    """A model file vistok loads is not installed (the message says how to install it)."""
