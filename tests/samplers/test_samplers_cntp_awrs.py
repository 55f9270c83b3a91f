"""Cautious next-token prediction and adaptive weighted rejection sampling on small models and distributions."""

import math

import pytest
import torch
from sampler_cases import chain_llama, chi_square_pvalue, one_thread, tiny_llama  # noqa: F401 (fixture)

from vistok import InvalidConfigError
from vistok.samplers import (
    CNTPConfig,
    SamplingConfig,
    awrs_sample,
    cntp_generate,
    constrained_generate,
    generate,
)
from vistok.samplers.cntp import trial_counts

pytest.importorskip("transformers")
P_MIN = 1e-3
STOPS = [3, 4]  # the "punctuation" of the tiny vocabulary


@pytest.fixture(scope="module")
def model():
    return tiny_llama(3, vocab=16, scale=1.5)


PROMPTS = torch.tensor([[0, 1, 5, 6], [1, 7, 8, 9], [0, 0, 1, 10]])
MASK = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]]).bool()


def test_trial_counts_follow_the_linear_rule():
    cntp = CNTPConfig(entropy_low=0.5, entropy_high=2.5, max_trials=5)
    counts = trial_counts(torch.tensor([0.0, 0.5, 1.0, 1.49, 1.5, 2.5, 9.0]), cntp)
    assert counts.tolist() == [1, 1, 2, 2, 3, 5, 5]  # 1 + 4 * share, rounded down


def test_without_uncertainty_cntp_is_plain_sampling(model):
    """Every step has one trial when entropy_low is above every entropy: same text as generate."""
    cntp = CNTPConfig(entropy_low=50.0, entropy_high=60.0)
    seeds = torch.tensor([3, 4, 5])
    ours = cntp_generate(model, PROMPTS, cntp=cntp, stop_token_ids=STOPS, attention_mask=MASK, max_new_tokens=10,
                         seeds=seeds)
    plain = generate(model, PROMPTS, attention_mask=MASK, max_new_tokens=10, seeds=seeds)
    assert torch.equal(ours.sequences, plain.sequences) and ours.stats["cautious_steps"] == 0


def test_cautious_steps_keep_the_lowest_perplexity_trial(model):
    cntp = CNTPConfig(entropy_low=0.0, entropy_high=1.0, max_trials=4, max_trial_tokens=6)
    out = cntp_generate(model, PROMPTS, cntp=cntp, stop_token_ids=STOPS, attention_mask=MASK, max_new_tokens=20,
                        seeds=torch.tensor([1, 2, 3]))
    assert out.stats["cautious_steps"] > 0 and out.stats["trials"] >= 2 * out.stats["cautious_steps"]
    for steps in out.stats["steps"]:
        for count, chosen, perplexities in steps:
            assert len(perplexities) == count and chosen == min(perplexities)
    # Each cautious segment ends at a stop token, at max_trial_tokens, or at the end of the budget.
    assert bool((out.lengths == 20).all())


def test_cntp_segments_end_at_stop_tokens(model):
    """With stop tokens everywhere but one token, every trial is one token long; with none, trials run to
    max_trial_tokens."""
    cntp = CNTPConfig(entropy_low=0.0, entropy_high=0.1, max_trials=3, max_trial_tokens=5)
    out = cntp_generate(model, PROMPTS, cntp=cntp, stop_token_ids=[], attention_mask=MASK, max_new_tokens=15,
                        seeds=torch.tensor([1, 2, 3]))
    assert out.stats["trial_tokens"] == 5 * out.stats["trials"]  # 15 = 3 segments of 5 tokens per row
    everything = list(range(16))
    short = cntp_generate(model, PROMPTS, cntp=cntp, stop_token_ids=everything, attention_mask=MASK,
                          max_new_tokens=6, seeds=torch.tensor([1, 2, 3]))
    assert short.stats["trial_tokens"] == short.stats["trials"]


def test_cntp_rows_are_independent(model):
    cntp = CNTPConfig(entropy_low=0.0, entropy_high=2.0, max_trials=3, max_trial_tokens=4)
    seeds = torch.tensor([7, 8, 9])
    config = SamplingConfig(top_k=8)
    both = cntp_generate(model, PROMPTS, config, cntp, stop_token_ids=STOPS, attention_mask=MASK,
                         max_new_tokens=12, seeds=seeds, eos_token_id=2)
    for row in range(3):
        alone = cntp_generate(model, PROMPTS[row:row + 1, MASK[row]], config, cntp, stop_token_ids=STOPS,
                              max_new_tokens=12, seeds=seeds[row:row + 1], eos_token_id=2)
        assert torch.equal(alone.new_tokens[0], both.new_tokens[row])


def test_cntp_rows_end_at_their_end_token(model):
    """With eos_token_id a row ends at its first EOS, also one drawn inside a cautious step's trial: EOS is its last
    token and padding follows. Trials that stopped only at stop tokens ran on past EOS and emitted text after it."""
    rows, new = 40, 12
    cntp = CNTPConfig(entropy_low=0.0, entropy_high=0.5, max_trials=4)
    out = cntp_generate(model, PROMPTS[1:2].expand(rows, -1), cntp=cntp, stop_token_ids=STOPS, max_new_tokens=new,
                        seeds=torch.arange(rows), eos_token_id=2, pad_token_id=0)
    assert out.stats["cautious_steps"] > 0
    for row in range(rows):
        tokens, n = out.new_tokens[row], int(out.lengths[row])
        first_eos = (tokens[:n] == 2).nonzero()
        assert int(first_eos[0]) == n - 1 if first_eos.numel() else n == new, row
        assert bool((tokens[n:] == 0).all()), row
    assert bool((out.lengths < new).any()), "the test needs rows that end at EOS"


def test_the_step_after_a_cautious_one_samples_the_model():
    """A chain whose step after token 1 is uncertain (two trials: stop with 0, or go on with 2) and certain after
    that: the token after a chosen segment [0] follows the model's distribution after 0. Reusing the noise of the
    losing trial (it drew its second token where the next step draws) made 3 come 0.25 of the time, not 0.15."""
    table = torch.tensor([[0.0, 0.0, 0.85, 0.15],  # after 0 (the stop token)
                          [0.5, 0.0, 0.5, 0.0],  # after 1: entropy log 2, cautious
                          [0.0, 0.0, 0.85, 0.15],
                          [0.0, 0.0, 0.85, 0.15]], dtype=torch.float64)
    rows = 8000
    cntp = CNTPConfig(entropy_low=0.5, entropy_high=0.6, max_trials=2, max_trial_tokens=2)
    out = cntp_generate(chain_llama(table), torch.ones(rows, 1, dtype=torch.long), cntp=cntp, stop_token_ids=[0],
                        max_new_tokens=3, seeds=torch.arange(rows))
    stopped = out.new_tokens[:, 0] == 0
    assert out.stats["cautious_steps"] == rows and int(stopped.sum()) > rows // 5
    after = torch.bincount(out.new_tokens[stopped, 1], minlength=4)
    assert chi_square_pvalue(after, table[0]) > P_MIN


def test_cntp_stop_tokens_are_checked(model):
    for bad, message in (([15.9], "stop_token_ids must be token ids"), ([True], "a bool is no token id"),
                         ([-1], "negative token id"), (torch.tensor([[3], [5]]), "1-D integer tensor")):
        with pytest.raises(InvalidConfigError, match=message):
            cntp_generate(model, PROMPTS, stop_token_ids=bad, attention_mask=MASK, max_new_tokens=2)


def test_cntp_config_validation():
    for bad in (dict(entropy_low=2.0, entropy_high=1.0), dict(max_trials=0), dict(min_trials=3, max_trials=2),
                dict(max_trial_tokens=0), dict(entropy_low=float("nan")), dict(entropy_low="0"),
                dict(entropy_low=False, entropy_high=True)):
        with pytest.raises(InvalidConfigError):
            CNTPConfig(**bad)


# ---------------------------------------------------------------------------------------------------------------
# Adaptive weighted rejection sampling
# ---------------------------------------------------------------------------------------------------------------

def table_constraint(allowed):
    """A constraint given as a ``[B, V]`` table, counting how many tokens it was asked about."""
    calls = {"tokens": 0}

    def accept(rows, tokens):
        calls["tokens"] += rows.numel()
        return allowed[rows, tokens]

    return accept, calls


@pytest.mark.parametrize("case", range(3))
def test_awrs_samples_the_constrained_distribution_with_unbiased_weights(case):
    g = torch.Generator().manual_seed(case)
    vocab, draws = 10, 20000
    logits = torch.randn(vocab, generator=g, dtype=torch.float64) * (1 + case)
    allowed_row = torch.rand(vocab, generator=g) < 0.5
    allowed_row[case] = True
    probs = logits.softmax(0)
    mass = float((probs * allowed_row).sum())
    accept, calls = table_constraint(allowed_row.expand(draws, -1))
    result = awrs_sample(logits.expand(draws, -1), accept, seeds=torch.arange(draws))
    assert bool(allowed_row[result.tokens].all())
    assert chi_square_pvalue(torch.bincount(result.tokens, minlength=vocab), probs * allowed_row) > P_MIN
    weights = result.log_weight.exp()
    standard_error = float(weights.std()) / math.sqrt(draws)
    assert abs(float(weights.mean()) - mass) < 4 * standard_error + 1e-12
    assert calls["tokens"] == int(result.evaluations.sum())


def test_awrs_weight_keeps_a_tiny_allowed_mass():
    """The one allowed token has probability e^-40 (after the rejected first token, the weight is its mass over two
    evaluations): the weight is log p - log 2, not -inf (1 - the rejected mass rounded to 0 below about e^-37)."""
    logits = torch.tensor([[0.0, -40.0, -math.inf], [0.0, -36.0, -math.inf]], dtype=torch.float64)
    accept, _ = table_constraint(torch.tensor([[False, True, False]] * 2))
    result = awrs_sample(logits, accept, seeds=torch.tensor([0, 1]))
    expected = logits.log_softmax(1)[:, 1] - math.log(2)
    assert result.tokens.tolist() == [1, 1]
    assert torch.allclose(result.log_weight, expected, rtol=0, atol=1e-9)


def test_awrs_evaluates_few_tokens_when_the_constraint_is_loose():
    vocab, rows = 5000, 64
    logits = torch.randn(rows, vocab, dtype=torch.float64) * 3
    allowed = torch.rand(rows, vocab, generator=torch.Generator().manual_seed(0)) < 0.9
    accept, calls = table_constraint(allowed)
    result = awrs_sample(logits, accept, seeds=torch.arange(rows))
    assert bool(allowed[torch.arange(rows), result.tokens].all())
    assert float(result.evaluations.double().mean()) < 5 and calls["tokens"] < rows * vocab / 500


def test_awrs_without_allowed_tokens_and_without_weights():
    logits = torch.tensor([[0.0, 1.0, -math.inf], [0.0, 0.0, 0.0]])
    allowed = torch.tensor([[False, False, True], [False, True, False]])  # row 0: only an impossible token
    accept, _ = table_constraint(allowed)
    result = awrs_sample(logits, accept, seeds=torch.tensor([0, 1]))
    assert result.tokens.tolist() == [-1, 1] and result.log_weight[0] == -math.inf
    assert int(result.evaluations[0]) == 2  # the two possible tokens, then nothing left
    quick = awrs_sample(logits, accept, seeds=torch.tensor([0, 1]), proper_weights=False)
    assert quick.tokens.tolist() == [-1, 1] and quick.log_weight[1] == 0
    with pytest.raises(InvalidConfigError, match="must answer with bools"):  # a probability is no verdict
        awrs_sample(logits, lambda rows, tokens: torch.full(rows.shape, 0.5), seeds=torch.tensor([0, 1]))
    with pytest.raises(InvalidConfigError, match=r"seeds must"):
        awrs_sample(logits, accept, seeds=torch.tensor([0, 1, 2]))
    with pytest.raises(InvalidConfigError, match=r"seeds must be a \[2\] integer tensor or None"):
        awrs_sample(logits, accept, seeds=3)  # as sample(): one int is no per-row seeds


def test_constrained_generation_respects_the_constraint(model):
    def no_odd_tokens(context, tokens):
        return tokens % 2 == 0

    out = constrained_generate(model, PROMPTS, no_odd_tokens, attention_mask=MASK, max_new_tokens=10,
                               seeds=torch.tensor([1, 2, 3]))
    assert bool((out.new_tokens % 2 == 0).all())
    assert bool(torch.isfinite(out.stats["log_weight"]).all())
    assert int(out.stats["evaluations"].sum()) < out.stats["vocab_evaluations"]


def test_constrained_generation_ends_a_row_that_nothing_satisfies(model):
    """A row whose constraint allows no token ends there (log weight -inf, its tokens so far): the constraint is not
    asked about it again, so its evaluations do not grow with max_new_tokens. A row left running was asked (and
    failed) at every later step."""
    prompts = torch.tensor([[1, 7, 8, 9], [5, 7, 8, 9]])

    def only_row_one_goes_on(context, tokens):  # any first token; after it, only the row whose prompt starts with 5
        allowed = (context[:, 0] == 5) | (context.shape[1] == prompts.shape[1])
        return allowed & (tokens >= 0)

    runs = [constrained_generate(model, prompts, only_row_one_goes_on, max_new_tokens=new, seeds=torch.tensor([1, 2]))
            for new in (2, 6)]
    for out in runs:
        assert out.lengths[0] == 1 and out.stats["log_weight"][0] == -math.inf
        assert bool(torch.isfinite(out.stats["log_weight"][1:]).all())
    assert runs[1].stats["evaluations"][0] == runs[0].stats["evaluations"][0]
    assert runs[1].stats["evaluations"][1] > runs[0].stats["evaluations"][1]  # the other row went on


def test_constrained_generation_takes_settings_per_row_after_rows_end(model):
    """Per-row temperatures stay with their rows once some rows have ended: each row gives what it gives alone."""
    def no_odd_tokens(context, tokens):
        return tokens % 2 == 0

    config = SamplingConfig(temperature=torch.tensor([1.0, 0.8, 1.2]))
    seeds = torch.tensor([1, 2, 3])
    both = constrained_generate(model, PROMPTS, no_odd_tokens, config, attention_mask=MASK, max_new_tokens=12,
                                seeds=seeds, eos_token_id=[2, 4])
    assert len(set(both.lengths.tolist())) > 1  # rows end at different steps
    for row in range(3):
        alone = constrained_generate(model, PROMPTS[row:row + 1, MASK[row]], no_odd_tokens,
                                     config.for_rows(torch.tensor([row])), max_new_tokens=12,
                                     seeds=seeds[row:row + 1], eos_token_id=[2, 4])
        assert torch.equal(alone.new_tokens[0], both.new_tokens[row])


UNPADDED = torch.tensor([[0, 1, 5, 6], [1, 7, 8, 9], [3, 3, 1, 10]])


def test_cntp_trial_tokens_follow_the_sampling_config(model):
    """Every emitted token, the later tokens of a trial included, lies in the top 2 of the model's logits after
    its prefix under top_k=2: trials that drew their later tokens from the unprocessed logits emitted tokens the
    config removes."""
    cntp = CNTPConfig(entropy_low=0.0, entropy_high=0.7, max_trials=4, max_trial_tokens=6)
    out = cntp_generate(model, UNPADDED, SamplingConfig(top_k=2), cntp, stop_token_ids=STOPS, max_new_tokens=16,
                        seeds=torch.tensor([1, 2, 3]))
    assert out.stats["trial_tokens"] > out.stats["trials"] > 0  # trials longer than their first token
    with torch.no_grad():
        logits = model(out.sequences).logits[:, UNPADDED.shape[1] - 1:-1]  # the distribution of each new token
    chosen = logits.gather(2, out.new_tokens[..., None])[..., 0]
    second = logits.topk(2, dim=2).values[..., 1]
    assert bool((chosen >= second - 1e-4).all())  # (the cached and the full forward round differently)


def test_cntp_counts_trials_on_the_processed_distribution(model):
    """With top_k=1 every processed distribution has entropy 0: no step is cautious and the text is greedy
    generate's. Trial counts taken from the raw logits' entropy (about 2.8 nats here) ran trials at every step."""
    config = SamplingConfig(top_k=1)
    seeds = torch.tensor([1, 2, 3])
    out = cntp_generate(model, UNPADDED, config, CNTPConfig(), stop_token_ids=STOPS, max_new_tokens=8, seeds=seeds)
    plain = generate(model, UNPADDED, config, max_new_tokens=8, seeds=seeds)
    assert out.stats["cautious_steps"] == 0 and out.stats["trials"] == 0
    assert torch.equal(out.new_tokens, plain.new_tokens)


def test_cntp_perplexity_is_per_token():
    """A chain where the step after 1 is uncertain (stop at once with 0, or go on with 2, after which 2 repeats
    with probability 0.9): the perplexity CNTP records for each chosen segment is exp(-mean log p) of its tokens
    under the chain. A total (exp(-sum log p)) would penalise the longer trials and record other values."""
    table = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 0.5], [0.1, 0.0, 0.9]], dtype=torch.float64)
    rows, width = 400, 4
    cntp = CNTPConfig(entropy_low=0.5, entropy_high=0.6, max_trials=3, max_trial_tokens=width)
    out = cntp_generate(chain_llama(table), torch.ones(rows, 1, dtype=torch.long), cntp=cntp, stop_token_ids=[0],
                        max_new_tokens=width, seeds=torch.arange(rows))
    lengths = set()
    for row in range(rows):
        count, chosen, perplexities = out.stats["steps"][row][0]  # the first step, the only uncertain one
        tokens = out.new_tokens[row].tolist()
        length = tokens.index(0) + 1 if 0 in tokens else width  # the segment ends at the stop token
        previous = [1] + tokens[:length - 1]
        mean_log_p = sum(math.log(table[a, b]) for a, b in zip(previous, tokens[:length], strict=True)) / length
        assert count == 3 and chosen == min(perplexities)
        assert chosen == pytest.approx(math.exp(-mean_log_p), rel=1e-6)
        lengths.add(length)
    assert {1, width} <= lengths  # one-token and full-length segments were both chosen


def test_constrained_generation_asks_each_row_about_its_own_context(model):
    """A constraint on the row's context (a token's parity must differ from the previous token's) holds at every
    step of every row, also after other rows have ended. Asked with the context of another row (the ended rows
    shifting which row is which), it forbade the other half of the vocabulary."""
    def alternate_parity(context, tokens):
        return (tokens - context[:, -1]) % 2 == 1

    out = constrained_generate(model, PROMPTS, alternate_parity, attention_mask=MASK, max_new_tokens=12,
                               seeds=torch.tensor([1, 2, 3]), eos_token_id=[2, 4])
    assert len(set(out.lengths.tolist())) > 1  # rows end at different steps: some go on after others ended
    for row in range(3):
        tokens = torch.cat([PROMPTS[row, -1:], out.new_tokens[row, :int(out.lengths[row])]])
        assert bool(((tokens[1:] - tokens[:-1]) % 2 == 1).all()), row
