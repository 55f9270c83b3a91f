"""A patched model behaves like a model: copies, pickling, state dicts, threads, empty batches, memory."""

import copy
import io
import pickle
import sys
import threading

import open_clip
import pytest
import timm
import torch
from helpers import tiny_hf_tower

import vistok
from vistok import InvalidConfigError, PatchStateError
from vistok.measure import peak_memory


def _timm(name, size=64, **kwargs):
    return lambda: timm.create_model(name, img_size=size, num_classes=10, **kwargs)


def _open_clip():
    return open_clip.transformer.VisionTransformer(image_size=32, patch_size=8, width=64, layers=4, heads=4,
                                                   mlp_ratio=2.0, output_dim=16, pool_type="avg")


def _encode_hf(model, images):
    return model(pixel_values=images).pooler_output


# name -> (build the model, image size, the method and options, encode images to one tensor)
CASES = {
    "timm vit, merge": (_timm("vit_tiny_patch16_224"), 64, ("merge", {"r": 3}), None),
    "timm vit registers, ats": (_timm("vit_tiny_patch16_224", reg_tokens=2, class_token=False, global_pool="avg"),
                                64, ("ats", {"k": 6, "min_tokens": 6}), None),
    "timm eva rope, random_drop": (_timm("eva02_tiny_patch14_224", 56), 56, ("random_drop", {"k": 0.5}), None),
    "timm vit, ats + merge": (_timm("vit_tiny_patch16_224"), 64,
                              ([("ats", {"k": 10, "blocks": [3]}), ("merge", {"r": 2, "blocks": [3, 4, 5]})], {}),
                              None),
    "open_clip avg pool, merge": (_open_clip, 32, ("merge", {"r": 2}), None),
    "hf clip, ats": (lambda: tiny_hf_tower("clip", 32, seed=None), 32, ("ats", {"k": 5, "min_tokens": 5}), _encode_hf),
    "hf siglip, merge": (lambda: tiny_hf_tower("siglip", 32, seed=None), 32, ("merge", {"r": 2}),
                         _encode_hf),
}


def _setup(case, batch=3, seed=0):
    build, size, (method, options), encode = CASES[case]
    torch.manual_seed(seed)
    model = build().eval()
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    encode = encode or (lambda m, x: m(x))

    def run(m, x=images):
        with torch.no_grad():
            return encode(m, x)

    return model, images, run, method, options


def _patch(model, method, options):
    return vistok.patch(model, method, **options)


@pytest.mark.parametrize("case", sorted(CASES))
def test_deepcopy_is_an_independent_patched_model(case):
    model, images, run, method, options = _setup(case)
    unpatched = run(model)
    handle = _patch(model, method, options)
    patched = run(model)
    assert not torch.equal(patched, unpatched), "the case must reduce tokens to test anything"

    twin = copy.deepcopy(model)
    twin_handle = vistok.get_handle(twin)
    assert twin_handle is not None and twin_handle is not handle and twin_handle.model is twin and twin_handle.active
    assert torch.equal(run(twin), patched)
    assert twin_handle.layouts and handle.layouts  # each saw its own forward pass

    with torch.no_grad():  # the copy computes with its own weights, the original with its own
        for parameter in twin.parameters():
            parameter.mul_(0.5)
    assert not torch.equal(run(twin), patched)
    assert torch.equal(run(model), patched)

    half = copy.deepcopy(model).to(torch.bfloat16)  # the copy casts alone; the original stays in float32
    assert run(half, images.bfloat16()).dtype == torch.bfloat16
    assert torch.equal(run(model), patched)

    vistok.unpatch(twin)
    assert not twin_handle.active and handle.active
    assert torch.equal(run(model), patched)
    handle.remove()
    assert not handle.active and torch.equal(run(model), unpatched)


@pytest.mark.parametrize("case", ["timm vit registers, ats", "open_clip avg pool, merge", "hf clip, ats"])
def test_a_shallow_copy_shares_the_patch_as_it_shares_the_blocks(case):
    """``copy.copy`` of a module shares its submodules, so a shallow copy of a patched model is the same patched
    model under a second name: it runs patched, has the original's handle, and unpatching either restores both
    (what the README says; a copy that ran unpatched, or that unpatched only itself, would leave the shared blocks
    inconsistent)."""
    model, _, run, method, options = _setup(case)
    unpatched = run(model)
    handle = _patch(model, method, options)
    patched = run(model)
    assert not torch.equal(patched, unpatched), "the case must reduce tokens to test anything"

    shallow = copy.copy(model)
    assert vistok.get_handle(shallow) is handle
    assert torch.equal(run(shallow), patched)
    vistok.unpatch(shallow)
    assert not handle.active and vistok.get_handle(model) is None
    assert torch.equal(run(model), unpatched) and torch.equal(run(shallow), unpatched)


@pytest.mark.parametrize("case", sorted(CASES))
def test_pickle_and_torch_save_give_a_patched_model(case):
    model, _, run, method, options = _setup(case)
    unpatched = run(model)
    _patch(model, method, options)
    patched = run(model)

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for loaded in (pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)):
        handle = vistok.get_handle(loaded)
        assert handle is not None and handle.active and handle.model is loaded
        assert torch.equal(run(loaded), patched)
        handle.remove()
        assert torch.equal(run(loaded), unpatched)
        assert not any("forward" in vars(module) for module in loaded.modules())


@pytest.mark.parametrize("case", ["timm vit, merge", "hf siglip, merge"])
def test_state_dict_round_trip(case):
    model, _, run, method, options = _setup(case)
    plain_keys = list(model.state_dict())
    _patch(model, method, options)
    patched = run(model)
    state = model.state_dict()
    assert list(state) == plain_keys  # patching adds no parameters or buffers

    other, _, _, _, _ = _setup(case, seed=5)  # different weights
    _patch(other, method, options)
    assert not torch.equal(run(other), patched)
    other.load_state_dict(state)
    assert torch.equal(run(other), patched)


@pytest.mark.parametrize("case", ["timm vit, merge", "timm vit registers, ats", "timm vit, ats + merge",
                                  "hf siglip, merge"])
def test_concurrent_calls_give_the_sequential_results(case, monkeypatch):
    model, _, run, method, options = _setup(case)
    handle = _patch(model, method, options)
    size = CASES[case][1]
    inputs = [torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)) for batch in (1, 2)]
    expected = [run(model, x) for x in inputs]
    monkeypatch.setattr(sys, "getswitchinterval", sys.getswitchinterval)  # restored after the test
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads as often as possible, mid-block included
    failures, layouts = [], {}

    def work(index):
        try:
            for _ in range(40):
                if not torch.equal(run(model, inputs[index]), expected[index]):
                    failures.append(f"thread {index}: a different output")
            layouts[index] = handle.layouts
        except Exception as error:  # noqa: BLE001 - any error is a failure of the test
            failures.append(f"thread {index}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=work, args=(index,)) for index in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not failures, failures[:3]
    # each thread's handle.layouts describe that thread's own last call
    assert {layout.batch_size for layout in layouts[0].values()} == {1}
    assert {layout.batch_size for layout in layouts[1].values()} == {2}


def _outcome(run, model):
    try:
        return run(model)
    except RuntimeError as error:
        return error


@pytest.mark.parametrize("case", sorted(CASES))
def test_empty_batch_behaves_as_unpatched(case):
    """An empty batch gives what the unpatched model gives: an empty output where the model's own code handles
    ``B = 0`` (timm's ViT). Where it does not (EVA, open_clip and HF reshape with -1), the model's own error
    from an unpatched block, or an empty output when vistok's code runs every block that would fail."""
    model, _, run, method, options = _setup(case, batch=0)
    unpatched = _outcome(run, model)
    with _patch(model, method, options):
        patched = _outcome(run, model)
    if isinstance(unpatched, Exception):
        assert (type(patched) is type(unpatched) and str(patched) == str(unpatched)) or patched.shape[0] == 0
    else:
        assert patched.shape == unpatched.shape and patched.shape[0] == 0


def test_jit_trace_records_a_reducer_that_declares_a_fixed_choice():
    """A reducer whose choice never depends on the token values (here: the first 8 patches) may say so
    (``traceable = True``) and is traced; the same reducer without it is refused."""
    from vistok.methods import MethodConfig, TokenReducer

    class KeepFirst(TokenReducer):
        def select(self, view):
            keep = torch.zeros(view.q.shape[0], view.q.shape[2], dtype=torch.bool)
            keep[:, : view.layout.num_prefix + 8] = True
            return keep

    class KeepFirstConfig(MethodConfig):
        name = "test-keep-first"

        def __init__(self, reducer):
            self.reducer = reducer

        def build(self, info):
            return {1: self.reducer()}

    model, images, _, _, _ = _setup("timm vit, merge")
    other = torch.randn_like(images) * 3
    Traceable = type("Traceable", (KeepFirst,), {"traceable": True})
    with torch.no_grad():
        with vistok.patch(model, KeepFirstConfig(KeepFirst)), pytest.raises(PatchStateError, match="traceable"):
            torch.jit.trace(model, images, check_trace=False)
        with vistok.patch(model, KeepFirstConfig(Traceable)):
            traced = torch.jit.trace(model, images, check_trace=False)
            assert torch.allclose(traced(other), model(other), atol=1e-5)


@pytest.mark.parametrize("method, options", [("ats", {"k": 8}), ("merge", {"r": 3}), ("random_drop", {}),
                                             ("super_token", {"stoken_size": 2})])
def test_a_run_on_meta_gives_the_unpatched_shapes(method, options):
    """``model.to("meta")`` runs for shapes as the unpatched model does: super tokens' autocast guard raised
    "unsupported scalarType" there (meta has no autocast)."""
    model, images, run, _, _ = _setup("timm vit, merge")
    expected = run(model.to("meta"), images.to("meta"))
    with vistok.patch(model, method, **options):
        patched = run(model, images.to("meta"))
    assert patched.is_meta and patched.shape == expected.shape == (3, 10)


@pytest.mark.parametrize("method, options, refused", [
    ("ats", {"k": 8}, True), ("random_drop", {}, True), ("merge", {"r": 3}, False),
    ("super_token", {"stoken_size": 2}, False), ([("ats", {"k": 8, "blocks": [3]}), ("merge", {"r": 2})], {}, True),
    ([("merge", {"r": 2, "blocks": [3]}), ("merge", {"r": 1, "blocks": [5]})], {}, False)])
def test_jit_trace_records_static_methods_and_refuses_the_others(method, options, refused):
    """A trace freezes what depends on values: merging and super tokens trace and agree with the eager model on
    another input; ATS and random dropping raised a raw TypeError (``round`` of a traced shape) or an internal
    TorchScript assertion, and are refused by name."""
    model, images, run, _, _ = _setup("timm vit, merge")
    other = torch.randn_like(images) * 3
    with vistok.patch(model, method, **options), torch.no_grad():
        if refused:
            with pytest.raises(PatchStateError, match="torch.jit.trace cannot record"):
                torch.jit.trace(model, images, check_trace=False)
        else:
            traced = torch.jit.trace(model, images, check_trace=False)
            assert torch.allclose(traced(other), model(other), atol=1e-5)


@pytest.mark.parametrize("method, options", [("ats", {}), ("ats", {"k": 0.5}), ("merge", {"r": 3}),
                                             ("random_drop", {}), ("super_token", {"stoken_size": 2})])
def test_empty_batch_every_method(method, options):
    model, _, run, _, _ = _setup("timm vit, merge", batch=0)
    with vistok.patch(model, method, blocks=list(range(12)), **options) as handle:
        assert run(model).shape == (0, 10)
        with pytest.raises(PatchStateError, match="empty batch"):
            handle.tokens_per_block()  # a mean over no images


def test_a_pass_that_stops_before_the_patched_blocks_starts_afresh():
    """The layouts belong to one pass: a pass that ends before the first patched block (intermediates of early
    blocks) does not inherit the previous pass's tokens, and the handle reports no layouts for it."""
    model = open_clip.transformer.VisionTransformer(image_size=32, patch_size=8, width=64, layers=4, heads=2,
                                                    mlp_ratio=2.0, output_dim=16, pool_type="avg").eval()
    images = torch.randn(2, 3, 32, 32)

    def early():
        return model.forward_intermediates(images, indices=[0], stop_early=True,
                                           output_fmt="NLC")["image_intermediates"][0]

    with torch.no_grad():
        expected = early()
        with vistok.patch(model, "ats", k=4, min_tokens=2, blocks=[2, 3]) as handle:
            model(images)
            assert handle.layouts
            assert torch.equal(early(), expected)
            assert handle.layouts == {}
            with pytest.raises(PatchStateError, match="no forward pass"):
                handle.tokens_per_block()


def test_a_composition_of_compositions_is_one_composition():
    """A patched model's config (a composition) can be composed again, as the list of its parts."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4).eval()
    images = torch.randn(2, 3, 64, 64)
    parts = [("ats", {"k": 10, "blocks": [1]}), ("merge", {"r": 2, "blocks": [1, 2, 3]})]
    with torch.no_grad():
        with vistok.patch(model, parts) as handle:
            expected, config = model(images), handle.config
        with vistok.patch(model, [config, ("random_drop", {"k": 4, "blocks": [3]})]) as handle:
            assert [type(part).__name__ for part in handle.config.parts] == ["ATSConfig", "MergeConfig",
                                                                              "RandomDropConfig"]
        with vistok.patch(model, [config]):
            assert torch.equal(model(images), expected)
    assert vistok.get_handle(None) is None and vistok.unpatch(None) is None


@pytest.mark.parametrize("method, options", [("ats", {}), ("merge", {"r": 3}), ("random_drop", {"k": 0.3}),
                                             ("super_token", {"stoken_size": 2}), ("ats", {"fusion": True, "k": 0.5})])
def test_patched_forward_needs_no_more_memory_than_unpatched(method, options):
    """The tensors a patched block keeps through its MLP (its memory peak) are those of the unpatched block."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10).eval()
    images = torch.randn(4, 3, 64, 64)
    unpatched = peak_memory(model, images)
    with vistok.patch(model, method, blocks=list(range(12)), **options):
        patched = peak_memory(model, images)
    assert patched <= unpatched


def test_fusion_needs_no_more_memory_than_unpatched_on_a_narrow_tower():
    """On a narrow tower the attention's own tensors are a large share of the peak: fusing while they were alive
    made ATS with fusion need 1.27x the unpatched peak here (1.06x on DeiT-Tiny at 224 px)."""
    from helpers import tiny_hf_tower

    model = tiny_hf_tower("clip")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    unpatched = peak_memory(model, images)
    with vistok.patch(model, "ats", fusion=True, k=0.5):
        assert peak_memory(model, images) <= unpatched


def test_peak_memory_counts_what_is_alive_at_once():
    class TwoBuffers(torch.nn.Module):
        def forward(self, x):
            a = x.new_zeros(1000)  # 4,000 bytes, alive while b is made
            b = x.new_zeros(3000)  # 12,000 bytes
            del a, b
            return x.new_zeros(10)  # 40 bytes

    model = TwoBuffers()
    assert peak_memory(model, torch.zeros(7)) == 16_000
    assert peak_memory(torch.nn.Linear(100, 100), torch.zeros(1, 100)) == 400  # the output only, not the weights
    dropping = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Dropout(0.5)).train()
    assert peak_memory(dropping, torch.zeros(1, 100)) == 400  # an inference pass: no dropout mask
    assert dropping.training and dropping[1].training  # the model's own mode comes back

    class Table(torch.nn.Module):  # a plain tensor attribute (no parameter, no buffer) read through a view
        def __init__(self):
            super().__init__()
            self.table = torch.randn(1000, 100)

        def forward(self, x):
            return x + self.table[:10]

    assert peak_memory(Table(), torch.zeros(10, 100)) == 4_000  # the sum, not the table's 400,000 bytes

    class Indexed(torch.nn.Module):  # a tensor made from Python values (no operator), read, freed: its storage's
        def forward(self, x):  # address goes to the next storage made, which must still count
            index = torch.as_tensor([0, 1, 2])
            picked = x[index]
            del index, picked
            y = x.exp()  # 4 MiB, alive with z: 8 MiB
            z = y + 1
            return z.sum()

    assert peak_memory(Indexed(), torch.zeros(1024, 1024)) >= 8 * 2**20


def test_random_drop_is_reproducible_per_call():
    model, images, run, _, _ = _setup("timm vit, merge")
    with vistok.patch(model, "random_drop", k=0.5, seed=3) as handle:
        first = run(model)
        kept = handle.layouts[3].source_index()
        assert torch.equal(run(model), first) and torch.equal(handle.layouts[3].source_index(), kept)
    with vistok.patch(model, "random_drop", k=0.5, seed=4) as handle:
        run(model)
        assert not torch.equal(handle.layouts[3].source_index(), kept)


@pytest.mark.parametrize("k", [2, 0.5, 0.3])
def test_random_drop_keeps_only_real_tokens_of_a_padded_layout(k):
    """After an earlier block padded the batch, the draw ranks padding last: each image keeps min(k, its count)
    (a fraction k of its count, rounded) of its own patches and no padding (padding had been kept in place of
    real tokens, and a fractional k truncated)."""
    from vistok.methods import AttentionView
    from vistok.methods.random_drop import RandomDropper
    from vistok.tokens import TokenLayout

    real = torch.tensor([6, 20, 3, 11])  # patch tokens per image; the rest of the 20 positions is padding
    layout = TokenLayout.original(torch.zeros(4, 21, 8), 1, True)
    valid = torch.cat([torch.ones(4, 1, dtype=torch.bool), torch.arange(20)[None] < real[:, None]], dim=1)
    layout = layout.select(torch.arange(21).expand(4, -1), valid)
    q = torch.zeros(4, 2, 21, 4)
    for seed in range(20):
        keep = RandomDropper(k, seed).select(AttentionView(q, q, q, layout, None))
        assert keep[:, 0].all() and not (keep & ~valid).any()
        expected = real.clamp(max=k) if isinstance(k, int) else (real * k).round().clamp(min=1)
        assert torch.equal(keep[:, 1:].sum(1), expected.long())


@pytest.mark.parametrize("seed", ["a", 1.5, True, -1, 2**62])
def test_random_drop_refuses_bad_seeds(seed):
    model, _, _, _, _ = _setup("timm vit, merge")
    with pytest.raises(InvalidConfigError, match="seed must be an int"):
        vistok.patch(model, "random_drop", seed=seed)
    assert vistok.get_handle(model) is None


def test_negative_block_indices_count_from_the_end():
    model, _, run, _, _ = _setup("timm vit, merge")
    with vistok.patch(model, "ats", k=5, min_tokens=5, blocks=[-1, -2]) as handle:
        assert sorted(handle.reducers) == [10, 11]
        from_end = run(model)
    with vistok.patch(model, "ats", k=5, min_tokens=5, blocks=[10, 11]):
        assert torch.equal(run(model), from_end)
    for blocks in ([12], [-13], [-1, 11]):
        with pytest.raises(InvalidConfigError):
            vistok.patch(model, "ats", blocks=blocks)


def test_per_block_values_pair_with_the_blocks_in_the_order_given():
    """``k=[...]`` / ``r=[...]`` go with ``blocks`` as written, also when the blocks are not in ascending order or
    count from the end; a merge schedule still runs from the first patched block to the last."""
    from helpers import make_images, make_model

    from vistok.measure import tokens_per_block

    model = make_model("vit", depth=6)
    images = make_images(model, 1)
    with vistok.patch(model, "random_drop", blocks=[4, 1], k=[5, 40]):
        assert tokens_per_block(model, images) == [197, 41, 41, 41, 6, 6]
    with vistok.patch(model, "random_drop", blocks=[-1, 1], k=[5, 40]):
        assert tokens_per_block(model, images) == [197, 41, 41, 41, 41, 6]
    with vistok.patch(model, "merge", blocks=[5, 0], r=[1, 20]):
        assert tokens_per_block(model, images) == [177] * 5 + [176]
    with vistok.patch(model, "ats", blocks=[3, 1], k=[10, 50], min_tokens=10) as handle:
        assert tokens_per_block(model, images)[1] <= 51 and tokens_per_block(model, images)[3] <= 11
        assert list(handle.reducers) == [1, 3]
    with vistok.patch(model, "merge", blocks=[3, 0], r=4, schedule="decreasing") as handle:
        in_order = tokens_per_block(model, images)
    with vistok.patch(model, "merge", blocks=[0, 3], r=4, schedule="decreasing"):
        assert tokens_per_block(model, images) == in_order


@pytest.mark.parametrize("case", ["timm vit, merge", "open_clip avg pool, merge", "hf clip, ats"])
def test_hooks_on_a_module_the_patched_block_never_calls_are_refused(case):
    """The patched block runs the attention module's parts, never the module: a hook on it (one that reads the
    attention's output, an adapter's pre-hook) would silently not run, and the output would differ from the
    unpatched model's even where every token is kept. A hook there is refused when patching, and one added after
    patching stops the forward; hooks on the block itself run and are allowed."""
    from vistok import UnsupportedModelError
    from vistok.backbones import resolve_backbone

    model, images, run, method, options = _setup(case)
    if case.startswith("hf"):  # transformers' own recording hooks stay on its attention modules: not the user's
        with torch.no_grad():
            model(pixel_values=images, output_attentions=True)
        from transformers.debug_utils import DebugUnderflowOverflow  # transformers' debugging hooks are a user's

        debugger = DebugUnderflowOverflow(model)
        with pytest.raises(UnsupportedModelError, match="has hooks"):
            _patch(model, method, options)
        for module in model.modules():
            for key in [k for k, h in module._forward_hooks.items() if h.__module__ == "transformers.debug_utils"]:
                del module._forward_hooks[key]
        del debugger
    attention = resolve_backbone(model).block_ops(1).bypassed()[0]
    hook = attention.register_forward_pre_hook(lambda module, args: None)
    with pytest.raises(UnsupportedModelError, match="block 1's .* has hooks"):
        _patch(model, method, options)
    assert vistok.get_handle(model) is None  # refused whole: nothing was patched
    hook.remove()
    attention.forward = attention.forward  # as accelerate's hooks wrap it, on the instance
    with pytest.raises(UnsupportedModelError, match="forward replaced on the instance"):
        _patch(model, method, options)
    del attention.forward
    calls = []
    block = resolve_backbone(model).blocks()[1]
    block.register_forward_hook(lambda module, args, out: calls.append(1))
    with _patch(model, method, options):
        run(model)
        assert calls == [1]
        hook = attention.register_forward_hook(lambda module, args, out: None)
        with pytest.raises(PatchStateError, match="was added after patching"):
            run(model)
        hook.remove()
        run(model)


def test_siglip_pooling_head_refuses_another_passes_tokens():
    """The replaced head checked only the shape: tokens of an earlier pass, pooled after another pass of the same
    shape, used that pass's padding and sizes (0.55 off) without an error, where timm's pool refuses them."""
    model = tiny_hf_tower("siglip", 32)
    head = model.head
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randn(2, 3, 32, 32, generator=generator) for _ in range(2))
    with vistok.patch(model, "merge", r=3, blocks=[1, 2]), torch.no_grad():
        earlier = model(pixel_values=second)
        torch.testing.assert_close(head(earlier.last_hidden_state), earlier.pooler_output)  # its own pass: pooled
        model(pixel_values=first)
        with pytest.raises(PatchStateError, match="not this thread's last forward pass's features"):
            head(earlier.last_hidden_state)


def test_open_clip_pooling_refuses_another_passes_tokens():
    """As the SigLIP head: open_clip's replaced _global_pool checked only the shape."""
    model = _open_clip().eval()
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randn(2, 3, 32, 32, generator=generator) for _ in range(2))
    with vistok.patch(model, "merge", r=3, blocks=[1, 2]), torch.no_grad():
        model.output_tokens = True
        pooled, _ = model(second)
        features = model.ln_post(model.transformer(model._embeds(second)))
        model(first)
        with pytest.raises(PatchStateError, match="not this thread's last forward pass's"):
            model._global_pool(features)
    model.output_tokens = False
    assert pooled.shape == (2, 16)


def test_editing_a_config_after_patching_changes_nothing_that_runs():
    """patch kept the caller's config object: editing it (to patch another model) changed the first vision-LLM's
    outputs and skipped the checks made at patch time; on a tower, handle.config misreported what ran."""
    from helpers import tiny_llava

    from vistok.adapters.methods import RandomSelectConfig
    from vistok.methods import RandomDropConfig

    tower = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=3).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    config = RandomDropConfig(k=0.5, blocks=[1, 2], seed=0)
    with vistok.patch(tower, config) as handle, torch.no_grad():
        before = tower(images)
        config.seed = 5
        assert handle.config.seed == 0 and torch.equal(tower(images), before)
    llava = tiny_llava()
    ids = torch.tensor([[1] + [99] * 16 + [5, 6], [1] + [99] * 16 + [7, 8]])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    chosen = RandomSelectConfig(tokens=4, seed=0)
    with vistok.patch(llava, chosen), torch.no_grad():
        before = llava(input_ids=ids, pixel_values=pixels).logits
        chosen.seed = 5
        torch.testing.assert_close(llava(input_ids=ids, pixel_values=pixels).logits, before, rtol=0, atol=0)



def _clip_tower(model):
    return model.vision_model


@pytest.mark.parametrize("copy_out", [copy.deepcopy, lambda tower: pickle.loads(pickle.dumps(tower))])
def test_a_tower_copied_out_of_a_patched_clip_model_runs_patched_and_unpatches(copy_out):
    """A CLIP model's image tower copied (or pickled) alone: the handle stays with the model that was patched; the
    copy runs patched, ``unpatch`` given the copy restores it (and only it), and it can be patched again."""
    model = tiny_hf_tower("clip-full", 32)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def pooled(tower):
        with torch.no_grad():
            return tower(pixel_values=images).pooler_output

    unpatched = pooled(_clip_tower(model))
    handle = vistok.patch(model, "ats", k=5, min_tokens=5)
    patched = pooled(_clip_tower(model))
    assert not torch.equal(patched, unpatched)
    tower = copy_out(_clip_tower(model))
    assert vistok.get_handle(tower) is None and torch.equal(pooled(tower), patched)
    with pytest.raises(vistok.AlreadyPatchedError, match="copied .* out of a model vistok patched"):
        vistok.patch(tower, "merge", r=2)
    with pytest.raises(PatchStateError, match="part of a patched model"):  # the original tower's owner is alive
        vistok.unpatch(_clip_tower(model))

    vistok.unpatch(tower)
    assert torch.equal(pooled(tower), unpatched) and not any("forward" in vars(m) for m in tower.modules())
    assert handle.active and torch.equal(pooled(_clip_tower(model)), patched)
    again = vistok.patch(tower, "merge", r=2)
    assert not torch.equal(pooled(tower), unpatched)
    again.remove()
    handle.remove()
    assert torch.equal(pooled(_clip_tower(model)), unpatched)


@pytest.mark.parametrize("first", ["patch", "unpatch"])
def test_a_tower_whose_patched_model_was_deleted_unpatches(first):
    """The model and its handle form a cycle: until the collector runs, the deleted model's handle seemed to own the
    tower (vistok collects before refusing)."""
    import gc

    model = tiny_hf_tower("clip-full", 32)
    tower = model.vision_model
    vistok.patch(model, "merge", r=2)
    gc.disable()  # no collection between the del and vistok's own
    try:
        del model
        if first == "patch":
            with pytest.raises(vistok.AlreadyPatchedError, match="patched model was deleted"):
                vistok.patch(tower, "merge", r=2)
        vistok.unpatch(tower)
    finally:
        gc.enable()
    assert not any("forward" in vars(m) or "_vistok_installed" in vars(m) for m in tower.modules())


def test_a_tower_patched_on_its_own_is_named_when_its_clip_model_is_patched():
    model = tiny_hf_tower("clip-full", 32)
    handle = vistok.patch(model.vision_model, "merge", r=2)
    with pytest.raises(vistok.AlreadyPatchedError, match="this CLIPVisionModel runs patched .*remove that patch"):
        vistok.patch(model, "merge", r=2)
    handle.remove()
    vistok.patch(model, "merge", r=2).remove()


def test_a_model_pickled_before_the_patch_record_loads_and_unpatches():
    """Pickles of patched models made before the undo list moved into the tower's record (a handle with
    ``_undo``) still load, run patched and unpatch."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=3, num_classes=3).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        unpatched = model(images)
        handle = vistok.patch(model, "merge", r=6)
        patched = model(images)
    handle._undo = handle.__dict__.pop("_installed").undo  # the old layout: no record on the tower
    del model.__dict__["_vistok_installed"]
    handle._undo.pop(0)  # nor its undo step
    loaded = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(loaded(images), patched)
        vistok.unpatch(loaded)
        assert torch.equal(loaded(images), unpatched)
    assert not any("forward" in vars(m) for m in loaded.modules()) and vistok.get_handle(loaded) is None


@pytest.mark.parametrize("blocks", [[1, 2, 3], [1, 2]])
def test_a_block_module_at_two_positions_is_refused(blocks):
    """A weight-tied model whose block list holds one module twice: one forward per module cannot run as two
    positions (before: a misleading error, or, patching before the repeat, block 2 silently merged nothing)."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=5, num_classes=3).eval()
    shared = model.blocks[2]
    model.blocks = torch.nn.Sequential(model.blocks[0], model.blocks[1], shared, model.blocks[3], shared)
    with pytest.raises(vistok.UnsupportedModelError, match="blocks 2 and 4 of VisionTransformer are one module"):
        vistok.patch(model, "merge", r=3, blocks=blocks)
    assert not any("forward" in vars(m) for m in model.modules()) and vistok.get_handle(model) is None


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_attention_dropout_in_training_mode_is_the_towers_own(kind):
    """In training mode the patched attention drops attention weights as the tower's own (SDPA) attention does, from
    the same random numbers; one that ran without dropout gave the eval-mode attention instead."""
    model = tiny_hf_tower(kind, image_size=32, num_hidden_layers=2, attention_dropout=0.5,
                          attn_implementation="sdpa").train()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.manual_seed(5)
        expected = model(pixel_values=images).last_hidden_state
        with vistok.patch(model, "ats", k=16, min_tokens=16, blocks=[0, 1]) as handle:
            torch.manual_seed(5)
            got = model(pixel_values=images).last_hidden_state
            assert sorted(handle.layouts) == [0, 1], "patched blocks did not run"
            torch.manual_seed(6)
            other_seed = model(pixel_values=images).last_hidden_state
    assert (got - expected).abs().max() <= 1e-4
    assert (other_seed - expected).abs().max() > 1e-2, "the dropout should change the output"


def test_a_second_remove_does_nothing_also_once_the_model_is_patched_again():
    """``handle.remove()`` again does nothing (as its docstring says): not an error, and not the removal of a newer
    patch of the same model. A remove that ran whatever the state raised, or took the new handle off."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=3, num_classes=3).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unpatched = model(images)
        old = vistok.patch(model, "merge", r=2)
        old.remove()
        old.remove()
        assert torch.equal(model(images), unpatched)
        new = vistok.patch(model, "merge", r=2)
        patched = model(images)
        old.remove()
        assert new.active and vistok.get_handle(model) is new and torch.equal(model(images), patched)
        new.remove()
        assert torch.equal(model(images), unpatched)


def test_the_tower_of_a_deepcopied_patched_clip_model_belongs_to_the_copy():
    """A deepcopy's handle owns the copied tower (its record is linked again when copied): ``unpatch`` given that
    tower refuses, as for the original, and the copy keeps running patched. A record left without an owner read as
    a tower copied out alone and was restored, leaving the copy's handle active over an unpatched tower."""
    model = tiny_hf_tower("clip-full", 32)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    vistok.patch(model, "ats", k=5, min_tokens=5)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        patched = twin.vision_model(pixel_values=images).pooler_output
        with pytest.raises(PatchStateError, match="part of a patched model"):
            vistok.unpatch(twin.vision_model)
        assert torch.equal(twin.vision_model(pixel_values=images).pooler_output, patched)
    vistok.unpatch(twin)
    assert not any("forward" in vars(m) or "_vistok_installed" in vars(m) for m in twin.modules())


@pytest.mark.parametrize("index", [3, True])
def test_a_users_config_that_builds_the_block_past_the_last_or_a_bool_is_refused(index):
    """Block indices are ints in ``[0, depth)``: the index one past the last block and a bool (an int to Python) are
    refused, and nothing is patched. An upper bound of ``<= depth`` patched nothing without a word; a bool was taken
    as block 1."""
    from vistok.methods import MethodConfig, TokenReducer
    from vistok.methods.random_drop import RandomDropper

    class BuildsThis(MethodConfig):
        name = "test-builds-index"

        def build(self, info):
            return {index: RandomDropper(0.5, 0)}

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=3, num_classes=3)
    assert isinstance(RandomDropper(0.5, 0), TokenReducer)
    with pytest.raises(InvalidConfigError, match=r"keys must be block indices in \[0, 3\)"):
        vistok.patch(model, BuildsThis())
    assert vistok.get_handle(model) is None and not any("forward" in vars(m) for m in model.modules())


def test_a_block_whose_forward_is_replaced_on_the_instance_is_refused_untouched():
    """A block whose ``forward`` someone replaced on the instance (another patching library, accelerate's hooks) is
    refused, its forward left in place: patching over it would bypass it, and removing the patch would delete it."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=3, num_classes=3).eval()
    own = model.blocks[1].forward
    model.blocks[1].forward = own
    with pytest.raises(vistok.AlreadyPatchedError, match="already has a replaced forward"):
        vistok.patch(model, "merge", r=2)
    assert vars(model.blocks[1])["forward"] is own and vistok.get_handle(model) is None
    assert not any("forward" in vars(block) for index, block in enumerate(model.blocks) if index != 1)


def test_a_vision_llm_refuses_an_attention_path_untouched():
    """``attention=`` chooses how patched tower blocks attend; a vision-LLM's boundary methods run no attention of
    their own, so a path other than "auto" is refused (not silently ignored) and nothing is patched."""
    from helpers import tiny_llava

    llava = tiny_llava()
    for attention in ("sdpa", "flex"):
        with pytest.raises(InvalidConfigError, match="applies to vision towers"):
            vistok.patch(llava, "random_select", tokens=4, attention=attention)
        assert vistok.find_handle(llava) is None
    vistok.patch(llava, "random_select", tokens=4).remove()
