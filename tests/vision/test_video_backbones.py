"""Hugging Face video transformers (VideoMAE, ViViT) under every method, on all space-time tokens: parity when
nothing is dropped, padded batches, VideoMAE's mean pooling, copies, and refusals."""

import copy
import pickle

import pytest
import torch
from transformers import (
    TimesformerConfig,
    TimesformerForVideoClassification,
    VideoMAEConfig,
    VideoMAEForVideoClassification,
    VideoMAEModel,
    VivitConfig,
    VivitForVideoClassification,
)

import vistok
from vistok import InputShapeError, PatchStateError, UnsupportedModelError
from vistok.methods import MethodConfig, TokenReducer

TOL = 1e-4
FRAMES, SIZE = 4, 32  # tubelets of 2 x 8 x 8: a (2, 4, 4) grid of 32 space-time tokens
SHARED = dict(image_size=SIZE, num_frames=FRAMES, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
              intermediate_size=128)


def videomae(**overrides):
    torch.manual_seed(0)
    config = VideoMAEConfig(**SHARED, patch_size=8, tubelet_size=2, num_labels=5, **overrides)
    return VideoMAEForVideoClassification(config).eval()


def videomae_bare():
    torch.manual_seed(0)
    return VideoMAEModel(VideoMAEConfig(**SHARED, patch_size=8, tubelet_size=2)).eval()


def vivit(**overrides):
    torch.manual_seed(0)
    config = VivitConfig(**SHARED, tubelet_size=[2, 8, 8], num_labels=5, **overrides)
    return VivitForVideoClassification(config).eval()


MODELS = {"videomae": videomae, "videomae bare": videomae_bare, "vivit": vivit}


def clips(batch=3, seed=1):
    return torch.randn(batch, FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def encode(model, x):
    with torch.no_grad():
        out = model(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


class _KeepAboveMeanNorm(TokenReducer):
    """Keeps the patch tokens whose value norm is above their clip's mean: uneven counts, so batches pad, and a
    choice that depends on the clip alone, so a clip keeps the same tokens in any batch."""

    def select(self, view):
        prefix = view.layout.num_prefix
        norms = view.v.transpose(1, 2).flatten(2).norm(dim=-1)[:, prefix:]
        valid = view.layout.valid_mask(norms.device)
        mean = (norms * valid[:, prefix:]).sum(1, keepdim=True) / valid[:, prefix:].sum(1, keepdim=True)
        keep = valid.clone()
        keep[:, prefix:] &= norms > mean
        return keep


class _UnevenConfig(MethodConfig):
    name = "test-uneven"

    def __init__(self, blocks):
        self.blocks = blocks

    def build(self, info):
        return {block: _KeepAboveMeanNorm() for block in self.blocks}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("method, options", [("ats", {"k": 32, "min_tokens": 32, "blocks": [0, 1, 2, 3]}),
                                             ("merge", {"r": 0}), ("random_drop", {"k": 32, "blocks": [1, 2]})])
def test_keep_everything_parity(name, method, options):
    model = MODELS[name]()
    x = clips()
    expected = encode(model, x)
    with vistok.patch(model, method, **options) as handle:
        got = encode(model, x)
        assert handle.info.grid_size == (2, 4, 4) and max(handle.layouts) == 3
    assert (got - expected).abs().max() <= TOL
    assert torch.equal(encode(model, x), expected)  # removed


def test_a_landscape_videomae_keeps_height_and_width_apart():
    """A VideoMAE of (height, width) = (32, 48) has a 2 x 4 x 6 grid, and patched at keep-everything it runs as the
    unpatched model on its own clips (with height and width swapped, it refused them as 48 x 32)."""
    torch.manual_seed(0)
    model = VideoMAEModel(VideoMAEConfig(**{**SHARED, "image_size": (32, 48)}, patch_size=8, tubelet_size=2)).eval()
    x = torch.randn(2, FRAMES, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    expected = encode(model, x)
    with vistok.patch(model, "merge", r=0) as handle:
        got = encode(model, x)
        assert handle.info.grid_size == (2, 4, 6)
    assert (got - expected).abs().max() <= TOL


@pytest.mark.parametrize("name", ["videomae", "vivit"])
def test_training_with_dropout_matches_the_unpatched_model(name):
    """In training with hidden dropout, the patched model at keep-everything draws the same dropout as the
    unpatched one under the same seed, so their logits agree (a block that skipped the dropout after its attention
    branch did not)."""
    model = MODELS[name](hidden_dropout_prob=0.3).train()
    x = clips()
    torch.manual_seed(1)
    expected = model(pixel_values=x).logits
    torch.manual_seed(2)
    assert not torch.allclose(model(pixel_values=x).logits, expected)  # the dropout is drawn
    with vistok.patch(model, "merge", r=0):
        torch.manual_seed(1)
        got = model(pixel_values=x).logits
    assert (got - expected).abs().max() <= TOL


@pytest.mark.parametrize("name", ["videomae", "vivit"])
@pytest.mark.parametrize("method", ["ats", "merge", "random_drop", "compose"])
def test_methods_reduce_space_time_tokens(name, method):
    model = MODELS[name]()
    x = clips()
    spec = {"ats": ("ats", {"k": 12}), "merge": ("merge", {"r": 5}), "random_drop": ("random_drop", {"k": 0.5}),
            "compose": ([("ats", {"k": 20, "blocks": [1]}), ("merge", {"r": 3, "blocks": [2, 3]})], {})}[method]
    with vistok.patch(model, spec[0], **spec[1]) as handle:
        out = encode(model, x)
        counts = handle.tokens_per_block()
        last = handle.layouts[3]
    prefix = 0 if name == "videomae" else 1
    assert out.shape == (3, 5) and bool(torch.isfinite(out).all())
    assert counts[-1] < 0.7 * (32 + prefix)
    positions = last.grid_positions()[last.valid_mask()]
    real = positions[:, 0] >= 0
    assert bool((positions[real] < torch.tensor([2, 4, 4])).all()) and int(real.sum()) > 0


@pytest.mark.parametrize("name", ["videomae", "vivit"])
def test_padded_batch_equals_clips_one_by_one(name):
    model = MODELS[name]()
    x = clips()
    config = [_UnevenConfig([1]), vistok.MergeConfig(r=2, blocks=[2, 3])]
    with vistok.patch(model, config) as handle:
        batched = encode(model, x)
        assert len(set(handle.layouts[3].num_valid().tolist())) > 1, "the test needs uneven counts"
        singles = torch.cat([encode(model, x[i:i + 1]) for i in range(3)])
    assert (batched - singles).abs().max() <= TOL


def test_flops_of_test_views_count_each_view_on_its_own():
    """A clip's test views run as one padded batch: its FLOPs are the sum of its views', each counted alone."""
    from vistok.measure import count_flops
    from vistok.video import VideoClassifier

    classifier = VideoClassifier(videomae())
    views = clips(batch=3).transpose(1, 2)[None]  # one clip's 3 views [1, V, C, T, H, W]
    with vistok.patch(classifier.model, _UnevenConfig([1])) as handle:
        with torch.no_grad():
            classifier(views)
        assert len(set(handle.layouts[1].num_valid().tolist())) > 1, "the test needs uneven counts"
        whole = count_flops(classifier, views)
        one_by_one = sum(count_flops(classifier, views[:, view]) for view in range(3))
    assert whole == one_by_one


def test_test_views_average_probabilities_without_underflow():
    """Views give log(mean_v softmax(logits_v)), each clip its own views' (a wrong split of the batch mixed clips; raw
    logits averaged are not probabilities): in float16 a class whose probability underflows in every view was
    -inf (its log-likelihood infinite); it is now the finite value, as in float32."""
    from vistok.video import VideoClassifier

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0, -20.0, -22.0], [0.0, -20.0, -22.0]], dtype=x.dtype)

    views = torch.zeros(1, 2, 3, 4, 8, 8)
    expected = torch.tensor([[0.0, -20.0, -22.0]]).log_softmax(-1)
    for dtype in (torch.float32, torch.float16):
        averaged = VideoClassifier(Fixed(), layout="CTHW")(views.to(dtype))
        assert averaged.dtype == dtype and torch.allclose(averaged.float(), expected, atol=1e-2)

    class Brightness(torch.nn.Module):  # each view its own logits, unnormalised (all shifted by 5)
        def forward(self, x):
            mean = x.mean(dim=(1, 2, 3, 4))
            return torch.stack([mean, -mean, 2 * mean], dim=-1) + 5.0

    # clip b's view v is the constant 3b + v: each clip's views differ, and so do the clips
    views = torch.arange(6.0).reshape(2, 3, 1, 1, 1, 1).expand(2, 3, 1, 2, 4, 4)
    averaged = VideoClassifier(Brightness(), layout="CTHW")(views)
    expected = torch.stack([Brightness()(clip).softmax(-1).mean(dim=0).log() for clip in views])  # clip by clip
    assert torch.allclose(averaged, expected, atol=1e-5)


def test_videomae_head_averages_real_tokens_by_size():
    """The head's mean is over the real tokens, each counted as often as the patches it stands for: the same as
    the bare model's padded output averaged with the layout's weights."""
    model = videomae()
    x = clips()
    config = [_UnevenConfig([1]), vistok.MergeConfig(r=2, blocks=[2, 3])]
    with vistok.patch(model, config) as handle:
        logits = encode(model, x)
        tokens = model.videomae(pixel_values=x).last_hidden_state
        weights = handle.layouts[3].token_weights(tokens.dtype, "cpu")[..., None]
    pooled = (tokens * weights).sum(1) / weights.sum(1)
    with torch.no_grad():
        expected = model.classifier(model.fc_norm(pooled))
    assert (logits - expected).abs().max() <= TOL
    with torch.no_grad():
        plain = model.classifier(model.fc_norm(tokens.mean(1)))
    assert (logits - plain).abs().max() > 1e-3  # a plain mean over padding and merged tokens would differ


def test_videomae_head_keeps_a_nan_in_its_own_clip():
    """The head's pre-hook told the pass's mean by value with ``torch.equal``: one NaN pixel in one clip made the
    whole batch fail it, and every other clip's logits came from the plain mean over padding and merged tokens."""
    model, x = videomae(), clips()
    bad = x.clone()
    bad[1, 0, 0, 3, 3] = float("nan")
    config = [_UnevenConfig([1]), vistok.MergeConfig(r=2, blocks=[2, 3])]
    with vistok.patch(model, config):
        clean, poisoned = encode(model, x), encode(model, bad)
    assert torch.equal(poisoned[[0, 2]], clean[[0, 2]]) and bool(poisoned[1].isnan().all())
    from vistok.backbones.hf_video import _same_values  # features of another dtype are not the pass's (no raise)

    assert not _same_values(clean, clean.double()) and _same_values(poisoned, poisoned.clone())


def test_copies_and_pickles_stay_patched():
    model = videomae()
    x = clips()
    handle = vistok.patch(model, "merge", r=4)
    patched = encode(model, x)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        twin_handle = vistok.get_handle(twin)
        assert twin_handle is not handle and twin_handle.active
        assert torch.equal(encode(twin, x), patched)
        twin_handle.remove()
    assert handle.active and torch.equal(encode(model, x), patched)


def test_refusals_and_bad_input():
    timesformer = TimesformerForVideoClassification(TimesformerConfig(**SHARED, patch_size=8, num_labels=5))
    with pytest.raises(UnsupportedModelError, match="divided space-time attention"):
        vistok.patch(timesformer, "ats")
    with pytest.raises(UnsupportedModelError, match="use_mean_pooling=False"):
        vistok.patch(videomae(use_mean_pooling=False), "merge")
    model = vivit()
    with vistok.patch(model, "ats", k=10):
        for bad in (torch.randn(2, 3, SIZE, SIZE), torch.randn(2, FRAMES + 2, 3, SIZE, SIZE),
                    torch.randn(2, FRAMES, 3, SIZE, SIZE + 8)):
            with pytest.raises(InputShapeError, match=r"\[B, 4, 3, 32, 32\]"):
                model(pixel_values=bad)
        with pytest.raises(PatchStateError, match="output_attentions"):
            model(pixel_values=clips(), output_attentions=True)


def test_videomae_head_normalises_other_features_as_the_unpatched_module_does():
    """The fc_norm pre-hook replaced whatever it was given by the last pass's weighted mean: a caller's own
    features came back as another batch's (or, once the pass's output was gone, a PatchStateError)."""
    model, x = videomae(), clips()
    features = torch.randn(1, SHARED["hidden_size"], generator=torch.Generator().manual_seed(2))
    expected = model.fc_norm(features)
    with vistok.patch(model, "merge", r=3, blocks=[1, 2]), torch.no_grad():
        patched = model(pixel_values=x, output_hidden_states=True)  # the pass's tokens stay alive
        torch.testing.assert_close(model.fc_norm(features), expected)
        same_shape = torch.randn(clips().shape[0], SHARED["hidden_size"])
        torch.testing.assert_close(model.fc_norm(same_shape), type(model.fc_norm).forward(model.fc_norm, same_shape))
        again = model(pixel_values=x)
    torch.testing.assert_close(again.logits, patched.logits)



@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_run_on_meta_gives_the_unpatched_shapes(name):
    """VideoMAE's mean-pooling hook compared values with ``torch.equal``, which has no meta kernel: a patched model
    run on ``meta`` for its shapes raised NotImplementedError where the unpatched one runs."""
    model = MODELS[name]()
    with vistok.patch(model, "merge", r=2):
        expected = encode(model, clips())
        patched = encode(model.to("meta"), clips().to("meta"))
    assert patched.is_meta and patched.shape == expected.shape


def test_vivit_with_interpolated_positions_takes_other_frame_sizes_off_the_native_grid():
    """interpolate_pos_encoding=True lets ViViT take 16 x 64 px frames (1 x 2 x 8 tubelets; Hugging Face
    interpolates a table of one tubelet slice only, and only for frames that are not square): the patched model
    accepts them (a check that refused every other size did not), gives the unpatched output at keep-everything,
    and its layouts claim no grid: the native 1 x 4 x 4 has as many tokens, and would misplace them."""
    torch.manual_seed(0)
    model = VivitForVideoClassification(VivitConfig(**{**SHARED, "num_frames": 2}, tubelet_size=[2, 8, 8],
                                                    num_labels=5)).eval()
    x = torch.randn(2, 2, 3, 16, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(pixel_values=x, interpolate_pos_encoding=True).logits
        with vistok.patch(model, "merge", r=0) as handle:
            got = model(pixel_values=x, interpolate_pos_encoding=True).logits
            assert handle.layouts and all(layout.grid_size is None for layout in handle.layouts.values())
    assert (got - expected).abs().max() <= TOL


@pytest.mark.parametrize("name", ["videomae", "vivit"])
def test_a_clip_with_another_channel_count_is_refused_naming_the_layout(name):
    """One channel where the model takes three: refused with the expected [B, T, C, H, W] shape, not left to a raw
    error inside the embedding."""
    model = MODELS[name]()
    with vistok.patch(model, "merge", r=2), pytest.raises(InputShapeError, match=r"\[B, 4, 3, 32, 32\]"):
        model(pixel_values=torch.randn(2, FRAMES, 1, SIZE, SIZE))


@pytest.mark.parametrize("name", ["videomae", "vivit"])
def test_attention_dropout_acts_only_in_training(name):
    """A model configured with attention dropout: in eval the patched model at keep-everything gives the unpatched
    output (no dropout drawn at inference); in training the patched model draws it (two seeds, two outputs)."""
    model = MODELS[name](attention_probs_dropout_prob=0.5)
    x = clips()
    expected = encode(model, x)
    with vistok.patch(model, "merge", r=0):
        assert (encode(model, x) - expected).abs().max() <= TOL
        model.train()
        with torch.no_grad():
            torch.manual_seed(1)
            first = model(pixel_values=x).logits
            torch.manual_seed(2)
            assert (model(pixel_values=x).logits - first).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(MODELS))
def test_removing_the_patch_leaves_no_hooks(name):
    """Removing the patch takes off every hook it installed, VideoMAE's mean-pooling pre-hook on fc_norm included
    (left there, it held the removed patch's tracker)."""
    model = MODELS[name]()
    with vistok.patch(model, "merge", r=2):
        encode(model, clips())
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks and "forward" not in vars(module)


@pytest.mark.parametrize("part", ["layernorm_before", "layernorm_after"])
def test_a_layer_whose_norm_is_not_a_layernorm_is_refused(part):
    """A block norm of another kind is refused, naming the layer and the part, and the model is left unpatched."""
    model = videomae()
    setattr(model.videomae.encoder.layer[2], part, torch.nn.Identity())
    with pytest.raises(UnsupportedModelError, match=f"VideoMAEModel layer 2.{part} is Identity, not LayerNorm"):
        vistok.patch(model, "merge", r=2)
    assert vistok.get_handle(model) is None
