"""Everything vistok cannot do is a clear VistokError, and a refused model is left untouched."""

import numpy as np
import pytest
import timm
import torch
from helpers import make_images, make_model
from timm.models.vision_transformer import ResPostBlock

import vistok
from vistok import (
    AlreadyPatchedError,
    InputShapeError,
    InvalidConfigError,
    PatchStateError,
    UnknownMethodError,
    UnsupportedModelError,
    VistokError,
)


def assert_untouched(model):
    for module in model.modules():
        assert "forward" not in vars(module) and "pool" not in vars(module)
        assert not module._forward_pre_hooks
    assert vistok.get_handle(model) is None


def test_errors_share_one_base():
    for error in (AlreadyPatchedError, InputShapeError, InvalidConfigError, PatchStateError, UnknownMethodError,
                  UnsupportedModelError):
        assert issubclass(error, VistokError)


@pytest.mark.parametrize("call, error", [
    (lambda: vistok.ops.gather_tokens(torch.zeros(2, 5, 3), torch.zeros(3, 2, dtype=torch.long)), InputShapeError),
    (lambda: vistok.ops.inverse_transform_sampling(torch.rand(5), 3), InputShapeError),
    (lambda: vistok.ops.inverse_transform_sampling(torch.rand(2, 5), 0), InvalidConfigError),
    (lambda: vistok.ops.merging.bipartite_soft_matching(torch.rand(1, 6, 4), 4), InvalidConfigError),
    (lambda: vistok.measure.count_flops(torch.nn.Identity(), []), InputShapeError),
    (lambda: vistok.measure.time_models({}, torch.zeros(1), runs=0), InvalidConfigError),
], ids=["gather", "sampling-shape", "sampling-levels", "matching-r", "flops-no-images", "timing-runs"])
def test_public_functions_raise_vistok_errors(call, error):
    with pytest.raises(error):
        call()


@pytest.mark.parametrize("build", [
    lambda: timm.create_model("resnet18"),
    lambda: torch.nn.Linear(3, 3),
    lambda: timm.create_model("vit_small_patch16_224", block_fn=ResPostBlock),
    lambda: timm.create_model("vit_small_patch16_224", patch_drop_rate=0.25),
    lambda: timm.create_model("eva02_tiny_patch14_224", use_post_norm=True),
], ids=["resnet", "linear", "res-post-block", "patch-dropout", "eva-post-norm"])
def test_unsupported_models_are_refused_untouched(build):
    model = build()
    with pytest.raises(UnsupportedModelError) as info:
        vistok.patch(model, "ats")
    assert type(model).__name__ in str(info.value) or "Block" in str(info.value)
    assert_untouched(model)


def test_unknown_parts_are_refused():
    model = make_model("vit")
    model.blocks[4].attn.sink = torch.nn.Parameter(torch.zeros(6))
    with pytest.raises(UnsupportedModelError, match=r"blocks\[4\].attn.*'sink'"):
        vistok.patch(model, "ats")
    assert_untouched(model)


def test_unknown_method_and_options():
    model = make_model("vit")
    with pytest.raises(UnknownMethodError, match="'atss'.*Did you mean 'ats'"):
        vistok.patch(model, "atss")
    with pytest.raises(InvalidConfigError, match="unknown option"):
        vistok.patch(model, "ats", kk=3)
    with pytest.raises(InvalidConfigError, match="not both"):
        vistok.patch(model, vistok.ATSConfig(k=10), k=3)
    # a (name, options) pair with keywords: the keywords were dropped (every block merged, not blocks=[0])
    with pytest.raises(InvalidConfigError, match=r"not both \(got \['blocks'\]\)"):
        vistok.patch(model, ("merge", {"r": 4}), blocks=[0])
    with pytest.raises(InvalidConfigError, match="option names must be strings"):
        vistok.patch(model, [("ats", {1: 2})])  # a raw TypeError ("keywords must be strings")
    with pytest.raises(InvalidConfigError, match="parts must be method configs, got 'ats'"):
        vistok.patch(model, vistok.methods.ComposedConfig(("ats", "merge")))  # a raw AttributeError
    with pytest.raises(InvalidConfigError, match=r"min_tokens must be an int in \[1, 196\] \(the model's"):
        vistok.patch(model, "ats", k=0.5, min_tokens=300)
    assert_untouched(model)


@pytest.mark.parametrize("options, message", [
    (dict(k=0), r"k=0 is outside \[1, "),
    (dict(k=197), "196 patch tokens"),
    (dict(k=-5), "outside"),
    (dict(k=1.5), r"in \(0, 1\]"),
    (dict(k=0.0), r"in \(0, 1\]"),
    (dict(k=True), "int or a float"),
    (dict(k="108"), "int or a float"),
    (dict(k=[100, 90], blocks=[3]), "2 values but 1 blocks"),
    (dict(blocks=[]), "empty"),
    (dict(blocks=[12]), "out of range"),
    (dict(blocks=[3, 3]), "twice"),
    (dict(blocks=[2.0]), "ints"),
    (dict(min_tokens=0), "min_tokens"),
    (dict(min_tokens=500), "min_tokens"),
])
def test_invalid_options(options, message):
    model = make_model("vit")
    with pytest.raises(InvalidConfigError, match=message):
        vistok.patch(model, "ats", **options)
    assert_untouched(model)


def test_patching_twice():
    model = make_model("vit")
    handle = vistok.patch(model, "ats")
    with pytest.raises(AlreadyPatchedError, match="already patched"):
        vistok.patch(model, "ats", k=50)
    handle.remove()
    vistok.patch(model, "ats", k=50).remove()


@pytest.mark.parametrize("shape, message", [
    ((1, 3, 200, 200), "built for 224x224.*got 200x200"),
    ((1, 1, 224, 224), "3 input channels"),
    ((3, 224, 224), r"\[B, C, H, W\]"),
])
def test_wrong_input_shape(shape, message):
    model = make_model("vit")
    with vistok.patch(model, "ats"), pytest.raises(InputShapeError, match=message):
        model(torch.randn(shape))


def test_dynamic_image_size_models_accept_other_sizes():
    model = make_model("vit", dynamic_img_size=True)
    with torch.no_grad(), vistok.patch(model, "ats", k=0.5) as handle:
        model(torch.randn(2, 3, 160, 160))
        assert handle.tokens_per_block()[0] == 101.0


def test_integer_options_are_bounded_by_the_native_patches_only_where_the_size_is_fixed():
    """A model set up for other sizes may be called on more patches than its native grid, so an int k, min_tokens or
    r above the native count is accepted there (and keeps everything at the native size); a fixed-size model refuses
    it as out of range."""
    fixed = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3).eval()
    for method, options in [("ats", dict(k=40)), ("ats", dict(k=0.5, min_tokens=20)), ("random_drop", dict(k=40)),
                            ("merge", dict(r=9))]:
        with pytest.raises(InvalidConfigError, match="16"):
            vistok.patch(fixed, method, **options)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3,
                              dynamic_img_size=True).eval()
    native, large = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 128, 128)  # 16 and 64 patches
    with torch.no_grad():
        expected = model(native)
        with vistok.patch(model, "ats", k=40, min_tokens=20, blocks=[1]) as handle:
            assert torch.equal(model(native), expected)
            model(large)
            assert handle.tokens_per_block()[1] <= 41
        with vistok.patch(model, "merge", r=9) as handle:
            model(large)
            assert handle.tokens_per_block() == [65 - 9, 65 - 18, 65 - 27]


def test_things_vistok_cannot_follow():
    model = make_model("vit")
    images = make_images(model, 1)
    with vistok.patch(model, "ats"):
        with pytest.raises(PatchStateError, match="no attention mask"):
            model(images, attn_mask=torch.ones(1, 197, 197, dtype=torch.bool))
        expected = model(images)
        model.set_grad_checkpointing(True)
        with pytest.raises(PatchStateError, match="checkpointing"):
            model(images)  # recording gradients: the backward pass would re-run blocks
        with torch.no_grad():  # nothing is re-run: the blocks run once, in order
            assert (model(images) - expected).abs().max() <= 1e-6
        model.set_grad_checkpointing(False)
        hook = model.blocks[5].register_forward_hook(lambda m, i, out: out.clone())
        with pytest.raises(PatchStateError, match="block 6 received tokens"):
            model(images)
        hook.remove()
        model(images)


@pytest.mark.parametrize("name, options, message", [
    ("ats", dict(min_tokens=0), "min_tokens must be an int >= 1"),
    ("ats", dict(k=[0.5, 2.0]), r"in \(0, 1\]"),
    ("merge", dict(r=-1), "r must be >= 0"),
    ("merge", dict(schedule="fast"), "schedule must be one of"),
    ("merge", dict(r=[2, 2], schedule="decreasing"), "not both"),
    ("merge", dict(trace_source="yes"), "trace_source must be a bool"),
    ("random_drop", dict(seed=-1), "seed must be an int"),
    ("random_drop", dict(k="half"), "int or a float"),
    ("super_token", dict(stoken_size=(2, 0)), "stoken_size must be a positive int"),
    ("super_token", dict(n_iter=0), "n_iter must be an int >= 1"),
    # a k the min_tokens floor overrides (kept 8 for k=4, silently), and bytes or numpy sizes taken as lists or crashing
    ("ats", dict(k=4), "k=4 is below min_tokens=8"),
    ("ats", dict(k=[20, 5], blocks=[1, 2], min_tokens=6), "k=5 is below min_tokens=6"),
    ("ats", dict(k=b"\x05\x06", blocks=[1, 2], min_tokens=1), "int or a float, got bytes"),
    ("random_drop", dict(k=b"ab"), "int or a float, got bytes"),
    ("merge", dict(r=b"\x01"), "r must be an int, got bytes"),
    ("super_token", dict(stoken_size=np.int64(2)), "stoken_size must be a positive int"),
])
def test_configs_check_what_needs_no_model_when_made(name, options, message):
    """A config refuses a bad option when it is made (vistok.create_config), before any model is patched; one set
    on a config afterwards is refused by patch, which leaves the model untouched."""
    with pytest.raises(InvalidConfigError, match=message):
        vistok.create_config(name, **options)
    config = vistok.create_config(name)
    for option, value in options.items():
        setattr(config, option, value)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3)
    for spec in (config, [config]):
        with pytest.raises(InvalidConfigError, match=message):
            vistok.patch(model, spec)
        assert_untouched(model)


def test_methods_the_instance_already_replaced_are_refused_untouched():
    """vistok replaces the model's pooling (and timm's forward_intermediates) on the instance while patched and
    deletes its replacement when removed: one the user (or another library) set there first would be bypassed,
    then deleted. Such a model is refused, with the user's method left in place."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3).eval()
    for name in ("pool", "forward_intermediates"):
        own = getattr(model, name)
        setattr(model, name, own)
        with pytest.raises(UnsupportedModelError, match=f"VisionTransformer.{name} is replaced on this instance"):
            vistok.patch(model, "merge", r=2)
        assert vars(model)[name] is own and vistok.get_handle(model) is None
        assert not any("forward" in vars(block) for block in model.blocks)
        assert set(vars(model)) & {"pool", "forward_intermediates"} == {name} and not model.norm._forward_hooks
        delattr(model, name)
        vistok.patch(model, "merge", r=2).remove()  # nothing of the refused patch is in the way


class _BuildsThis(vistok.methods.MethodConfig):
    name = "test-builds-this"

    def __init__(self, reducers):
        self.reducers = reducers

    def build(self, info):
        return self.reducers


@pytest.mark.parametrize("reducers", [{}, {12: vistok.methods.TokenReducer()}, {-1: vistok.methods.TokenReducer()},
                                      {0: "ats"}, [(0, vistok.methods.TokenReducer())]])
def test_a_users_config_that_builds_no_blocks_or_blocks_past_the_model_is_refused(reducers):
    """An empty dict was a bare ValueError from min(); an index past the last block was silently ignored."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=4, num_classes=3)
    with pytest.raises(InvalidConfigError, match=r"_BuildsThis.build (must return|returned)"):
        vistok.patch(model, _BuildsThis(reducers))
    assert_untouched(model)
    assert vistok.get_handle(model) is None


def test_a_users_config_may_build_numpy_block_indices():
    reducers = {index: vistok.methods.random_drop.RandomDropper(0.5, 0) for index in np.arange(2, 4)}
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=4, num_classes=3)
    with vistok.patch(model, _BuildsThis(reducers)) as handle:
        assert sorted(handle.reducers) == [2, 3] and all(type(index) is int for index in handle.reducers)


def test_a_timm_failure_other_than_an_unknown_name_surfaces_as_itself(tmp_path):
    """Only timm's "Unknown model" becomes an InvalidConfigError naming the model unknown; a checkpoint whose shapes
    do not fit raised that too, hiding timm's own error about the state dict."""
    from vistok._timm import create_timm_model

    small = dict(img_size=32, depth=1)
    checkpoint = tmp_path / "five_classes.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=5, **small).state_dict(), checkpoint)
    with pytest.raises(RuntimeError, match="size mismatch for head.weight") as failure:
        create_timm_model("vit_tiny_patch16_224", "test", num_classes=10, checkpoint_path=str(checkpoint), **small)
    assert not isinstance(failure.value, VistokError)
    with pytest.raises(InvalidConfigError, match="test: unknown model 'no_such_vit'"):
        create_timm_model("no_such_vit", "test", num_classes=10)
