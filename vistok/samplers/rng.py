"""Random numbers that are reproducible per row without a global seed.

With ``seeds`` (one int64 per row), the value drawn for row ``b`` depends only on ``seeds[b]``, a ``counter`` (a
decoding step, say) and a ``stream`` (which use of the randomness), never on the other rows, the batch size, the
device or torch's global generator. It is a counter-based generator: SplitMix64 (Steele et al., 2014) applied to
a per-row key, computed with int64 tensor arithmetic (wrapping multiplication), so there is no Python loop over
rows. Without ``seeds``, torch's generator is used (``generator`` or the global one).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import is_int, is_int64, is_integer_tensor
from ..errors import InvalidConfigError

__all__ = ["uniform", "uniform_at", "gumbel", "gumbel_at", "derive_seeds", "check_seeds"]

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shr(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 values (torch's ``>>`` is arithmetic on negative numbers)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: Tensor, inplace: bool = False) -> Tensor:
    """The SplitMix64 finaliser: a bijection of int64 that scrambles every bit."""
    if not inplace:
        x = x.clone()
    x.bitwise_xor_(_shr(x, 30)).mul_(_MIX1)
    x.bitwise_xor_(_shr(x, 27)).mul_(_MIX2)
    return x.bitwise_xor_(_shr(x, 31))


def _to_unit(h: Tensor) -> Tensor:
    """Hashes (int64) to float64 numbers in the open interval (0, 1), 53 random bits each."""
    bits = _shr(h, 11)
    # the top value, 2**53 - 1 + 0.5, rounds to 2**53 in float64: keep it below 1 (Gumbel noise would be +inf)
    return bits.double().add_(0.5).mul_(2.0**-53).clamp_(max=1.0 - 2.0**-53)


def check_seeds(seeds: Tensor, batch: int | None = None) -> Tensor:
    """Raise ``InvalidConfigError`` unless ``seeds`` is a 1-D integer tensor (of ``batch`` entries if given): a
    float seed would be silently truncated, and a seed per row is what makes rows independent of each other."""
    if not is_integer_tensor(seeds):
        what = f"a {seeds.dtype} tensor" if isinstance(seeds, Tensor) else repr(seeds)
        raise InvalidConfigError(f"seeds must be an integer tensor with one seed per row, got {what}")
    if seeds.dim() != 1 or (batch is not None and seeds.shape[0] != batch):
        expected = f"({batch},)" if batch is not None else "[rows]"
        raise InvalidConfigError(f"seeds must have shape {expected}, one seed per row; got {tuple(seeds.shape)}")
    return seeds


def derive_seeds(seeds: Tensor, salt: int | Tensor) -> Tensor:
    """New independent per-row seeds from ``seeds`` (``[R]`` int64) and ``salt`` (an int or ``[R]`` int64),
    e.g. one seed per trial of a row."""
    salt = torch.as_tensor(salt, dtype=torch.int64, device=seeds.device)
    return _mix(_mix(seeds.long()) + _mix(salt * _GOLDEN + 1))


def _wrap(value: int) -> int:
    """A Python int reduced to the int64 range, as int64 arithmetic would wrap it."""
    return (value + (1 << 63)) % (1 << 64) - (1 << 63)


def _row_keys(seeds: Tensor, counter: int | Tensor, stream: int) -> Tensor:
    if isinstance(counter, Tensor):
        if not is_integer_tensor(counter) or counter.dim() > 1 \
                or (counter.dim() == 1 and counter.shape[0] != seeds.shape[0]):
            raise InvalidConfigError(f"counter must be an int or an integer tensor with one value per row "
                                     f"({seeds.shape[0]}), got a {counter.dtype} tensor of shape "
                                     f"{tuple(counter.shape)}")
    elif not is_int64(counter):
        raise InvalidConfigError(f"counter must be an int64 or an integer tensor with one value per row, got "
                                 f"{counter!r}")
    if not is_int(stream):
        raise InvalidConfigError(f"stream must be an int, got {stream!r}")
    counter = torch.as_tensor(counter, dtype=torch.int64, device=seeds.device)
    return _mix(derive_seeds(seeds, counter) ^ _wrap(stream * _MIX1))


def uniform(batch: int, n: int, *, seeds: Tensor | None = None, counter: int | Tensor = 0, stream: int = 0,
            generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """``[batch, n]`` float64 uniform numbers in the open interval ``(0, 1)``.

    Args:
        seeds: ``[batch]`` int64 per-row seeds, or ``None`` to use torch's generator.
        counter: an int or ``[batch]`` int64, mixed into the key (e.g. the decoding step).
        stream: an int separating independent uses at the same counter.
        generator: torch generator used when ``seeds`` is ``None``.
    """
    if seeds is None:
        u = torch.rand(batch, n, dtype=torch.float64, generator=generator, device=device)
        return u.clamp_(min=2.0**-54)  # (0, 1): rand may return exactly 0
    keys = _row_keys(check_seeds(seeds, batch).long(), counter, stream)
    index = torch.arange(1, n + 1, dtype=torch.int64, device=seeds.device) * _GOLDEN
    return _to_unit(_mix(keys[:, None] + index[None, :], inplace=True))


def uniform_at(rows: Tensor, cols: Tensor, *, seeds: Tensor, counter: int | Tensor = 0, stream: int = 0) -> Tensor:
    """The numbers :func:`uniform` would put at ``[rows[i], cols[i]]`` (``[N]`` each), computed only there."""
    keys = _row_keys(check_seeds(seeds).long(), counter, stream)
    return _to_unit(_mix(keys[rows] + (cols.long() + 1) * _GOLDEN, inplace=True))


def gumbel_at(rows: Tensor, cols: Tensor, **kwargs) -> Tensor:
    """The Gumbel noise :func:`gumbel` would put at ``[rows[i], cols[i]]``, computed only there."""
    return uniform_at(rows, cols, **kwargs).log_().neg_().log_().neg_()


def gumbel(batch: int, n: int, **kwargs) -> Tensor:
    """``[batch, n]`` float64 standard Gumbel noise ``-log(E)``, ``E ~ Exp(1)`` (same keywords as
    :func:`uniform`). ``argmax(logits + gumbel)`` is an exact sample of ``softmax(logits)``: the exponential
    race ``argmin E_i / p_i``."""
    return uniform(batch, n, **kwargs).log_().neg_().log_().neg_()
