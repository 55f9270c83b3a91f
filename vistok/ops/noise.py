"""Random numbers as a pure function of ``(seed, row, column)``: the same values on every device, in eager mode
and under ``torch.compile``, with no generator object and nothing copied from the host.

A counter-based hash (each value hashes its own coordinates) in place of a generator's stream: ``torch.Generator``
cannot be created inside a compiled graph, and drawing on the CPU for a GPU model copies from the host (which
waits for the device) in every block. Every product stays below ``2**59``, so int64 never overflows.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hashed_noise"]

_LOW_32 = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B  # below 2**27: a 32-bit value times it stays below 2**59


def _mix32(x: Tensor | int) -> Tensor | int:
    """An avalanche hash of 32-bit values (Python ints or int64 tensors): two multiply-xorshift rounds."""
    x = ((x >> 16) ^ x) * _MULTIPLIER & _LOW_32
    x = ((x >> 16) ^ x) * _MULTIPLIER & _LOW_32
    return (x >> 16) ^ x


def hashed_noise(seed: int, rows: int, columns: int, device: torch.device | str | None = None) -> Tensor:
    """``[rows, columns]`` int64 values in ``[0, 2**32)``, uniform and independent in practice, determined by
    ``seed`` (an int in ``[0, 2**63)``) and each entry's position. Rank them to draw a random order: a row's values
    are distinct (for fixed seed and row, each step is a bijection of the column), so there are no ties.
    """
    row = torch.arange(rows, device=device, dtype=torch.long)[:, None]
    column = torch.arange(columns, device=device, dtype=torch.long)[None, :]
    seed_key = _mix32(_mix32(seed & _LOW_32) ^ ((seed >> 32) & _LOW_32))  # Python ints: no tensor for the seed
    return _mix32(_mix32(seed_key ^ row) ^ column)
