"""Speculative sampling with a draft model: standard (one draft) and SpecTr's K-SEQ (several drafts).

Standard (Leviathan et al., 2023; Chen et al., 2023): the draft proposes ``gamma`` tokens ``x_i ~ q``; the
target scores them in one forward; ``x_i`` is accepted with probability ``min(1, p(x_i) / q(x_i))``; at the first
rejection a token is drawn from the residual ``max(0, p - q)`` (normalised) and the block ends; if all are
accepted, a bonus token is drawn from ``p`` after the last one.

K-SEQ (Sun et al., "SpecTr", NeurIPS 2023): ``k`` independent draft sequences. At each position the candidates
still consistent with the accepted prefix are i.i.d. draws from ``q``; they are tried in order, candidate ``i``
accepted with probability ``min(1, p(x_i) / (rho q(x_i)))``; if all fail, a token is drawn from the residual
``p - min(q, p / rho) * (1 - (1 - beta)^k) / beta`` with ``beta = sum min(q, p / rho)``. ``rho`` is the
smallest value in ``[1, k]`` with ``(1 - (1 - beta)^k) / beta <= rho`` (found by bisection), which makes the
residual non-negative. With ``k = 1``, ``rho = 1`` and K-SEQ is the standard rule.

Both are exact: every emitted token is distributed as the target's (processed) next-token distribution given the
tokens before it, whatever the draft. ``q`` may be zero on tokens (a VocabTrim draft): the residual covers them.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from .._checks import is_int
from ..errors import InvalidConfigError
from . import rng
from ._decoding import CausalLMState, check_causal_lm, check_full_attention, output_vocab_size
from ._params import check_token_ids
from .errors import InvalidLogitsError, VocabularyMismatchError
from .generation import GenerationOutput, check_decoding, check_max_new_tokens, eos_set, prepare_prompt
from .pipeline import SamplingConfig
from .sampling import as_seeds, sample

__all__ = ["speculative_verify", "kseq_verify", "kseq_rho", "SpeculativeDecoder"]

# Streams of the per-row random numbers (rng): one per use, so that they never overlap.
_DRAFT, _ACCEPT, _RESIDUAL = 1, 2, 3


def speculative_verify(target_probs: Tensor, draft_probs: Tensor, draft_tokens: Tensor, *,
                       seeds: Tensor | None = None, counter: int | Tensor = 0,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Standard speculative verification of one block per row.

    Args:
        target_probs: ``[B, G + 1, V]`` target distributions after the prefix and after each draft token.
        draft_probs: ``[B, G, V]`` the draft distributions the tokens were drawn from.
        draft_tokens: ``[B, G]``.
        seeds, counter, generator: randomness (see :mod:`vistok.samplers.rng`).

    Returns:
        ``accepted`` (``[B]``, how many draft tokens are kept, ``0..G``) and ``next_token`` (``[B]``, the
        residual draw at the first rejection, or the bonus token when all ``G`` were accepted).
    """
    _check_block(target_probs, draft_probs, draft_tokens, "[B, G]")
    batch, gamma = draft_tokens.shape
    p = target_probs.double()
    q = draft_probs.double()
    p_x = p[:, :gamma].gather(2, draft_tokens[..., None])[..., 0]
    q_x = q.gather(2, draft_tokens[..., None])[..., 0]
    u = rng.uniform(batch, gamma, seeds=seeds, counter=counter, stream=_ACCEPT, generator=generator,
                    device=p.device)
    ok = u * q_x < p_x  # u < min(1, p/q), written without dividing (q_x > 0 for a drawn token)
    accepted = ok.long().cumprod(dim=1).sum(dim=1)
    rows = torch.arange(batch, device=p.device)
    at = p[rows, accepted]
    residual = (at - q[rows, accepted.clamp(max=gamma - 1)]).clamp_(min=0)
    residual = torch.where((accepted < gamma)[:, None], residual, at)
    return accepted, _draw(residual, at, seeds, counter, generator)


def kseq_rho(p: Tensor, q: Tensor, k: Tensor, iterations: int = 50) -> Tensor:
    """SpecTr's ``rho`` per row: the smallest ``rho`` in ``[1, k]`` found by bisection with
    ``(1 - (1 - beta)^k) / beta <= rho``, ``beta = sum min(q, p / rho)`` (``[B, V]``, ``[B, V]``, ``[B]``).
    The returned value always satisfies the inequality (``rho = k`` does)."""
    k = k.to(p.dtype)

    def excess(rho: Tensor) -> Tensor:
        beta = torch.minimum(q, p / rho[:, None]).sum(dim=1).clamp_min(1e-300)
        return (1 - (1 - beta) ** k) / beta - rho

    low, high = torch.ones_like(k), k.clone()
    done = excess(low) <= 0
    high = torch.where(done, low, high)
    for _ in range(iterations):
        middle = (low + high) / 2
        fine = excess(middle) <= 0
        high = torch.where(fine, middle, high)
        low = torch.where(fine, low, middle)
    return high


def kseq_verify(target_probs: Tensor, draft_probs: Tensor, draft_tokens: Tensor, *,
                seeds: Tensor | None = None, counter: int | Tensor = 0,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """SpecTr K-SEQ verification of ``k`` draft sequences per row.

    Args:
        target_probs: ``[B, k, G + 1, V]`` target distributions along each candidate.
        draft_probs: ``[B, k, G, V]``.
        draft_tokens: ``[B, k, G]``, candidate ``j`` drawn from ``draft_probs[:, j]``.

    Returns:
        ``accepted`` (``[B]``), ``tokens`` (``[B, G + 1]``: the ``accepted`` kept draft tokens, then the
        residual or bonus token at index ``accepted``; later entries are meaningless) and ``candidate``
        (``[B]``: a candidate whose draft starts with the kept tokens).
    """
    _check_block(target_probs, draft_probs, draft_tokens, "[B, k, G]")
    batch, k, gamma = draft_tokens.shape
    device = target_probs.device
    rows = torch.arange(batch, device=device)
    active = torch.ones(batch, k, dtype=torch.bool, device=device)
    running = torch.ones(batch, dtype=torch.bool, device=device)
    accepted = torch.zeros(batch, dtype=torch.long, device=device)
    tokens = torch.zeros(batch, gamma + 1, dtype=torch.long, device=device)
    u = rng.uniform(batch, gamma * k, seeds=seeds, counter=counter, stream=_ACCEPT, generator=generator,
                    device=device).view(batch, gamma, k)
    lead = torch.zeros(batch, dtype=torch.long, device=device)
    for t in range(gamma):
        lead = torch.where(running, active.long().argmax(dim=1), lead)  # first candidate matching the prefix
        p = target_probs[rows, lead, t].double()
        q = draft_probs[rows, lead, t].double()
        count = active.sum(dim=1).clamp_(min=1)
        rho = kseq_rho(p, q, count)
        x = draft_tokens[:, :, t]
        hit = active & (u[:, t] * rho[:, None] * q.gather(1, x) < p.gather(1, x))  # u < min(1, p / (rho q))
        any_hit = hit.any(dim=1)
        chosen = x[rows, hit.long().argmax(dim=1)]
        cap = torch.minimum(q, p / rho[:, None])
        beta = cap.sum(dim=1, keepdim=True).clamp_min(1e-300)
        residual = (p - cap * (1 - (1 - beta) ** count[:, None].double()) / beta).clamp_(min=0)
        drawn = _draw(residual, p, seeds, counter, generator, stream=_RESIDUAL + 10 * t)
        tokens[:, t] = torch.where(any_hit, chosen, drawn)
        accepted += (running & any_hit).long()
        running = running & any_hit
        active = active & (x == chosen[:, None]) & running[:, None]
    lead = torch.where(running, active.long().argmax(dim=1), lead)
    tokens[:, gamma] = _draw(target_probs[rows, lead, gamma].double(), None, seeds, counter, generator,
                             stream=_RESIDUAL + 10 * gamma)
    return accepted, tokens, lead


def _check_block(target_probs: Tensor, draft_probs: Tensor, draft_tokens: Tensor, tokens_shape: str) -> None:
    """Refuse a verification block whose shapes do not line up (``target_probs`` one position longer than the
    drafts), whose tokens are not ids of the vocabulary, or whose distributions are not probabilities."""
    for name, tensor in (("target_probs", target_probs), ("draft_probs", draft_probs), ("draft_tokens", draft_tokens)):
        if not isinstance(tensor, Tensor):
            raise InvalidConfigError(f"{name} must be a tensor, got {type(tensor).__name__}")
    rank = len(tokens_shape.split(","))
    lead, vocab = tuple(draft_tokens.shape), target_probs.shape[-1] if target_probs.dim() else 0
    if draft_tokens.dim() != rank or 0 in lead or target_probs.shape != (*lead[:-1], lead[-1] + 1, vocab) \
            or draft_probs.shape != (*lead, vocab) or vocab == 0:
        raise InvalidConfigError(
            f"draft_tokens {tuple(draft_tokens.shape)}, draft_probs {tuple(draft_probs.shape)} and target_probs "
            f"{tuple(target_probs.shape)} do not line up: expected draft_tokens {tokens_shape}, draft_probs "
            f"{tokens_shape[:-1]}, V] and target_probs {tokens_shape[:-2]}G + 1, V] (the target also scores the "
            "position after the last draft)")
    if draft_tokens.is_floating_point() or draft_tokens.is_complex() or draft_tokens.dtype == torch.bool:
        raise InvalidConfigError(f"draft_tokens must be token ids (integers), got {draft_tokens.dtype}")
    if bool(((draft_tokens < 0) | (draft_tokens >= vocab)).any()):
        raise InvalidConfigError(f"draft_tokens must be ids in [0, {vocab}), got values from "
                                 f"{int(draft_tokens.min())} to {int(draft_tokens.max())}")
    for name, probs in (("target_probs", target_probs), ("draft_probs", draft_probs)):
        if not probs.is_floating_point() or bool((probs < 0).any()) or not bool(probs.isfinite().all()):
            raise InvalidLogitsError(f"{name} must be finite, non-negative probabilities (softmax the logits)")


def _draw(weights: Tensor, fallback: Tensor | None, seeds: Tensor | None, counter, generator,
          stream: int = _RESIDUAL) -> Tensor:
    """One token per row from unnormalised ``weights`` (``[B, V]``); rows whose weights sum to 0 (a residual
    that vanished to rounding: the draft already matched the target there) use ``fallback``."""
    if fallback is not None:
        empty = weights.sum(dim=1, keepdim=True) <= 0
        weights = torch.where(empty, fallback, weights)
    return sample(weights.log(), seeds=seeds, counter=counter, stream=stream, generator=generator)


class SpeculativeDecoder:
    """Speculative sampling with a Hugging Face target and draft, batched, with their KV caches.

    Args:
        target: the model whose distribution the output follows.
        draft: a cheaper causal LM over the same vocabulary (e.g. :func:`self_draft`); its logits may cover a
            subset of it given by ``draft_vocab`` (VocabTrim).
        gamma: draft tokens per block.
        num_drafts: ``k`` draft sequences per row (``k > 1``: SpecTr K-SEQ).
        config: the sampling configuration; the output follows the target's distribution processed by it.
        draft_config: how the draft samples its proposals (default: ``config``). Any choice stays exact.
        draft_vocab: ``[M]`` target token ids of the draft's ``M`` logits (``None``: the same vocabulary).

    Raises:
        VocabularyMismatchError: the draft's logits do not line up with the target's vocabulary.
    """

    def __init__(self, target: nn.Module, draft: nn.Module, *, gamma: int = 4, num_drafts: int = 1,
                 config: SamplingConfig | None = None, draft_config: SamplingConfig | None = None,
                 draft_vocab: Tensor | None = None) -> None:
        for role, model in (("target", target), ("draft", draft)):
            check_causal_lm(model, role)
            check_full_attention(model, role, "speculative decoding")
        for name, value in (("gamma", gamma), ("num_drafts", num_drafts)):
            if not is_int(value, 1):
                raise InvalidConfigError(f"{name} must be an int >= 1, got {value!r}")
        self.target, self.draft = target, draft
        self.gamma, self.num_drafts = gamma, num_drafts
        self.config = check_decoding(config, 0)
        self.draft_config = self.config if draft_config is None else check_decoding(draft_config, 0)
        self.vocab_size = output_vocab_size(target)
        self.draft_vocab = None if draft_vocab is None else check_token_ids(draft_vocab, "draft_vocab",
                                                                            VocabularyMismatchError)
        self._check_vocab(output_vocab_size(draft))

    def _check_vocab(self, draft_width: int | None) -> None:
        if self.draft_vocab is not None and self.vocab_size is None:
            raise VocabularyMismatchError("a draft_vocab maps the draft's logits into the target's vocabulary, whose "
                                          "size vistok cannot read from this target (no output head it knows)")
        if draft_width is None or self.vocab_size is None:
            return
        if self.draft_vocab is None:
            if draft_width != self.vocab_size:
                raise VocabularyMismatchError(
                    f"the draft has {draft_width} output tokens and the target {self.vocab_size}: speculative "
                    "sampling needs the same vocabulary (or a draft_vocab map for a trimmed draft head)")
            return
        ids = self.draft_vocab
        if ids.dim() != 1 or ids.numel() != draft_width:
            raise VocabularyMismatchError(f"draft_vocab lists {ids.numel()} ids but the draft has {draft_width} "
                                          "output tokens")
        if bool((ids < 0).any() or (ids >= self.vocab_size).any()) or ids.unique().numel() != ids.numel():
            raise VocabularyMismatchError("draft_vocab must hold distinct target token ids in "
                                          f"[0, {self.vocab_size})")

    def _draft_probs(self, logits: Tensor, config: SamplingConfig) -> Tensor:
        """Draft logits (``[R, M]``) -> processed probabilities over the target vocabulary (``[R, V]``)."""
        probs = config.process(logits.float()).double().softmax(dim=1)
        if self.draft_vocab is None:
            if self.vocab_size is not None and probs.shape[1] != self.vocab_size:
                raise VocabularyMismatchError(f"the draft returned {probs.shape[1]} logits, the target "
                                              f"vocabulary has {self.vocab_size}")
            return probs
        if probs.shape[1] != self.draft_vocab.numel():
            raise VocabularyMismatchError(f"the draft returned {probs.shape[1]} logits, but draft_vocab lists "
                                          f"{self.draft_vocab.numel()} ids")
        full = probs.new_zeros(probs.shape[0], self.vocab_size)
        return full.index_copy_(1, self.draft_vocab.to(probs.device), probs)

    def _propose(self, draft: CausalLMState, pending: Tensor, pending_valid: Tensor | None,
                 config: SamplingConfig, seeds: Tensor | None, iteration: int, generator) -> tuple[Tensor, Tensor]:
        """Draft ``gamma`` tokens in every candidate row: ``[R, G]`` tokens and ``[R, G, V]`` their distributions."""
        tokens, distributions = [], []
        for j in range(self.gamma):
            logits = draft.feed(pending, pending_valid, last_only=True)[:, -1]
            probs = self._draft_probs(logits, config)
            token = sample(probs.log(), seeds=seeds, counter=iteration * (self.gamma + 1) + j, stream=_DRAFT,
                           generator=generator)
            tokens.append(token)
            distributions.append(probs)
            pending, pending_valid = token[:, None], None
        return torch.stack(tokens, dim=1), torch.stack(distributions, dim=1)

    def _score(self, target: CausalLMState, pending: Tensor, pending_valid: Tensor, drafted: Tensor,
               config: SamplingConfig, batch: int) -> Tensor:
        """One target forward over the last prefix token and the drafts: ``[B, k, G + 1, V]`` distributions."""
        feed = torch.cat([pending, drafted], dim=1)
        valid = torch.cat([pending_valid, torch.ones_like(drafted, dtype=torch.bool)], dim=1)
        logits = target.feed(feed, valid)
        width = logits.shape[-1]
        if self.vocab_size is not None and width != self.vocab_size:
            raise VocabularyMismatchError(f"the target returned {width} logits, expected {self.vocab_size}")
        probs = config.process(logits.reshape(-1, width).float()).double().softmax(dim=1)
        return probs.view(batch, self.num_drafts, self.gamma + 1, width)

    def _verify(self, target_probs: Tensor, draft_probs: Tensor, drafted: Tensor, seeds: Tensor | None,
                iteration: int, generator) -> tuple[Tensor, Tensor, Tensor]:
        """``accepted`` ``[B]``, ``tokens`` ``[B, G + 1]`` (accepted drafts, then the next token) and the lead
        candidate ``[B]`` (see :func:`kseq_verify`)."""
        batch, k, gamma = target_probs.shape[0], self.num_drafts, self.gamma
        if k > 1:
            return kseq_verify(target_probs, draft_probs.view(batch, k, gamma, -1), drafted.view(batch, k, gamma),
                               seeds=seeds, counter=iteration, generator=generator)
        accepted, next_token = speculative_verify(target_probs[:, 0], draft_probs, drafted, seeds=seeds,
                                                  counter=iteration, generator=generator)
        tokens = torch.cat([drafted, next_token[:, None]], dim=1)
        tokens[torch.arange(batch, device=tokens.device), accepted] = next_token
        return accepted, tokens, torch.zeros_like(accepted)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, *, attention_mask: Tensor | None = None, max_new_tokens: int = 32,
                 seeds: int | Tensor | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int = 0, generator: torch.Generator | None = None) -> GenerationOutput:
        """Generate like :func:`~vistok.samplers.generate` (same arguments), ``gamma`` draft tokens at a time.

        ``stats``: ``iterations`` (target forwards after the prompt), ``proposed`` and ``accepted`` draft
        tokens (rows still generating), ``acceptance_rate``, ``tokens_per_target_call`` (the tokens a row gains per
        target forward it takes part in, a finished row's no longer counted), forward counts, seconds.
        """
        check_decoding(self.config, pad_token_id)
        input_ids, mask = prepare_prompt(input_ids, attention_mask)
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        batch, k, gamma = input_ids.shape[0], self.num_drafts, self.gamma
        device = next(self.target.parameters()).device
        seeds = None if seeds is None else as_seeds(seeds, batch, device)
        row_seeds = None if seeds is None else seeds.repeat_interleave(k)
        candidate_salt = torch.arange(batch * k, device=device) % k
        draft_seeds = None if seeds is None else rng.derive_seeds(row_seeds, candidate_salt)
        eos = eos_set(eos_token_id, device)
        config = _repeat_config(self.config, k * (gamma + 1))
        draft_config = _repeat_config(self.draft_config, k)
        started = time.perf_counter()

        prompt = input_ids.to(device).repeat_interleave(k, dim=0)
        prompt_mask = mask.to(device).repeat_interleave(k, dim=0)
        target = CausalLMState(self.target, batch * k, device)
        draft = CausalLMState(self.draft, batch * k, device)
        # Both models see every prompt token but the last one, which they feed with their next block.
        if prompt.shape[1] > 1:
            target.prefill(prompt[:, :-1], prompt_mask[:, :-1])
            draft.prefill(prompt[:, :-1], prompt_mask[:, :-1])
        target_pending, target_pending_valid = prompt[:, -1:], prompt_mask[:, -1:]
        draft_pending, draft_pending_valid = target_pending, target_pending_valid

        new_tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        rows = torch.arange(batch, device=device)
        proposed = accepted_total = iterations = 0
        while not bool(done.all()):
            drafted, draft_probs = self._propose(draft, draft_pending, draft_pending_valid, draft_config, draft_seeds,
                                                 iterations, generator)
            target_probs = self._score(target, target_pending, target_pending_valid, drafted, config, batch)
            accepted, tokens, lead = self._verify(target_probs, draft_probs, drafted, seeds, iterations, generator)
            proposed += int((~done).sum()) * gamma
            accepted_total += int(accepted[~done].sum())
            lengths, done = _emit(tokens, accepted, done, lengths, new_tokens, eos, max_new_tokens)
            iterations += 1
            if bool(done.all()):
                break
            # Roll both caches back to the accepted prefix (that of the lead candidate, copied to all k). The target
            # fed the last prefix token and the G drafts; the draft fed its pending tokens and drafts 1..G-1.
            position = torch.arange(gamma + 1, device=device)[None, :]
            target.invalidate((position <= accepted[:, None]).repeat_interleave(k, dim=0))
            draft.invalidate((position[:, :gamma - 1] < accepted[:, None]).repeat_interleave(k, dim=0))
            if k > 1:
                lead_rows = (lead + rows * k).repeat_interleave(k)
                target.select(lead_rows)
                draft.select(lead_rows)
            next_token = tokens[rows, accepted].repeat_interleave(k)
            target_pending, target_pending_valid = next_token[:, None], ~done.repeat_interleave(k)[:, None]
            # The draft also still needs its last draft token when all were accepted.
            last_draft = drafted.view(batch, k, gamma)[rows, lead, -1].repeat_interleave(k)
            all_accepted = (accepted == gamma).repeat_interleave(k)
            draft_pending = torch.stack([last_draft, next_token], dim=1)
            draft_pending_valid = torch.stack([all_accepted, torch.ones_like(all_accepted)], dim=1)
            draft_pending_valid &= target_pending_valid
        stats = {
            "iterations": iterations,
            "proposed": proposed,
            "accepted": accepted_total,
            "acceptance_rate": accepted_total / max(proposed, 1),
            "tokens_per_target_call": float(lengths.sum()) / max(proposed // gamma, 1),  # per row and forward it ran
            "target_forward_calls": target.forward_calls,
            "draft_forward_calls": draft.forward_calls,
            "seconds": time.perf_counter() - started,
            "new_tokens": int(lengths.sum()),
        }
        return GenerationOutput(torch.cat([input_ids.to(device), new_tokens], dim=1), new_tokens, lengths, stats)


def _emit(tokens: Tensor, accepted: Tensor, done: Tensor, lengths: Tensor, new_tokens: Tensor, eos: Tensor,
          max_new_tokens: int) -> tuple[Tensor, Tensor]:
    """Write the ``accepted + 1`` tokens of each live row into ``new_tokens``, stopping after an EOS and at
    ``max_new_tokens``. Returns the new ``lengths`` and ``done``."""
    position = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
    emitting = (position <= accepted[:, None]) & ~done[:, None]
    is_eos = torch.isin(tokens, eos) & emitting
    after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    emitting &= ~after_eos & (position < (max_new_tokens - lengths)[:, None])
    at_row, at_position = emitting.nonzero(as_tuple=True)
    new_tokens[at_row, lengths[at_row] + at_position] = tokens[at_row, at_position]
    lengths = lengths + emitting.sum(dim=1)
    return lengths, done | (is_eos & emitting).any(dim=1) | (lengths >= max_new_tokens)


def _repeat_config(config: SamplingConfig, repeats: int) -> SamplingConfig:
    """The config for rows repeated ``repeats`` times each (per-row tensors repeated alike)."""
    changes = {name: value.repeat_interleave(repeats) for name, value in vars(config).items()
               if isinstance(value, Tensor)}
    return config.replace(**changes) if changes else config

