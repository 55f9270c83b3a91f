"""Speculative sampling (standard and SpecTr K-SEQ), VocabTrim and self-drafts: exactness and bookkeeping."""

import itertools
import math

import pytest
import torch
from sampler_cases import (  # noqa: F401 (fixture)
    P_MIN,
    bonus_test,
    chain_probs,
    chi_square_pvalue,
    draft_block,
    emitted_pairs,
    markov,
    one_thread,
    pair_test,
    tiny_llama,
)

from vistok import InvalidConfigError, UnsupportedModelError
from vistok.samplers import (
    Int8Linear,
    InvalidLogitsError,
    SamplingConfig,
    SpeculativeDecoder,
    VocabTrim,
    VocabularyMismatchError,
    cntp_generate,
    generate,
    kseq_rho,
    kseq_verify,
    self_draft,
    speculative_verify,
)
from vistok.samplers.quantize import int8_quantize

pytest.importorskip("transformers")


# ---------------------------------------------------------------------------------------------------------------
# The verification rules on known distributions (a Markov chain over a small vocabulary)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", range(4))
def test_standard_rule_is_exact(case):
    vocab, gamma, draws = 6, 3, 30000
    p_table, q_table = markov(case, vocab, 1.5), markov(100 + case, vocab, 1.5 + case)
    if case == 3:
        q_table[:, :2] = 0  # a draft that never proposes two tokens (like a trimmed vocabulary)
        q_table /= q_table.sum(dim=1, keepdim=True)
    drafts = draft_block(q_table, 0, gamma, 1, draws, case)[:, 0]
    accepted, next_token = speculative_verify(chain_probs(p_table, 0, drafts), chain_probs(q_table, 0, drafts)[:, :-1],
                                              drafts, seeds=torch.arange(draws), counter=case)
    tokens = torch.cat([drafts, next_token[:, None]], dim=1)
    tokens[torch.arange(draws), accepted] = next_token
    pair_test(p_table, 0, *emitted_pairs(accepted, tokens))
    bonus_test(p_table, accepted, tokens, gamma)
    expected_rate = torch.minimum(p_table[0], q_table[0]).sum()  # P(first draft accepted)
    assert abs(float((accepted >= 1).double().mean()) - float(expected_rate)) < 0.015


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("case", range(3))
def test_kseq_is_exact(k, case):
    vocab, gamma, draws = 6, 2, 30000
    p_table, q_table = markov(10 + case, vocab, 2.0), markov(200 + case, vocab, 1.0 + case)
    drafts = draft_block(q_table, 1, gamma, k, draws, case)
    accepted, tokens, lead = kseq_verify(chain_probs(p_table, 1, drafts), chain_probs(q_table, 1, drafts)[..., :-1, :],
                                         drafts, seeds=torch.arange(draws), counter=case)
    pair_test(p_table, 1, *emitted_pairs(accepted, tokens))
    bonus_test(p_table, accepted, tokens, gamma)
    # the lead candidate's draft starts with the kept tokens
    for row in range(200):
        n = int(accepted[row])
        assert torch.equal(drafts[row, lead[row], :n], tokens[row, :n])


def test_kseq_accepts_more_with_more_drafts():
    vocab, gamma, draws = 8, 1, 20000
    p_table, q_table = markov(5, vocab, 2.0), markov(6, vocab, 2.0)
    rates = []
    for k in (1, 2, 4):
        drafts = draft_block(q_table, 0, gamma, k, draws, k)
        accepted, _, _ = kseq_verify(chain_probs(p_table, 0, drafts), chain_probs(q_table, 0, drafts)[..., :-1, :],
                                     drafts, seeds=torch.arange(draws))
        rates.append(float(accepted.double().mean()))
    assert rates[0] < rates[1] < rates[2]


def test_kseq_with_one_draft_is_the_standard_rule():
    p_table, q_table = markov(1, 5, 1.0), markov(2, 5, 1.0)
    drafts = draft_block(q_table, 0, 3, 1, 2000, 0)
    p, q = chain_probs(p_table, 0, drafts), chain_probs(q_table, 0, drafts)[..., :-1, :]
    accepted_k, tokens, _ = kseq_verify(p, q, drafts, seeds=torch.arange(2000))
    accepted_s, _ = speculative_verify(p[:, 0], q[:, 0], drafts[:, 0], seeds=torch.arange(2000))
    assert torch.equal(accepted_k, accepted_s)  # same uniforms, rho = 1


def test_verification_refuses_blocks_that_do_not_line_up():
    """Probabilities one position short, logits for probabilities, and tokens outside the vocabulary are named
    (a bare IndexError only when every draft was accepted, or a silent result, before)."""
    p_table, q_table = markov(1, 5, 1.0), markov(2, 5, 1.0)
    drafts = draft_block(q_table, 0, 2, 2, 4, 0)
    p, q = chain_probs(p_table, 0, drafts), chain_probs(q_table, 0, drafts)[..., :-1, :]
    cases = [((p[:, 0, :-1], q[:, 0], drafts[:, 0]), InvalidConfigError, "do not line up"),
             ((p[:, 0], q[:, 0, :, :4], drafts[:, 0]), InvalidConfigError, "do not line up"),
             ((p[:, 0], q[:, 0], drafts[:, 0] + 5), InvalidConfigError, r"ids in \[0, 5\)"),
             ((p[:, 0], q[:, 0], drafts[:, 0].float()), InvalidConfigError, "must be token ids"),
             ((p[:, 0].log(), q[:, 0], drafts[:, 0]), InvalidLogitsError, "non-negative probabilities")]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            speculative_verify(*args)
        with pytest.raises(error, match=message):
            kseq_verify(*(tensor[:, None].expand(-1, 2, *tensor.shape[1:]) for tensor in args))
    with pytest.raises(InvalidConfigError, match="do not line up"):
        kseq_verify(p, q, drafts[:, 0])


def test_models_with_sliding_window_attention_are_refused_where_rows_get_gaps():
    """Speculative decoding and CNTP leave invalid columns inside a row's cache, which a sliding window counts:
    a model with one is refused when the decoder is built (it crashed mid-generation cropping the sliding
    cache); the same model without the window is taken, and plain generate takes both."""
    from transformers import MistralConfig, MistralForCausalLM

    def mistral(window):
        torch.manual_seed(0)
        config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               sliding_window=window, pad_token_id=0)
        return MistralForCausalLM(config).eval()

    greedy = SamplingConfig(temperature=0)
    sliding, full = mistral(6), mistral(None)
    for target, draft in ((sliding, full), (full, sliding)):
        with pytest.raises(UnsupportedModelError, match="sliding-window attention; speculative decoding"):
            SpeculativeDecoder(target, draft, gamma=3, config=greedy)
    with pytest.raises(UnsupportedModelError, match="sliding-window attention; cautious next-token prediction"):
        cntp_generate(sliding, PROMPT, greedy, stop_token_ids=[3], max_new_tokens=2)
    decoder = SpeculativeDecoder(full, self_draft(full, num_layers=1), gamma=3, config=greedy)
    plain = generate(full, PROMPT, greedy, max_new_tokens=12)
    assert torch.equal(decoder.generate(PROMPT, max_new_tokens=12).new_tokens, plain.new_tokens)
    assert generate(sliding, PROMPT, greedy, max_new_tokens=12).new_tokens.shape == (1, 12)


def test_rho_satisfies_its_inequality_and_is_smallest():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(50, 30, generator=g, dtype=torch.float64) ** 4
    q = torch.rand(50, 30, generator=g, dtype=torch.float64) ** 4
    p, q = p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)
    k = torch.randint(1, 6, (50,), generator=g)
    rho = kseq_rho(p, q, k)

    def excess(r):
        beta = torch.minimum(q, p / r[:, None]).sum(1)
        return (1 - (1 - beta) ** k) / beta - r

    assert bool((excess(rho) <= 1e-12).all()) and bool((rho >= 1).all()) and bool((rho <= k).all())
    assert bool((rho[k == 1] == 1).all())
    below = (rho - 1e-6).clamp(min=1)
    assert bool(((excess(below) > 0) | (rho == 1)).all())


# ---------------------------------------------------------------------------------------------------------------
# The decoder with Hugging Face models and their caches
# ---------------------------------------------------------------------------------------------------------------

VOCAB, LENGTH = 8, 3
PROMPT = torch.tensor([[1, 5, 3]])


@pytest.fixture(scope="module")
def models():
    target = tiny_llama(0, vocab=VOCAB, scale=3.0)
    draft = tiny_llama(1, vocab=VOCAB, scale=3.0)
    with torch.no_grad():  # exact distribution of the first LENGTH tokens, by enumeration
        sequences = torch.tensor(list(itertools.product(range(VOCAB), repeat=LENGTH)))
        full = torch.cat([PROMPT.expand(len(sequences), -1), sequences], dim=1)
        log_probs = target(full).logits.double().log_softmax(-1)
        start = PROMPT.shape[1] - 1
        joint = sum(log_probs[:, start + i].gather(1, sequences[:, i:i + 1])[:, 0] for i in range(LENGTH)).exp()
    return target, draft, joint


def sequence_pvalue(out, joint):
    index = (out.new_tokens[:, :LENGTH] * torch.tensor([VOCAB ** 2, VOCAB, 1])).sum(1)
    return chi_square_pvalue(torch.bincount(index, minlength=VOCAB ** LENGTH), joint)


@pytest.mark.parametrize("setup", ["standard", "kseq2", "kseq3", "truncated", "vocab_trim", "vocab_trim_kseq2",
                                   "int8", "int8_vocab_trim"])
def test_decoder_output_follows_the_target(models, setup):
    """4,000 rows of one prompt, each with its own seed: the first three generated tokens fit the target's
    exact joint distribution (512 sequences) whatever the draft, and whatever each row accepted."""
    target, draft, joint = models
    vocab = None
    k = {"kseq2": 2, "kseq3": 3, "vocab_trim_kseq2": 2}.get(setup, 1)
    if setup == "truncated":
        draft = self_draft(target, num_layers=1)
    if setup == "int8":
        draft = self_draft(target, dtype=torch.bfloat16, quantize="int8")
    if "vocab_trim" in setup:
        trim = VocabTrim(torch.tensor([0, 3, 4, 6]))
        draft, vocab = trim.draft(draft, quantize="int8" if setup.startswith("int8") else None), trim.token_ids
    decoder = SpeculativeDecoder(target, draft, gamma=2, num_drafts=k, draft_vocab=vocab)
    rows = 4000
    out = decoder.generate(PROMPT.expand(rows, -1), max_new_tokens=LENGTH, seeds=torch.arange(rows))
    assert sequence_pvalue(out, joint) > P_MIN
    assert 0 < out.stats["acceptance_rate"] <= 1


def test_plain_generate_follows_the_target(models):
    target, _, joint = models
    out = generate(target, PROMPT.expand(4000, -1), max_new_tokens=LENGTH, seeds=torch.arange(4000))
    assert sequence_pvalue(out, joint) > P_MIN


def test_decoder_with_a_processed_distribution(models):
    """With top-k and a temperature, the first token follows the target's processed distribution (chi-square over
    4,000 rows), whatever the unprocessed draft proposes: a token outside the target's top 3 never appears."""
    target, draft, _ = models
    config = SamplingConfig(top_k=3, temperature=0.5)
    decoder = SpeculativeDecoder(target, draft, gamma=3, config=config, draft_config=SamplingConfig())
    rows = 4000
    out = decoder.generate(PROMPT.expand(rows, -1), max_new_tokens=1, seeds=torch.arange(rows))
    with torch.no_grad():
        processed = config.process(target(PROMPT).logits[:, -1].double()).softmax(-1)[0]
    counts = torch.bincount(out.new_tokens[:, 0], minlength=VOCAB)
    assert int(counts[processed == 0].sum()) == 0
    assert chi_square_pvalue(counts, processed) > P_MIN


def test_rows_are_independent_and_reproducible(models):
    target, draft, _ = models
    prompts = torch.tensor([[0, 0, 1, 5, 3], [1, 2, 3, 4, 5], [0, 1, 7, 7, 2]])
    mask = prompts != 0
    mask[:, -1] = True
    decoder = SpeculativeDecoder(target, draft, gamma=3, num_drafts=2)
    seeds = torch.tensor([5, 6, 7])
    both = decoder.generate(prompts, attention_mask=mask, max_new_tokens=12, seeds=seeds)
    again = decoder.generate(prompts, attention_mask=mask, max_new_tokens=12, seeds=seeds)
    assert torch.equal(both.sequences, again.sequences)
    calls = []
    for row in range(3):
        valid = mask[row]
        alone = decoder.generate(prompts[row:row + 1, valid], max_new_tokens=12, seeds=seeds[row:row + 1])
        assert torch.equal(alone.new_tokens[0], both.new_tokens[row])
        calls.append(alone.stats["iterations"])
    assert len(set(calls)) > 1, "the test needs rows that finish at different times"
    # per row and target forward it takes part in: the rows' own figures pooled, finished rows not counted
    assert both.stats["tokens_per_target_call"] == pytest.approx(3 * 12 / sum(calls))


def test_eos_and_max_new_tokens(models):
    """Rows end at their first EOS (kept, then padding) or at max_new_tokens, and as many rows emit EOS within the
    first LENGTH tokens as the target's exact distribution says: a decoder that never emitted EOS (every row running
    to max_new_tokens) passed the per-row checks."""
    target, draft, joint = models
    decoder = SpeculativeDecoder(target, draft, gamma=4)
    rows = 200
    out = decoder.generate(PROMPT.expand(rows, -1), max_new_tokens=7, seeds=torch.arange(rows), eos_token_id=2,
                           pad_token_id=0)
    for row in range(rows):
        tokens, n = out.new_tokens[row], int(out.lengths[row])
        first_eos = (tokens[:n] == 2).nonzero()
        assert n == 7 or (first_eos.numel() and int(first_eos[0]) == n - 1)
        assert bool((tokens[n:] == 0).all())
    sequences = torch.tensor(list(itertools.product(range(VOCAB), repeat=LENGTH)))
    chance = float(joint[(sequences == 2).any(dim=1)].sum())  # P(EOS among the first LENGTH tokens)
    ended = int((out.new_tokens[:, :LENGTH] == 2).any(dim=1).sum())
    assert abs(ended - rows * chance) < 4 * math.sqrt(rows * chance * (1 - chance))


def test_a_draft_equal_to_the_target_is_always_accepted(models):
    """A self-draft with every layer proposes from the target's own distributions, so every draft is accepted: a draft
    cache that lost the last accepted token was rejected at times, and K-SEQ drew from its empty residual (p == q)
    instead of falling back to p. A greedy draft_config must reach the draft, which the target then rejects at times."""
    target, _, _ = models
    same = self_draft(target)
    rows, new = 50, 20
    for k in (1, 2):
        out = SpeculativeDecoder(target, same, gamma=3, num_drafts=k).generate(
            PROMPT.expand(rows, -1), max_new_tokens=new, seeds=torch.arange(rows))
        assert out.stats["acceptance_rate"] == 1.0, k
        greedy_draft = SpeculativeDecoder(target, same, gamma=3, num_drafts=k,
                                          draft_config=SamplingConfig(temperature=0))
        out = greedy_draft.generate(PROMPT.expand(rows, -1), max_new_tokens=new, seeds=torch.arange(rows))
        assert out.stats["acceptance_rate"] < 1.0, k
    p_table = markov(3, 5, 1.0)
    drafts = draft_block(p_table, 0, 2, 2, 500, 0)
    p = chain_probs(p_table, 0, drafts)
    accepted, _, _ = kseq_verify(p, p[..., :-1, :], drafts, seeds=torch.arange(500))
    assert bool((accepted == 2).all())


def test_greedy_blocks_accept_the_drafts_greedy_proposals(models):
    """Greedy target and draft: each block accepts as many drafts as the draft's greedy continuation of the text so
    far shares with the target's (the reference runs the draft on the whole context, without a cache). A draft cache
    that kept a rejected draft token, or lost the last accepted one, proposed from another context."""
    target, draft, _ = models
    greedy, gamma, new = SamplingConfig(temperature=0), 3, 12
    prompts = torch.tensor([[1, 5, 3], [4, 2, 6], [7, 7, 1], [3, 0, 5]])
    out = SpeculativeDecoder(target, draft, gamma=gamma, config=greedy).generate(prompts, max_new_tokens=new)
    text = generate(target, prompts, greedy, max_new_tokens=new + gamma + 1).new_tokens  # what the target verifies
    assert torch.equal(out.new_tokens, text[:, :new])
    proposed = accepted = 0
    with torch.no_grad():
        for row in range(len(prompts)):
            length = 0
            while length < new:
                context = torch.cat([prompts[row], text[row, :length]])
                for _ in range(gamma):
                    context = torch.cat([context, draft(context[None]).logits[0, -1].argmax()[None]])
                same = (context[-gamma:] == text[row, length:length + gamma]).long().cumprod(dim=0).sum()
                proposed, accepted, length = proposed + gamma, accepted + int(same), length + int(same) + 1
    assert out.stats["accepted"] < out.stats["proposed"], "the test needs rejections"
    assert (out.stats["accepted"], out.stats["proposed"]) == (accepted, proposed)


def test_per_row_settings_stay_with_their_rows(models):
    """A per-row temperature reaches each row's candidates and target positions: row 0 (temperature 0) is the
    target's greedy text and row 1 (temperature 1) what it gives alone. Spread row after row (repeat, not
    repeat_interleave), row 0 took row 1's temperature at some positions."""
    target, draft, _ = models
    per_row = SamplingConfig(temperature=torch.tensor([0.0, 1.0]))
    greedy = generate(target, PROMPT, SamplingConfig(temperature=0), max_new_tokens=12).new_tokens[0]
    for k in (1, 2):
        out = SpeculativeDecoder(target, draft, gamma=3, num_drafts=k, config=per_row).generate(
            PROMPT.expand(2, -1), max_new_tokens=12, seeds=torch.tensor([3, 4]))
        alone = SpeculativeDecoder(target, draft, gamma=3, num_drafts=k).generate(
            PROMPT, max_new_tokens=12, seeds=torch.tensor([4]))
        assert torch.equal(out.new_tokens[0], greedy), k
        assert torch.equal(out.new_tokens[1], alone.new_tokens[0]), k


def test_vocabulary_mismatch_is_refused(models):
    target, _, _ = models
    other = tiny_llama(2, vocab=VOCAB + 1)
    with pytest.raises(VocabularyMismatchError, match="same vocabulary"):
        SpeculativeDecoder(target, other)
    trimmed = self_draft(target, vocab=torch.tensor([1, 2, 3]))
    with pytest.raises(VocabularyMismatchError):
        SpeculativeDecoder(target, trimmed)                                   # map missing
    with pytest.raises(VocabularyMismatchError):
        SpeculativeDecoder(target, trimmed, draft_vocab=torch.tensor([1, 2]))  # wrong length
    with pytest.raises(VocabularyMismatchError):
        SpeculativeDecoder(target, trimmed, draft_vocab=torch.tensor([1, 1, 2]))
    with pytest.raises(VocabularyMismatchError):
        self_draft(target, vocab=torch.tensor([0, VOCAB]))
    for ids in (torch.tensor([1.5, 2.5, 3.5]), torch.tensor([True, False, True])):  # never truncated to ids
        with pytest.raises(VocabularyMismatchError, match="draft_vocab must be token ids"):
            SpeculativeDecoder(target, trimmed, draft_vocab=ids)
        with pytest.raises(InvalidConfigError, match="vocab must be token ids"):
            self_draft(target, vocab=ids)
    listed = SpeculativeDecoder(target, trimmed, draft_vocab=[1, 2, 3])  # a list of ids is taken as one
    assert torch.equal(listed.draft_vocab, torch.tensor([1, 2, 3]))
    with pytest.raises(InvalidConfigError, match="dtype must be a floating torch.dtype"):
        self_draft(target, dtype="bfloat16")
    hidden = self_draft(target)  # a head vistok cannot read: the widths are checked when the logits come
    hidden.get_output_embeddings = lambda: None
    decoder = SpeculativeDecoder(target, hidden, draft_vocab=torch.tensor([1, 2, 3]))
    with pytest.raises(VocabularyMismatchError, match=f"returned {VOCAB} logits, but draft_vocab lists 3"):
        decoder.generate(PROMPT, max_new_tokens=2, seeds=torch.tensor([0]))
    with pytest.raises(VocabularyMismatchError, match="cannot read from this target"):
        SpeculativeDecoder(hidden, trimmed, draft_vocab=torch.tensor([1, 2, 3]))
    with pytest.raises(InvalidConfigError):
        SpeculativeDecoder(target, target, gamma=0)
    with pytest.raises(UnsupportedModelError):
        SpeculativeDecoder(target, torch.nn.Linear(2, 2))


def test_self_draft_shares_weights_and_leaves_the_target_alone(models):
    target, _, _ = models
    before = {name: p.clone() for name, p in target.named_parameters()}
    layers = len(target.model.layers)
    draft = self_draft(target, num_layers=1, vocab=torch.tensor([0, 2, 5]))
    assert len(target.model.layers) == layers and target.config.num_hidden_layers == layers
    assert target.lm_head.weight.shape[0] == VOCAB
    assert len(draft.model.layers) == 1 and draft.config.num_hidden_layers == 1
    assert draft.model.embed_tokens.weight.data_ptr() == target.model.embed_tokens.weight.data_ptr()
    vocab = torch.tensor([0, 2, 5])
    with torch.no_grad():
        logits = draft(PROMPT).logits
        hidden = target(PROMPT, output_hidden_states=True).hidden_states[1]  # after the first layer
        expected = target.lm_head(target.model.norm(hidden))[..., vocab]
    assert logits.shape == (1, 3, 3) and torch.allclose(logits, expected, atol=1e-5)
    for name, p in target.named_parameters():
        assert torch.equal(p, before[name])
    cast = self_draft(target, dtype=torch.bfloat16)
    assert cast.lm_head.weight.dtype == torch.bfloat16 and target.lm_head.weight.dtype == torch.float32
    with pytest.raises(InvalidConfigError):
        self_draft(target, num_layers=layers + 1)
    target.train()  # the target's modes too: the draft's own modules are in eval mode, the shared ones untouched
    try:
        draft = self_draft(target, num_layers=1)
        assert all(module.training for module in target.modules())
        assert not draft.training and not draft.model.training
    finally:
        target.eval()


def test_vocab_trim_calibration():
    sequences = [torch.tensor([5, 5, 5, 2, 7, 7]), torch.tensor([7, 9])]
    trim = VocabTrim.from_token_ids(sequences, 2)
    assert trim.token_ids.tolist() == [5, 7]
    assert VocabTrim.from_token_ids(sequences, 3, always=[0]).token_ids.tolist() == [0, 5, 7]
    filled = VocabTrim.from_token_ids(sequences, 6, fill=12)
    assert filled.token_ids.tolist() == [5, 7, 2, 9, 0, 1]
    assert abs(trim.coverage(sequences) - 6 / 8) < 1e-12
    with pytest.raises(InvalidConfigError):
        VocabTrim.from_token_ids(sequences, 0)
    for ids, always, message in [(torch.tensor([1, -2]), (), "negative token id"),
                                 (torch.tensor([1.7, 2.2]), (), "sequences must be token ids"),
                                 (torch.tensor([1, 2]), [None], "always must be token ids")]:
        with pytest.raises(InvalidConfigError, match=message):  # never truncated to ids, nor a bincount error
            VocabTrim.from_token_ids(ids, 2, always=always)
    for options, message in [(dict(fill=2.5), "fill must be"), (dict(fill=True), "fill must be"),
                             (dict(always=[7, 2, 3]), "cannot hold the 3 ids of always"),  # ids dropped
                             (dict(fill=8), "token id 9 is not in the vocabulary of fill=8"),  # kept: a bad map
                             (dict(always=[20], fill=12), "token id 20 is not in the vocabulary of fill=12")]:
        with pytest.raises(InvalidConfigError, match=message):
            VocabTrim.from_token_ids(sequences, 2, **options)
    with pytest.raises(InvalidConfigError, match="size 13 is larger than the vocabulary"):  # gave 12 ids
        VocabTrim.from_token_ids(sequences, 13, fill=12)
    for given, message in [(torch.tensor([1.7, 2.2]), "sequences must be token ids"), ([], "no tokens")]:
        with pytest.raises(InvalidConfigError, match=message):  # 1.7 counted as 1; [] a torch.cat error
            trim.coverage(given)


def test_vocab_trim_calibration_stops_at_the_end_token():
    """What the model samples past its end token (4 after 2, here) counts only without eos_token_id."""
    from sampler_cases import chain_llama

    table = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0],
                          [0.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    model = chain_llama(table)  # 0 -> 1 -> 2 (the end) -> 4 -> 4 ...
    prompts = [torch.tensor([[0]])]
    running = VocabTrim.from_generations(model, prompts, 3, max_new_tokens=4)
    stopped = VocabTrim.from_generations(model, prompts, 3, max_new_tokens=4, eos_token_id=2)
    assert sorted(running.token_ids.tolist()) == [0, 1, 4] and sorted(stopped.token_ids.tolist()) == [0, 1, 2]


def test_vocab_trim_calibration_counts_no_padding_after_the_end_token():
    """Calibrating on generations counts what the model emitted, up to its end token, and the prompts: the same
    trim as from_token_ids on those tokens. Counting whole rows counted the padding after the end (id 0, which
    this chain never emits) as the most frequent token."""
    from sampler_cases import chain_llama

    table = torch.zeros(5, 5, dtype=torch.float64)
    table[0, 1] = table[1, 3] = table[3, 2] = table[2, 4] = table[4, 4] = 1.0  # 1 -> 3 -> 2 (the end) -> 4 ...
    model = chain_llama(table)
    prompts = [torch.tensor([[1]]), torch.tensor([[1, 3]])]
    trim = VocabTrim.from_generations(model, prompts, 3, max_new_tokens=6, eos_token_id=2)
    emitted = []
    for index, prompt in enumerate(prompts):
        out = generate(model, prompt, max_new_tokens=6, seeds=torch.tensor([index]), eos_token_id=2)
        emitted.append(torch.cat([prompt[0], out.new_tokens[0, :int(out.lengths[0])]]))
    assert torch.equal(trim.token_ids, VocabTrim.from_token_ids(emitted, 3).token_ids)
    assert sorted(trim.token_ids.tolist()) == [1, 2, 3]


def test_a_trimmed_head_keeps_the_bias_of_its_tokens():
    """A draft trimmed to some ids gives the target's logits at those ids, with a head that has a bias (a distinct
    large value per token): a head that took the first biases, not those of its ids, shifted every logit."""
    model = tiny_llama(5, vocab=VOCAB)
    head = model.lm_head
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(head.weight)
        model.lm_head.bias.copy_(10 * torch.arange(VOCAB, dtype=torch.float32))
    vocab = torch.tensor([6, 2, 5])
    with torch.no_grad():
        expected = model(PROMPT).logits[..., vocab]
        for draft in (self_draft(model, vocab=vocab), self_draft(model, vocab=vocab, dtype=torch.float64)):
            assert torch.allclose(draft(PROMPT).logits.float(), expected, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Int8 weight-only drafts
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("features", [(96, 40), (40, 33), (24, 1)])  # (in, out): torch's CPU kernel crashed on the
def test_int8_linear_multiplies_by_its_dequantized_weight(bias, features, monkeypatch):  # last two (in % 16 != 0)
    """The CPU kernel path (bfloat16 activations) and the dequantizing fallback compute x W_q^T + b for the
    int8 weight W_q, which is within half a quantization step of the original weight."""
    fan_in, fan_out = features
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(fan_in, fan_out, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(fan_out, fan_in, generator=g) * torch.rand(fan_out, 1, generator=g))
    layer = Int8Linear(linear)
    weight = layer.dequantized_weight()
    step = layer.scales[:, None]
    assert bool(((weight - linear.weight).abs() <= step / 2 + 1e-7).all())
    assert layer.int8_weight.dtype == torch.int8 and int(layer.int8_weight.abs().max()) == 127
    x = torch.randn(3, 5, fan_in, generator=g)
    bias = None if linear.bias is None else linear.bias.detach().double()
    expected = torch.nn.functional.linear(x.double(), weight.double(), bias)
    rounded = torch.nn.functional.linear(x.bfloat16().double(), weight.double(), bias)  # what the kernel is given
    for inputs in (x, x.bfloat16()):
        fast = layer(inputs)
        assert fast.shape == (3, 5, fan_out) and fast.dtype == inputs.dtype
        # bfloat16 arithmetic errs by at most 0.6 % of the largest output here; scales off by 1 % err by 1.5 %
        assert torch.allclose(fast.double(), rounded, rtol=0, atol=1e-2 * float(rounded.abs().max()))
    monkeypatch.delattr(torch, "_weight_int8pack_mm")  # the path other devices take
    assert torch.allclose(layer(x).double(), expected, atol=1e-4)
    with pytest.raises(ValueError, match=rf"\[\.\.\., {fan_in}\]"):
        layer(torch.randn(2, fan_in - 1))


def test_int8_self_draft_copies_and_quantizes_every_linear(models):
    target, _, _ = models
    before = {name: p.clone() for name, p in target.named_parameters()}
    linears = sum(isinstance(m, torch.nn.Linear) for m in target.modules())
    draft = self_draft(target, dtype=torch.bfloat16, quantize="int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in draft.modules())
    assert sum(isinstance(m, Int8Linear) for m in draft.modules()) == linears
    assert all(isinstance(m, torch.nn.Linear) for m in [target.lm_head, target.model.layers[0].mlp.up_proj])
    for name, p in target.named_parameters():
        assert torch.equal(p, before[name])
    with torch.no_grad():
        p = target(PROMPT).logits.softmax(-1)
        q = draft(PROMPT).logits.float().softmax(-1)
    assert float(torch.minimum(p, q).sum(-1).min()) > 0.9  # close to the target: a draft worth using
    trimmed = self_draft(target, vocab=torch.tensor([0, 2, 5]), quantize="int8")
    assert isinstance(trimmed.lm_head, Int8Linear) and trimmed.lm_head.out_features == 3
    SpeculativeDecoder(target, trimmed, draft_vocab=torch.tensor([0, 2, 5]))  # its width is checked
    with pytest.raises(VocabularyMismatchError):
        SpeculativeDecoder(target, trimmed)
    with pytest.raises(InvalidConfigError, match="quantize"):
        self_draft(target, quantize="int4")
    with pytest.raises(InvalidConfigError, match="floating torch.dtype"):
        self_draft(target, dtype=torch.int8)


def test_int8_self_draft_of_gpt2_quantizes_its_conv1d_layers():
    """GPT-2's attention and MLP layers are transformers' Conv1D (x @ W + b, W [in, out]), not nn.Linear: the
    int8 draft quantizes them too (only the head was quantized) and computes what the target does, closely."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    target = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32)).eval()
    draft = self_draft(target, quantize="int8")
    assert not any(isinstance(m, (Conv1D, torch.nn.Linear)) for m in draft.modules())
    assert sum(isinstance(m, Int8Linear) for m in draft.modules()) == 2 * 4 + 1  # c_attn, c_proj, c_fc, mlp.c_proj
    assert sum(isinstance(m, Conv1D) for m in target.modules()) == 2 * 4  # the target is left alone
    with torch.no_grad():
        p = target(PROMPT).logits.softmax(-1)
        q = draft(PROMPT).logits.float().softmax(-1)
    assert float(torch.minimum(p, q).sum(-1).min()) > 0.9


def test_int8_quantization_has_one_scale_per_row():
    """Rows of very different sizes (1 to 1e-3): each row is quantized on its own scale, its largest entry at
    +-127 and every entry within half of that row's step. One scale for the whole weight left the small rows a
    few levels (or none) and errors of 100 % of their size."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 64, generator=g) * torch.tensor([1.0, 0.3, 0.1, 0.03, 0.01, 0.001])[:, None]
    values, scales = int8_quantize(weight)
    assert values.dtype == torch.int8 and values.shape == weight.shape and scales.shape == (6,)
    assert torch.equal(values.abs().amax(dim=1), torch.full((6,), 127, dtype=torch.int8))
    assert torch.allclose(scales, weight.abs().amax(dim=1) / 127, rtol=1e-6, atol=0)
    error = (values.float() * scales[:, None] - weight).abs()
    assert bool((error <= scales[:, None] / 2 * (1 + 1e-5)).all())


def test_int8_linear_adds_a_large_bias_on_the_kernel_path():
    """On the CPU kernel path (in_features a multiple of 16) the output is x W_q^T + b also when the bias dwarfs the
    product (100 and up): within the bfloat16 error of the product alone, so a forgotten bias errs by 100."""
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    with torch.no_grad():
        linear.bias.copy_(100 + torch.arange(40.0))
    layer = Int8Linear(linear)
    x = torch.randn(3, 96, generator=g)
    product = torch.nn.functional.linear(x.bfloat16().double(), layer.dequantized_weight().double())
    expected = product + linear.bias.detach().double()
    got = layer(x)
    assert got.dtype == x.dtype
    assert torch.allclose(got.double(), expected, rtol=0, atol=1e-2 * float(product.abs().max()))
