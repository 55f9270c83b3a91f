"""The sampling step: an exponential race (Gumbel-max) over processed logits, reproducible per row."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import is_int, is_int64
from ..errors import InvalidConfigError
from . import rng
from ._params import check_logits, check_row_max, work_dtype
from ._processor import LogitsFilter
from .errors import InvalidLogitsError

__all__ = ["sample", "SeededSampling", "as_seeds"]

_SPARSE_SHARE = 8  # sample over the finite logits only when they are at most 1/8 of the tensor


def sample(logits: Tensor, *, seeds: Tensor | None = None, counter: int | Tensor = 0, stream: int = 0,
           generator: torch.Generator | None = None) -> Tensor:
    """One token per row, an exact sample of ``softmax(logits)``: ``argmax(logits + G)`` with i.i.d. Gumbel
    noise ``G`` (the exponential race ``argmin E_i / p_i``).

    With ``seeds``, the noise of row ``b`` is a function of ``(seeds[b], counter, token)`` only
    (:mod:`vistok.samplers.rng`): the same row gives the same token whatever the batch, device or global seed.
    Tokens whose logit is ``-inf`` never win and, when they are most of the vocabulary (after truncation), get
    no noise at all.

    Args:
        logits: ``[B, V]`` processed logits, any float dtype.
        seeds: ``[B]`` int64 seeds, or ``None`` for torch's generator (``generator`` or the global one).
        counter: an int or ``[B]`` int64 mixed into the noise (e.g. the row's current length), so that
            successive steps draw fresh noise.
        stream: an int separating independent draws at the same counter (e.g. drafting and verifying).

    Returns:
        ``[B]`` int64 token ids.

    Raises:
        InvalidLogitsError: NaN or ``+inf`` logits, or a row with every logit ``-inf``.
    """
    check_logits(logits)
    work = work_dtype(logits)
    row_max = work.amax(dim=1, keepdim=True)
    empty = check_row_max(row_max)
    if bool(empty.any()):
        rows = empty.flatten().nonzero().flatten().tolist()
        raise InvalidLogitsError(f"row(s) {rows[:8]} have every logit -inf: no token is left to sample "
                                 "(the constraints or filters removed the whole vocabulary)")
    batch, vocab = work.shape
    shifted = work - row_max  # <= 0, so adding the noise cannot overflow
    if seeds is not None:
        rng.check_seeds(seeds, batch)
        finite = shifted > -math.inf
        if int(finite.sum()) * _SPARSE_SHARE <= batch * vocab:
            return _sample_sparse(shifted, finite, seeds.to(work.device), counter, stream)
    noise = rng.gumbel(batch, vocab, seeds=None if seeds is None else seeds.to(work.device), counter=counter,
                       stream=stream, generator=generator, device=work.device)
    return (shifted.double() + noise).argmax(dim=1)


def _sample_sparse(shifted: Tensor, finite: Tensor, seeds: Tensor, counter: int | Tensor, stream: int) -> Tensor:
    """The race over the finite logits only; the same tokens as the dense race with the same seeds."""
    rows, cols = finite.nonzero(as_tuple=True)
    key = shifted[rows, cols].double() + rng.gumbel_at(rows, cols, seeds=seeds, counter=counter, stream=stream)
    batch, vocab = shifted.shape
    best = torch.full((batch,), -math.inf, dtype=key.dtype, device=key.device)
    best = best.scatter_reduce(0, rows, key, "amax")
    winner = key == best[rows]
    first = torch.full((batch,), vocab, dtype=torch.long, device=key.device)
    return first.scatter_reduce(0, rows[winner], cols[winner], "amin")


def as_seeds(seeds: int | Tensor, batch: int, device: torch.device | str | None = None) -> Tensor:
    """``[batch]`` int64 seeds from one int (row ``b`` gets a seed derived from ``(seed, b)``) or a tensor."""
    if isinstance(seeds, Tensor):
        if seeds.shape != (batch,) or seeds.is_floating_point() or seeds.dtype == torch.bool:
            raise InvalidConfigError(f"seeds must be an int or a [{batch}] integer tensor, got "
                                     f"{seeds.dtype} {tuple(seeds.shape)}")
        return seeds.to(device=device, dtype=torch.int64)
    if not is_int64(seeds):
        raise InvalidConfigError(f"seeds must be an int64 or a [{batch}] integer tensor, got {seeds!r}")
    base = torch.full((batch,), seeds, dtype=torch.int64, device=device)
    return rng.derive_seeds(base, torch.arange(batch, device=device))


class SeededSampling(LogitsFilter):
    """A last processor for ``model.generate`` that makes sampling reproducible per row without a global seed.

    It draws the token with :func:`sample` (seeds per row, counter = the row's current length) and returns
    logits that are ``-inf`` everywhere except at that token, so ``generate`` (``do_sample=True`` or greedy)
    emits it. Put it after every other processor::

        model.generate(ids, do_sample=True, logits_processor=LogitsProcessorList(
            [SamplingPipeline(config), SeededSampling(seeds, pad_token_id=tokenizer.pad_token_id)]))

    Args:
        seeds: ``[B]`` int64 seeds (one per row of ``generate``'s batch), or an int.
        pad_token_id: the id that left-pads the prompts: a row's length then leaves out its leading pad tokens,
            so the row gives the same tokens alone or in a padded batch (and the same as
            :func:`~vistok.samplers.generate` with these seeds). ``None``: every column counts (prompts of one
            length). A prompt that itself starts with this id loses those tokens from its count.
    """

    def __init__(self, seeds: int | Tensor, pad_token_id: int | None = None) -> None:
        if isinstance(seeds, Tensor) and (seeds.dim() != 1 or seeds.is_floating_point()):
            raise InvalidConfigError(f"seeds must be an int or a 1-D integer tensor, got {tuple(seeds.shape)}")
        if pad_token_id is not None and not is_int(pad_token_id):
            raise InvalidConfigError(f"pad_token_id must be an int or None, got {pad_token_id!r}")
        as_seeds(seeds, seeds.shape[0] if isinstance(seeds, Tensor) else 1)
        self.seeds = seeds
        self.pad_token_id = pad_token_id

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        check_logits(scores)
        seeds = as_seeds(self.seeds, scores.shape[0], scores.device)
        counter: int | Tensor = input_ids.shape[1]
        if self.pad_token_id is not None:
            leading = (input_ids == self.pad_token_id).long().cumprod(dim=1).sum(dim=1)
            counter = (input_ids.shape[1] - leading).to(scores.device)
        token = sample(scores, seeds=seeds, counter=counter)
        chosen = torch.full_like(scores, -math.inf)
        return chosen.scatter_(1, token[:, None], 0.0)

    def apply(self, scores: Tensor) -> Tensor:
        raise InvalidConfigError(
            "SeededSampling needs the input ids (the counter): call it as processor(input_ids, scores)")
