"""Adaptive weighted rejection sampling (AWRS; Lipkin et al., "Fast Controlled Generation from Language Models
with Adaptive Weighted Rejection Sampling", COLM 2025) for a boolean token constraint.

To sample from ``p(x) c(x) / Z`` (``c`` a boolean constraint, ``Z = sum p c``) without evaluating ``c`` on the
whole vocabulary: draw tokens from ``p`` *without replacement* (Gumbel keys, highest first) and return the first
one the constraint accepts. That is an exact sample of the constrained, renormalised distribution, and when the
constraint keeps most of the probability mass it evaluates ``c`` on a handful of tokens. A second round
(again without replacement, the first round's rejections excluded) yields the properly weighted estimate

    w = (1 - sum of p over the first round's rejections) / (rejections in both rounds + 1),

with ``E[w] = Z``: the weight sequential Monte Carlo needs (the reference implementation in genlm-control uses
the same two-round estimator). ``w = 0`` (log weight ``-inf``) when no token satisfies the constraint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import InvalidConfigError
from . import rng
from ._decoding import CausalLMState, check_causal_lm
from ._params import check_logits, check_row_max, work_dtype
from .generation import GenerationOutput, check_decoding, check_max_new_tokens, eos_set, prepare_prompt
from .pipeline import SamplingConfig
from .sampling import as_seeds

__all__ = ["awrs_sample", "AWRSResult", "constrained_generate"]

# accept(rows [n], tokens [n]) -> [n] bool: does the constraint allow token tokens[i] in row rows[i]?
Constraint = Callable[[Tensor, Tensor], Tensor]

_ROUND_STREAMS = (11, 12)
_CANDIDATES = 16  # tokens taken from the top of the keys at a time


@dataclass
class AWRSResult:
    """Per row: ``tokens`` (``[B]``, ``-1`` where nothing satisfies the constraint), ``log_weight`` (``[B]``,
    log of the unbiased estimate of the constrained mass ``Z``), ``evaluations`` (``[B]``, constraint calls
    spent, both rounds)."""

    tokens: Tensor
    log_weight: Tensor
    evaluations: Tensor


def awrs_sample(logits: Tensor, accept: Constraint, *, seeds: Tensor | None = None, counter: int | Tensor = 0,
                generator: torch.Generator | None = None, proper_weights: bool = True) -> AWRSResult:
    """One constrained token per row by adaptive weighted rejection sampling.

    Args:
        logits: ``[B, V]`` (processed) logits of the unconstrained distribution ``p``.
        accept: ``accept(rows, tokens) -> bool``, all ``[n]``; called with at most one token per row at a time,
            in the order the sampler needs them (so it is called only on tokens it must know about).
        seeds, counter, generator: randomness, as in :func:`~vistok.samplers.sample`.
        proper_weights: run the second round (the weight). ``False``: only the token (weight 0 = log 1 for
            every row that found one), about half the evaluations.

    Returns:
        :class:`AWRSResult`.
    """
    check_logits(logits)
    work = work_dtype(logits)
    empty = check_row_max(work.amax(dim=1, keepdim=True))[:, 0]
    log_probs = work.double().log_softmax(dim=1).masked_fill(empty[:, None], -math.inf)
    batch, vocab = log_probs.shape
    device = log_probs.device
    if seeds is not None and not isinstance(seeds, Tensor):
        raise InvalidConfigError(f"seeds must be a [{batch}] integer tensor or None, got {type(seeds).__name__}")
    seeds = None if seeds is None else as_seeds(seeds, batch, device)  # checked, and on the logits' device
    evaluations = torch.zeros(batch, dtype=torch.long, device=device)
    token, rejected_first = _first_accepted(log_probs, accept, seeds, counter, generator, _ROUND_STREAMS[0],
                                            evaluations)
    found = token >= 0
    rejections = rejected_first.sum(dim=1)
    if proper_weights:
        second = log_probs.masked_fill(rejected_first, -math.inf)
        before = evaluations.clone()
        _first_accepted(second, accept, seeds, counter, generator, _ROUND_STREAMS[1], evaluations, active=found)
        # Round two stops at its first acceptance: every other evaluation was a rejection.
        rejections = rejections + (evaluations - before - found.long())
        # log(1 - rejected mass) as the log of the mass left: 1 - sum(rejected) loses it when the allowed mass is
        # tiny (-inf below about e^-37 though a token was found).
        log_weight = second.logsumexp(dim=1) - torch.log1p(rejections.double())
    else:
        log_weight = torch.zeros(batch, dtype=torch.float64, device=device)
    log_weight = log_weight.masked_fill(~found, -math.inf)
    return AWRSResult(token, log_weight, evaluations)


def _first_accepted(log_probs: Tensor, accept: Constraint, seeds, counter, generator, stream: int,
                    evaluations: Tensor, active: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Walk each row's tokens in decreasing ``log_probs + Gumbel`` (sampling without replacement) until the
    constraint accepts one. Returns the tokens (``-1`` if none) and the ``[B, V]`` mask of rejected tokens."""
    batch, vocab = log_probs.shape
    device = log_probs.device
    noise = rng.gumbel(batch, vocab, seeds=seeds, counter=counter, stream=stream, generator=generator,
                       device=device)
    keys = log_probs + noise  # -inf for impossible tokens
    rows = torch.arange(batch, device=device)
    token = torch.full((batch,), -1, dtype=torch.long, device=device)
    rejected = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
    running = torch.ones(batch, dtype=torch.bool, device=device) if active is None else active.clone()
    while bool(running.any()):
        top_keys, top_ids = keys.topk(min(_CANDIDATES, vocab), dim=1)
        for j in range(top_ids.shape[1]):
            running &= top_keys[:, j] > -math.inf  # a row whose possible tokens are all rejected is finished
            if not bool(running.any()):
                break
            at = rows[running]
            candidate = top_ids[at, j]
            verdict = torch.as_tensor(accept(at, candidate), device=device).reshape(-1)
            if verdict.dtype != torch.bool:  # a probability would be read as True
                raise InvalidConfigError(f"the constraint must answer with bools (accepted or not), got "
                                         f"{verdict.dtype}")
            if verdict.shape[0] != at.shape[0]:
                raise InvalidConfigError(f"the constraint returned {verdict.shape[0]} answers for {at.shape[0]} "
                                         "tokens")
            evaluations[at] += 1
            token[at[verdict]] = candidate[verdict]
            rejected[at[~verdict], candidate[~verdict]] = True
            keys[at, candidate] = -math.inf
            running[at[verdict]] = False
    return token, rejected


class _RowConstraint:
    """The user's ``constraint(context, tokens)`` seen as ``accept(rows, tokens)`` over the live rows."""

    def __init__(self, constraint: Callable[[Tensor, Tensor], Tensor], context: Tensor, live_rows: Tensor) -> None:
        self.constraint, self.context, self.live_rows = constraint, context, live_rows

    def __call__(self, rows: Tensor, tokens: Tensor) -> Tensor:
        return self.constraint(self.context[self.live_rows[rows]], tokens)


@torch.no_grad()
def constrained_generate(model: nn.Module, input_ids: Tensor, constraint: Callable[[Tensor, Tensor], Tensor],
                         config: SamplingConfig | None = None, *, attention_mask: Tensor | None = None,
                         max_new_tokens: int = 32, seeds: int | Tensor | None = None,
                         eos_token_id: int | list[int] | None = None, pad_token_id: int = 0,
                         generator: torch.Generator | None = None) -> GenerationOutput:
    """Generate under a token constraint with :func:`awrs_sample` at every step.

    Args:
        constraint: ``constraint(context, tokens) -> bool`` with ``context`` ``[n, T]`` (each asking row's prompt
            and generated tokens, padded with ``pad_token_id``) and ``tokens`` ``[n]`` candidates.
        Others as :func:`~vistok.samplers.generate`.

    ``stats``: ``evaluations`` (constraint calls per row, ``[B]``), ``vocab_evaluations`` (what checking the
    whole vocabulary at every step would cost), ``log_weight`` (``[B]``, sum over steps: the log importance
    weight of each row's sequence, ``-inf`` if a step had no allowed token; the row then ends).

    The constraint applies after ``config``'s processing: what temperature 0, top-k or top-p leave out is never a
    candidate, so a row whose remaining tokens are all forbidden ends there (greedy decoding whose top token is
    forbidden ends at once, with weight ``-inf``, rather than taking the best allowed token).
    """
    check_causal_lm(model, "model")
    config = check_decoding(config, pad_token_id)
    input_ids, mask = prepare_prompt(input_ids, attention_mask)
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    batch = input_ids.shape[0]
    device = next(model.parameters()).device
    seeds = None if seeds is None else as_seeds(seeds, batch, device)
    eos = eos_set(eos_token_id, device)
    started = time.perf_counter()
    prompt = input_ids.to(device).masked_fill(~mask.to(device), pad_token_id)
    state = CausalLMState(model, batch, device)
    logits = state.prefill(prompt, mask)
    new_tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    log_weight = torch.zeros(batch, dtype=torch.float64, device=device)
    evaluations = torch.zeros(batch, dtype=torch.long, device=device)
    vocab_evaluations = 0
    for step in range(max_new_tokens):
        live = ~done
        rows = live.nonzero()[:, 0]
        asking = _RowConstraint(constraint, torch.cat([prompt, new_tokens[:, :step]], dim=1), rows)
        result = awrs_sample(config.for_rows(rows).process(logits[live].float()), asking,
                             seeds=None if seeds is None else seeds[live], counter=state.lengths[live],
                             generator=generator)
        token = torch.full((batch,), pad_token_id, dtype=torch.long, device=device)
        token[live] = result.tokens.clamp(min=0)
        evaluations[live] += result.evaluations
        vocab_evaluations += int(live.sum()) * logits.shape[1]
        log_weight[live] += result.log_weight
        failed = torch.zeros_like(done)
        failed[live] = result.tokens < 0
        emitted = live & ~failed
        new_tokens[:, step] = torch.where(emitted, token, pad_token_id)
        lengths += emitted.long()
        done = done | failed | (emitted & torch.isin(token, eos))
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = state.feed(token[:, None], ~done[:, None], last_only=True)[:, -1]
    stats = {"evaluations": evaluations, "vocab_evaluations": vocab_evaluations, "log_weight": log_weight,
             "forward_calls": state.forward_calls, "seconds": time.perf_counter() - started,
             "new_tokens": int(lengths.sum())}
    return GenerationOutput(torch.cat([input_ids.to(device), new_tokens], dim=1), new_tokens, lengths, stats)
