"""The sampling step (exponential race, per-row seeds), its random numbers, the pipeline and bad input."""

import itertools
import math

import pytest
import torch
from sampler_cases import chi_square_pvalue, logit_cases, one_thread, tiny_llama  # noqa: F401 (fixture)

from vistok import InvalidConfigError, VistokError
from vistok.samplers import (
    FILTER_CLASSES,
    PROCESSOR_ORDER,
    InvalidLogitsError,
    SamplingConfig,
    SamplingPipeline,
    SeededSampling,
    generate,
    min_p_filter,
    rng,
    sample,
    temperature_scale,
    top_k_filter,
    top_p_filter,
)
from vistok.samplers._decoding import CausalLMState
from vistok.samplers._params import PARAM_BOUNDS
from vistok.samplers.sampling import as_seeds
from vistok.samplers.truncation import epsilon_filter, eta_filter, top_h_filter, typical_filter

P_MIN = 1e-3  # every goodness-of-fit test below uses fixed seeds, so it either always passes or always fails


def test_uniform_numbers_are_uniform_and_row_independent():
    seeds = torch.tensor([0, 1, 2**40, -5])
    u = rng.uniform(4, 20000, seeds=seeds, counter=7)
    assert u.dtype == torch.float64 and bool(((u > 0) & (u < 1)).all())
    counts = torch.histc(u.flatten().float(), bins=50, min=0, max=1)
    assert chi_square_pvalue(counts, torch.ones(50)) > P_MIN
    assert torch.equal(rng.uniform(1, 20000, seeds=seeds[2:3], counter=7), u[2:3])  # alone = in a batch
    other = rng.uniform(4, 20000, seeds=seeds, counter=8)
    assert abs(float(torch.corrcoef(torch.stack([u.flatten(), other.flatten()]))[0, 1])) < 0.02
    assert not torch.equal(rng.uniform(4, 100, seeds=seeds, counter=7, stream=1), u[:, :100])
    rows, cols = torch.tensor([3, 0, 3]), torch.tensor([19999, 0, 5])
    assert torch.equal(rng.uniform_at(rows, cols, seeds=seeds, counter=7), u[rows, cols])
    extremes = rng._to_unit(torch.tensor([0, -1]))  # the hashes with the fewest and the most top bits set
    assert 0 < float(extremes[0]) and float(extremes[1]) < 1


def test_sample_is_an_exact_draw_from_softmax():
    """20,000 rows with the same logits and different seeds: the counts fit softmax (chi-square)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, -math.inf, 1.5])
    draws = 20000
    tokens = sample(logits.expand(draws, -1), seeds=torch.arange(draws))
    counts = torch.bincount(tokens, minlength=8)
    assert counts[6] == 0
    assert chi_square_pvalue(counts, logits.softmax(0)) > P_MIN


def test_sparse_and_dense_races_agree():
    """After truncation only the finite logits get noise; the winner is the one the dense race picks."""
    logits = top_k_filter(logit_cases(0, batch=64, vocab=3000), 20)
    seeds = torch.arange(64) * 7919
    sparse = sample(logits, seeds=seeds, counter=3)
    dense = (logits - logits.amax(1, keepdim=True) + rng.gumbel(64, 3000, seeds=seeds, counter=3)).argmax(1)
    assert torch.equal(sparse, dense)


def test_sample_is_reproducible_per_row():
    logits = logit_cases(2, batch=8, vocab=500)
    seeds = torch.arange(100, 108)
    first = sample(logits, seeds=seeds, counter=5)
    assert torch.equal(first, sample(logits, seeds=seeds, counter=5))
    for row in range(8):
        assert sample(logits[row:row + 1], seeds=seeds[row:row + 1], counter=5) == first[row]
    torch.manual_seed(123)
    again = sample(logits, seeds=seeds, counter=5)  # the global generator plays no part
    assert torch.equal(first, again)
    assert not torch.equal(first, sample(logits, seeds=seeds, counter=6))


def test_sample_with_torch_generator():
    logits = logit_cases(3, batch=4, vocab=50)
    a = sample(logits, generator=torch.Generator().manual_seed(0))
    b = sample(logits, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_sample_any_float_dtype(dtype):
    logits = torch.tensor([[0.0, 5.0, -math.inf], [1.0, -math.inf, -math.inf]], dtype=dtype)
    tokens = sample(logits, seeds=torch.tensor([1, 2]))
    assert tokens.tolist()[1] == 0 and tokens[0] in (0, 1)


BAD_LOGITS = {
    "nan": torch.tensor([[0.0, float("nan"), 1.0]]),
    "plus_inf": torch.tensor([[0.0, math.inf, 1.0]]),
}


@pytest.mark.parametrize("case", sorted(BAD_LOGITS))
def test_nan_and_plus_inf_are_refused_everywhere(case):
    logits = BAD_LOGITS[case]
    functions = [lambda x: sample(x), lambda x: top_k_filter(x, 2), lambda x: top_p_filter(x, 0.9),
                 lambda x: min_p_filter(x, 0.1), lambda x: typical_filter(x, 0.9), lambda x: epsilon_filter(x, 1e-3),
                 lambda x: eta_filter(x, 1e-3), lambda x: top_h_filter(x, 0.4),
                 lambda x: top_h_filter(x, 0.4, rule="reference", top_n=100),
                 lambda x: SamplingConfig(top_p=0.9).sample(x)]
    for function in functions:
        with pytest.raises(InvalidLogitsError, match="NaN or \\+inf"):
            function(logits)
    assert issubclass(InvalidLogitsError, VistokError) and issubclass(InvalidLogitsError, ValueError)


@pytest.mark.parametrize("filter_value", [-math.inf, -1e4])
def test_rows_without_tokens_pass_the_filters_and_are_refused_by_sampling(filter_value):
    """With a finite filter_value, min-p filled an empty row with it: every token equal, sampled uniformly."""
    logits = torch.tensor([[0.0, 1.0, 2.0], [-math.inf] * 3])
    fill = {"filter_value": filter_value}
    for out in (top_k_filter(logits, 2, **fill), top_p_filter(logits, 0.5, **fill), min_p_filter(logits, 0.5, **fill),
                min_p_filter(logits, 0.5, min_tokens_to_keep=2, **fill), typical_filter(logits, 0.5, **fill),
                epsilon_filter(logits, 0.1, **fill), eta_filter(logits, 0.1, **fill), top_h_filter(logits, 0.5, **fill),
                top_h_filter(logits, 0.5, rule="reference", top_n=2, **fill)):
        assert torch.equal(out[1], logits[1]) and not bool(torch.isnan(out).any())
        with pytest.raises(InvalidLogitsError, match=r"row\(s\) \[1\].*every logit -inf"):
            sample(out)
    with pytest.raises(InvalidLogitsError, match=r"row\(s\) \[1\].*every logit -inf"):
        sample(logits)


def test_malformed_logits():
    for bad in (torch.zeros(3), torch.zeros(2, 3, dtype=torch.long), torch.zeros(0, 5), torch.zeros(2, 0)):
        with pytest.raises(InvalidLogitsError):
            sample(bad)
        with pytest.raises(InvalidLogitsError):
            top_p_filter(bad, 0.5)


def test_temperature_passes_non_finite_values_and_sampling_refuses_them():
    logits = torch.tensor([[0.0, float("nan")]])
    assert torch.isnan(temperature_scale(logits, 0.5)[0, 1])
    with pytest.raises(InvalidLogitsError):
        SamplingConfig(temperature=0.5).sample(logits)


def test_pipeline_order_and_equivalence_to_manual_chain():
    config = SamplingConfig(temperature=0.8, min_p=0.02, top_h=0.9, top_k=40, top_p=0.95, typical_p=0.99,
                            epsilon=1e-5, eta=1e-5)
    names = [type(p).__name__ for p in config.processors]
    assert names == [FILTER_CLASSES[name].__name__ for name in PROCESSOR_ORDER]
    logits = logit_cases(4, batch=6, vocab=800)
    manual = logits
    for processor in config.processors:
        manual = processor(None, manual)
    assert torch.equal(config.process(logits), manual)
    assert torch.equal(SamplingPipeline(config)(None, logits), manual)
    assert SamplingConfig().processors == []


@pytest.mark.parametrize("option, value, function", [
    ("min_p", 0.9, min_p_filter), ("top_k", 1, top_k_filter), ("top_p", 0.05, top_p_filter),
    ("typical_p", 0.05, typical_filter), ("epsilon", 0.2, epsilon_filter), ("eta", 0.2, eta_filter),
    ("top_h", 0.1, top_h_filter)])
def test_a_configs_min_tokens_to_keep_reaches_every_filter(option, value, function):
    """The config's result is the filter function's with the same minimum, which binds on these rows."""
    logits = torch.randn(6, 800, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    expected = function(logits, value, min_tokens_to_keep=5)
    assert torch.equal(SamplingConfig(**{option: value}, min_tokens_to_keep=5).process(logits), expected)
    assert (torch.isfinite(expected).sum(dim=-1) >= 5).all()
    assert not torch.equal(expected, function(logits, value))


def test_a_configs_top_h_rule_and_top_n_reach_the_filter():
    """Near-uniform rows, where the reference rule's top_n bounds what top-H keeps."""
    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.01
    expected = top_h_filter(logits, 0.99, rule="reference", top_n=100)
    config = SamplingConfig(top_h=0.99, top_h_rule="reference", top_h_top_n=100)
    assert torch.equal(config.process(logits), expected)
    assert torch.isfinite(expected).sum() < torch.isfinite(top_h_filter(logits, 0.99, rule="reference")).sum()


def test_min_p_position_differs_from_hugging_face():
    """With min-p and top-p together: vistok (and vLLM) measure top-p's mass after min-p, Hugging Face before
    it. Here min-p removes the tail, so top-p then keeps fewer tokens than Hugging Face's order keeps."""
    logits = torch.log(torch.tensor([[0.4, 0.2, 0.15, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01]]))
    ours = SamplingConfig(min_p=0.2, top_p=0.8).process(logits)
    hugging_face_order = min_p_filter(top_p_filter(logits, 0.8), 0.2)
    assert torch.isfinite(ours).sum() == 3 and torch.isfinite(hugging_face_order).sum() == 4


def test_config_validation():
    for bad in (dict(temperature=-1.0), dict(top_k=1.5), dict(top_p=2.0), dict(min_p=-0.5), dict(typical_p=1.5),
                dict(epsilon=1.0), dict(eta=-0.1), dict(top_h=0.0), dict(top_h=0.5, top_h_rule="x"),
                dict(top_h=0.5, top_h_top_n=0), dict(min_tokens_to_keep=0), dict(top_p=torch.ones(2, 2))):
        with pytest.raises(InvalidConfigError):
            SamplingConfig(**bad)
    with pytest.raises(InvalidConfigError):
        SamplingPipeline(SamplingConfig(), top_k=3)
    assert SamplingConfig(top_k=5).replace(top_k=0).processors == []


def test_per_row_config_mixes_greedy_and_sampling():
    logits = logit_cases(0, batch=3, vocab=100)
    config = SamplingConfig(temperature=torch.tensor([0.0, 1.0, 0.0]), top_k=torch.tensor([0, 5, 0]))
    tokens = config.sample(logits, seeds=torch.arange(3))
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    assert int(tokens[1]) in logits[1].topk(5).indices.tolist()


def test_processors_inside_hugging_face_generate():
    """Each processor and the whole pipeline run inside ``model.generate``; SeededSampling makes the output a
    function of the per-row seeds only (not of the global seed, nor of the other rows)."""
    transformers = pytest.importorskip("transformers")
    model = tiny_llama(scale=4.0)
    prompt = torch.tensor([[1, 5, 6, 7], [1, 9, 3, 4]])
    config = SamplingConfig(temperature=0.9, min_p=0.01, top_k=10, top_p=0.95)

    def run(ids, seeds, global_seed):
        torch.manual_seed(global_seed)
        processors = transformers.LogitsProcessorList([SamplingPipeline(config), SeededSampling(seeds)])
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=None,
                              max_new_tokens=12, logits_processor=processors, pad_token_id=0)

    seeds = torch.tensor([11, 12])
    first, second = run(prompt, seeds, 0), run(prompt, seeds, 1)
    assert torch.equal(first, second)
    assert torch.equal(run(prompt[1:], seeds[1:], 2), first[1:])
    # left padding: with the pad id, a row gives what it gives alone, and what vistok's generate gives
    padded = torch.tensor([[0, 0, 1, 5], [1, 9, 3, 4]])
    processors = transformers.LogitsProcessorList([SamplingPipeline(config), SeededSampling(seeds, pad_token_id=0)])
    batch = model.generate(padded, attention_mask=(padded != 0).long(), do_sample=True, top_k=None, max_new_tokens=12,
                           logits_processor=processors, pad_token_id=0)[:, 4:]
    processors = transformers.LogitsProcessorList([SamplingPipeline(config), SeededSampling(seeds[:1], pad_token_id=0)])
    alone = model.generate(padded[:1, 2:], attention_mask=torch.ones(1, 2, dtype=torch.long), do_sample=True,
                           top_k=None, max_new_tokens=12, logits_processor=processors, pad_token_id=0)[:, 2:]
    width = alone.shape[1]  # the row alone stops at its end token; in the batch it is padded after it
    assert torch.equal(batch[0, :width], alone[0]) and bool((batch[0, width:] == 0).all())
    ours = generate(model, padded, config, attention_mask=padded != 0, max_new_tokens=12, seeds=seeds, eos_token_id=2)
    assert torch.equal(ours.new_tokens[:, :batch.shape[1]], batch)
    for processor in config.processors:
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=None,
                             max_new_tokens=4, logits_processor=transformers.LogitsProcessorList([processor]),
                             pad_token_id=0)
        assert out.shape == (2, 8)


def test_a_left_padded_row_decodes_as_its_tokens_alone():
    """In a batch, a left-padded row's next-token logits, after its prompt and after each token fed later, are those
    of a full forward of its own tokens (float rounding apart). Positions that counted the padding put the first new
    token before the prompt's last ones, which moves the logits (RoPE)."""
    model = tiny_llama(0, scale=3.0)
    padded = torch.tensor([[0, 0, 0, 0, 1, 5, 3], [1, 2, 3, 4, 5, 6, 7]])
    state = CausalLMState(model, 2)
    got = [state.prefill(padded, padded != 0)[0]]
    fed = torch.tensor([9, 4, 11])
    for token in fed:
        got.append(state.feed(token.expand(2, 1))[0, -1])
    with torch.no_grad():
        expected = model(torch.cat([padded[0, 4:], fed])[None]).logits[0, 2:]
    assert torch.allclose(torch.stack(got), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_temperature_scales_half_logits_in_float32(dtype):
    """A valid temperature on valid half-precision logits never overflows to inf (the scaled logits need not be
    half numbers): the result is float32, exactly the float32 division."""
    logits = torch.tensor([[6e4, 5.9e4, 0.0], [1.0, 2.0, 3.0]], dtype=dtype)
    seeds = torch.tensor([1, 2])
    for temperature in (0.7, 1e-4, torch.tensor([0.7, 1e-4])):
        scaled = temperature_scale(logits, temperature)
        reference = temperature_scale(logits.float(), temperature)
        assert scaled.dtype == torch.float32 and bool(torch.isfinite(scaled).all())
        assert torch.equal(scaled, reference)
        assert torch.equal(sample(scaled, seeds=seeds), sample(reference, seeds=seeds))
    config = SamplingConfig(temperature=1e-4, top_k=2)
    assert torch.equal(config.sample(logits, seeds=seeds), config.sample(logits.float(), seeds=seeds))


@pytest.mark.parametrize("seeds", [torch.tensor([1, 2]), torch.tensor([1, 2, 3, 4]), torch.tensor([[1, 2, 3]]),
                                   torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, True]), [1, 2, 3]])
def test_bad_seeds_are_config_errors(seeds):
    """Seeds of the wrong length, shape or dtype are refused with a VistokError, never truncated or broadcast."""
    logits = torch.randn(3, 10)
    calls = [lambda: sample(logits, seeds=seeds), lambda: rng.uniform(3, 4, seeds=seeds),
             lambda: SamplingConfig(top_k=3).sample(logits, seeds=seeds)]
    for call in calls:
        with pytest.raises(InvalidConfigError, match="seed"):
            call()
    with pytest.raises(InvalidConfigError, match="integer tensor"):
        rng.uniform_at(torch.tensor([0]), torch.tensor([0]), seeds=torch.tensor([0.5]))


def test_counters_and_streams_are_checked_like_seeds():
    """A counter is an int or an integer value per row: a longer one would draw several tokens for one row, a float
    one would be truncated."""
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    seeds = torch.tensor([0])
    assert torch.equal(sample(logits, seeds=seeds, counter=torch.tensor([3])), sample(logits, seeds=seeds, counter=3))
    for counter in (torch.tensor([1, 2]), torch.tensor([1.9]), torch.tensor([True]), torch.tensor([[1]]), 1.0, True,
                    2**70):
        with pytest.raises(InvalidConfigError, match="counter must be an int"):
            sample(logits, seeds=seeds, counter=counter)
    with pytest.raises(InvalidConfigError, match="stream must be an int"):
        sample(logits, seeds=seeds, stream=1.5)
    with pytest.raises(InvalidConfigError, match="seeds must be an int64"):  # not an overflow deep in torch
        generate(tiny_llama(), torch.tensor([[1, 2]]), max_new_tokens=1, seeds=2**70)


def test_sampling_options_are_checked_when_made():
    """Top-H's rule and count are checked while top_h is off (a later replace(top_h=...) would fail far away), and
    the pipeline takes a SamplingConfig or its own keywords only."""
    with pytest.raises(InvalidConfigError, match="top-H rule"):
        SamplingConfig(top_h_rule="bogus")
    with pytest.raises(InvalidConfigError, match="unknown option"):
        SamplingPipeline(foo=1)
    with pytest.raises(InvalidConfigError, match="must be a SamplingConfig"):
        SamplingPipeline({"top_k": 3})


def test_decoding_arguments_are_checked():
    model = tiny_llama()
    prompt = torch.tensor([[1, 2, 3]])
    for kwargs, message in [(dict(config={"top_k": 3}), "SamplingConfig"), (dict(eos_token_id=2.0), "eos_token_id"),
                            (dict(eos_token_id="2"), "eos_token_id"), (dict(pad_token_id=None), "pad_token_id")]:
        with pytest.raises(InvalidConfigError, match=message):
            generate(model, prompt, max_new_tokens=2, **kwargs)
    for ids in (torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long), prompt.bool()):
        with pytest.raises(InvalidConfigError, match="input_ids must"):
            generate(model, ids, max_new_tokens=2)
    for eos in ([2, 3], torch.tensor([2, 3]), torch.tensor(2), 2):  # a list, a tensor of ids, or one id
        assert generate(model, prompt, max_new_tokens=2, eos_token_id=eos, seeds=0).new_tokens.shape == (1, 2)
    with pytest.raises(InvalidConfigError, match="a bool is no token id"):
        generate(model, prompt, max_new_tokens=2, eos_token_id=[True])
    assert bool((generate(model, prompt, max_new_tokens=4, eos_token_id=list(range(24)), pad_token_id=-1,
                          seeds=0).new_tokens[0, 1:] == -1).all())  # any int fills a row after its end
    # ... also while other rows go on (the fill was fed to the model: an IndexError from the embedding)
    prompts, eos, seeds = torch.tensor([[1, 2, 3], [4, 5, 6]]), [0, 7, 13], torch.tensor([1, 2])
    reference = generate(model, prompts, max_new_tokens=8, eos_token_id=eos, pad_token_id=0, seeds=seeds)
    assert len(set(reference.lengths.tolist())) == 2  # one row ends first
    for fill in (-1, 10**6):
        out = generate(model, prompts, max_new_tokens=8, eos_token_id=eos, pad_token_id=fill, seeds=seeds)
        assert torch.equal(out.lengths, reference.lengths)
        ended = torch.arange(8)[None, :] >= reference.lengths[:, None]
        assert torch.equal(out.new_tokens, reference.new_tokens.masked_fill(ended, fill))


def test_seeded_sampling_validates():
    with pytest.raises(InvalidConfigError):
        SeededSampling(torch.tensor([0.5]))
    with pytest.raises(InvalidConfigError):
        SeededSampling(torch.tensor([1, 2]))(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_is_shift_invariant_at_huge_logits(dtype):
    """Adding a constant to the logits leaves softmax alone: 4,000 rows of two equal logits of 1e20 give each token
    half the time (chi-square), with seeds and with a generator. Noise added to the logits themselves, not to the
    logits minus the row's maximum, was lost to rounding (1e20 + G == 1e20) and the first token always won."""
    draws = 4000
    logits = torch.full((draws, 2), 1e20, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    for tokens in (sample(logits, seeds=torch.arange(draws)), sample(logits, generator=generator)):
        assert chi_square_pvalue(torch.bincount(tokens, minlength=2), torch.ones(2)) > P_MIN


def test_one_int_seed_gives_each_row_a_stream_of_its_own():
    """With one int as the seeds, the rows draw independently: 4,000 rows of the same logits (or of one prompt in
    generate) fit softmax (chi-square). Giving every row the int itself made them all draw the same token."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    draws = 4000
    tokens = sample(logits.expand(draws, -1), seeds=as_seeds(7, draws))
    assert chi_square_pvalue(torch.bincount(tokens, minlength=6), logits.softmax(0)) > P_MIN
    model = tiny_llama()
    prompt = torch.tensor([[1, 5, 6, 7]])
    out = generate(model, prompt.expand(draws, -1), max_new_tokens=1, seeds=7)
    with torch.no_grad():
        probs = model(prompt).logits[0, -1].double().softmax(0)
    assert chi_square_pvalue(torch.bincount(out.new_tokens[:, 0], minlength=probs.numel()), probs) > P_MIN


FILTER_FUNCTIONS = {"temperature": temperature_scale, "min_p": min_p_filter, "top_h": top_h_filter,
                    "top_k": top_k_filter, "top_p": top_p_filter, "typical_p": typical_filter,
                    "epsilon": epsilon_filter, "eta": eta_filter}


@pytest.mark.parametrize("name", sorted(name for name, bounds in PARAM_BOUNDS.items()
                                         if math.isfinite(bounds["low"]) or math.isfinite(bounds["high"])))
def test_per_row_parameters_have_the_bounds_of_numbers(name):
    """At each finite bound of a parameter, a per-row tensor is refused exactly when the number is (top_h = 0 and
    epsilon = 1 refused, epsilon = 0 and top_p = 1 taken): by the filter function, the processor and SamplingConfig.
    A tensor check that forgot an open lower bound took top_h = 0."""
    bounds = PARAM_BOUNDS[name]
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    for bound, is_open in ((bounds["low"], bounds.get("low_open", False)),
                           (bounds["high"], bounds.get("high_open", False))):
        if not math.isfinite(bound):
            continue
        inside = (bounds["low"] + min(bounds["high"], bounds["low"] + 1)) / 2
        forms = (bound, torch.tensor([inside, bound], dtype=torch.float64))
        uses = (lambda v: FILTER_FUNCTIONS[name](logits, v), lambda v: FILTER_CLASSES[name](v).apply(logits),
                lambda v: SamplingConfig(**{name: v}).process(logits))
        for value, use in itertools.product(forms, uses):
            if is_open:
                with pytest.raises(InvalidConfigError, match=name):
                    use(value)
            else:
                assert use(value).shape == logits.shape


def test_process_returns_a_new_tensor_without_processors():
    """A config with nothing active returns a copy of the logits: a caller writing into the result (a constraint's
    mask) leaves the model's logits alone. Returning the input itself let such writes reach them."""
    logits = logit_cases(0, batch=3, vocab=50)
    before = logits.clone()
    for out in (SamplingConfig().process(logits), SamplingPipeline(SamplingConfig())(None, logits)):
        assert torch.equal(out, before) and out.data_ptr() != logits.data_ptr()
        out[:, 0] = -math.inf
        assert torch.equal(logits, before)


def test_a_pipeline_made_from_keywords_runs_those_options():
    """``SamplingPipeline(**options)`` is ``SamplingPipeline(SamplingConfig(**options))``: the same chain and the same
    logits. A pipeline that built a default config from its keywords would pass the logits through unchanged."""
    logits = logit_cases(1, batch=4, vocab=60)
    options = dict(temperature=0.7, top_k=5, min_p=0.05)
    pipeline = SamplingPipeline(**options)
    expected = SamplingConfig(**options).process(logits)
    assert [type(p).__name__ for p in pipeline.config.processors] == ["Temperature", "MinPFilter", "TopKFilter"]
    assert torch.equal(pipeline(None, logits), expected) and not torch.equal(expected, logits)


def test_a_configs_sample_draws_from_the_generator_it_is_given():
    """``SamplingConfig.sample(generator=g)`` is ``sample(process(logits), generator=g)``: the draws follow ``g``,
    not the global seed. Dropping the generator drew from torch's global generator instead."""
    logits = torch.zeros(64, 40)  # uniform rows: every token may win, so a draw from another stream differs
    config = SamplingConfig(top_k=20)
    draws = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        draws.append(config.sample(logits, generator=torch.Generator().manual_seed(7)))
    expected = sample(config.process(logits), generator=torch.Generator().manual_seed(7))
    assert torch.equal(draws[0], expected) and torch.equal(draws[1], expected)
    assert not torch.equal(config.sample(logits, generator=torch.Generator().manual_seed(8)), expected)
