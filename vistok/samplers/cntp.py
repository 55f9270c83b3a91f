"""Cautious next-token prediction (CNTP; Wang et al., Findings of ACL 2025).

At each step the entropy ``H`` of the (processed) next-token distribution decides how cautious to be::

    N = floor(min_trials + (max_trials - min_trials) * clamp((H - entropy_low) / (entropy_high - entropy_low), 0, 1))

``N = 1``: sample one token as usual. ``N > 1``: sample ``N`` independent trials from this point, each until it
emits a stop token (punctuation), an end-of-sequence token or runs out of budget, and keep the trial with the
lowest perplexity ``exp(-mean log p)`` (its tokens' log-probabilities under the processed distributions). The
defaults are the authors' (``entropy_low = 0.01``, ``entropy_high = 1.5``, ``max_trials = 10``).

The trials of all rows run as one batch on copies of the rows' KV caches (one forward per trial token, not one
per trial), and rows that need no trials take their single token in the same forwards.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import is_int, is_real
from ..errors import InvalidConfigError
from . import rng
from ._decoding import CausalLMState, check_causal_lm, check_full_attention
from ._params import check_token_ids
from .generation import GenerationOutput, check_decoding, check_max_new_tokens, eos_set, prepare_prompt
from .pipeline import SamplingConfig
from .sampling import as_seeds, sample

__all__ = ["CNTPConfig", "cntp_generate", "punctuation_token_ids", "trial_counts", "DEFAULT_PUNCTUATION"]

DEFAULT_PUNCTUATION = (".", ",", "\n", "?", "!", ":", ";", ")", "]", "}")  # the authors' list


@dataclass(frozen=True)
class CNTPConfig:
    """Options of :func:`cntp_generate`.

    Attributes:
        entropy_low, entropy_high: entropies (nats) mapped to ``min_trials`` and ``max_trials``.
        min_trials, max_trials: the trial count range (``min_trials = 1``: confident steps sample one token).
        max_trial_tokens: a trial that emits no stop token ends after this many tokens (the authors' trials
            run until punctuation or the generation's own end; this bounds the cost).
    """

    entropy_low: float = 0.01
    entropy_high: float = 1.5
    min_trials: int = 1
    max_trials: int = 10
    max_trial_tokens: int = 32

    def __post_init__(self) -> None:
        if not (is_real(self.entropy_low) and is_real(self.entropy_high) and math.isfinite(self.entropy_low)
                and math.isfinite(self.entropy_high) and 0 <= self.entropy_low < self.entropy_high):
            raise InvalidConfigError(f"need 0 <= entropy_low < entropy_high, got {self.entropy_low}, "
                                     f"{self.entropy_high}")
        for name in ("min_trials", "max_trials", "max_trial_tokens"):
            value = getattr(self, name)
            if not is_int(value, 1):
                raise InvalidConfigError(f"{name} must be an int >= 1, got {value!r}")
        if self.min_trials > self.max_trials:
            raise InvalidConfigError(f"min_trials ({self.min_trials}) exceeds max_trials ({self.max_trials})")


def trial_counts(entropy: Tensor, cntp: CNTPConfig) -> Tensor:
    """``[B]`` trial counts for ``[B]`` entropies (the linear rule above, rounded down)."""
    share = ((entropy - cntp.entropy_low) / (cntp.entropy_high - cntp.entropy_low)).clamp(0, 1)
    return (cntp.min_trials + (cntp.max_trials - cntp.min_trials) * share).floor().long()


def punctuation_token_ids(tokenizer, marks: Iterable[str] = DEFAULT_PUNCTUATION) -> list[int]:
    """Ids of the tokens whose text, trailing spaces aside, ends with one of ``marks``: the stop tokens of the
    trials. (The authors take the single-token encodings of the marks; a BPE vocabulary also has merged tokens
    such as ``".\n\n"`` or ``"),"`` that end a clause.)"""
    marks = tuple(marks)
    return [i for i in range(len(tokenizer)) if tokenizer.decode([i]).rstrip(" ").endswith(marks)]


@torch.no_grad()
def cntp_generate(model: nn.Module, input_ids: Tensor, config: SamplingConfig | None = None,
                  cntp: CNTPConfig | None = None, *, stop_token_ids: Iterable[int] | Tensor,
                  attention_mask: Tensor | None = None, max_new_tokens: int = 64, seeds: int | Tensor | None = None,
                  eos_token_id: int | list[int] | None = None, pad_token_id: int = 0,
                  generator: torch.Generator | None = None) -> GenerationOutput:
    """Generate with cautious next-token prediction.

    Arguments as :func:`~vistok.samplers.generate`, plus ``cntp`` (:class:`CNTPConfig`) and
    ``stop_token_ids`` (e.g. :func:`punctuation_token_ids`). With ``seeds``, each row's output depends only on
    its seed. Steps whose trial count is 1 sample exactly like :func:`~vistok.samplers.generate` with the same
    seed, so with ``entropy_low`` above every entropy, the two give the same text.

    ``stats`` adds ``cautious_steps`` (row-steps that ran trials), ``trials`` (trials run) and ``trial_tokens``
    (tokens sampled inside trials), and ``steps``: per row, a list of ``(trial count, chosen trial
    perplexity, all trial perplexities)`` for each step that ran trials.
    """
    check_causal_lm(model, "model")
    check_full_attention(model, "model", "cautious next-token prediction")
    config = check_decoding(config, pad_token_id)
    if cntp is not None and not isinstance(cntp, CNTPConfig):
        raise InvalidConfigError(f"cntp must be a CNTPConfig (or None), got {type(cntp).__name__}")
    cntp = cntp or CNTPConfig()
    input_ids, mask = prepare_prompt(input_ids, attention_mask)
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    batch = input_ids.shape[0]
    device = next(model.parameters()).device
    seeds = None if seeds is None else as_seeds(seeds, batch, device)
    stops = check_token_ids(stop_token_ids if isinstance(stop_token_ids, Tensor) else list(stop_token_ids),
                            "stop_token_ids").to(device)
    eos = eos_set(eos_token_id, device)
    started = time.perf_counter()

    state = CausalLMState(model, batch, device)
    logits = state.prefill(input_ids, mask)
    new_tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    stats = {"cautious_steps": 0, "trials": 0, "trial_tokens": 0, "steps": [[] for _ in range(batch)]}
    while True:
        processed = config.process(logits.float())
        log_probs = processed.double().log_softmax(dim=1)
        entropy = -torch.special.xlogy(log_probs.exp(), log_probs.exp()).sum(dim=1)
        counts = torch.where(done, 1, trial_counts(entropy, cntp))
        if bool((counts == 1).all()):
            token = sample(processed, seeds=seeds, counter=state.lengths, generator=generator)
            segment = torch.where(done, pad_token_id, token)[:, None]
            segment_length = (~done).long()
        else:
            segment, segment_length = _run_trials(state, processed, counts, config, cntp, stops, eos, seeds,
                                                  generator, done, max_new_tokens - lengths, stats)
        # Append the segments; the last token of each is fed at the next step.
        at_row, at_position = (torch.arange(segment.shape[1], device=device)[None, :]
                               < segment_length[:, None]).nonzero(as_tuple=True)
        new_tokens[at_row, lengths[at_row] + at_position] = segment[at_row, at_position]
        last = segment.gather(1, (segment_length - 1).clamp(min=0)[:, None])[:, 0]
        lengths += segment_length
        ended = torch.isin(segment, eos) & (torch.arange(segment.shape[1], device=device) < segment_length[:, None])
        done = done | ended.any(dim=1) | (lengths >= max_new_tokens)
        if bool(done.all()):
            break
        logits = state.feed(last[:, None], ~done[:, None], last_only=True)[:, -1]
    stats.update(forward_calls=state.forward_calls, seconds=time.perf_counter() - started,
                 new_tokens=int(lengths.sum()))
    return GenerationOutput(torch.cat([input_ids.to(device), new_tokens], dim=1), new_tokens, lengths, stats)


def _run_trials(state: CausalLMState, processed: Tensor, counts: Tensor, config: SamplingConfig,
                cntp: CNTPConfig, stops: Tensor, eos: Tensor, seeds: Tensor | None, generator, done: Tensor,
                budget: Tensor, stats: dict) -> tuple[Tensor, Tensor]:
    """Run ``counts[b]`` trials for every row ``b`` at once; keep each row's best. Returns the chosen segments
    (``[B, L]``) and their lengths (``[B]``); ``state`` is left on the chosen trials, their last token unfed."""
    device = processed.device
    batch = counts.shape[0]
    owner = torch.arange(batch, device=device).repeat_interleave(counts)            # [R] row of each trial
    trial = torch.arange(owner.shape[0], device=device) - (counts.cumsum(0) - counts)[owner]  # index within row
    # A row with one trial takes one token (an ordinary step); with one trial, trial 0 replays generate's draw.
    single = (counts == 1)[owner]
    limit = torch.where(single, 1, torch.minimum(budget[owner], torch.tensor(cntp.max_trial_tokens, device=device)))
    limit = limit.clamp(min=1)
    state.select(owner)
    base = state.lengths
    # Each trial draws from a stream of its own, salted with this step's position. The row's own stream gives only
    # trial 0's first token (the one generate would draw); the steps after this one read it from the chosen
    # segment's end on, so no later draw reuses noise that decided which trial won.
    trial_seeds = None if seeds is None else rng.derive_seeds(rng.derive_seeds(seeds[owner], base), trial)
    step_logits = processed[owner]
    trial_config = config.for_rows(owner)
    rows = owner.shape[0]
    width = int(limit.max())
    tokens = torch.zeros(rows, width, dtype=torch.long, device=device)
    log_prob = torch.zeros(rows, dtype=torch.float64, device=device)
    length = torch.zeros(rows, dtype=torch.long, device=device)
    running = ~done[owner]
    for t in range(width):
        draw_seeds = trial_seeds
        if seeds is not None and t == 0:
            draw_seeds = torch.where(single | (trial == 0), seeds[owner], trial_seeds)
        token = sample(step_logits, seeds=draw_seeds, counter=base + t, generator=generator)
        token_log_prob = step_logits.double().log_softmax(dim=1).gather(1, token[:, None])[:, 0]
        tokens[:, t] = torch.where(running, token, 0)
        log_prob += torch.where(running, token_log_prob, 0.0)
        length += running.long()
        finished = torch.isin(token, stops) | torch.isin(token, eos) | (length >= limit)
        running = running & ~finished
        if not bool(running.any()):
            break
        step_logits = trial_config.process(state.feed(token[:, None], running[:, None], last_only=True)[:, -1].float())
    perplexity = torch.exp(-log_prob / length.clamp(min=1))
    best = torch.full((batch,), math.inf, dtype=torch.float64, device=device)
    best = best.scatter_reduce(0, owner, perplexity, "amin")
    is_best = perplexity == best[owner]
    chosen = torch.full((batch,), rows, dtype=torch.long, device=device)
    chosen = chosen.scatter_reduce(0, owner, torch.arange(rows, device=device).masked_fill(~is_best, rows), "amin")
    state.select(chosen)
    cautious = (counts > 1) & ~done
    stats["cautious_steps"] += int(cautious.sum())
    stats["trials"] += int(counts[cautious].sum())
    stats["trial_tokens"] += int(length[(counts > 1)[owner]].sum())
    for b in cautious.nonzero().flatten().tolist():
        mine = (owner == b).nonzero().flatten()
        stats["steps"][b].append((int(counts[b]), float(perplexity[chosen[b]]), perplexity[mine].tolist()))
    return tokens[chosen], length[chosen]
