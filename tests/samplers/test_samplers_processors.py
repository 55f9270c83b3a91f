"""The truncation processors against Hugging Face's on many random logits, plus their own properties."""

import math

import pytest
import torch
from sampler_cases import KINDS, logit_cases, one_thread, tie_complete  # noqa: F401 (fixture)

from vistok.samplers import (
    EpsilonFilter,
    EtaFilter,
    MinPFilter,
    Temperature,
    TopHFilter,
    TopKFilter,
    TopPFilter,
    TypicalFilter,
    _select,
    epsilon_filter,
    eta_filter,
    min_p_filter,
    sample,
    temperature_scale,
    top_h_filter,
    top_k_filter,
    top_p_filter,
    typical_filter,
)

hf = pytest.importorskip("transformers.generation.logits_process")

SEEDS = range(20)  # 4 of each kind of logits
IDS = torch.zeros(1, 1, dtype=torch.long)

# name -> (vistok function, Hugging Face factory (value, min_tokens) -> processor, parameter values)
PAIRS = {
    "top_k": (top_k_filter, lambda v, m: hf.TopKLogitsWarper(v, min_tokens_to_keep=m), [1, 5, 50, 5000]),
    "top_p": (top_p_filter, lambda v, m: hf.TopPLogitsWarper(v, min_tokens_to_keep=m), [0.0, 0.3, 0.9, 0.99]),
    "min_p": (min_p_filter, lambda v, m: hf.MinPLogitsWarper(v, min_tokens_to_keep=m), [0.01, 0.1, 0.5, 1.0]),
    "typical": (typical_filter, lambda v, m: hf.TypicalLogitsWarper(v, min_tokens_to_keep=m), [0.2, 0.9, 0.99]),
    "epsilon": (epsilon_filter, lambda v, m: hf.EpsilonLogitsWarper(v, min_tokens_to_keep=m), [1e-4, 1e-3, 0.05]),
    "eta": (eta_filter, lambda v, m: hf.EtaLogitsWarper(v, min_tokens_to_keep=m), [1e-4, 3e-3, 0.05]),
}


def kept(scores):
    """Tokens that can still be sampled. A kept ``-inf`` token and a removed one are the same output."""
    return torch.isfinite(scores)


def typical_closeness(logits):
    """The ranking Hugging Face's typical sampling sorts by (higher is more typical), in its arithmetic."""
    log_probs = logits.log_softmax(dim=1)
    entropy = -(log_probs * log_probs.exp()).nansum(dim=1, keepdim=True)
    return -(log_probs.neg() - entropy).abs()


def hf_keep(name, value, min_tokens, logits):
    """Hugging Face's kept set with ties completed. Its min-p ranks ``min_tokens_to_keep`` by probability, which
    ties every token whose probability underflows to 0; vistok ranks by logit. Those tokens are left out of the
    comparison (``comparable``)."""
    processor = PAIRS[name][1](value, min_tokens)
    keep = kept(processor(IDS, logits)) & torch.isfinite(logits)
    if name == "min_p":
        keep &= logits.softmax(dim=1) > 0
    ranking = typical_closeness(logits) if name == "typical" else logits
    return tie_complete(ranking, keep) & torch.isfinite(logits)


def comparable(name, logits):
    return logits.softmax(dim=1) > 0 if name == "min_p" else torch.ones_like(logits, dtype=torch.bool)


def vistok_keep(name, value, min_tokens, logits):
    return kept(PAIRS[name][0](logits, value, min_tokens_to_keep=min_tokens))


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("min_tokens", [1, 3])
def test_same_tokens_as_hugging_face_float64(name, min_tokens):
    """In float64 (no rounding at the cut-off in practice) the kept set is Hugging Face's, ties completed."""
    for seed in SEEDS:
        logits = logit_cases(seed)
        for value in PAIRS[name][2]:
            expected = hf_keep(name, value, min_tokens, logits)
            got = vistok_keep(name, value, min_tokens, logits) & comparable(name, logits)
            assert torch.equal(got, expected), (name, KINDS[seed % len(KINDS)], value, (got ^ expected).sum())


@pytest.mark.parametrize("name", ["top_k", "min_p", "epsilon"])
@pytest.mark.parametrize("min_tokens", [1, 3])
def test_same_tokens_as_hugging_face_float32_same_arithmetic(name, min_tokens):
    """Where vistok does Hugging Face's arithmetic, float32 agrees exactly too."""
    for seed in SEEDS:
        logits = logit_cases(seed, dtype=torch.float32)
        for value in PAIRS[name][2]:
            got = vistok_keep(name, value, min_tokens, logits) & comparable(name, logits)
            assert torch.equal(got, hf_keep(name, value, min_tokens, logits))


@pytest.mark.parametrize("name", ["top_p", "typical", "eta"])
def test_float32_differences_are_rounding_at_the_cut_off(name):
    """top-p, typical and eta compute the cut-off another way (histogram, entropy): in float32 a token may land
    on the other side only if moving the parameter by 1e-4 (relative) flips it in float64."""
    delta, rows_differing, rows_total = 1e-4, 0, 0
    for seed in SEEDS:
        logits = logit_cases(seed, dtype=torch.float32)
        wide = logits.double()
        for value in PAIRS[name][2]:
            differ = vistok_keep(name, value, 1, logits) ^ hf_keep(name, value, 1, logits)
            low, high = value * (1 - delta), min(value * (1 + delta), 0.999999 if name == "eta" else 1.0)
            borderline = vistok_keep(name, low, 1, wide) ^ vistok_keep(name, high, 1, wide)
            assert not bool((differ & ~borderline).any()), (name, seed, value)
            rows_differing += int(differ.any(dim=1).sum())
            rows_total += logits.shape[0]
    assert rows_differing <= 0.02 * rows_total  # and such rows are rare


@pytest.mark.parametrize("alpha", [0.1, 0.4, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_h_reference_rule_matches_hugging_face(alpha, dtype):
    for seed in SEEDS:
        logits = logit_cases(seed, dtype=dtype)
        expected = tie_complete(logits, kept(hf.TopHLogitsWarper(alpha)(IDS, logits)) & torch.isfinite(logits))
        got = kept(top_h_filter(logits, alpha, rule="reference", top_n=100))
        assert torch.equal(got, expected & torch.isfinite(logits)), (seed, alpha)


def brute_top_h(probs, alpha, rule, slack=0.0):
    """Top-H by its definition, one row at a time in float64: the longest prefix of the sorted distribution
    whose (renormalised or unnormalised) entropy stays within ``alpha * H(p) + slack``; at least one token.
    A token whose probability underflows to 0 adds entropy in exact arithmetic, not in float64: it ends the set
    below ``alpha = 1``, and joins it at ``alpha = 1``, where the whole distribution meets the budget."""
    p = probs.double()
    entropy = float(-torch.special.xlogy(p, p).sum())
    order = p.argsort(descending=True)
    count = 1
    for n in range(2, len(p) + 1):
        s = p[order[:n]]
        if alpha < 1 and s[-1] == 0:
            break
        partial = float(-torch.special.xlogy(s, s).sum())
        value = partial / float(s.sum()) + math.log(float(s.sum())) if rule == "paper" else partial
        if value > alpha * entropy + slack:
            break
        count = n
    return p >= p[order[count - 1]]


@pytest.mark.parametrize("rule", ["paper", "reference"])
@pytest.mark.parametrize("alpha", [0.05, 0.3, 0.7, 1.0])
def test_top_h_matches_its_definition(rule, alpha):
    """Between the sets the definition gives with the budget moved by -1e-12 and +1e-12 (rounding; at alpha = 1
    the whole vocabulary sits exactly on the budget), and exactly equal to one of them."""
    for seed in range(10):
        logits = logit_cases(seed, batch=4, vocab=300)
        got = kept(top_h_filter(logits, alpha, rule=rule))
        for row in range(logits.shape[0]):
            probs, finite = logits[row].softmax(0), torch.isfinite(logits[row])
            strict = brute_top_h(probs, alpha, rule, -1e-12) & finite
            loose = brute_top_h(probs, alpha, rule, 1e-12) & finite
            assert bool((strict <= got[row]).all() and (got[row] <= loose).all()), (rule, alpha, seed, row)
            assert torch.equal(got[row], strict) or torch.equal(got[row], loose)


@pytest.mark.parametrize("rule", ["paper", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_h_alpha_one_keeps_every_token(rule, dtype):
    """At alpha = 1 the whole distribution meets the budget exactly: no token is lost to rounding or underflow."""
    for seed in range(10):
        logits = torch.cat([logit_cases(seed, batch=4, vocab=300), torch.randn(8, 300, dtype=torch.float64) * 3])
        logits = logits.to(dtype)
        assert torch.equal(kept(top_h_filter(logits, 1.0, rule=rule)), torch.isfinite(logits)), seed


@pytest.mark.parametrize("rule", ["paper", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gap", [10.0, 100.0, 200.0, 500.0, 800.0])
def test_top_h_extremely_peaked_rows(rule, dtype, gap):
    """One dominant token over a tail whose probabilities underflow in float32 (gap > 104) or float64 (> 745):
    the tail is not kept whole, and the set is the definition's (evaluated in float64)."""
    logits = torch.zeros(1, 50, dtype=torch.float64)
    logits[0, 1:] = -gap - 0.01 * torch.arange(49, dtype=torch.float64)
    got = kept(top_h_filter(logits.to(dtype), 0.5, rule=rule))[0]
    assert int(got.sum()) < 50
    assert torch.equal(got, brute_top_h(logits[0].softmax(0), 0.5, rule))  # no absolute slack: H(p) < 1e-12


def test_paper_rule_entropy_grows_with_the_set():
    """Why the paper's greedy rule is a threshold on the prefix length: adding tokens in decreasing probability
    never lowers the entropy of the renormalised set."""
    for seed in range(10):
        p = logit_cases(seed, batch=3, vocab=400)[:, :].softmax(1).sort(dim=1, descending=True).values
        mass = p.cumsum(1)
        renormalised = -torch.special.xlogy(p, p).cumsum(1) / mass + mass.log()
        finite = p > 0
        steps = renormalised[:, 1:] - renormalised[:, :-1]
        assert bool((steps[finite[:, 1:]] >= -1e-12).all())


def test_top_h_widens_its_candidates():
    """With the whole vocabulary as candidates (top_n=None), a row that keeps more than the first candidate
    list is still exact."""
    logits = torch.randn(2, 5000, dtype=torch.float64) * 0.05  # nearly uniform: Top-H keeps thousands
    got = kept(top_h_filter(logits, 0.99, rule="reference"))
    assert int(got.sum(1).min()) > 500
    for row in range(2):
        assert torch.equal(got[row], brute_top_h(logits[row].softmax(0), 0.99, "reference", 1e-12))


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("min_tokens", [1, 3])
def test_per_row_parameters_equal_row_by_row_calls(name, min_tokens):
    """A ``[B]`` tensor of values keeps what each row's number keeps, ``min_tokens_to_keep`` included: a per-row
    top-k that ignored it kept one token at ``k = 1`` where the number keeps three."""
    function, _, values = PAIRS[name]
    logits = logit_cases(4, batch=len(values) * 2)
    per_row = torch.tensor(values * 2, dtype=torch.int64 if name == "top_k" else torch.float64)
    batched = function(logits, per_row, min_tokens_to_keep=min_tokens)
    for row in range(logits.shape[0]):
        single = function(logits[row:row + 1], per_row[row].item(), min_tokens_to_keep=min_tokens)
        assert torch.equal(batched[row:row + 1], single)


@pytest.mark.parametrize("rule", ["paper", "reference"])
def test_top_h_per_row_alpha(rule):
    logits = logit_cases(0, batch=3)
    alpha = torch.tensor([0.2, 0.5, 0.9])
    batched = top_h_filter(logits, alpha, rule=rule)
    for row in range(3):
        assert torch.equal(batched[row:row + 1], top_h_filter(logits[row:row + 1], alpha[row].item(), rule=rule))


FILTERS = {
    "top_k": lambda x: top_k_filter(x, 20),
    "top_p": lambda x: top_p_filter(x, 0.8),
    "min_p": lambda x: min_p_filter(x, 0.1),
    "typical": lambda x: typical_filter(x, 0.7),
    "epsilon": lambda x: epsilon_filter(x, 1e-3),
    "eta": lambda x: eta_filter(x, 1e-3),
    "top_h": lambda x: top_h_filter(x, 0.4),
    "top_h_reference": lambda x: top_h_filter(x, 0.4, rule="reference", top_n=100),
}


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_filters_are_permutation_equivariant_and_only_remove(name):
    """Ties share their fate, so shuffling the vocabulary shuffles the result; kept logits are untouched."""
    for seed in range(10):
        logits = logit_cases(seed, batch=6, vocab=500)
        out = FILTERS[name](logits)
        assert out.dtype == logits.dtype and out.shape == logits.shape
        keep = kept(out)
        assert torch.equal(out[keep], logits[keep])
        assert bool(keep.any(dim=1).all())
        perm = torch.randperm(logits.shape[1], generator=torch.Generator().manual_seed(seed))
        assert torch.equal(FILTERS[name](logits[:, perm]), out[:, perm])


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_does_not_modify_its_input(name):
    logits = logit_cases(1, batch=3, vocab=100)
    before = logits.clone()
    out = FILTERS[name](logits)
    assert torch.equal(logits, before) and out.data_ptr() != logits.data_ptr()


@pytest.mark.parametrize("name", sorted(FILTERS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_judged_in_float32(name, dtype):
    logits = logit_cases(4, batch=4, vocab=300).to(dtype)
    out = FILTERS[name](logits)
    assert out.dtype == dtype
    assert torch.equal(kept(out), kept(FILTERS[name](logits.float())))


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_vocabulary_of_one(name):
    logits = torch.tensor([[0.3], [-2.0]])
    assert torch.equal(FILTERS[name](logits), logits)


def test_neutral_values_keep_everything():
    logits = logit_cases(2)
    for out in (top_k_filter(logits, 0), top_p_filter(logits, 1.0), min_p_filter(logits, 0.0),
                typical_filter(logits, 1.0), epsilon_filter(logits, 0.0), eta_filter(logits, 0.0),
                temperature_scale(logits, 1.0)):
        assert torch.equal(out, logits)
    mixed = top_p_filter(logits[:2], torch.tensor([1.0, 0.5]))
    assert torch.equal(mixed[0], logits[0]) and not torch.equal(mixed[1], logits[1])
    # a token whose weight underflows to 0 (exp(-200) in float32) is still kept at p = 1, given per row too
    far = torch.tensor([[0.0, -200.0], [0.0, -200.0]])
    assert torch.equal(top_p_filter(far, 1.0), far) and torch.equal(top_p_filter(far, torch.tensor([1.0, 1.0])), far)
    # the same for typical_p = 1 on tokens whose weights underflow (a cut-off computed anyway dropped them)
    far = torch.tensor([[0.0, -50.0, -200.0, -1000.0]] * 2)
    for mass in (1.0, torch.tensor([1.0, 1.0])):
        assert torch.equal(typical_filter(far, mass), far)


def test_min_tokens_to_keep_rescues_empty_cuts():
    logits = torch.randn(4, 1000, dtype=torch.float64)  # every probability is far below epsilon = 0.5
    assert torch.equal(kept(epsilon_filter(logits, 0.5)).sum(1), torch.ones(4, dtype=torch.long))
    assert torch.equal(kept(epsilon_filter(logits, 0.5, min_tokens_to_keep=7)).sum(1), torch.full((4,), 7))
    for cut in (epsilon_filter(logits, 0.5, min_tokens_to_keep=2), min_p_filter(logits, 1.0, min_tokens_to_keep=2),
                top_p_filter(logits, 0.0, min_tokens_to_keep=2)):
        assert torch.equal(kept(cut).sum(1), torch.full((4,), 2))
    # eta never needs it (p_max >= exp(-H) > eta), but honours it
    assert bool((kept(eta_filter(logits, 0.9, min_tokens_to_keep=900)).sum(1) >= 900).all())
    # more than the vocabulary keeps all of it (not a topk error)
    small = logits[:, :6]
    for function, value in [(epsilon_filter, 0.5), (min_p_filter, 1.0), (top_p_filter, 0.0), (typical_filter, 0.2),
                            (eta_filter, 0.9), (top_k_filter, 1), (top_k_filter, torch.ones(4, dtype=torch.long))]:
        assert torch.equal(function(small, value, min_tokens_to_keep=10), small), function.__name__


def test_filter_value():
    from vistok import InvalidConfigError

    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert top_k_filter(logits, 2, filter_value=-100.0).tolist() == [[3.0, 2.0, -100.0, -100.0]]
    functions = [(top_k_filter, 2), (top_p_filter, 0.5), (min_p_filter, 0.1), (typical_filter, 0.5),
                 (epsilon_filter, 0.1), (eta_filter, 0.1), (top_h_filter, 0.5)]
    for function, value in functions:  # the functions check it as the processors do
        for bad in (float("nan"), math.inf):
            with pytest.raises(InvalidConfigError, match="filter_value"):
                function(logits, value, filter_value=bad)


def test_epsilon_keeps_a_probability_equal_to_epsilon():
    """Epsilon keeps a token whose probability equals epsilon exactly (``p >= epsilon``, as Hugging Face's warper):
    a strict comparison dropped the two tokens of probability 0.25 here and kept only the top one."""
    logits = torch.tensor([[math.log(2.0), 0.0, 0.0]], dtype=torch.float64)
    assert logits.softmax(dim=1).tolist() == [[0.5, 0.25, 0.25]]  # an exact tie with epsilon = 0.25
    expected = kept(hf.EpsilonLogitsWarper(0.25)(IDS, logits))
    assert bool(expected.all())
    assert torch.equal(kept(epsilon_filter(logits, 0.25)), expected)
    assert torch.equal(kept(epsilon_filter(logits, torch.tensor([0.25]))), expected)


def test_typical_can_drop_the_top_token():
    logits = torch.tensor([[5.0] + [0.0] * 200])  # one likely token, a long flat tail: the tail is typical
    assert not bool(kept(typical_filter(logits, 0.5))[0, 0])


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5, 4.0])
def test_temperature_matches_hugging_face(temperature):
    logits = logit_cases(0, dtype=torch.float32)
    assert torch.equal(temperature_scale(logits, temperature), hf.TemperatureLogitsWarper(temperature)(IDS, logits))


def test_temperature_zero_is_greedy_per_row():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [1.0, 3.0, 3.0, 0.0]])
    out = temperature_scale(logits, torch.tensor([0.0, 2.0]))
    assert out[0].tolist() == [-math.inf, 3.0, -math.inf, -math.inf]  # the first top token
    assert torch.equal(out[1], logits[1] / 2)


@pytest.mark.parametrize("seed", range(10))
def test_mass_threshold_matches_sorting(seed, monkeypatch):
    """The histogram cut-off equals the sorted one, also when the boundary bin must be split (forced here by a
    tiny sort limit) and with heavy ties."""
    if seed % 2:
        monkeypatch.setattr(_select, "_SORT_LIMIT", 16)
    logits = logit_cases(seed, batch=6, vocab=3000)
    if seed % 3 == 0:
        logits = logits * 1e-3  # a narrow spread: most tokens share a few bins
    fraction = torch.rand(6, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    weight = torch.exp(logits - logits.amax(1, keepdim=True))
    got = _select.mass_threshold(logits, weight, fraction)
    for row in range(6):
        values, order = logits[row].sort(descending=True)
        mass = weight[row][order].cumsum(0)
        first = int((mass < fraction[row] * weight[row].sum()).sum().clamp(max=len(mass) - 1))
        assert got[row, 0] == values[first], (seed, row)


def test_processors_validate_their_parameters():
    from vistok import InvalidConfigError

    for bad in (lambda: TopKFilter(2.5), lambda: TopPFilter(1.5), lambda: TopPFilter(float("nan")),
                lambda: MinPFilter(-0.1), lambda: TypicalFilter(2), lambda: EpsilonFilter(1.0),
                lambda: EtaFilter(-1e-3), lambda: TopHFilter(0.0), lambda: TopHFilter(0.5, rule="other"),
                lambda: TopHFilter(0.5, top_n=0), lambda: Temperature(-1.0), lambda: TopKFilter(5, 0),
                lambda: TopPFilter(torch.tensor([0.5, 1.2])), lambda: TopKFilter(torch.tensor([1.0])),
                lambda: top_p_filter(torch.randn(2, 5), torch.tensor([0.5, 0.5, 0.5])),
                lambda: TopPFilter(0.9, filter_value=float("nan")),
                lambda: top_p_filter(torch.randn(1, 5), torch.tensor([True])),  # a bool is no probability
                lambda: Temperature(torch.tensor([False])),
                lambda: TopPFilter(torch.tensor([0.5 + 0j]))):
        with pytest.raises(InvalidConfigError):
            bad()
    with pytest.raises(InvalidConfigError, match="top_p must be a number"):
        TopPFilter(10**400)  # an OverflowError
    import numpy as np

    assert TopPFilter(np.float32(0.5)) is not None and TopKFilter(np.int64(3)) is not None  # numpy scalars: numbers


def test_a_temperature_that_rounds_to_zero_is_greedy_in_both_forms():
    """A positive temperature too small for float32 logits is 0 there: greedy as a number and as a per-row tensor
    (which is cast to the logits' dtype), not a division by zero (NaN) in one of them."""
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]])
    greedy = temperature_scale(logits, 0.0)
    assert torch.equal(temperature_scale(logits, 1e-300), greedy)
    assert torch.equal(temperature_scale(logits, torch.tensor([1e-300, 1e-300], dtype=torch.float64)), greedy)
    assert torch.equal(temperature_scale(logits.double(), 1e-300), logits.double() / 1e-300)  # float64: finite


def test_a_temperature_under_which_the_logits_overflow_keeps_the_top_tokens():
    """A positive temperature that is not 0 in the logits' precision but makes ``logits / T`` overflow (to
    ``+inf``, or ``-inf`` for a row of negative logits) gives the limit ``T -> 0``: the row's top tokens (ties
    together), never a row refused as NaN/+inf or as empty; rows that do not overflow are divided as usual."""
    logits = torch.tensor([[1000.0, 999.0, 1000.0], [-3.0, -1.0, -2.0], [0.5, 0.25, -0.5]])
    top = [[0.0, -math.inf, 0.0], [-math.inf, 0.0, -math.inf], [0.0, -math.inf, -math.inf]]
    for temperature in (1e-40, torch.full((3,), 1e-40)):
        assert temperature_scale(logits, temperature).tolist() == top
    per_row = temperature_scale(logits, torch.tensor([1e-40, 2.0, 0.5]))
    assert per_row[0].tolist() == top[0] and torch.equal(per_row[1:], logits[1:] / torch.tensor([[2.0], [0.5]]))
    assert temperature_scale(logits.double(), 1e-320).tolist() == top  # float64 has no greedy cut-off
    assert sample(temperature_scale(logits, 1e-40), seeds=torch.tensor([0, 1, 2]), counter=0)[1:].tolist() == [1, 0]


@pytest.mark.parametrize("temperature", [2.0**-149, 2.0**-150, 2.0**-155])
def test_the_greedy_cut_off_of_a_number_is_where_float32_rounds_it_to_zero(temperature):
    """A temperature given as a number acts as the per-row form, which is cast to the float32 logits' dtype: greedy
    where that rounds it to 0 (2**-150 rounds to even 0, 2**-149 is the smallest float32), the overflow rule above
    it. A cut-off set lower than 2**-150 divided by a float32 zero (NaN rows) for the temperatures in between."""
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]])
    per_row = torch.full((2,), temperature, dtype=torch.float64)
    rounds_to_zero = float(per_row.float()[0]) == 0
    number = temperature_scale(logits, temperature)
    assert torch.equal(number, temperature_scale(logits, per_row))
    assert torch.equal(number, temperature_scale(logits, 0.0)) == rounds_to_zero
    assert rounds_to_zero == (temperature <= 2.0**-150)
