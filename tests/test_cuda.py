"""The library on a CUDA device: the same kept tokens and outputs as on the CPU, half precision, gradients, and
samplers whose kept sets and seeded draws do not depend on the device.

CI has no GPU, so this module is skipped there (the reason is printed); on a GPU machine run
``pytest tests/test_cuda.py``.
"""

import copy

import pytest
import torch
from helpers import FAMILIES, make_images, make_model
from sampler_cases import chain_probs, draft_block, emitted_pairs, logit_cases, markov, pair_test, tiny_llama

import vistok
from vistok import samplers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
OPTIONS = {"ats": {"k": 0.5}, "merge": {"r": 8}}
# merging refuses rotary models, so those families are checked with ATS only
CASES = [(family, method) for family in sorted(FAMILIES) for method in OPTIONS
         if not (method == "merge" and "rope" in family)]


@pytest.fixture(autouse=True, scope="module")
def exact_float32():
    """TF32 matrix products round to 10 mantissa bits; the parity checks need true float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


SYNC_FREE = {"ats": ("ats", {"k": 0.5}), "merge": ("merge", {"r": 8}), "random_drop": ("random_drop", {"k": 0.5}),
             "ats then merge": ([("ats", {"k": 100, "blocks": [3]}), ("merge", {"r": 8, "blocks": [4, 5, 6]})], {})}


@pytest.mark.parametrize("case", sorted(SYNC_FREE))
def test_patched_forward_never_waits_for_the_gpu(case):
    """No read back to the host and no synchronising copy inside a patched forward (CUDA's sync debug mode
    raises on either): the host can queue the whole forward ahead of the device."""
    method, options = SYNC_FREE[case]
    model = make_model("vit").to(CUDA)
    images = make_images(model, 4).to(CUDA)
    with torch.no_grad(), vistok.patch(model, method, **options):
        model(images)  # warm-up: lazy initialisation may synchronise once
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(images)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_random_drop_keeps_the_same_tokens_on_every_device():
    on_cpu = make_model("vit")
    on_gpu = copy.deepcopy(on_cpu).to(CUDA)
    images = make_images(on_cpu, 3)
    with torch.no_grad(), vistok.patch(on_cpu, "random_drop", k=0.3) as cpu_handle, \
            vistok.patch(on_gpu, "random_drop", k=0.3) as gpu_handle:
        on_cpu(images)
        on_gpu(images.to(CUDA))
        for block, layout in cpu_handle.layouts.items():
            other = gpu_handle.layouts[block]
            for image in range(images.shape[0]):  # the real tokens, in order (padding may differ)
                kept = layout.source[image][layout.valid_mask()[image]]
                assert torch.equal(other.source[image][other.valid_mask(CUDA)[image]].cpu(), kept)


def test_keep_everything_parity_and_removal_on_cuda(family):
    model = make_model(family).to(CUDA)
    images = make_images(model, 2).to(CUDA)
    patches = model.patch_embed.num_patches
    with torch.no_grad():
        expected = model(images)
        with vistok.patch(model, "ats", k=patches, min_tokens=patches, blocks=range(len(model.blocks))):
            got = model(images)
        after = model(images)
    assert (got - expected).abs().max() <= 1e-4
    assert torch.equal(after, expected)


@pytest.mark.parametrize(("family", "method"), CASES)
def test_cuda_keeps_the_tokens_the_cpu_keeps(family, method):
    on_cpu = make_model(family)
    on_gpu = copy.deepcopy(on_cpu).to(CUDA)
    images = make_images(on_cpu, 4)
    with torch.no_grad(), vistok.patch(on_cpu, method, **OPTIONS[method]) as cpu_handle, \
            vistok.patch(on_gpu, method, **OPTIONS[method]) as gpu_handle:
        expected = on_cpu(images)
        got = on_gpu(images.to(CUDA)).cpu()
        assert gpu_handle.tokens_per_block()[-1] < on_cpu.patch_embed.num_patches
        for block, layout in cpu_handle.layouts.items():  # the GPU may pad to a static width: compare real tokens
            other = gpu_handle.layouts[block]
            for image in range(images.shape[0]):
                real, other_real = layout.valid_mask()[image], other.valid_mask()[image].cpu()
                assert torch.equal(layout.source_index()[image, real], other.source_index()[image].cpu()[other_real])
                if layout.sizes is not None:
                    assert torch.allclose(layout.sizes[image, real], other.sizes[image].cpu()[other_real])
    assert (got - expected).abs().max() <= 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_half_precision_on_cuda(method, dtype):
    """The half-precision patched model gives each image nearly what the float32 patched model gives it, and
    more like it than like any other image's (outputs of different images of these random models already agree to
    a cosine of about 0.8; on the CPU half vs float32 agree to 0.93 or more: ATS may sample other tokens)."""
    model = make_model("vit").to(CUDA)
    images = make_images(model, 8).to(CUDA)
    with torch.no_grad():
        with vistok.patch(model, method, **OPTIONS[method]):
            reference = model(images)
        model.to(dtype)
        with vistok.patch(model, method, **OPTIONS[method]) as handle:
            got = model(images.to(dtype))
            kept = handle.tokens_per_block()
    assert got.dtype == dtype and bool(torch.isfinite(got).all())
    assert kept[-1] < 0.6 * kept[0]
    agreement = torch.nn.functional.cosine_similarity(got.float()[:, None], reference[None], dim=-1)  # [8, 8]
    assert torch.equal(agreement.argmax(dim=1).cpu(), torch.arange(8)), "outputs out of line with their images"
    assert float(agreement.diagonal().min()) > 0.85, "half-precision patched output far from the float32 one"


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_training_on_cuda_reaches_every_parameter(method):
    model = make_model("deit3_layerscale").to(CUDA).train()
    images = make_images(model, 4).to(CUDA)
    with vistok.patch(model, method, **OPTIONS[method]):
        model(images).logsumexp(dim=-1).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and bool(torch.isfinite(parameter.grad).all()), name
        assert bool(parameter.grad.abs().sum() > 0), name


# ---------------------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------------------

FILTERS = {
    "top_k": (samplers.top_k_filter, 50),
    "top_p": (samplers.top_p_filter, 0.9),
    "min_p": (samplers.min_p_filter, 0.05),
    "typical": (samplers.typical_filter, 0.9),
    "epsilon": (samplers.epsilon_filter, 3e-4),
    "eta": (samplers.eta_filter, 3e-4),
    "top_h": (samplers.top_h_filter, 0.4),
}


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_filters_keep_the_same_tokens_on_cuda(name):
    function, value = FILTERS[name]
    for seed in range(10):
        logits = logit_cases(seed)
        expected = torch.isfinite(function(logits, value))
        got = torch.isfinite(function(logits.to(CUDA), value)).cpu()
        assert torch.equal(got, expected), f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["top_k", "min_p", "epsilon"])
def test_filters_in_half_precision_on_cuda(name, dtype):
    function, value = FILTERS[name]
    logits = logit_cases(4, dtype=torch.float32).to(dtype)  # 'peaked': an LLM-like shape
    got = function(logits.to(CUDA), value)
    assert got.dtype == dtype
    assert not bool(got.isnan().any()) and bool(torch.isfinite(got).any(dim=1).all())
    assert torch.equal(torch.isfinite(got).cpu(), torch.isfinite(function(logits, value)))


def test_seeded_draws_do_not_depend_on_the_device():
    logits = logit_cases(0, batch=64, vocab=5000)
    seeds = torch.arange(64) * 7919
    for counter in range(5):
        expected = samplers.sample(logits, seeds=seeds, counter=counter)
        got = samplers.sample(logits.to(CUDA), seeds=seeds.to(CUDA), counter=counter)
        assert torch.equal(got.cpu(), expected)


def test_speculative_verification_is_exact_on_cuda():
    vocab, gamma, draws = 6, 3, 30000
    p_table, q_table = markov(0, vocab, 1.5), markov(100, vocab, 2.0)
    drafts = draft_block(q_table, 0, gamma, 1, draws, 0)[:, 0]
    target, draft = chain_probs(p_table, 0, drafts), chain_probs(q_table, 0, drafts)[:, :-1]
    accepted, next_token = samplers.speculative_verify(target.to(CUDA), draft.to(CUDA), drafts.to(CUDA),
                                                       seeds=torch.arange(draws, device=CUDA))
    accepted, next_token = accepted.cpu(), next_token.cpu()
    tokens = torch.cat([drafts, next_token[:, None]], dim=1)
    tokens[torch.arange(draws), accepted] = next_token
    pair_test(p_table, 0, *emitted_pairs(accepted, tokens))


def test_generation_on_cuda_matches_the_cpu():
    model = tiny_llama(scale=3.0)
    prompt = torch.tensor([[1, 5, 7, 9], [1, 4, 4, 3]])
    config = samplers.SamplingConfig(temperature=0.9, top_p=0.95)
    expected = samplers.generate(model, prompt, config, max_new_tokens=12, seeds=torch.tensor([3, 4]))
    model_gpu = copy.deepcopy(model).to(CUDA)
    got = samplers.generate(model_gpu, prompt.to(CUDA), config, max_new_tokens=12, seeds=torch.tensor([3, 4]))
    assert torch.equal(got.sequences.cpu(), expected.sequences)
    decoder = samplers.SpeculativeDecoder(model_gpu, samplers.self_draft(model_gpu, num_layers=1), gamma=3)
    out = decoder.generate(prompt.to(CUDA), max_new_tokens=12, seeds=torch.tensor([3, 4]))
    assert out.sequences.shape == (2, 4 + 12) and out.sequences.device.type == CUDA.type


@pytest.mark.parametrize("case", sorted(SYNC_FREE))
def test_compiled_flex_path_matches_eager_on_cuda(case, monkeypatch):
    """Inductor's fused FlexAttention kernel, which "auto" runs compiled on a GPU where a key bias or padding is
    (checked: flex is traced; random dropping keeps exactly its bound, unbiased, so "auto" runs SDPA there),
    against eager SDPA; compiled as tools/bench_gpu.py compiles (inference mode, a dynamic batch). Last in the
    file: its inductor compiles take the longest, and a time limit should cut them, not the checks after them."""
    traced = []
    flex = vistok.ops.attention._flex_attend
    monkeypatch.setattr(vistok.ops.attention, "_flex_attend", lambda *args: traced.append(1) or flex(*args))
    method, options = SYNC_FREE[case]
    model = make_model("vit").to(CUDA)
    images = make_images(model, 4).to(CUDA)
    with torch.inference_mode(), vistok.patch(model, method, attention="sdpa", **options) as handle:
        expected = model(images)
        handle.attention = "auto"
        torch._dynamo.reset()
        marked = images.clone()
        torch._dynamo.maybe_mark_dynamic(marked, 0)
        compiled = torch.compile(model, fullgraph=True)(marked)
    if case == "random_drop":
        assert not traced, "auto took flex where no key is biased"
    else:
        assert traced, "auto did not take the flex path compiled on CUDA"
    assert (compiled - expected).abs().max() <= 1e-3


def test_compiled_auto_keeps_sdpa_for_heads_under_16_dimensions_on_cuda(monkeypatch):
    """Inductor's CUDA flex kernel raises NotImplementedError for heads under 16 dimensions: "auto" compiles such a
    model with SDPA (and the same outputs) instead of failing."""
    import timm

    traced = []
    flex = vistok.ops.attention._flex_attend
    monkeypatch.setattr(vistok.ops.attention, "_flex_attend", lambda *args: traced.append(1) or flex(*args))
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, embed_dim=64, num_heads=8, depth=4).eval().to(CUDA)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(CUDA)
    with torch.inference_mode(), vistok.patch(model, "merge", r=3) as handle:
        expected = model(images)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)(images)
        assert handle.attention == "auto"
    assert not traced and (compiled - expected).abs().max() <= 1e-3
