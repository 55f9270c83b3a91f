"""tools/ (train, eval, sweep), configs, the Fashion-MNIST data, checkpoints and token overlays."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import ROOT, interrupted_at, load_tool

import vistok
from vistok import data as vdata
from vistok.config import ConfigError, _load_yaml, load_config, parse_overrides
from vistok.experiment import set_fused_attention
from vistok.models import CheckpointError, load_checkpoint
from vistok.viz import patch_groups, save_overlay_grid

SMALL = ["model_kwargs.depth=3", "data.limit=256", "train.batch_size=64", "train.eval_batch_size=128"]


def test_config_checks_keys_and_types(tmp_path):
    defaults = {"model": "m", "train": {"epochs": 3, "lr": 0.1}, "method_options": {}}
    config = load_config(defaults, None, parse_overrides(["train.lr=2", "method_options.k=5"]))
    assert config["train"] == {"epochs": 3, "lr": 2} and config["method_options"] == {"k": 5}
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'.*Did you mean 'train.epochs'"):
        load_config(defaults, None, {"train.epoch": 4})
    with pytest.raises(ConfigError, match="unknown config key 'method_optionsk'"):  # free-form below the dot only
        load_config(defaults, None, {"method_optionsk": 5})
    with pytest.raises(ConfigError, match="train.epochs should be int"):
        load_config(defaults, None, {"train.epochs": "many"})
    for key, value in (("train.epochs", True), ("train.lr", False)):  # a bool is an int to Python, not here
        with pytest.raises(ConfigError, match=f"{key} should be"):
            load_config(defaults, None, {key: value})
    assert load_config({"flag": False}, None, {"flag": True})["flag"] is True
    for override in ("train.epochs=", "train.epochs=null", "train.lr=~"):  # no value where the default has one
        with pytest.raises(ConfigError, match="should be (int|float)"):
            load_config(defaults, None, parse_overrides([override]))
    with pytest.raises(ConfigError, match="model should be str"):  # output= would have meant this folder
        load_config(defaults, None, parse_overrides(["model="]))
    assert load_config(defaults, None, parse_overrides(["model=''"]))["model"] == ""  # an empty string, said so
    assert load_config({"root": None}, None, parse_overrides(["root=null"]))["root"] is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(defaults, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(defaults, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])
    # a key given twice, or with a key inside it: the last one silently won, and which one depended on the order
    for items in (["train.epochs=1", "train.epochs=5"], ["method_options={k: 5}", "method_options.r=3"],
                  ["method_options.r=3", "method_options={k: 5}"]):
        with pytest.raises(ConfigError, match="is set twice"):
            parse_overrides(items)
    assert parse_overrides(["train.epochs=1", "train.epochs_x=2"]) == {"train.epochs": 1, "train.epochs_x": 2}
    empty = tmp_path / "empty.yaml"  # a section with its settings commented out; options left empty
    empty.write_text("train:\n  # epochs: 5\nmethod_options:\n")
    assert load_config(defaults, empty) == defaults
    empty.write_text("train: {}\n")
    assert load_config(defaults, empty) == defaults
    listed = {"mean": [0.5, 0.5], "k": [108]}
    for override, message in (("mean=[a,b]", "mean should be a list of numbers"), ("k=[true]", "k should be a list"),
                              ("mean=[0.5,b]", "mean should be a list of numbers")):  # every item, not the first
        with pytest.raises(ConfigError, match=message):
            load_config(listed, None, parse_overrides([override]))
    assert load_config(listed, None, parse_overrides(["k=[0.5,64]"]))["k"] == [0.5, 64]  # a fraction or a count


def test_only_true_and_false_are_booleans(tmp_path):
    """accelerate's mixed_precision=no (the documented default) must stay the string 'no', in files too."""
    assert parse_overrides(["a=no", "b=off", "c=yes", "d=true", "e=False", "f=3"]) == {
        "a": "no", "b": "off", "c": "yes", "d": True, "e": False, "f": 3}
    defaults = {"train": {"mixed_precision": "no", "fused_attn": True}}
    assert load_config(defaults, None, parse_overrides(["train.mixed_precision=no"]))["train"]["mixed_precision"] \
        == "no"
    file = tmp_path / "c.yaml"
    file.write_text("train:\n  mixed_precision: no\n  fused_attn: false\n")
    assert load_config(defaults, file)["train"] == {"mixed_precision": "no", "fused_attn": False}
    with pytest.raises(ConfigError, match="train.fused_attn should be bool"):
        load_config(defaults, None, parse_overrides(["train.fused_attn=no"]))


def test_exponents_are_floats(tmp_path):
    """YAML 1.2 floats: 1e-3 (no dot) and 2.5e4 (no sign) are numbers, as in Python, not strings."""
    assert parse_overrides(["a=1e-3", "b=2.5e4", "c=-3E2", "d=3", "e=1e"]) == {
        "a": 0.001, "b": 25000.0, "c": -300.0, "d": 3, "e": "1e"}
    file = tmp_path / "c.yaml"
    file.write_text("train:\n  lr: 1e-3\n")
    assert load_config({"train": {"lr": 0.1}}, file)["train"]["lr"] == 0.001


def test_config_files_refuse_twice_written_keys_and_read_yaml_1_2_ints(tmp_path):
    """A second `data:` section silently replaced the first (its settings were lost unseen); `010` was octal 8 and
    `1:30` base-60 90 (YAML 1.1)."""
    defaults = {"data": {"limit": 0, "augment": True}, "method_options": {}}
    file = tmp_path / "c.yaml"
    file.write_text("data:\n  limit: 100\nmethod_options:\n  k: 48\ndata:\n  augment: false\n")
    with pytest.raises(ConfigError, match="'data' is written twice"):
        load_config(defaults, file)
    file.write_text("data: {limit: 1, limit: 2}\n")
    with pytest.raises(ConfigError, match="'limit' is written twice"):
        load_config(defaults, file)
    file.write_text("base: &base {limit: 3}\ndata:\n  <<: *base\n  augment: false\n")  # a merge key is not twice
    assert load_config({**defaults, "base": {"limit": 0}}, file)["data"] == {"limit": 3, "augment": False}
    assert parse_overrides(["a=010", "b=1:30", "c=0x10", "d=0o17", "e=1_000", "f=-7", "g=.5"]) == {
        "a": 10, "b": "1:30", "c": 16, "d": 15, "e": 1000, "f": -7, "g": 0.5}
    file.write_text("data:\n  limit: 010\n")
    assert load_config(defaults, file)["data"]["limit"] == 10
    nested = "defs:\n  c: &c {k: 1, j: 1}\n  b: &b {<<: *c, k: 2}\nx: {<<: *b}\n"  # merge keys over merged ones
    assert _load_yaml(nested)["defs"]["b"] == {"k": 2, "j": 1}  # no "written twice" for an override
    assert parse_overrides(["a=0o_", "b=._", "c=0x_", "d=1._"]) == {"a": "0o_", "b": "._", "c": "0x_", "d": 1.0}
    with pytest.raises(ConfigError, match="override 'x=\\[1,': the value is not valid YAML"):
        parse_overrides(["x=[1,"])


def test_keys_that_default_to_unset_are_type_checked(tmp_path, capsys):
    """checkpoint=true (next to pretrained=true) or data.root=5 ended in a TypeError traceback."""
    from vistok.experiment import DATA_DEFAULTS, MODEL_DEFAULTS, UNSET_KINDS

    defaults = {**MODEL_DEFAULTS, "data": DATA_DEFAULTS}
    for override, message in (("checkpoint=true", "checkpoint should be str"), ("checkpoint=5", "should be str"),
                              ("data.root=5", "data.root should be str"), ("method=5", "method should be str or list"),
                              ("data.input_size=true", "data.input_size should be int or list")):
        with pytest.raises(ConfigError, match=message):
            load_config(defaults, None, parse_overrides([override]), UNSET_KINDS)
    config = load_config(defaults, None, parse_overrides(["checkpoint=null", "data.input_size=[24,24]",
                                                         "data.mean=0.5", "method=[ats, merge]"]), UNSET_KINDS)
    assert config["checkpoint"] is None and config["data"]["input_size"] == [24, 24]
    assert config["method"] == ["ats", "merge"]  # vistok.patch takes a list of methods
    assert load_tool("eval").main(["checkpoint=true", "--json", str(tmp_path / "e.json")]) == 2
    assert "checkpoint should be str" in capsys.readouterr().err


def test_a_named_fashion_mnist_root_is_the_only_place_read(tmp_path, monkeypatch):
    """A misspelt data.root, or one holding other files, was passed over for the system copy without a word;
    a root with only the test split serves the test split."""
    monkeypatch.delenv("VISTOK_DATA", raising=False)
    with pytest.raises(vdata.DatasetNotFoundError, match="typo"):
        vdata.find_fashion_mnist(tmp_path / "typo")
    system = vdata.find_fashion_mnist()
    test_only = tmp_path / "test_only"
    test_only.mkdir()
    for name in vdata._FILES["test"]:
        source = system / name if (system / name).exists() else system / f"{name}.gz"
        (test_only / source.name).symlink_to(source)
    images, labels = vdata.load_fashion_mnist("test", test_only)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    with pytest.raises(vdata.DatasetNotFoundError):
        vdata.load_fashion_mnist("train", test_only)
    with pytest.raises(vdata.DatasetNotFoundError):
        vdata.find_fashion_mnist(test_only)  # both splits asked for
    broken = tmp_path / "broken_test_only"  # unnamed, a copy with one split is passed over: both come from one copy
    broken.mkdir()
    for name in vdata._FILES["test"]:
        (broken / name).write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05")  # 5 labels promised, none there
    monkeypatch.setenv("VISTOK_DATA", str(broken))
    assert vdata.load_fashion_mnist("test")[0].shape == (10000, 28, 28)
    assert load_tool("eval").main([f"data.root={tmp_path / 'typo'}", "--json", str(tmp_path / "e.json")]) == 2


def test_a_validation_folder_without_some_class_keeps_the_training_ids(tmp_path):
    """val/ was numbered on its own: without one training class, every later class took its neighbour's id, and
    eval, the sweep and training's validation scored against shifted labels."""
    from PIL import Image

    root = tmp_path / "images"
    _class_folders(root, {"bag": 8, "coat": 4, "sneaker": 7}, per_class=2)
    for image in (root / "val" / "coat").iterdir():
        image.unlink()
    (root / "val" / "coat").rmdir()
    settings = {"input_size": 28, "train": False, "mean": (0.5,), "std": (0.5,), "channels": 1}
    train = vdata.image_folder_dataset(root, "train", **settings)
    val = vdata.image_folder_dataset(root, "val", **settings)
    assert val.classes == train.classes == ["bag", "coat", "sneaker"]
    assert sorted(set(val.targets)) == [0, 2] and len(val) == 4
    assert all(val.classes[target] == Path(path).parent.name for path, target in val.samples)
    (root / "val" / "dress").mkdir()
    Image.new("RGB", (28, 28)).save(root / "val" / "dress" / "0.png")
    with pytest.raises(vdata.DatasetNotFoundError, match=r"class folders \['dress'\] that .*train lacks"):
        vdata.image_folder_dataset(root, "val", **settings)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_folder_images_are_read_as_displayed(tmp_path, orientation):
    """A photo stored turned with an EXIF orientation (a phone's portrait shot) was fed to the model sideways; a
    reader that took a transposed one (orientation 5) for unturned refused it as misread."""
    from PIL import Image, ImageOps

    shown = np.zeros((24, 40, 3), dtype=np.uint8)
    shown[:12, :20] = 255  # as displayed: 40 wide, 24 high, its top-left quarter white
    upright = Image.fromarray(shown)
    turn = Image.Transpose
    storing = {2: turn.FLIP_LEFT_RIGHT, 3: turn.ROTATE_180, 4: turn.FLIP_TOP_BOTTOM, 5: turn.TRANSPOSE,
               6: turn.ROTATE_90, 7: turn.TRANSVERSE, 8: turn.ROTATE_270}  # the inverse of what each one displays by
    stored = upright.transpose(storing[orientation]) if orientation > 1 else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    read = np.asarray(vdata.read_image(tmp_path / "photo.jpg", "RGB"), dtype=np.float64)
    assert read.shape == (24, 40, 3)
    assert read[:10, :16].mean() > 240 and read[:, 24:].mean() < 15 and read[14:].mean() < 15
    with Image.open(tmp_path / "photo.jpg") as opened:  # Pillow's own reading of the orientation
        assert np.array_equal(read, np.asarray(ImageOps.exif_transpose(opened).convert("RGB")))


def test_folder_data_refuses_a_channel_count_images_do_not_have(tmp_path):
    """A 4-channel model got RGB images and failed in the first batch with a raw RuntimeError."""
    with pytest.raises(vistok.InvalidConfigError, match="read as grey .* or RGB .*, not 4 channels"):
        vdata.image_folder_dataset(tmp_path, "train", 28, False, (0.5,) * 4, (0.5,) * 4, channels=4)


def test_images_are_read_at_their_bit_depth_and_hidden_folders_are_no_classes(tmp_path):
    """A 16-bit grey image is scaled to 8 bits (Pillow's convert clipped it: nearly all white); a file that is no
    image is named (a PIL traceback mid-epoch); a hidden folder (.ipynb_checkpoints) is no class: it shifted
    every class id after it."""
    from PIL import Image

    ramp = np.linspace(0, 65535, 56 * 56).round().astype(np.uint16).reshape(56, 56)
    Image.fromarray(ramp).save(tmp_path / "wide.png")
    Image.fromarray((ramp >> 8).astype(np.uint8)).save(tmp_path / "narrow.png")
    for mode in ("L", "RGB"):
        wide = np.asarray(vdata.read_image(tmp_path / "wide.png", mode), dtype=np.int64)
        narrow = np.asarray(vdata.read_image(tmp_path / "narrow.png", mode), dtype=np.int64)
        assert wide.shape == narrow.shape and np.abs(wide - narrow).max() <= 1
        assert np.array_equal(wide if mode == "L" else wide[..., 1], np.rint(ramp / 65535 * 255))  # the nearest level
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(vistok.InputShapeError, match="cannot read the image .*broken.png"):
        vdata.read_image(tmp_path / "broken.png", "L")
    root = tmp_path / "images"
    _class_folders(root, {"bag": 8, "coat": 4}, per_class=2)
    for split in ("train", "val"):
        for hidden in (root / split / ".ipynb_checkpoints", root / split / "bag" / ".ipynb_checkpoints"):
            hidden.mkdir()
            Image.new("L", (28, 28)).save(hidden / "0.png")
    settings = {"input_size": 28, "train": False, "mean": (0.5,), "std": (0.5,), "channels": 1}
    for split in ("train", "val"):
        dataset = vdata.image_folder_dataset(root, split, **settings)
        assert dataset.classes == ["bag", "coat"] and len(dataset) == 4
        assert all(dataset.classes[target] == Path(path).parent.name for path, target in dataset.samples)
    import pickle  # a spawned data-loader worker gets the dataset pickled (a class made inside a function failed)

    copied = pickle.loads(pickle.dumps(vdata.image_folder_dataset(root, "train", **settings)))
    assert copied.classes == ["bag", "coat"] and len(copied) == 4
    from vistok.video.datasets import class_folders, folder_classes

    assert folder_classes(root / "train") == ["bag", "coat"]  # video folders alike
    for name in ("bag/a.mp4", "bag/.ipynb_checkpoints/a-checkpoint.mp4", ".ipynb_checkpoints/b.mp4"):
        (root / "clips" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "clips" / name).write_bytes(b"")
    videos = class_folders(root / "clips")
    assert [Path(sample.path).name for sample in videos.samples] == ["a.mp4"] and videos.classes == ["bag"]
    (root / "val" / "bag" / "9.png").write_bytes(b"truncated")
    dataset = vdata.image_folder_dataset(root, "val", **settings)
    broken = next(i for i, (path, _) in enumerate(dataset.samples) if path.endswith("9.png"))
    with pytest.raises(vistok.InputShapeError, match="9.png"):
        dataset[broken]


def test_model_and_image_settings_that_would_change_nothing_or_everything_are_refused():
    """A model_kwargs key the model does not take was a TypeError traceback (timm) or silently ignored (an hf:
    config keeps any key); NaN / inf normalisation made every input NaN; a method option written twice kept the
    last silently."""
    from vistok.config import parse_method_spec
    from vistok.experiment import IMAGE_KEYS, build_model, image_settings

    config = {"model": "vit_tiny_patch16_224", "model_kwargs": {"depht": 2}, "pretrained": False,
              "checkpoint": None, "method": None}
    with pytest.raises(ConfigError, match="model vit_tiny_patch16_224 with model_kwargs .*depht"):
        build_model(config)
    hf = {**config, "model": "hf:VideoMAEForVideoClassification", "model_kwargs": {"num_frame": 8}}
    with pytest.raises(ConfigError, match=r"model_kwargs \['num_frame'\] are not VideoMAEConfig settings"):
        build_model(hf)
    tiny = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
            "image_size": 32, "patch_size": 16, "num_frames": 2, "attn_implementation": "eager"}  # a config key
    assert build_model({**hf, "model_kwargs": tiny}).config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match="model vit_tiny_patch16_224 with model_kwargs .*depht"):
        image_settings(dict.fromkeys(IMAGE_KEYS), config)  # the model's own settings, read on meta
    for key, value in [("mean", [float("nan")]), ("std", [float("inf")]), ("mean", [float("-inf")])]:
        with pytest.raises(ConfigError, match=f"data.{key} must be a finite number or a list of them"):
            image_settings({**dict.fromkeys(IMAGE_KEYS), key: value})
    with pytest.raises(ConfigError, match="positions given more than once"):
        parse_method_spec("pool:positions=original,positions=compact")
    assert parse_method_spec("pool:positions=original,tokens=4") == ("pool", {"positions": "original", "tokens": 4})


def test_sweep_checks_every_point_first_and_keeps_finished_rows(tmp_path, capsys, monkeypatch):
    """A bad point was found only when reached (after the whole-test-set points before it) and every finished row
    was lost; num_frames=[0] ran the unpatched model labelled `0 frames`; method= was silently ignored; the
    default --out overwrote the committed results/sweep.csv."""
    sweep = load_tool("sweep")
    out = tmp_path / "sweep"
    small = ["--config", str(ROOT / "configs/sweep_fmnist.yaml"), "--out", str(out), "pretrained=false",
             "model_kwargs.depth=3", "data.limit=20", "sweep.flops_images=2", "sweep.ats_k=[]", "sweep.random_k=[]",
             "sweep.input_sizes=[]", "sweep.ats_blocks=[1]"]
    reached = []
    monkeypatch.setattr(sweep, "run_point", lambda *args: reached.append(args) or {})
    for extra, message in ((["sweep.merge_r=[4,-1]"], "r must be >= 0"), (["sweep.ats_fixed_k=[8]",
                           "sweep.ats_blocks=[1,40]"], "block index 40 is out of range"),
                           (["sweep.input_sizes=[0]"], "sweep.input_sizes must hold ints >= 1"),
                           (["method=merge", "method_options.r=50"], "method and method_options do not apply")):
        keys = {item.partition("=")[0] for item in extra}  # each key given once: extra replaces small's
        argv = [item for item in small if item.partition("=")[0] not in keys] + extra
        assert sweep.main(argv) == 2 and message in capsys.readouterr().err, extra
    assert not reached and not (tmp_path / "sweep.csv").exists()
    video = ["--config", str(ROOT / "configs/sweep_fmnist_video.yaml"), "--out", str(out),
             f"data.root={ROOT / 'data/fmnist_clips_sample'}", "sweep.num_frames=[0]"]
    assert sweep.main(video) == 2 and "sweep.num_frames must hold ints >= 1" in capsys.readouterr().err
    # a frame count the tubelets do not divide was found after every other point
    assert sweep.main(video[:-1] + ["sweep.num_frames=[3]"]) == 2 and "not a multiple of tubelet_frames=2" in \
        capsys.readouterr().err
    assert not reached
    with pytest.raises(SystemExit) as stopped:
        sweep.main([arg for arg in small if arg not in ("--out", str(out))])
    assert stopped.value.code == 2 and "--out" in capsys.readouterr().err
    # a pretrained Hugging Face model's depth is in its files, not its class's default config: not built on meta
    monkeypatch.setattr(sweep, "build_model", lambda *args, **kwargs: pytest.fail("built from the class defaults"))
    sweep.check_points({"model": "hf:VideoMAEForVideoClassification", "pretrained": True},
                       [{"patch": ("ats", {"k": 16, "blocks": [12, 13]}), "size": None}])
    monkeypatch.undo()
    monkeypatch.setattr(sweep, "run_point", interrupted_at(sweep.run_point, 2))
    with pytest.raises(KeyboardInterrupt):
        sweep.main(small + ["sweep.merge_r=[4]"])
    rows = (tmp_path / "sweep.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("unpatched,full,") and "gflops_ratio" in rows[0]


def _class_folders(root: Path, classes: dict[str, int], per_class: int) -> None:
    """``root/{train,val}/<name>/*.png``: real Fashion-MNIST test images of the given labels, as RGB files."""
    from PIL import Image

    images, labels = vdata.load_fashion_mnist("test")
    for split, offset in (("train", 0), ("val", per_class)):
        for name, label in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            chosen = (labels == label).nonzero().squeeze(1)[offset: offset + per_class]
            for index in chosen.tolist():
                Image.fromarray(images[index].numpy()).convert("RGB").save(folder / f"{index}.png")


def test_folder_data_takes_the_models_own_image_settings(tmp_path):
    """data.name=folder normalises, resizes and crops as the model's pretrained config says (timm's
    resolve_data_config), each data.* setting overriding it: it used ImageNet's mean and std, 224 px, bilinear and
    crop 0.875 whatever the model (vit_small_patch16_224 wants 0.5 / 0.5, bicubic, 0.9), and read grey models'
    folders as RGB. The training set is train/'s images only (one read from val/ trained on the validation set)."""
    from PIL import Image
    from torchvision import transforms as T

    from vistok.experiment import DATA_DEFAULTS, build_data, image_settings

    data = dict(DATA_DEFAULTS, name="folder")
    vit = {"model": "vit_small_patch16_224", "model_kwargs": {}}
    assert image_settings(data, vit) == {"input_size": 224, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                                         "interpolation": "bicubic", "crop_pct": 0.9, "channels": 3}
    assert image_settings(data, {**vit, "model_kwargs": {"img_size": 64}})["input_size"] == 64
    mine = image_settings({**data, "mean": [0.4, 0.4, 0.4], "crop_pct": 1}, vit)
    assert mine["mean"] == (0.4, 0.4, 0.4) and mine["crop_pct"] == 1.0 and mine["std"] == (0.5, 0.5, 0.5)
    assert image_settings(data)["mean"] == (0.485, 0.456, 0.406)  # no model: ImageNet's
    for key, value in [("mean", "abc"), ("std", [0.5, 0]), ("crop_pct", 1.5), ("interpolation", "cubic"),
                       ("interpolation", "random"), ("input_size", 0)]:  # random: timm's eval transform has none
        with pytest.raises(ConfigError, match=f"data.{key} must be"):
            image_settings({**data, key: value}, vit)
    with pytest.raises(ConfigError, match="data.mean would change nothing"):
        build_data({**DATA_DEFAULTS, "mean": [0.5]})  # Fashion-MNIST has its own
    with pytest.raises(ConfigError, match="data.crop_pct would change nothing"):
        build_data({**DATA_DEFAULTS, "name": "video", "root": str(tmp_path), "crop_pct": 0.9})
    # the channels are the model's: one mean for three channels broadcasts; three for one channel cannot
    assert image_settings({**data, "mean": [0.5]}, vit)["channels"] == 3
    with pytest.raises(ConfigError, match="data.mean has 3 values for a model of 1 input channels"):
        image_settings(data, {"model": "deit_tiny_patch16_224", "model_kwargs": {"in_chans": 1}})
    assert image_settings(data, {"model": "stvit_small", "model_kwargs": {}})["crop_pct"] == 0.9  # built on meta
    root = tmp_path / "images"
    _class_folders(root, {"bag": 8, "sneaker": 7}, per_class=2)
    grey = {"model": "vistok_vit_fmnist", "model_kwargs": {}}
    train, val, _, _ = build_data({**data, "root": str(root)}, model=grey)
    for dataset, split in ((train, "train"), (val, "val")):
        assert sorted(path for path, _ in dataset.samples) == sorted(map(str, root.glob(f"{split}/*/*.png")))
    _, val, _, _ = build_data({**data, "root": str(root)}, train=False, model=grey)
    image, _ = val[0]
    assert image.shape == (1, 28, 28)  # grey, whole: the reference ViT's own input
    pixels = T.functional.pil_to_tensor(Image.open(val.samples[0][0]).convert("L")).float().div(255)
    assert torch.allclose(image, (pixels - 0.2860) / 0.3530, atol=1e-5)


def test_configs_saved_before_the_image_settings_keep_their_meaning():
    """A config saved when data.input_size, mean and std defaulted to ImageNet's (and data.crop_pct did not exist):
    Fashion-MNIST's loads as it did (those values were refused as settings), and a resume compares it in today's
    terms: folder data resized bilinearly with crop 0.875 at its saved size, video's ImageNet values are today's
    unset, Fashion-MNIST read none of them."""
    from vistok.experiment import DATA_DEFAULTS, build_data, upgrade_saved_config

    earlier = {key: value for key, value in DATA_DEFAULTS.items() if key not in ("interpolation", "crop_pct")}
    earlier.update(input_size=224, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    assert build_data({**earlier, "interpolation": None, "crop_pct": None}, train=False)[1] is not None
    keys = ("input_size", "mean", "std", "interpolation", "crop_pct")
    upgraded = {name: upgrade_saved_config({"data": {**earlier, "name": name}})["data"] for name in
                ("fashion_mnist", "folder", "video")}
    assert [upgraded["fashion_mnist"][key] for key in keys] == [None] * 5 == [upgraded["video"][key] for key in keys]
    assert [upgraded["folder"][key] for key in keys] == [224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225],
                                                         "bilinear", 0.875]
    grey_video = upgrade_saved_config({"data": {**earlier, "name": "video", "input_size": 28, "mean": [0.286]}})
    assert grey_video["data"]["input_size"] == 28 and grey_video["data"]["mean"] == [0.286]
    today = {"data": dict(DATA_DEFAULTS)}
    assert upgrade_saved_config(today) is today  # a config that has the keys is today's


def test_a_class_folder_dataset_trains_a_head_of_its_class_count(tmp_path, capsys, monkeypatch):
    """data.name=folder as a new user runs it: two class folders of real images give a 2-way head (not the
    model's 1000), train.mixed_precision=no is accepted on the command line, and eval and the sweep read the same
    folder, with data.workers loading processes."""
    import vistok.experiment as experiment

    workers, make_loader = [], experiment.loader
    monkeypatch.setattr(experiment, "loader", lambda *args, **kwargs: workers.append(kwargs.get("num_workers"))
                        or make_loader(*args, **kwargs))
    root = tmp_path / "images"
    _class_folders(root, {"bag": 8, "sneaker": 7}, per_class=6)
    small = ["model=vit_tiny_patch16_224", "model_kwargs.img_size=64", "model_kwargs.depth=2", "data.name=folder",
             f"data.root={root}", "data.input_size=64"]
    run = tmp_path / "run"
    train, evaluate = load_tool("train"), load_tool("eval")
    assert train.main([*small, "train.epochs=1", "train.warmup_epochs=0.5", "train.batch_size=4",
                       "train.eval_batch_size=6", "train.mixed_precision=no", f"output={run}"]) == 0
    model = load_checkpoint(timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=2),
                            run / "model.safetensors")
    assert model.head.out_features == 2
    # timm's augmentation draws from the main process's generator with 0 workers, from each worker's otherwise
    assert train.main([*small, "train.epochs=1", "train.warmup_epochs=0.5", "train.batch_size=4",
                       "train.eval_batch_size=6", f"output={run}", "--resume", "data.workers=1"]) == 2
    assert "data.workers: 0 -> 1" in capsys.readouterr().err
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= metrics["val_top1"] <= 100 and metrics["val_top5"] == 100.0  # two classes: top-2 is everything
    out = tmp_path / "not yet made" / "eval.json"  # --json makes its folder
    workers.clear()
    assert evaluate.main([*small, f"checkpoint={run / 'model.safetensors'}", "eval.flops_images=4",
                          "eval.batch_size=6", "data.workers=1", "--json", str(out)]) == 0
    assert workers[0] == 1  # the evaluation's loader
    written = json.loads(out.read_text())
    assert written["images"] == 12 and written["throughput_batch"] == 12  # timed on its own batch, not the 4 counted
    sweep = load_tool("sweep")  # the sweep reads the same folder with the same 2-way head
    assert sweep.main(["--config", str(ROOT / "configs/sweep_fmnist.yaml"), "--out", str(tmp_path / "sweep"),
                       *small, "pretrained=false", f"checkpoint={run / 'model.safetensors'}",
                       "sweep.ats_k=[10]", "sweep.ats_fixed_k=[]", "sweep.ats_fusion_k=[]", "sweep.ats_blocks=[1]",
                       "sweep.merge_r=[]", "sweep.random_k=[]", "sweep.input_sizes=[]", "sweep.batch_size=6",
                       "sweep.flops_images=2", "data.workers=1"]) == 0
    assert (tmp_path / "sweep.csv").is_file() and workers.count(1) == 3  # eval's, and each sweep point's
    capsys.readouterr()
    # pretrained weights without a checkpoint for these classes: the 2-way head would be random (chance accuracy)
    for tool, config in ((evaluate, []), (sweep, ["--config", str(ROOT / "configs/sweep_fmnist.yaml"), "--out",
                                                  str(tmp_path / "sweep_pretrained")])):
        assert tool.main([*config, "model=vistok_vit_fmnist", "pretrained=true", "data.name=folder",
                          f"data.root={root}"]) == 2
        assert "pretrained head has 10 classes" in capsys.readouterr().err
    assert train.main([*small, "model_kwargs.num_classes=5", f"output={tmp_path / 'bad'}"]) == 2
    assert "model_kwargs.num_classes=5, but data.root" in capsys.readouterr().err
    (root / "val" / "coat").mkdir()
    (root / "val" / "sneaker").rename(root / "val" / "coat" / "x")
    assert train.main([*small, f"output={tmp_path / 'bad'}"]) == 2
    assert "has class folders ['coat'] that" in capsys.readouterr().err


def test_fashion_mnist_is_real_and_found():
    images, labels = vdata.load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(torch.bincount(labels), torch.full((10,), 1000))
    train_images, train_labels = vdata.load_fashion_mnist("train")
    assert train_images.shape == (60000, 28, 28) and torch.equal(torch.bincount(train_labels), torch.full((10,), 6000))
    with pytest.raises(vistok.VistokError, match="splits"):
        vdata.load_fashion_mnist("val")


def test_missing_dataset_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(vdata, "DEBIAN_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("VISTOK_DATA", raising=False)
    with pytest.raises(vdata.DatasetNotFoundError, match="apt-get install dataset-fashion-mnist.*data.download=true"):
        vdata.find_fashion_mnist()
    with pytest.raises(vdata.DatasetNotFoundError, match=r"not found in .*empty \(data.root= / root= names the one "
                                                         r"folder read.*t10k-labels-idx1-ubyte\(.gz\).*download"):
        vdata.find_fashion_mnist(tmp_path / "empty")
    train = load_tool("train")
    assert train.main(["--config", str(ROOT / "configs/fmnist_vit.yaml"), "output=" + str(tmp_path / "run")]) == 2


def test_fashion_mnist_files_of_other_counts_are_named(tmp_path):
    """An images file and a labels file of different counts (two splits side by side) met TensorDataset's bare
    AssertionError."""
    def idx(name: str, values: np.ndarray) -> None:
        header = bytes([0, 0, 8, values.ndim]) + b"".join(side.to_bytes(4, "big") for side in values.shape)
        (tmp_path / name).write_bytes(header + values.astype(np.uint8).tobytes())

    idx("train-images-idx3-ubyte", np.zeros((3, 28, 28)))
    idx("train-labels-idx1-ubyte", np.zeros(2))
    with pytest.raises(vistok.VistokError, match=r"train-images-idx3-ubyte holds 3 images but .*"
                                                 r"train-labels-idx1-ubyte holds 2 labels"):
        vdata.fashion_mnist_dataset("train", tmp_path)


def test_batch_transform_normalises_and_shifts():
    images = torch.zeros(64, 28, 28, dtype=torch.uint8)
    images[:, 14, 14] = 255
    plain = vdata.GreyBatchTransform()(images)
    assert plain.shape == (64, 1, 28, 28)
    assert torch.allclose(plain[0, 0, 0, 0], torch.tensor(-vdata.FASHION_MNIST_MEAN / vdata.FASHION_MNIST_STD))
    moved = vdata.GreyBatchTransform(augment=True, seed=1)(images)
    bright = moved[:, 0].flatten(1).argmax(1)
    rows, cols = bright // 28, bright % 28
    # shifted by up to 2 pixels, and maybe mirrored (column 14 -> 13) first
    assert bool(((rows - 14).abs() <= 2).all()) and bool(((cols >= 11) & (cols <= 16)).all())
    assert len(set(bright.tolist())) > 5
    # what is shifted in is the background, normalised black as every other pixel but the bright one (not 0)
    assert bool((torch.isclose(moved, plain.min()) | torch.isclose(moved, plain.max())).all())
    assert torch.equal(moved, vdata.GreyBatchTransform(augment=True, seed=1)(images))
    images[:, 14, 14], images[:, 10, 3] = 0, 255  # off the axis: a flip lands in another column
    unflipped = vdata.GreyBatchTransform(augment=True, seed=1, flip=False)(images)[:, 0].flatten(1).argmax(1) % 28
    assert bool(((unflipped >= 1) & (unflipped <= 5)).all())  # data.flip=false: shifted, never mirrored
    assert bool((vdata.GreyBatchTransform(augment=True, seed=1)(images)[:, 0].flatten(1).argmax(1) % 28 > 20).any())


def test_augment_and_flip_switches_reach_every_dataset(tmp_path):
    """data.augment=false trains folder data on the evaluation transform, data.flip=false takes the horizontal
    flips out (folder data and Fashion-MNIST's batch transform); both were ignored there."""
    from torchvision import transforms as T

    from vistok.experiment import DATA_DEFAULTS, build_data

    root = tmp_path / "images"
    _class_folders(root, {"bag": 8, "sneaker": 7}, per_class=2)
    data = dict(DATA_DEFAULTS, name="folder", root=str(root))
    model = {"model": "vit_tiny_patch16_224", "model_kwargs": {}}

    def steps(settings):
        transform = build_data(settings, model=model)[0].transform
        return [type(step).__name__ for step in transform.transforms]

    assert "RandomHorizontalFlip" in steps(data) and "RandomResizedCropAndInterpolation" in steps(data)
    assert "RandomHorizontalFlip" not in steps({**data, "flip": False})
    assert "RandomResizedCropAndInterpolation" in steps({**data, "flip": False})
    evaluation = build_data(data, model=model)[1].transform
    assert repr(build_data({**data, "augment": False}, model=model)[0].transform) == repr(evaluation)
    assert isinstance(evaluation.transforms[-1], T.Normalize)
    assert build_data(dict(DATA_DEFAULTS, flip=False), train=True)[2].flip is False  # Fashion-MNIST


def test_the_training_seed_reaches_every_augmentation():
    """train.seed must draw Fashion-MNIST's shifts and flips and a video set's clips and crops: with a fixed seed
    there, every seed trained on the same draws."""
    from vistok.experiment import DATA_DEFAULTS, build_data

    images = torch.zeros(64, 28, 28, dtype=torch.uint8)
    images[:, 14, 10] = 255

    def shifted(seed):
        return build_data(dict(DATA_DEFAULTS), seed, train=False)[2](images)

    assert torch.equal(shifted(3), shifted(3)) and not torch.equal(shifted(3), shifted(4))
    video = {**DATA_DEFAULTS, **_load_yaml((ROOT / "configs/fmnist_video_vit.yaml").read_text())["data"],
             "root": str(ROOT / "data" / "fmnist_clips_sample")}

    def clips(seed):
        train_set = build_data(video, seed)[0]
        return torch.stack([train_set[index][0] for index in range(4)])

    assert torch.equal(clips(3), clips(3)) and not torch.equal(clips(3), clips(4))


@pytest.mark.slow
def test_train_eval_and_resume(tmp_path, monkeypatch, capsys):
    train, evaluate = load_tool("train"), load_tool("eval")
    run = tmp_path / "run"
    config = str(ROOT / "configs/fmnist_vit.yaml")
    monkeypatch.setattr(train, "validate", interrupted_at(train.validate, 2))  # in epoch 2
    with pytest.raises(KeyboardInterrupt):
        train.main(["--config", config, "train.epochs=2", f"output={run}", "train.fused_attn=false", *SMALL])
    monkeypatch.undo()
    with open(run / "metrics.jsonl", "a") as log:  # as if epoch 2 had been logged, then cut off before its checkpoint
        log.write(json.dumps({"epoch": 2, "train_loss": 0.0}) + "\n" + '{"epoch": 3, "tra')
    stale = run / "checkpoint.previous"  # left by a save cut off after its swap
    stale.mkdir()
    (stale / "old.bin").write_text("stale")
    (run / "checkpoint").rename(run / "checkpoint.partial")  # a save cut off between its two renames
    states = run / "checkpoint.partial" / "random_states_0.pkl"  # as accelerate fails to load it with numpy 1.24
    states.rename(states.with_suffix(".away"))
    assert train.main(["--config", config, "train.epochs=2", f"output={run}", "train.fused_attn=false", "--resume",
                       *SMALL]) == 2  # not a second run from the seed
    assert "did not restore the random state" in capsys.readouterr().err
    states.with_suffix(".away").rename(states)
    assert train.main(["--config", config, "train.epochs=2", f"output={run}", "train.fused_attn=false", "--resume",
                       *SMALL]) == 0
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    (straight := tmp_path / "straight").mkdir()
    (straight / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "from": "an earlier run"}) + "\n")
    # resuming is training on: the augmentation's shifts and flips continue, so the weights are those of one run
    assert train.main(["--config", config, "train.epochs=2", f"output={straight}", "train.fused_attn=false",
                       *SMALL]) == 0
    logged = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in logged] == [1, 2] and "from" not in logged[0]  # a fresh run's own log
    model = load_checkpoint(timm.create_model("vistok_vit_fmnist", depth=3), run / "model.safetensors")
    assert model.blocks[0].attn.qkv.weight.abs().sum() > 0
    reference = load_checkpoint(timm.create_model("vistok_vit_fmnist", depth=3), straight / "model.safetensors")
    for (name, value), expected in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(value, expected), name
    # fine-tuning with ATS on (the ATS path is differentiable)
    assert train.main(["--config", config, "train.epochs=1", f"output={tmp_path / 'ats'}", "method=ats",
                       "method_options.k=40", "method_options.blocks=[1,2]", f"checkpoint={run / 'model.safetensors'}",
                       *SMALL]) == 0
    out = tmp_path / "eval.json"
    assert evaluate.main([f"checkpoint={run / 'model.safetensors'}", "model_kwargs.depth=3", "data.limit=200",
                          "method=ats", "method_options.k=40", "method_options.blocks=[1,2]",
                          "eval.flops_images=20", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 200 and 0 <= result["top1"] <= 100 and result["top5"] >= result["top1"]
    assert result["tokens_per_block"][0] == 197 and result["tokens_per_block"][-1] <= 41
    assert result["gflops"] > 0 and result["images_per_s"] > 0


@pytest.mark.parametrize("setting, message", [
    ("train.clip_grad=-1", "train.clip_grad must be a finite number >= 0"),  # reversed the gradient
    ("train.weight_decay=-1", "train.weight_decay must be"), ("train.warmup_epochs=-3", "train.warmup_epochs must"),
    ("train.lr=.inf", "train.lr must be a finite number > 0"), ("train.lr=0.0", "train.lr must be"),
    ("train.min_lr=.nan", "train.min_lr must be"), ("train.label_smoothing=5.0", "label_smoothing must be below 1"),
    ("train.threads=-1", "train.threads must be an int >= 0"), ("train.seed=-1", "train.seed must be an int in"),
    ("train.seed=4294967296", "train.seed must be an int in"),
    ("train.min_lr=0.5", "train.min_lr (0.5) must not exceed train.lr (0.0015)"),  # the cosine "decay" climbed
    ("train.warmup_epochs=1.0", "train.warmup_epochs (1.0) must be below train.epochs (1)")])  # never decayed
def test_training_settings_that_would_train_wrongly_are_refused(tmp_path, capsys, setting, message):
    """Each was accepted: the run trained the wrong way, logged NaN, or failed in a library with a traceback."""
    train = load_tool("train")
    tiny = ["train.epochs=1", "data.limit=64", "model_kwargs.depth=1", "train.batch_size=32"]  # if it trained
    assert train.main(["--config", str(ROOT / "configs/fmnist_vit.yaml"), setting, f"output={tmp_path}", *tiny]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_a_trailing_partial_accumulation_has_its_own_learning_rate_step(tmp_path, monkeypatch, capsys):
    """4 batches an epoch with grad_accum=3: accelerate steps the optimizer after batch 3 and again at the end of
    the loader, so an epoch has 2 schedule steps, and the next epoch starts on a step of its own; each of them
    clips the gradients at train.clip_grad and every batch's loss is smoothed by train.label_smoothing (both were
    once ignored). A resume shares the run's settings."""
    from accelerate import Accelerator

    train = load_tool("train")
    steps, schedule = [], train.cosine_with_warmup
    smoothing, clipped, loss, clip = [], [], F.cross_entropy, Accelerator.clip_grad_norm_

    def recorded(step, total, *args):
        steps.append((step, total))
        return schedule(step, total, *args)

    monkeypatch.setattr(train, "cosine_with_warmup", recorded)
    monkeypatch.setattr(F, "cross_entropy", lambda *args, **kwargs: smoothing.append(kwargs.get("label_smoothing"))
                        or loss(*args, **kwargs))
    monkeypatch.setattr(Accelerator, "clip_grad_norm_", lambda self, parameters, max_norm, *args: clipped.append(
        max_norm) or clip(self, parameters, max_norm, *args))
    arguments = ["--config", str(ROOT / "configs/fmnist_vit.yaml"), "train.epochs=2", "train.grad_accum=3",
                 "train.label_smoothing=0.2", "train.clip_grad=0.5", f"output={tmp_path}", *SMALL]
    assert train.main(arguments) == 0
    per_batch = [(0, 4), (0, 4), (0, 4), (1, 4), (2, 4), (2, 4), (2, 4), (3, 4)]
    assert steps[::2] == per_batch and steps[1::2] == per_batch  # set on both parameter groups (decay, no decay)
    assert smoothing == [0.2] * len(per_batch) and clipped == [0.5] * 4  # 2 optimizer steps an epoch
    assert train.main([*arguments, "--resume", "train.threads=1", "data.workers=0"]) == 0  # machine settings may change
    assert train.main([*arguments, "--resume", "train.lr=0.5"]) == 2
    assert "train.lr: 0.0015 -> 0.5" in capsys.readouterr().err

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "validate", interrupted)  # a fresh run in the folder, cut off before its checkpoint
    with pytest.raises(KeyboardInterrupt):
        train.main([*arguments, "train.lr=0.5"])
    # the first run's log and config stay with its weights and checkpoint (they were replaced at the start)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((tmp_path / "config.json").read_text())["train"]["lr"] == 0.0015
    assert train.main([*arguments, "--resume", "train.lr=0.5"]) == 2  # the checkpoint there is still the first run's
    assert "train.lr: 0.0015 -> 0.5" in capsys.readouterr().err


def test_tools_reject_bad_input(tmp_path, capsys):
    train = load_tool("train")
    assert train.main(["model=not_a_model", "data.limit=10", f"output={tmp_path}"]) == 2
    assert "unknown model 'not_a_model'" in capsys.readouterr().err
    assert train.main(["method=atz", "data.limit=10", f"output={tmp_path}", "model_kwargs.depth=1"]) == 2
    assert "unknown method 'atz'" in capsys.readouterr().err
    assert train.main(["train.epoch=3"]) == 2
    assert "Did you mean 'train.epochs'" in capsys.readouterr().err
    assert train.main(["model=resnet18", "train.fused_attn=false", "data.limit=10", f"output={tmp_path}"]) == 2
    assert "resnet18 has no attention module with timm's fused_attn switch" in capsys.readouterr().err
    for override, message in [("train.grad_accum=0", "train.grad_accum must be an int >= 1"),
                              ("train.batch_size=0", "train.batch_size must be an int >= 1"),
                              ("train.mixed_precision=bogus", "train.mixed_precision must be one of"),
                              ("data.limit=-5", "data.limit must be an int >= 0"),
                              ("data.workers=-1", "data.workers must be an int >= 0"),
                              ("data.input_size=14", "data.input_size would change nothing"),
                              ("data.limit=100", "smaller than one batch")]:  # 100 images, batches of 128
        assert train.main(["model_kwargs.depth=1", f"output={tmp_path / 'bad'}", override]) == 2, override
        assert message in capsys.readouterr().err
    evaluate = load_tool("eval")
    for override in ("eval.batch_size=0", "eval.throughput_runs=0"):
        assert evaluate.main(["model_kwargs.depth=1", override]) == 2
        assert f"{override.split('=')[0]} must be an int >= 1" in capsys.readouterr().err
    assert evaluate.main(["model_kwargs.depth=1", "eval.threads=-1"]) == 2  # torch's RuntimeError, a traceback
    assert "eval.threads must be an int >= 0" in capsys.readouterr().err
    # video data that is not there: a message and status 2 (a FileNotFoundError traceback)
    video = ["--config", str(ROOT / "configs/kinetics400_videomae_eval.yaml")]
    assert evaluate.main([*video, f"data.root={tmp_path / 'kinetics400'}"]) == 2
    assert "kinetics400 is not a folder" in capsys.readouterr().err
    assert evaluate.main([*video, f"data.root={tmp_path}"]) == 2
    assert "no such clip list" in capsys.readouterr().err
    assert evaluate.main(["--config", str(ROOT / "configs/eval_fmnist_video.yaml"),
                          f"data.root={tmp_path / 'fmnist_clips'}"]) == 2
    assert "tools/make_video_data.py writes it" in capsys.readouterr().err
    sweep = load_tool("sweep")
    assert sweep.main(["--config", str(ROOT / "configs/sweep_fmnist.yaml"), "--out", str(tmp_path / "sweep"),
                       "model_kwargs.depth=1", "sweep.batch_size=0"]) == 2
    assert "sweep.batch_size must be an int >= 1" in capsys.readouterr().err
    assert evaluate.main([f"checkpoint={tmp_path / 'none.safetensors'}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_tool_arguments_are_checked_before_the_work(tmp_path, capsys):
    """Counts below 1, fractions outside (0, 1] and bad manifests stop a tool at once with status 2, before any
    model loads; they divided by zero, crashed or were silently clamped after the work."""
    for tool, arguments, message in [("eval_video_qa", ["--questions", "0"], "--questions"),
                                     ("eval_video_qa", ["--budgets", "-1"], "--budgets"),
                                     ("eval_video_qa", ["--seed", "-1"], "--seed"),
                                     ("eval_vlm", ["--seed", "-1"], "--seed"),
                                     ("eval_vlm", ["--seed", str(2**32)], "a seed below 2**32"),
                                     ("make_video_qa", ["--seed", "-3"], "--seed"),
                                     ("eval_vlm", ["--fractions", "2.0"], "expected a number in (0, 1]"),
                                     ("eval_vlm", ["--prefill-runs", "0"], "--prefill-runs"),
                                     ("eval_vlm", ["--tune", "0.3", "--tune-batches", "1"], "need 4 batches"),
                                     ("train_clip", ["--warmup", "0"], "--warmup"),
                                     ("train_vlm", ["--save-every", "0"], "--save-every"),
                                     ("train_video_vlm", ["--learned", "1.5"], "expected a number in [0, 1]"),
                                     ("train_video_vlm", ["--learned", "0.7", "--every", "0.5"], "at most 1 together"),
                                     ("demo", ["--limit", "-5"], "--limit"),
                                     ("demo", ["--calibration", "2"], "--calibration must be at least 4"),
                                     ("demo", ["--target", "2"], "--target must be a GFLOPs ratio"),
                                     ("benchmark", ["ats", "--batch-size", "-2"], "--batch-size"),
                                     ("benchmark", ["ats", "--runs", "0"], "--runs"),
                                     ("eval_pages", ["--pages", "nope.png"], "no such file: nope.png"),
                                     ("eval_pages", ["--crop-size", "100"], "not a multiple of"),
                                     ("eval_pages", ["--crop-size", "0"], "--crop-size"),
                                     ("train_vlm", ["--seed", "-1"], "--seed"),
                                     ("train_clip", ["--seed", str(10**20)], "--seed"),
                                     ("train_clip", ["--threads", "-1"], "--threads"),
                                     ("train_clip", ["--lr", "nan"], "--lr"),
                                     ("train_clip", ["--minutes", "-1"], "--minutes"),  # trained 0 steps, saved
                                     ("train_clip", ["--weight-decay", "-0.1"], "--weight-decay"),
                                     ("train_vlm", ["--lora-rank", "0"], "--lora-rank"),
                                     ("train_vlm", ["--compress-tokens", "0"], "--compress-tokens"),
                                     ("train_vlm", ["--threads", "-1"], "--threads"),
                                     ("train_video_vlm", ["--lora-rank", "-2"], "--lora-rank"),
                                     ("train_video_vlm", ["--lr", "-1"], "--lr"),
                                     ("make_video_data", ["--seed", str(2**64)], "a seed below 2**32"),
                                     ("make_video_data", ["--train", "0"], "--train"),
                                     ("bench_video", ["decode", "--repeats", "0"], "--repeats"),
                                     ("bench_video", ["loader", "--workers", "-1"], "--workers")]:
        with pytest.raises(SystemExit) as stopped:
            load_tool(tool).main(arguments)
        assert stopped.value.code == 2 and message in capsys.readouterr().err, (tool, arguments)
    vlm = load_tool("eval_vlm")  # method words are checked before the model loads (they failed after the
    for methods, message in [(["pool:tokens=9"], "the budget comes from --fractions"),  # all-token run)
                             (["nosuch"], "unknown method 'nosuch'"), (["pool:bogus=1"], "unknown option")]:
        assert vlm.main(["--methods", *methods]) == 2 and message in capsys.readouterr().err
    evaluate = load_tool("eval_video_qa")
    (tmp_path / "rows.json").write_text(json.dumps([{"video": "a.mp4", "question": "?"}]))
    for manifest, message in [(tmp_path / "none.json", "does not exist"), (tmp_path / "rows.json", "row 0 has no "
                                                                                                 "answer")]:
        assert evaluate.main(["--manifest", str(manifest), "--out", str(tmp_path / "qa")]) == 2
        assert message in capsys.readouterr().err
    from vistok.models.reference_vlm import warm_start

    with pytest.raises(CheckpointError, match="no trained tensors at"):
        warm_start(None, str(tmp_path / "none.safetensors"))


def test_class_counts_are_checked_by_format_and_at_every_sweep_point(monkeypatch):
    """Class names (folders, Kinetics CSVs) need one score each; a video list's numeric labels are the model's own
    ids, so a list whose highest label is below the model's last class is fine (it was refused). The sweep checks
    each point's model before evaluating it: a pretrained hf: model is not built before the first point."""
    import types

    from vistok.config import ConfigError
    from vistok.experiment import check_model_classes

    model = types.SimpleNamespace(num_classes=8)
    listed = types.SimpleNamespace(videos=types.SimpleNamespace(classes=[str(i) for i in range(6)]))
    for data_format, classes, refused in (("list", 6, False), ("list", 9, True), ("kinetics_csv", 6, True),
                                          ("folders", 8, False)):
        dataset = types.SimpleNamespace(videos=types.SimpleNamespace(classes=[str(i) for i in range(classes)]))
        config = {"model": "m", "data": {"root": "r", "format": data_format}}
        if refused:
            with pytest.raises(ConfigError, match=f"gives 8 class scores, but data.root=r has {classes} classes"):
                check_model_classes(model, dataset, config, "eval.py")
        else:
            check_model_classes(model, dataset, config, "eval.py")
    # a checkpoint whose id2label orders the same names otherwise would score its class i as the data's class i
    named = types.SimpleNamespace(videos=types.SimpleNamespace(classes=["bike", "car", "phone"]))
    config = {"model": "m", "data": {"root": "r", "format": "kinetics_csv"}}
    for order, refused in ((["bike", "car", "phone"], False), (["car", "bike", "phone"], True),
                           (["LABEL_0", "LABEL_1", "LABEL_2"], False)):
        hf = types.SimpleNamespace(config=types.SimpleNamespace(num_labels=3, id2label=dict(enumerate(order))))
        if refused:
            with pytest.raises(ConfigError, match="class 0 is 'car' for the model, 'bike' for the data"):
                check_model_classes(hf, named, config, "eval.py")
        else:
            check_model_classes(hf, named, config, "eval.py")
    sweep = load_tool("sweep")
    monkeypatch.setattr(sweep, "evaluate", lambda *args, **kwargs: pytest.fail("evaluated"))
    config = {**sweep.DEFAULTS, "pretrained": False, "model_kwargs": {"depth": 1},
              "data": {**sweep.DEFAULTS["data"], "root": "r", "format": "kinetics_csv"}}
    with pytest.raises(ConfigError, match="gives 10 class scores, but data.root=r has 6 classes"):
        sweep.run_point(config, {"method": "unpatched", "label": "full", "patch": None, "size": None}, listed, None)


def test_benchmarks_and_eval_refuse_a_json_folder_before_the_work(tmp_path, capsys, monkeypatch):
    """--json <folder> failed with IsADirectoryError (a traceback) after the whole benchmark or evaluation."""
    video, benchmark, samplers, evaluate = (load_tool(name) for name in ("bench_video", "benchmark",
                                                                         "bench_samplers", "eval"))
    monkeypatch.setattr(video, "_decode", lambda *args: pytest.fail("benchmarked"))
    monkeypatch.setattr(benchmark, "_memory", lambda *args: pytest.fail("benchmarked"))
    monkeypatch.setattr(samplers, "bench_processors", lambda *args: pytest.fail("benchmarked"))
    monkeypatch.setattr(evaluate, "run_eval", lambda *args: pytest.fail("evaluated"))
    for main, argv in ((video.main, ["decode"]), (benchmark.main, ["memory"]), (samplers.main, ["processors"]),
                       (evaluate.main, [])):
        assert main([*argv, "--json", str(tmp_path)]) == 2, argv
        assert "--json" in (error := capsys.readouterr().err) and "a folder, not a file" in error
    for device in ("tpu", *(["cuda"] if not torch.cuda.is_available() else [])):  # a traceback after the FLOPs
        assert benchmark.main(["ats", "--device", device]) == 2 and "--device" in capsys.readouterr().err
    gpu = load_tool("bench_gpu")
    monkeypatch.setattr(gpu, "allow_recompiles", lambda *args: pytest.fail("measured"))
    assert gpu.main(["--smoke", "--out", str(tmp_path)]) == 2 and "a folder, not a file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # bench_samplers' counts were plain ints: -1 failed inside torch
        samplers.main(["processors", "--batch", "-1"])


def test_eval_video_qa_seed_picks_the_questions_and_the_frames_dropped():
    """``--seed`` makes another held-out question set and another frame draw per question (it had no seed:
    every run asked the same questions and dropped the same frames); seed 0 keeps the published draw."""
    import argparse

    evaluate = load_tool("eval_video_qa")

    def asked(seed: int) -> list[tuple]:
        arguments = argparse.Namespace(manifest=None, questions=4, seed=seed)
        return [(q["question"], q["answer"], q["frames"].sum().item()) for q in evaluate.load_questions(arguments)]

    assert asked(0) == asked(0) and asked(0) != asked(1)
    draws = {seed: [torch.randperm(16, generator=evaluate.question_generator(seed, index)).tolist()
                    for index in range(3)] for seed in (0, 1)}
    assert draws[0] == [torch.randperm(16, generator=torch.Generator().manual_seed(index)).tolist()
                        for index in range(3)]
    assert len({tuple(d) for d in draws[0] + draws[1]}) == 6  # no question shares its draw across seeds


def test_checkpoint_that_does_not_fit(tmp_path):
    from safetensors.torch import save_file

    small = timm.create_model("vistok_vit_fmnist", depth=2)
    save_file(small.state_dict(), str(tmp_path / "small.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing \['blocks.2"):
        load_checkpoint(timm.create_model("vistok_vit_fmnist", depth=3), tmp_path / "small.safetensors")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(timm.create_model("vistok_vit_fmnist", depth=2, embed_dim=48), tmp_path / "small.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(small, tmp_path / "junk.safetensors")


def test_unfused_attention_computes_the_same_function():
    torch.manual_seed(0)
    model = timm.create_model("vistok_vit_fmnist_reg4", depth=2)
    x = torch.randn(3, 1, 28, 28)
    fused = model(x)
    fused.square().sum().backward()
    fused_grad = model.blocks[0].attn.qkv.weight.grad.clone()
    model.zero_grad()
    assert set_fused_attention(model, False) == 2
    assert not any(block.attn.fused_attn for block in model.blocks)
    unfused = model(x)
    unfused.square().sum().backward()
    torch.testing.assert_close(unfused, fused, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight.grad, fused_grad, rtol=1e-3, atol=1e-5)
    assert set_fused_attention(torch.nn.Linear(2, 2), False) == 0


@pytest.mark.slow
def test_sweep_writes_csv_and_plot(tmp_path, monkeypatch):
    """Each row as its point measured it: ats_fixed ran without min_tokens (adaptive, like ats), ats_fusion without
    fusion (ats_fixed again), mean_tokens was the fewest of the blocks' counts, top1_change had its sign reversed and
    the downsampled point's FLOPs were counted at the native size."""
    sweep = load_tool("sweep")
    per_block, evaluate = [], sweep.evaluate  # each point's tokens per block as its evaluation counted them

    def evaluated(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        per_block.append(list(result.get("tokens_per_block") or []))  # none: a model that keeps every token
        return result

    monkeypatch.setattr(sweep, "evaluate", evaluated)
    out = tmp_path / "sweep.v2"  # a prefix with a dot: its files are sweep.v2.csv and sweep.v2.png
    assert sweep.main(["--config", str(ROOT / "configs/sweep_fmnist.yaml"), "--out", str(out), "pretrained=false",
                       "model_kwargs.depth=3", "data.limit=100", "sweep.ats_k=[64]", "sweep.ats_fixed_k=[32]",
                       "sweep.ats_fusion_k=[32]", "sweep.ats_blocks=[1,2]",
                       "sweep.merge_r=[0,8]", "sweep.random_k=[64]", "sweep.input_sizes=[20]",
                       "sweep.flops_images=10"]) == 0
    rows = (tmp_path / "sweep.v2.csv").read_text().splitlines()
    assert rows[0].startswith("method,label,top1") and len(rows) == 9
    assert [row.split(",")[0] for row in rows[1:]] == ["unpatched", "ats", "ats_fixed", "ats_fusion", "merge",
                                                     "merge", "random_drop", "downsample"]
    # every point is the same random model: merging nothing scores as the unpatched one (each point drew its own)
    assert rows[5].startswith("merge,r=0,") and rows[5].split(",")[2:4] == rows[1].split(",")[2:4]
    import csv

    table = list(csv.DictReader(rows))  # the baselines' tokens too (they were left blank), and what FLOPs averaged
    assert float(table[0]["mean_tokens"]) == 197 and 0 < float(table[-1]["mean_tokens"]) < 197  # 20 px: fewer
    assert {row["flops_images"] for row in table} == {"10"}
    for row, tokens in zip(table, per_block, strict=True):
        if tokens:  # the mean over the blocks, not the fewest
            assert float(row["mean_tokens"]) == pytest.approx(sum(tokens) / len(tokens)), row["method"]
        assert float(row["top1_change"]) == pytest.approx(float(row["top1"]) - float(table[0]["top1"]))
        assert float(row["gflops_ratio"]) == pytest.approx(float(row["gflops"]) / float(table[0]["gflops"]))
    assert any(float(row["top1_change"]) != 0 for row in table)  # the sign is seen
    fixed, fusion = table[2], table[3]
    assert per_block[2] == [197, 33, 33]  # ats_fixed: k=32 patch tokens and the class token in each ATS block
    assert [fixed[key] for key in ("top1", "top5", "gflops")] != [fusion[key] for key in ("top1", "top5", "gflops")]
    assert float(table[-1]["gflops_ratio"]) < 1  # 20 px: fewer tokens, fewer FLOPs
    assert (tmp_path / "sweep.v2.png").stat().st_size > 10_000


def test_overlays_account_for_every_patch(tmp_path):
    model = timm.create_model("vistok_vit_fmnist", depth=4).eval()
    images = vdata.GreyBatchTransform()(vdata.load_fashion_mnist("test")[0][:3])
    with torch.no_grad():
        with vistok.patch(model, "ats", k=40, blocks=[1, 2]) as handle:
            model(images)
            ats = handle.layouts[3]
        with vistok.patch(model, "merge", r=20, trace_source=True) as handle:
            model(images)
            merged = handle.layouts[3]
        untraced = []  # merged patches were drawn as dropped
        for method, options in (("merge", {"r": 20}), ("ats", {"k": 40, "blocks": [1], "fusion": True})):
            with vistok.patch(model, method, **options) as handle:
                model(images)
                untraced.append(handle.layouts[3])
    for layout in untraced:
        with pytest.raises(vistok.InvalidConfigError, match="patch with trace_source=True to draw them"):
            save_overlay_grid(tmp_path / "untraced.png", images, {"x": layout}, grid=(14, 14))
    with pytest.raises(vistok.InputShapeError, match="2 images, but layout 'merge' is of a batch of 3"):
        save_overlay_grid(tmp_path / "two.png", images[:2], {"merge": merged}, grid=(14, 14))  # was zip()'s error
    kept = patch_groups(ats, 196)
    assert torch.equal((kept >= 0).sum(1), ats.num_valid() - 1)
    groups = patch_groups(merged, 196)
    assert bool((groups >= 0).all())
    for b in range(3):
        sizes = torch.bincount(groups[b], minlength=merged.num_tokens)
        assert torch.equal(sizes[1:].float(), merged.sizes[b, 1:])
    path = save_overlay_grid(tmp_path / "tokens.png", images, {"ats": ats, "merge": merged}, grid=(14, 14))
    assert path.stat().st_size > 10_000
    from vistok.viz import overlay

    with pytest.raises(vistok.InputShapeError, match="30x30 image with 196 patch groups does not divide"):
        overlay(np.zeros((30, 30, 3)), groups[0].numpy(), (14, 14))
    for layout in (ats, merged):  # a grid that is not the model's: a wrong picture (traced) or an IndexError
        with pytest.raises(vistok.InputShapeError, match=r"grid \(7, 7\), but layout 'x' is over the model's "
                                                         r"\(14, 14\) patch grid"):
            save_overlay_grid(tmp_path / "wrong.png", images, {"x": layout}, grid=(7, 7))
        with pytest.raises(vistok.InputShapeError, match="patch_groups: the layout"):
            patch_groups(layout, 49)
    assert not (tmp_path / "wrong.png").exists()


def test_overlay_titles_give_the_counts_of_a_ragged_batch():
    """Counts 11, 8, 8, 8, 8, 8 were titled "8 tokens", the rounded mean."""
    from vistok.tokens import TokenLayout
    from vistok.viz import _token_note

    layout = TokenLayout.original(torch.zeros(6, 12, 4), 1, True)
    valid = torch.arange(12)[None] <= torch.tensor([11, 8, 8, 8, 8, 8])[:, None]
    ragged = layout.select(torch.arange(12).expand(6, -1), valid)
    assert _token_note(ragged) == "mean 8.5 tokens, 8-11" and _token_note(layout) == "11 tokens"


def test_overlays_on_a_non_square_grid_draw_each_patch_where_it_lies():
    """A 4 x 6 grid of 8 px patches (32 x 48 px), rows first as the model numbers its patches: the dropped patch
    (row 0, column 5) dims the top-right corner, the merged pair (row 3, columns 0-1) fills the bottom-left with
    its mean (the square grids of the other tests would not see rows and columns swapped)."""
    from vistok.viz import overlay

    image = np.random.default_rng(0).random((32, 48, 3))
    groups = np.arange(24)
    groups[5] = -1  # row 0, column 5
    groups[19] = 18  # row 3, columns 0 and 1 in one token
    drawn = overlay(image, groups, (4, 6))
    inside = (slice(1, 7), slice(41, 47))  # the dropped patch, inside its borders
    assert np.allclose(drawn[inside], image[inside] * 0.25)
    merged = (slice(25, 31), slice(1, 15))
    assert np.allclose(drawn[merged], image[24:32, 0:16].reshape(-1, 3).mean(0))
    untouched = (slice(9, 15), slice(9, 15))  # row 1, column 1: its own token
    assert np.allclose(drawn[untouched], image[untouched])


@pytest.mark.parametrize("side", [28, 224])
def test_overlay_borders_survive_on_the_saved_figure(side, tmp_path):
    """The 1-pixel borders between token groups are drawn at about the panel's size on the PNG: drawn 8 times
    larger (224 px images), saving kept one border line in eight."""
    from PIL import Image

    from vistok.viz import overlay

    model = timm.create_model("vistok_vit_fmnist", depth=2).eval()
    images = vdata.GreyBatchTransform()(vdata.load_fashion_mnist("test")[0][:1])
    with torch.no_grad(), vistok.patch(model, "merge", r=40, trace_source=True) as handle:
        model(images)
        merged = handle.layouts[1]
    images = F.interpolate(images, size=(side, side))
    path = save_overlay_grid(tmp_path / "tokens.png", images, {"merge": merged}, grid=(14, 14))
    drawn = overlay(np.zeros((224, 224, 3)), patch_groups(merged, 196)[0].numpy(), (14, 14))
    border = np.array([1.0, 0.85, 0.2])
    expected = int((np.abs(drawn - border).max(axis=-1) < 0.01).sum())  # on a 224 px panel
    saved = np.asarray(Image.open(path).convert("RGB"), dtype=float) / 255
    found = int((np.abs(saved - border).max(axis=-1) < 0.1).sum())
    assert found >= 0.7 * expected


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    tool = "eval" if "eval" in path.stem.split("_") else "sweep" if path.name.startswith("sweep_") else "train"
    config = load_config(load_tool(tool).DEFAULTS, path)
    if config["model"].startswith("hf:"):
        import transformers

        assert hasattr(transformers, config["model"][3:]) and config["model_kwargs"].get("name_or_path")
    else:
        assert timm.is_model(config["model"])
    if config["method"]:
        vistok.create_config(config["method"], **config["method_options"])
    if tool == "train":
        load_tool("train")._check_settings(config["train"])  # the learning-rate schedule's settings too


def test_eval_vlm_evaluates_the_fine_vlm_as_it_was_trained(monkeypatch, capsys):
    """--fine without --methods numbered the kept tokens compactly, a mode the fine VLM never saw (10 points lower
    on merge_to_budget); its defaults now carry positions=original, the baseline too."""
    tool = load_tool("eval_vlm")
    checked = []
    monkeypatch.setattr(tool, "check_method", checked.append)

    def stop(**kwargs):
        raise vistok.InvalidConfigError("stop before the model")

    monkeypatch.setattr(tool, "create_reference_vlm", stop)
    assert tool.main(["--fine"]) == 2
    assert checked == [f"{method}:positions=original" for method in tool.METHODS]
    assert "default baseline" not in capsys.readouterr().err  # pool:positions=original is among them
    checked.clear()
    assert tool.main([]) == 2 and checked == list(tool.METHODS)


def test_eval_vlm_compares_with_pooling_at_equal_tokens():
    """Pooling can only make some budgets (a 14 x 14 grid pools to 64 cells, not 65): with pooling as the baseline,
    every method takes pooling's budget at each fraction, so vs_baseline always has its pair."""
    settings = load_tool("eval_vlm").settings
    points = settings(["pool", "dominant"], [0.33, 0.05], 196, (14, 14), baseline="pool")
    assert points[0] == (None, 196)
    assert [tokens for method, tokens in points[1:3]] == [tokens for method, tokens in points[3:5]]
    assert [tokens for _, tokens in settings(["dominant"], [0.33, 0.05], 196, (14, 14))[1:]] == [65, 10]
    # pooling as the baseline but not evaluated: nothing to align with
    assert [tokens for _, tokens in settings(["dominant"], [0.33, 0.05], 196, (14, 14), "pool")[1:]] == [65, 10]


def test_only_an_augmenting_transform_has_its_draws_checkpointed():
    train = load_tool("train")
    assert train.augmentation_rng(vdata.GreyBatchTransform(augment=False)) is None  # an older checkpoint resumes
    assert isinstance(train.augmentation_rng(vdata.GreyBatchTransform(augment=True)), torch.Generator)
    assert train.augmentation_rng(None) is None


def test_every_tool_reports_vistok_errors_with_status_2(capsys):
    """The README: the tools print vistok's message and exit with status 2 instead of a traceback, also those that
    did not catch errors themselves (a decorated main)."""
    assert load_tool("eval_pages").main(["--keep", "2", "--out", "unused"]) == 2
    assert "eval_pages.py: error: correlation_guided: keep must be a fraction" in capsys.readouterr().err
    for tool in ("eval_video_qa", "eval_pages", "benchmark", "bench_samplers", "bench_video", "tune_reference",
                 "bench_gpu", "train", "eval", "sweep", "demo", "eval_vlm", "train_vlm", "train_video_vlm",
                 "make_video_data", "make_video_qa"):
        source = (ROOT / "tools" / f"{tool}.py").read_text()
        assert "@reports_errors" in source or "except vistok.VistokError" in source, tool


def test_a_list_of_methods_with_options_is_written_as_yaml_lists():
    """A config has lists, not tuples: ``method: [[ats, {k: 40}], [merge, {r: 4}]]`` was refused ("method must be
    a name or a config object, got list"), so a composition in a config could only take default options."""
    config = load_config({"method": None}, None, parse_overrides(["method=[[ats, {k: 40, blocks: [3]}], "
                                                                  "[merge, {r: 4, blocks: [6, 7]}]]"]),
                         {"method": (str, list)})
    composed = vistok.create_config(config["method"])
    assert composed == vistok.create_config([("ats", {"k": 40, "blocks": [3]}), ("merge", {"r": 4, "blocks": [6, 7]})])
    with pytest.raises(vistok.InvalidConfigError, match=r"in a YAML config: method: \[\[ats, \{k: 100\}\]"):
        vistok.create_config(["ats", "merge"], k=40)


def test_a_single_mean_and_std_serve_every_channel():
    """``data.mean=0.5`` passed the config's type check and was then refused by the image settings."""
    from vistok.experiment import IMAGE_KEYS, image_settings

    settings = image_settings({**dict.fromkeys(IMAGE_KEYS), "mean": 0.5, "std": 0.25})
    assert settings["mean"] == (0.5,) and settings["std"] == (0.25,)
    with pytest.raises(ConfigError, match="data.std must be a finite number or a list of them"):
        image_settings({**dict.fromkeys(IMAGE_KEYS), "std": -1})


@pytest.mark.parametrize(("tool", "arguments", "message"), [
    ("eval", ["model=deit_tiny_patch16_224", "model_kwargs.depth=1"], "images are 1x28x28 .* takes 3 channels"),
    ("eval", ["model=deit_tiny_patch16_224", "model_kwargs.depth=1", "model_kwargs.in_chans=1"],
     "images are 1x28x28 .* was built for 224x224"),
    ("train", ["model=deit_tiny_patch16_224", "model_kwargs.depth=1", "model_kwargs.in_chans=1", "train.epochs=1",
               "train.warmup_epochs=0"],
     "images are 1x28x28 .* was built for 224x224")])
def test_a_model_that_does_not_take_the_images_is_refused_before_the_work(tmp_path, capsys, tool, arguments,
                                                                          message):
    """A model for other images than the data's: timm's AssertionError from the first forward, exit 1."""
    argv = [*arguments, "data.limit=8", "eval.flops_images=2"] if tool == "eval" else \
        [*arguments, "data.limit=8", "train.batch_size=4", f"output={tmp_path / 'run'}"]
    assert load_tool(tool).main(argv) == 2
    assert re.search(message, capsys.readouterr().err)


def test_folder_images_of_another_size_than_the_model_are_refused(tmp_path, capsys):
    root = tmp_path / "images"
    _class_folders(root, {"bag": 8, "sneaker": 7}, per_class=2)
    small = ["model=vit_tiny_patch16_224", "model_kwargs.img_size=64", "model_kwargs.depth=1", "data.name=folder",
             f"data.root={root}", "data.input_size=32", "eval.flops_images=2"]
    assert load_tool("eval").main(small) == 2
    assert "images are 3x32x32" in capsys.readouterr().err and \
        load_tool("eval").main([*small[:-2], "data.input_size=64", "eval.flops_images=2"]) == 0


def test_outputs_that_cannot_be_written_are_refused_before_the_work(tmp_path, capsys):
    """train.py's output a file failed at mkdir after the setup; the sweep's plot a folder failed after every
    point, and a prefix under a file at mkdir (tracebacks, exit 1)."""
    afile = tmp_path / "afile"
    afile.write_text("")
    assert load_tool("train").main(["model_kwargs.depth=1", "data.limit=8", f"output={afile}"]) == 2
    assert "a file, not a folder" in capsys.readouterr().err
    sweep = load_tool("sweep")
    (tmp_path / "s.png").mkdir()
    common = ["pretrained=false", "model_kwargs.depth=1", "data.limit=8", "sweep.ats_k=[]", "sweep.ats_fixed_k=[]",
              "sweep.merge_r=[]", "sweep.random_k=[]", "sweep.input_sizes=[]", "sweep.flops_images=2"]
    for out, message in ((tmp_path / "s", "a folder, not a file"), (afile / "s", "is a file, not a folder")):
        assert sweep.main(["--config", str(ROOT / "configs/sweep_fmnist.yaml"), "--out", str(out), *common]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()


def test_a_sweep_input_size_the_patch_size_does_not_divide_is_refused_first(tmp_path, capsys):
    """Found after every other point before (timm's AssertionError, exit 1, no plot)."""
    out = tmp_path / "s"
    assert load_tool("sweep").main(["--config", str(ROOT / "configs/sweep_fmnist.yaml"), "--out", str(out),
                                    "pretrained=false", "model_kwargs.depth=1", "data.limit=8", "sweep.ats_k=[]",
                                    "sweep.ats_fixed_k=[]", "sweep.merge_r=[4]", "sweep.random_k=[]",
                                    "sweep.input_sizes=[27]", "sweep.flops_images=2"]) == 2
    assert "sweep.input_sizes [27] are not multiples of the model's patch size (2, 2)" in capsys.readouterr().err
    assert not out.with_suffix(".csv").exists()


def test_models_whose_patch_embedding_takes_any_size_are_not_refused():
    """XCiT's convolutional stem has an img_size but takes any size: check_model_takes_images refused it (and told
    the user to set dynamic_img_size, a kwarg XCiT has not)."""
    from vistok.experiment import check_model_takes_images

    images = [(torch.rand(3, 64, 64), 0)]
    model = timm.create_model("xcit_nano_12_p16_224", pretrained=False, depth=1).eval()
    check_model_takes_images(model, images, None, "eval.py")
    assert model(images[0][0][None]).shape == (1, 1000)
    with pytest.raises(ConfigError, match="built for 32x32"):  # timm's PatchEmbed of a fixed size still is
        check_model_takes_images(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1), images, None, "x")


def test_a_sweep_input_size_is_not_checked_against_the_patch_size_where_the_model_pads():
    """With dynamic_img_pad the model pads 27 px to 28: the size is fine (it was refused)."""
    sweep = load_tool("sweep")
    config = {**sweep.DEFAULTS, "pretrained": False,
              "model_kwargs": {"depth": 1, "dynamic_img_pad": True}}
    sweep.check_points(config, [{"method": "downsample", "label": "27px", "patch": None, "size": 27}])
    with pytest.raises(ConfigError, match="not multiples of the model's patch size"):
        sweep.check_points({**config, "model_kwargs": {"depth": 1}},
                           [{"method": "downsample", "label": "27px", "patch": None, "size": 27}])


@pytest.mark.parametrize(("tool", "arguments"), [("make_video_data", ["--train", "8", "--test", "8"]),
                                                 ("make_video_qa", ["--size", "2"])])
def test_the_data_generators_refuse_an_out_that_is_a_file(tmp_path, capsys, tool, arguments):
    """A NotADirectoryError traceback (exit 1) after Fashion-MNIST was loaded, before."""
    afile = tmp_path / "afile"
    afile.write_text("")
    assert load_tool(tool).main(["--out", str(afile), *arguments]) == 2
    assert "a file, not a folder" in capsys.readouterr().err
