"""The base of vistok's logits processors: Hugging Face's ``LogitsProcessor`` protocol without importing it."""

from __future__ import annotations

import math

from torch import Tensor

from .._checks import is_int, is_real
from ..errors import InvalidConfigError

__all__ = ["LogitsFilter", "check_min_tokens", "check_filter_value"]


class LogitsFilter:
    """A callable ``(input_ids, scores) -> scores`` that ``LogitsProcessorList`` and ``model.generate`` accept.

    It is a plain class, so ``import vistok.samplers`` does not import transformers; ``generate()`` only needs
    the call signature. Subclasses implement :meth:`apply`, which never modifies ``scores`` in place.
    """

    def __call__(self, input_ids: Tensor | None, scores: Tensor) -> Tensor:
        """``scores``: ``[B, V]`` logits of the next token; ``input_ids`` (``[B, T]``) is not used."""
        return self.apply(scores)

    def apply(self, scores: Tensor) -> Tensor:
        """``[B, V]`` processed logits, a new tensor."""
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({fields})"


def check_min_tokens(value: int) -> int:
    if not is_int(value, 1):
        raise InvalidConfigError(f"min_tokens_to_keep must be an int >= 1, got {value!r}")
    return value


def check_filter_value(value: float) -> float:
    if not is_real(value) or math.isnan(value) or value == math.inf:
        raise InvalidConfigError(f"filter_value must be a number below +inf (usually -inf), got {value!r}")
    return float(value)
