"""The shipped reference model on the real Fashion-MNIST test set, and the main job (tools/demo.py)."""

import importlib.util
import re

import pytest
import timm
import torch
from helpers import ROOT

import vistok
from vistok.data import GreyBatchTransform, fashion_mnist_dataset, load_fashion_mnist
from vistok.experiment import batches
from vistok.measure import tokens_per_block
from vistok.measure.accuracy import evaluate

MODEL_CARD_TOP1 = 89.5  # the model card reports 89.54 on the whole test set


@pytest.fixture(scope="module")
def reference():
    return timm.create_model("vistok_vit_fmnist", pretrained=True).eval()


@pytest.mark.slow
def test_reference_model_accuracy_on_the_whole_test_set(reference):
    result = evaluate(reference, batches(fashion_mnist_dataset("test"), 1000), GreyBatchTransform())
    assert result["images"] == 10000
    assert result["top1"] >= MODEL_CARD_TOP1


@pytest.mark.slow
def test_ats_on_the_reference_model_on_real_images(reference):
    """Keep-everything ATS gives the unpatched predictions on real images; ATS at k=48 keeps at most 48 patch
    tokens per image, costs less, and stays far above chance (what it costs in accuracy: results/sweep.csv)."""
    test_set = torch.utils.data.Subset(fashion_mnist_dataset("test"), range(1000))
    images = GreyBatchTransform()(torch.stack([test_set[i][0] for i in range(len(test_set))]))
    patches, depth = reference.patch_embed.num_patches, len(reference.blocks)
    with torch.no_grad():
        expected = reference(images)
        with vistok.patch(reference, "ats", k=patches, min_tokens=patches, blocks=range(depth)):
            everything = reference(images)
    assert (everything - expected).abs().max() <= 1e-4
    assert torch.equal(everything.argmax(1), expected.argmax(1))
    unpatched = vistok.measure.count_flops(reference, images[:64])
    with vistok.patch(reference, "ats", k=48) as handle:
        reduced = evaluate(reference, batches(test_set, 500), GreyBatchTransform())
        cost = vistok.measure.count_flops(reference, images[:64])
        for block in handle.reducers:
            assert int(handle.layouts[block].num_valid().max()) <= 1 + 48
    assert cost < 0.6 * unpatched
    assert reduced["top1"] > 50.0  # chance is 10 %


@pytest.mark.slow
def test_demo_runs_on_the_shipped_model(tmp_path, capsys, monkeypatch):
    """The speeds compare the methods (the timed models were all unpatched) and the tuner calibrates on training
    images (it was given test images, the ones it is then scored on)."""
    spec = importlib.util.spec_from_file_location("demo", ROOT / "tools" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    timed_tokens, calibrations, time_models, tune = {}, [], demo.time_models, vistok.tune

    def timed(models, sample, **kwargs):
        for label, model in models.items():
            timed_tokens[label] = sum(tokens := tokens_per_block(model, sample)) / len(tokens)
        return time_models(models, sample, **kwargs)

    monkeypatch.setattr(demo, "time_models", timed)
    monkeypatch.setattr(vistok, "tune", lambda model, calibration, **kwargs: calibrations.append(calibration) or
                        tune(model, calibration, **kwargs))
    assert demo.main(["--limit", "100", "--calibration", "32", "--flops-images", "16", "--out", str(tmp_path)]) == 0
    full = timed_tokens.pop("unpatched")
    assert timed_tokens and all(tokens < full for tokens in timed_tokens.values())  # each timed as patched
    (calibration,) = calibrations
    assert torch.equal(calibration, GreyBatchTransform()(load_fashion_mnist("train")[0][:32]))
    printed = capsys.readouterr().out
    assert "vistok_vit_fmnist_reg4" in printed and "unpatched" in printed and "ATS+fusion k=108" in printed
    assert "merge r=12" in printed and "tuner at 0.5x GFLOPs (32 training images" in printed
    assert "best swept point within 0.5x GFLOPs" in printed and "--limit: not the same images" in printed
    assert (tmp_path / "tokens.png").stat().st_size > 10_000
    assert (tmp_path / "pareto.png").stat().st_size > 10_000


def test_register_variant_keeps_its_registers_and_the_unpatched_outputs():
    """vistok_vit_fmnist_reg4 (random init): 196 patch tokens + CLS + 4 registers; keep-everything ATS and r=0
    merging give the unpatched outputs; ATS and merging never drop or merge the 5 prefix tokens."""
    torch.manual_seed(0)
    model = timm.create_model("vistok_vit_fmnist_reg4").eval()
    assert model.num_prefix_tokens == 5 and model.patch_embed.num_patches == 196
    images = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    patches, depth = model.patch_embed.num_patches, len(model.blocks)
    with torch.no_grad():
        expected = model(images)
        with vistok.patch(model, "ats", k=patches, min_tokens=patches, blocks=range(depth)):
            assert (model(images) - expected).abs().max() <= 1e-4
        with vistok.patch(model, "merge", r=0):
            assert (model(images) - expected).abs().max() <= 1e-4
        for method, options in (("ats", {"k": 16}), ("merge", {"r": 16})):
            with vistok.patch(model, method, **options) as handle:
                model(images)
                assert handle.layouts
                for layout in handle.layouts.values():
                    assert layout.num_prefix == 5 and layout.num_tokens < 201
                    assert torch.equal(layout.source_index()[:, :5], torch.arange(5).expand(6, -1))
                    assert bool(layout.valid_mask()[:, :5].all())
    timm.create_model("vistok_vit_fmnist_reg4", pretrained=True)  # its shipped weights fit it
    shipped = timm.create_model("vistok_vit_fmnist")  # the one-conv stem still loads the shipped weights
    vistok.models.load_checkpoint(shipped, ROOT / "models" / "vistok_vit_fmnist" / "model.safetensors")


def test_timms_eval_transform_gives_the_reference_models_training_input():
    """timm's standard pipeline (resolve_data_config, create_transform) on a 28 x 28 grey image gives what the model
    was trained on (GreyBatchTransform): no crop_pct in the config meant timm's 0.875, a 32 px resize and a 28 px
    crop (7.6 points of top-1 on 500 test images)."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from vistok.data import load_fashion_mnist

    model = timm.create_model("vistok_vit_fmnist")
    transform = create_transform(**resolve_data_config({}, model=model))
    images = load_fashion_mnist("test")[0][:8]
    timm_input = torch.stack([transform(Image.fromarray(image.numpy())) for image in images])
    assert torch.allclose(timm_input, GreyBatchTransform()(images), atol=1e-5)


def test_pretrained_cfg_overlay_file_is_the_weights_loaded(tmp_path):
    """timm's ``pretrained_cfg_overlay=dict(file=...)`` loads that file (the shipped weights were loaded instead,
    silently); its other keys update the pretrained config."""
    from safetensors.torch import save_file

    mine = timm.create_model("vistok_vit_fmnist")
    with torch.no_grad():
        mine.head.bias.copy_(torch.arange(10.0))
    save_file(mine.state_dict(), str(tmp_path / "mine.safetensors"))
    loaded = timm.create_model("vistok_vit_fmnist", pretrained=True, pretrained_cfg_overlay=dict(
        file=str(tmp_path / "mine.safetensors"), crop_pct=0.9))
    assert torch.equal(loaded.head.bias, torch.arange(10.0)) and loaded.pretrained_cfg["crop_pct"] == 0.9
    two = timm.create_model("vistok_vit_fmnist", num_classes=2)  # fine-tuned on two classes
    save_file(two.state_dict(), str(tmp_path / "two.safetensors"))
    for asked in ({"num_classes": 2}, {}):  # its head as saved; a head asked for as well
        loaded = timm.create_model("vistok_vit_fmnist", pretrained=True, **asked, pretrained_cfg_overlay=dict(
            file=str(tmp_path / "two.safetensors"), num_classes=2))
        assert torch.equal(loaded.head.weight, two.head.weight) and loaded.num_classes == 2


@pytest.mark.parametrize("name", ["vistok_vit_fmnist", "vistok_vit_fmnist_reg4", "vistok_video_vit_fmnist",
                                  "vistok_video_vit_fmnist_merge"])
def test_every_factory_loads_the_file_named_or_refuses(name, tmp_path):
    """A weights file named in ``pretrained_cfg`` or ``pretrained_cfg_overlay`` is what loads, on the video
    factories too (they loaded the shipped weights, silently, as the image factories did for ``pretrained_cfg``);
    a missing file, a tag or a URL is refused rather than replaced by the shipped weights."""
    from safetensors.torch import save_file

    from vistok.models import CheckpointError

    mine = timm.create_model(name)
    with torch.no_grad():
        mine.head.bias.copy_(torch.arange(float(mine.num_classes)))
    save_file(mine.state_dict(), str(tmp_path / "mine.safetensors"))
    shipped = timm.create_model(name, pretrained=True)
    assert not torch.equal(shipped.head.bias, mine.head.bias)
    for key in ("pretrained_cfg", "pretrained_cfg_overlay"):
        loaded = timm.create_model(name, pretrained=True, **{key: dict(file=str(tmp_path / "mine.safetensors"))})
        assert torch.equal(loaded.head.bias, mine.head.bias), key
        with pytest.raises(CheckpointError, match="does not exist"):
            timm.create_model(name, pretrained=True, **{key: dict(file=str(tmp_path / "none.safetensors"))})
    # both: the overlay's file over pretrained_cfg's (timm's order), here a file that does not exist
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg=dict(file=str(tmp_path / "none.safetensors")),
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "mine.safetensors")))
    assert torch.equal(loaded.head.bias, mine.head.bias)
    with pytest.raises(vistok.InvalidConfigError, match="no pretrained tag 'in1k'"):
        timm.create_model(f"{name}.in1k", pretrained=True)
    with pytest.raises(vistok.InvalidConfigError, match="hf_hub_id"):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id="someone/weights"))


def test_a_checkpoint_that_does_not_fit_is_refused_naming_its_tensors(tmp_path):
    """load_checkpoint refuses a state with a tensor missing, one too many or one of another shape, naming each,
    and loads nothing; a missing tensor reached torch's strict load and failed there, with a RuntimeError."""
    from safetensors.torch import save_file

    from vistok.models import CheckpointError, load_checkpoint

    model = timm.create_model("vistok_vit_fmnist", depth=1)
    state = {name: value.clone() for name, value in model.state_dict().items()}
    bias = state.pop("head.bias")
    wrong = {"missing": (state, r"missing \['head.bias'\]"),
             "unexpected": ({**state, "head.bias": bias, "head.scale": bias.clone()}, r"unexpected \['head.scale'\]"),
             "mis_shaped": ({**state, "head.bias": bias[:3].clone()}, r"shape mismatch \['head.bias: checkpoint \(3,")}
    before = {name: value.clone() for name, value in model.state_dict().items()}
    for kind, (saved, named) in wrong.items():
        save_file(saved, str(tmp_path / f"{kind}.safetensors"))
        with pytest.raises(CheckpointError, match=f"does not fit VisionTransformer: {named}"):
            load_checkpoint(model, tmp_path / f"{kind}.safetensors")
        assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items()), kind


def test_an_overlays_class_count_is_the_models(tmp_path):
    """``pretrained_cfg_overlay`` ``num_classes`` without a file: the model has that head, as in timm (its
    pretrained config said N classes on a 10-class head); the shipped 10-class weights do not fit it."""
    from vistok.models import CheckpointError

    for name in ("vistok_vit_fmnist", "vistok_video_vit_fmnist"):
        model = timm.create_model(name, pretrained_cfg_overlay=dict(num_classes=5))
        assert model.num_classes == model.head.out_features == model.pretrained_cfg["num_classes"] == 5
        asked = timm.create_model(name, num_classes=3, pretrained_cfg_overlay=dict(num_classes=5))
        assert asked.num_classes == asked.pretrained_cfg["num_classes"] == 3  # the head asked for wins
        with pytest.raises(CheckpointError, match="head.weight"):
            timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(num_classes=5))


def test_missing_weights_name_the_command_that_trains_them(monkeypatch, tmp_path):
    """Each shipped model's missing-weights error names the command its model card trains it with (every model
    without "vlm" in its name was told configs/fmnist_vit.yaml, the image ViT's); a name vistok ships no weights
    for is told which it does."""
    from vistok.models import CheckpointError, reference, reference_checkpoint

    monkeypatch.setenv("VISTOK_MODELS", str(tmp_path))
    monkeypatch.setattr(reference, "REPOSITORY_MODELS", tmp_path)
    cards = sorted((ROOT / "models").glob("*/README.md"))
    assert len(cards) >= 10
    for card in cards:
        with pytest.raises(CheckpointError) as missing:
            reference_checkpoint(card.parent.name)
        command = re.search(r"train them with (.+?)(?: \.\.\. \(|\.$)", str(missing.value)).group(1)
        text = " ".join(card.read_text().replace("\\\n", " ").split())  # continued lines joined
        assert f"{command} " in text, (card.parent.name, command)
    with pytest.raises(CheckpointError, match=r"no weights of vistok_vit_fmnist_tiny at .*vistok ships weights for "
                       r"\[.*'vistok_video_vit_fmnist'"):
        reference_checkpoint("vistok_vit_fmnist_tiny")


def test_pretrained_takes_timms_head_options(reference):
    """As timm's factories: num_classes=0 gives the pretrained features (no head), num_classes=N a fresh N-way
    head on the same trunk, global_pool another pooling of the same tokens; an attention pool is refused."""
    images = GreyBatchTransform()(fashion_mnist_dataset("test").tensors[0][:3])
    with torch.no_grad():
        tokens = reference.forward_features(images)
        features = timm.create_model("vistok_vit_fmnist", pretrained=True, num_classes=0).eval()
        assert torch.allclose(features(images), reference.forward_head(tokens, pre_logits=True))
        fresh = timm.create_model("vistok_vit_fmnist", pretrained=True, num_classes=3).eval()
        assert fresh.head.out_features == 3 and torch.allclose(fresh.forward_features(images), tokens)
        averaged = timm.create_model("vistok_vit_fmnist", pretrained=True, global_pool="avg").eval()
        assert torch.allclose(averaged(images), reference.head(tokens[:, 1:].mean(dim=1)), atol=1e-5)
    with pytest.raises(vistok.InvalidConfigError, match="attention pool"):
        timm.create_model("vistok_vit_fmnist", pretrained=True, global_pool="map")
    with pytest.raises(vistok.InvalidConfigError, match="features_only is not supported"):
        timm.create_model("vistok_vit_fmnist", features_only=True)  # was a TypeError from VisionTransformer
    clips = torch.randn(2, 1, 4, 28, 28)
    video = timm.create_model("vistok_video_vit_fmnist", pretrained=True).eval()  # the video model alike
    with torch.no_grad():
        tokens = video.forward_features(clips)
        fresh = timm.create_model("vistok_video_vit_fmnist", pretrained=True, num_classes=5).eval()
        assert fresh.head.out_features == 5 and torch.allclose(fresh.forward_features(clips), tokens)
        averaged = timm.create_model("vistok_video_vit_fmnist", pretrained=True, global_pool="avg").eval()
        assert torch.allclose(averaged(clips), video.head(tokens[:, video.num_prefix_tokens:].mean(dim=1)),
                              atol=1e-5)
