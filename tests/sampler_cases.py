"""Shared helpers of the sampler tests: logit cases, a chi-square test, tiny random causal LMs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

KINDS = ("normal", "ties", "heavy_ties", "extreme", "peaked")


def logit_cases(seed: int, batch: int = 12, vocab: int = 2000, dtype: torch.dtype = torch.float64) -> Tensor:
    """Random ``[batch, vocab]`` logits of one of :data:`KINDS` (cycling with ``seed``).

    ``ties``/``heavy_ties`` round the logits so that many tokens share a value; ``extreme`` mixes ``-inf``
    tokens, huge offsets, rows of nearly equal logits and very wide rows; ``peaked`` looks like an LLM's output
    (a few dominant tokens over a long tail).
    """
    g = torch.Generator().manual_seed(seed)
    kind = KINDS[seed % len(KINDS)]
    scale = 0.3 + 4 * torch.rand(batch, 1, generator=g, dtype=torch.float64)
    x = torch.randn(batch, vocab, generator=g, dtype=torch.float64) * scale
    if kind == "ties":
        x = (x * 2).round() / 2
    elif kind == "heavy_ties":
        x = x.round().clamp(-2, 2)
    elif kind == "extreme":
        x = x.masked_fill(torch.rand(batch, vocab, generator=g) < 0.3, -math.inf)
        x[:, 0] = torch.randn(batch, generator=g, dtype=torch.float64)  # at least one finite logit per row
        special = [lambda r: r * 1e-6,                  # almost uniform
                   lambda r: r + 1e4,                   # huge offset
                   lambda r: r * 300,                   # extremely peaked
                   lambda r: torch.cat([r[:1], torch.full_like(r[1:], -math.inf)])]  # a single possible token
        for row, change in zip(range(batch), special, strict=False):
            x[row] = change(x[row])
    elif kind == "peaked":
        x[:, :8] += 6 + 6 * torch.rand(batch, 8, generator=g, dtype=torch.float64)
    return x.to(dtype)


def tie_complete(logits: Tensor, keep: Tensor) -> Tensor:
    """Extend a keep mask that is a prefix of the descending order of ``logits`` to every token tied with its
    last element (what vistok keeps when Hugging Face splits a tie)."""
    lowest = logits.masked_fill(~keep, math.inf).amin(dim=1, keepdim=True)
    return keep | (logits >= lowest)


def chi_square_pvalue(counts: Tensor, probs: Tensor, min_expected: float = 5.0) -> float:
    """Pearson's chi-square goodness-of-fit p-value of ``counts`` (``[K]``) against ``probs`` (``[K]``).
    Categories expected to get fewer than ``min_expected`` draws are pooled into one."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    total = counts.sum()
    expected = probs / probs.sum() * total
    small = expected < min_expected
    if bool(small.any()):
        counts = torch.cat([counts[~small], counts[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    assert bool((counts[~keep] == 0).all()), "draws in a category of probability 0"
    counts, expected = counts[keep], expected[keep]
    statistic = ((counts - expected) ** 2 / expected).sum()
    dof = counts.numel() - 1
    if dof < 1:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


def tiny_llama(seed: int = 0, vocab: int = 24, layers: int = 2, hidden: int = 32, scale: float = 1.0):
    """A small random ``LlamaForCausalLM`` (CPU, float32, eval). ``scale`` multiplies the LM head, making the
    next-token distributions more (>1) or less peaked."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def chain_llama(table: Tensor):
    """A one-layer ``LlamaForCausalLM`` (running its KV cache as usual) whose next-token distribution is
    ``table[last token]`` (``[V, V]`` probabilities): a Markov chain with exactly known distributions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class ChainLlama(LlamaForCausalLM):
        def forward(self, input_ids=None, logits_to_keep=0, **kwargs):
            out = super().forward(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)
            logits = table.log().float()[input_ids]
            out.logits = logits[:, -logits_to_keep:] if logits_to_keep else logits
            return out

    torch.manual_seed(0)
    vocab = table.shape[0]
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return ChainLlama(config).eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module to run it with one intra-op thread (restored afterwards): these tests are many
    small tensor ops, which two threads do not speed up and which stall whenever the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


P_MIN = 1e-3  # the chi-square tests' threshold: fixed seeds, so each test always passes or always fails


def markov(seed, vocab, sharpness):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(vocab, vocab, generator=g, dtype=torch.float64) * sharpness).softmax(dim=1)


def draft_block(q_table, start, gamma, k, draws, seed):
    """``draws`` rows of ``k`` draft sequences of ``gamma`` tokens from the chain ``q`` after ``start``."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(draws, k, gamma, dtype=torch.long)
    previous = torch.full((draws, k), start)
    for t in range(gamma):
        probs = q_table[previous.flatten()]
        previous = torch.multinomial(probs, 1, generator=g).view(draws, k)
        tokens[:, :, t] = previous
    return tokens


def chain_probs(table, start, tokens):
    """``[..., G + 1, V]`` next-token distributions after ``start`` and after each token."""
    previous = torch.cat([torch.full_like(tokens[..., :1], start), tokens], dim=-1)
    return table[previous]


def emitted_pairs(accepted, tokens):
    """First two emitted tokens of each row (``tokens`` holds accepted drafts then the next token)."""
    return tokens[:, 0], tokens[:, 1], accepted >= 1


def bonus_test(p_table, accepted, tokens, gamma):
    """Chi-square: in rows that accepted all ``gamma`` drafts, the extra token after them ~ p(.|last draft)
    (``pair_test`` sees only the first two emitted tokens, never this one when ``gamma >= 2``)."""
    vocab = p_table.shape[0]
    full = accepted == gamma
    assert int(full.sum()) >= 300, "too few rows accepted every draft to test the bonus token"
    last, bonus = tokens[full, gamma - 1], tokens[full, gamma]
    counts = torch.bincount(last * vocab + bonus, minlength=vocab * vocab)
    expected = (torch.bincount(last, minlength=vocab)[:, None] * p_table).flatten()
    assert chi_square_pvalue(counts, expected) > P_MIN


def pair_test(p_table, start, first, second, has_second):
    """Chi-square: the first token ~ p(.|start); the second ~ p(.|first) among rows that emitted two."""
    vocab = p_table.shape[0]
    assert chi_square_pvalue(torch.bincount(first, minlength=vocab), p_table[start]) > P_MIN
    pairs = first[has_second] * vocab + second[has_second]
    counts = torch.bincount(pairs, minlength=vocab * vocab)
    expected = (torch.bincount(first[has_second], minlength=vocab)[:, None] * p_table).flatten()
    assert chi_square_pvalue(counts, expected) > P_MIN
