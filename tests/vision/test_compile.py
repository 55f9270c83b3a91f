"""Patched models under ``torch.compile`` and on every attention path: whole graphs (no graph break inside a
patched block: a host read would be one), the same outputs as eager mode and as the unpatched model."""

import json
import types

import open_clip
import pytest
import timm
import torch
from helpers import TOL, load_tool, make_images, make_model, tiny_hf_tower

import vistok
from vistok import InvalidConfigError
from vistok.ops import attend, attention_path, hashed_noise

# A 4-block ViT on 64 px (16 patches): methods in blocks 1-3.
METHODS = {
    # a fraction of 16 patches (6 levels) under min_tokens=1: compiled, the blocks pad every image to the static
    # bound (eager, the counts are read; on these random weights the images happen to keep equal counts)
    "ats": ("ats", {"k": 0.4, "min_tokens": 1}),
    "ats fusion": ("ats", {"k": 6, "min_tokens": 6, "fusion": True}),
    "merge": ("merge", {"r": 3}),
    "random_drop": ("random_drop", {"k": 0.5}),
    "ats then merge": ([("ats", {"k": 8, "blocks": [1]}), ("merge", {"r": 2, "blocks": [2, 3]})], {}),
}


def _tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4, num_classes=10).eval()


def _images(batch=3, size=64):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _compiled(function, backend="eager"):
    torch._dynamo.reset()
    return torch.compile(function, backend=backend, fullgraph=True)


@pytest.mark.parametrize("case", sorted(METHODS))
def test_compiled_whole_graph_matches_eager(case):
    """Under compile the blocks pad to the methods' static bounds instead of reading counts: the valid tokens,
    their outputs and the tokens per block are those of eager mode."""
    method, options = METHODS[case]
    model, images = _tiny_vit(), _images()
    with vistok.patch(model, method, **options) as handle, torch.inference_mode():
        expected, expected_tokens = model(images), handle.tokens_per_block()
        handle._tracker.clear()
        compiled = _compiled(model)(images)
        assert handle.tokens_per_block() == expected_tokens
        assert expected_tokens[-1] < expected_tokens[0]  # the method did reduce
        if case == "ats":  # the static-bound padding was traced, not only exact counts
            assert any(layout.valid is not None for layout in handle.layouts.values())
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-5)


def test_patching_after_compiling_recompiles():
    """dynamo's guards see the patch come and go: never a stale graph."""
    model, images = _tiny_vit(), _images()
    with torch.inference_mode():
        unpatched = model(images)
        compiled = _compiled(model)
        assert torch.equal(compiled(images), unpatched)
        with vistok.patch(model, "merge", r=3):
            patched = model(images)
            torch.testing.assert_close(compiled(images), patched, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(patched, unpatched, atol=1e-3)
        assert torch.equal(compiled(images), unpatched)


@pytest.mark.parametrize("attention", ["auto", "flex"])
def test_a_dynamic_batch_compiles_once(attention):
    """How tools/bench_gpu.py compiles: inference mode, the batch dimension marked dynamic, either path."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    model = _tiny_vit()
    method, options = METHODS["ats then merge"]
    with vistok.patch(model, method, attention=attention, **options), torch.inference_mode():
        expected = [model(_images(batch)) for batch in (2, 5)]
        compiled = _compiled(model, backend=counting_backend)
        first = _images(2)
        torch._dynamo.mark_dynamic(first, 0)
        got = [compiled(first), compiled(_images(5))]
    assert len(graphs) == 1
    for out, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_keep_everything_compiles_whole_and_matches_unpatched(family):
    """Every timm family: keep-everything ATS (then merging nothing where merging applies) under fullgraph
    compile runs the selection and the gathers, and still computes the unpatched model. Keeping every token, no
    image is padded and ``r=0`` returns before any matching: padding and merging are traced in
    :func:`test_compiled_whole_graph_matches_eager`."""
    model = make_model(family)
    images = make_images(model, 2)
    with torch.inference_mode():
        expected = model(images)
    info = vistok.patch(model, "ats").info
    vistok.unpatch(model)
    patches = info.num_patches
    methods = [("ats", {"k": patches, "min_tokens": patches})]
    if not info.rotary:
        methods.append(("merge", {"r": 0}))
    with vistok.patch(model, methods), torch.inference_mode():
        compiled = _compiled(model)(images)
    assert (compiled - expected).abs().max() <= TOL


@pytest.mark.parametrize("tower", ["hf clip", "hf siglip", "open_clip"])
def test_towers_compile_whole_and_match_unpatched(tower):
    if tower == "open_clip":
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
        images, encode = _images(2, 224), model.encode_image
    else:
        model = tiny_hf_tower(tower.removeprefix("hf "))
        images, encode = _images(2), (lambda x: model(pixel_values=x).pooler_output)
    with torch.inference_mode():
        expected = encode(images)
    patches = vistok.patch(model, "ats").info.num_patches
    vistok.unpatch(model)
    with vistok.patch(model, [("ats", {"k": patches, "min_tokens": patches}), ("merge", {"r": 0})]), \
            torch.inference_mode():
        compiled = _compiled(encode)(images)
    assert (compiled - expected).abs().max() <= TOL


def test_video_transformer_compiles_whole():
    """VideoMAE: space-time tokens, ATS padding a batch, and the mean-pooling hook that reads the last tokens."""
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    torch.manual_seed(0)
    model = VideoMAEForVideoClassification(VideoMAEConfig(
        image_size=32, num_frames=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128, patch_size=8, tubelet_size=2, num_labels=5)).eval()
    clips = torch.randn(3, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with vistok.patch(model, "ats", k=0.5) as handle, torch.inference_mode():
        expected = model(pixel_values=clips).logits
        compiled = _compiled(lambda x: model(pixel_values=x).logits)(clips)
        assert handle.layouts[3].valid is not None  # the compiled call padded to the bound
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-5)


EAGER_FLEX = "ignore:flex_attention called without torch.compile"  # eager flex is the reference: what is tested


@pytest.mark.filterwarnings(EAGER_FLEX)
@pytest.mark.parametrize("case", sorted(METHODS))
def test_flex_path_matches_sdpa(case, monkeypatch):
    """FlexAttention's score_mod adds the same padding mask and log-size bias as SDPA's additive mask (eager
    mode runs flex's reference implementation). Flex runs wherever a key is biased: merged sizes (merging,
    fusion); not random dropping, which keeps exactly its count unbiased, nor eager ATS here (equal counts: no
    padding; :func:`test_attend_paths_agree_on_a_padded_biased_batch` checks padding)."""
    import vistok.ops.attention as attention_ops

    calls = []
    flex_attend = attention_ops._flex_attend
    monkeypatch.setattr(attention_ops, "_flex_attend", lambda *args: calls.append(1) or flex_attend(*args))
    method, options = METHODS[case]
    model, images = _tiny_vit(), _images()
    with vistok.patch(model, method, attention="sdpa", **options) as handle, torch.inference_mode():
        expected = model(images)
        assert not calls
        handle.attention = "flex"
        flex = model(images)
    assert bool(calls) == (case in ("ats fusion", "merge", "ats then merge"))
    torch.testing.assert_close(flex, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings(EAGER_FLEX)
def test_flex_on_the_cpu_records_gradients_through_sdpa():
    """FlexAttention has no backward pass on the CPU: a forward there that records gradients takes "sdpa" (the same
    outputs and gradients) instead of failing with torch's NotImplementedError."""
    model, images = _tiny_vit(), _images()
    results = []
    for path in ("sdpa", "flex"):
        with vistok.patch(model, "merge", r=3, attention=path):
            model.zero_grad()
            out = model(images)
            out.square().sum().backward()
            results.append((out.detach(), model.patch_embed.proj.weight.grad.clone()))
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.filterwarnings(EAGER_FLEX)
def test_flex_on_the_cpu_records_gradients_through_values_alone():
    """A frozen tower whose last value projection is trained records gradients through v only: "flex" checked the
    queries and failed with torch's NotImplementedError (no FlexAttention backward on the CPU)."""
    model, images = tiny_hf_tower("clip"), torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    value = [m for n, m in model.named_modules() if n.endswith("self_attn")][-1].v_proj.weight
    value.requires_grad_(True)
    results = []
    for path in ("sdpa", "flex"):
        with vistok.patch(model, "merge", r=2, attention=path):
            value.grad = None
            out = model(pixel_values=images).pooler_output
            out.square().sum().backward()
            results.append((out.detach(), value.grad.clone()))
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("case", sorted(METHODS))
def test_gpu_gather_branches_match_the_cpu_rows(case, monkeypatch):
    """ops/gather.py picks rows with index_select on the CPU and torch.gather / scatter_add elsewhere: the GPU
    branches run here too (forced), with the same outputs."""
    import vistok.ops.gather as gather_ops

    method, options = METHODS[case]
    model, images = _tiny_vit(), _images()
    with vistok.patch(model, method, **options), torch.inference_mode():
        expected = model(images)
        monkeypatch.setattr(gather_ops, "_by_rows", lambda x: False)
        by_gather = model(images)
    torch.testing.assert_close(by_gather, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings(EAGER_FLEX)
def test_super_token_attends_on_the_handles_path(monkeypatch):
    """super_token computes its own biased attention (log mass over super tokens): on the path the handle names,
    like every other method, with the same outputs."""
    import vistok.ops.attention as attention_ops

    calls, flex = [], attention_ops._flex_attend
    monkeypatch.setattr(attention_ops, "_flex_attend", lambda *args: calls.append(args[0].shape) or flex(*args))
    model, images = _tiny_vit(), _images()
    with vistok.patch(model, "super_token", blocks=[0, 1], attention="sdpa") as handle, torch.inference_mode():
        expected = model(images)
        assert not calls
        handle.attention = "flex"
        on_flex = model(images)
    assert len(calls) == 2  # one per super-token block
    torch.testing.assert_close(on_flex, expected, atol=1e-5, rtol=1e-5)


def test_flex_under_compile_matches_eager_sdpa():
    """The flex path traced whole (AOT autograd over FlexAttention's operator): ATS pads, merging biases by size.
    Inductor's fused kernels for it run on GPUs (tests/test_cuda.py); torch 2.14's CPU kernels cannot read a bias
    computed inside the same graph."""
    method, options = METHODS["ats then merge"]
    model, images = _tiny_vit(), _images()
    with vistok.patch(model, method, attention="sdpa", **options) as handle, torch.inference_mode():
        expected = model(images)
        handle.attention = "flex"
        compiled = _compiled(model, backend="aot_eager")(images)
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-5)


def test_attention_path_choice():
    bias = torch.zeros(2, 1, 1, 5)
    q = torch.zeros(2, 1, 5, 4)
    on_gpu = types.SimpleNamespace(is_cuda=True, shape=q.shape, device=torch.device("cuda"), requires_grad=True)
    assert attention_path("flex", q, None, 0.0) == "sdpa"  # nothing biased: the plain fused kernel
    assert attention_path("flex", q, bias, 0.1) == "sdpa"  # flex has no dropout
    assert attention_path("flex", q, bias, 0.0) == "flex"
    assert attention_path("flex", q.requires_grad_(), bias, 0.0) == "sdpa"  # no FlexAttention backward on the CPU
    assert attention_path("flex", on_gpu, bias, 0.0) == "flex"  # on a GPU it has one
    q.requires_grad_(False)
    value = torch.zeros(2, 1, 5, 4, requires_grad=True)  # only the values record gradients (a tuned v_proj)
    assert attention_path("flex", q, bias, 0.0, (torch.zeros_like(value), value)) == "sdpa"
    assert attention_path("flex", q, bias.requires_grad_(), 0.0) == "sdpa"
    bias.requires_grad_(False)
    assert attention_path("auto", q, bias, 0.0) == "sdpa"  # eager CPU
    assert attention_path("auto", on_gpu, bias, 0.0) == "sdpa"  # eager GPU: flex would be unfused
    wide = types.SimpleNamespace(is_cuda=True, shape=(2, 1, 5, 16), device=torch.device("cuda"), requires_grad=False)
    assert _compiled(lambda: attention_path("auto", wide, bias, 0.0) == "flex")() is True
    # inductor's CUDA flex kernel raises NotImplementedError for heads under 16 dimensions: compiled "auto" keeps SDPA
    assert _compiled(lambda: attention_path("auto", on_gpu, bias, 0.0) == "sdpa")() is True
    narrow_values = torch.zeros(2, 1, 5, 8)
    assert _compiled(lambda: attention_path("auto", wide, bias, 0.0, (narrow_values, narrow_values)) == "sdpa")()


@pytest.mark.filterwarnings(EAGER_FLEX)
def test_attend_paths_agree_on_a_padded_biased_batch():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, n, 16, generator=generator) for n in (5, 9, 9))
    bias = torch.rand(3, 9, generator=generator).log()
    bias[0, 6:] = float("-inf")
    key_bias = bias[:, None, None, :]
    logits = q @ k.transpose(-2, -1) / 4 + key_bias
    expected = logits.softmax(-1) @ v
    for path in ("sdpa", "flex", "auto"):
        torch.testing.assert_close(attend(q, k, v, key_bias, path=path), expected, atol=1e-5, rtol=1e-5)


def test_changing_the_attention_path_recompiles():
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    model, images = _tiny_vit(), _images()
    method, options = METHODS["ats then merge"]
    with vistok.patch(model, method, attention="sdpa", **options) as handle, torch.inference_mode():
        compiled = _compiled(model, backend=counting_backend)
        expected = compiled(images)
        handle.attention = "flex"
        flex = compiled(images)
    assert len(graphs) == 2
    assert any("flex_attention" in str(graph.graph) for graph in graphs[1:])
    assert not any("flex_attention" in str(graph.graph) for graph in graphs[:1])
    torch.testing.assert_close(flex, expected, atol=1e-5, rtol=1e-5)


def test_attention_option_is_checked():
    model = _tiny_vit()
    with pytest.raises(InvalidConfigError, match="attention must be one of"):
        vistok.patch(model, "merge", attention="flash")
    assert vistok.get_handle(model) is None
    with vistok.patch(model, "merge") as handle:
        assert handle.attention == "auto"
        with pytest.raises(InvalidConfigError, match="attention must be one of"):
            handle.attention = "xformers"
        assert handle.attention == "auto"


def _chi_square(counts, draws, kept):
    """Pearson's statistic for how often each of ``len(counts)`` positions was among ``kept`` drawn uniformly
    without replacement, ``draws`` times: chi-square with ``len(counts) - 1`` degrees of freedom (the counts
    sum to ``draws * kept``; each free direction has variance ``draws * p * (n - kept) / (n - 1)``)."""
    n = len(counts)
    p = kept / n
    return float(((counts.double() - draws * p) ** 2).sum() / (draws * p * (n - kept) / (n - 1)))


CHI_SQUARE_15_999 = 37.7  # the 99.9 % quantile of chi-square with 15 degrees of freedom


def test_hashed_noise_is_uniform_and_independent():
    """Keeping the top half of each row: every position is kept half of the time, and two positions together
    as often as a uniformly random half would."""
    rows, columns = 4000, 16
    noise = hashed_noise(7, rows, columns)
    assert noise.dtype == torch.long and bool((noise >= 0).all()) and bool((noise < 2**32).all())
    kept = noise.argsort(dim=1).argsort(dim=1) >= columns // 2
    assert _chi_square(kept.sum(dim=0), rows, columns // 2) < CHI_SQUARE_15_999
    both = float((kept[:, 0] & kept[:, 1]).double().mean())
    assert abs(both - 0.5 * (columns // 2 - 1) / (columns - 1)) < 0.03
    assert torch.equal(hashed_noise(7, rows, columns), noise)
    assert not torch.equal(hashed_noise(8, rows, columns), noise)
    largest = hashed_noise(2**63 - 1, 2, 3)
    assert bool((largest >= 0).all()) and not torch.equal(largest, hashed_noise(2**63 - 2, 2, 3))
    for seed in (1, 2**62 + 5):  # seeds that differ in the high 32 bits only draw other values
        assert not torch.equal(hashed_noise(seed, 2, 3), hashed_noise(seed ^ 2**32, 2, 3))


def test_random_drop_keeps_uniformly_random_tokens():
    """Over many seeds, random dropping keeps every patch position equally often."""
    model = _tiny_vit()
    images = _images(1)
    counts = torch.zeros(16)
    for seed in range(300):
        with vistok.patch(model, "random_drop", k=4, blocks=[1], seed=seed) as handle, torch.inference_mode():
            model(images)
            counts[handle.layouts[1].source[0, 1:] - 1] += 1
    assert _chi_square(counts, 300, 4) < CHI_SQUARE_15_999


@pytest.mark.slow
def test_gpu_benchmark_runs_every_step(tmp_path):
    """tools/bench_gpu.py's dry run: every model variant, eager and compiled (both attention paths), and the
    vision-LLM prefill, measured and written to the JSON; the GPU run is the same code on bigger models."""
    bench = load_tool("bench_gpu")
    out = tmp_path / "gpu.json"
    assert bench.main(["--smoke", "--batches", "2", "--runs", "1", "--budget-s", "1800", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["errors"] == [] and record["skipped"] == [] and record["finished"] is True
    rows = {(row["mode"], row["variant"]) for row in record["rows"]}
    variants = bench.SMOKE_CASES[0].variants(("auto", "sdpa", "flex"))
    assert rows == {("eager", "unpatched"), ("compiled", "unpatched")} | {("compiled", label) for label in variants} \
        | {("eager", label) for label in bench.SMOKE_CASES[0].variants(("auto",))}
    assert all(row["speedup"] > 0 and row["compile_s"] is not None for row in record["rows"]
               if row["mode"] == "compiled")
    assert {row["attention"] for row in record["rows"] if row["mode"] == "compiled"} == {None, "auto", "sdpa", "flex"}
    assert [row["variant"] for row in record["prefill"]][0] == "all tokens" and len(record["prefill"]) == 4
