"""The ``vistok`` command's options reaching the work, the plots drawing what they are given where it belongs, and
the datasets read from where and as they are asked."""

import argparse
import gzip
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch

import vistok
import vistok.data as vdata
import vistok.viz as viz
from vistok.cli import main
from vistok.tokens import TokenLayout

BORDER = np.array([1.0, 0.85, 0.2])


class Stop(Exception):
    """Raised by a spy once it has recorded what it was given."""


# --- the command line -------------------------------------------------------------------------------------------


def test_option_parsers_take_their_bounds_and_refuse_past_them():
    """Each argparse type takes the ends of its documented range and refuses the next value: a seed of 2**32 - 1
    but not 2**32, a fraction or share of exactly 1, a share, count_or_zero and positive_or_zero of 0 (weight decay
    0 was refused by a check that forgot ``zero_allowed``), but no fraction or positive number of 0."""
    from vistok import cli

    assert cli.seed(str(2**32 - 1)) == 2**32 - 1 and cli.seed("0") == 0
    assert cli.fraction("1") == 1.0 and cli.share("1") == 1.0 and cli.share("0") == 0.0
    assert cli.count("1") == 1 and cli.count_or_zero("0") == 0 and cli.count("4", least=4) == 4
    assert cli.positive_or_zero("0") == 0.0 and cli.positive("1e-9") == 1e-9
    refused = [(cli.seed, str(2**32)), (cli.fraction, "0"), (cli.fraction, "1.0001"), (cli.share, "-0.001"),
               (cli.share, "1.0001"), (cli.fraction, "nan"), (cli.positive, "0"), (cli.positive, "inf"),
               (cli.positive_or_zero, "-1e-9"), (cli.count, "0"), (cli.count_or_zero, "-1"), (cli.count, "x")]
    for parse, text in refused:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_bench_hands_dtype_device_attention_and_threads_on(monkeypatch):
    """`vistok bench --dtype --device --attention --threads` reach the benchmark and torch (a dtype replaced by
    float32, a device by "cpu", an attention path by "auto", or threads never set would time another run than the
    one the report names)."""
    import vistok.measure.bench as bench

    seen, threads = {}, []

    def recorded(model_name, variants, **options):
        seen.update(options)
        raise Stop

    monkeypatch.setattr(bench, "run_benchmark", recorded)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    with pytest.raises(Stop):
        main(["bench", "--model", "vit_tiny_patch16_224", "--method", "merge", "--dtype", "bfloat16", "--device",
              "cpu:0", "--attention", "sdpa", "--threads", "3", "--no-progress"])
    assert (seen["dtype"], seen["device"], seen["attention"], seen["compile"]) == (torch.bfloat16, "cpu:0", "sdpa",
                                                                                   None)
    assert threads == [3]


def test_tune_hands_target_cost_weights_and_checkpoint_on(tmp_path, monkeypatch):
    """`vistok tune` loads the weights asked for (--pretrained, then --checkpoint) and tunes for --target of --cost
    on --images calibration images (a target or cost replaced by the default searched for another pick; dropped
    weights tuned a random model)."""
    from vistok import _timm, tuner
    from vistok.models import reference

    created, loaded, seen, threads = [], [], [], []

    def create(name, caller, pretrained=False):
        created.append((name, pretrained))
        return timm.create_model(name)

    def tune(model, images, target, labels, **kwargs):
        seen.append((images.shape[0], target, labels, kwargs))
        raise Stop

    monkeypatch.setattr(_timm, "create_timm_model", create)
    monkeypatch.setattr(reference, "load_checkpoint", lambda model, path: loaded.append(path))
    monkeypatch.setattr(tuner, "tune", tune)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    with pytest.raises(Stop):
        main(["tune", "--model", "vistok_vit_fmnist", "--pretrained", "--checkpoint", "weights.safetensors",
              "--target", "0.7", "--cost", "tokens", "--images", "6", "--threads", "2", "--out", str(tmp_path / "t")])
    assert created == [("vistok_vit_fmnist", True)] and loaded == ["weights.safetensors"] and threads == [2]
    images, target, labels, kwargs = seen[0]
    assert (images, target, labels, kwargs["cost"]) == (6, 0.7, None, "tokens")


@pytest.mark.parametrize(("flags", "expected"), [
    ([], {"selection": "learned", "frames": 16, "merge_threshold": 0.75, "merge_on": "selection"}),
    (["--merge-on", "summary", "--selection", "uniform", "--frames", "5"],
     {"selection": "uniform", "frames": 5, "merge_threshold": 0.98, "merge_on": "summary"}),
    (["--no-temporal-merge", "--budget", "64"], {"budget": 64, "merge_threshold": None}),
    (["--merge-threshold", "0.9", "--merge-on", "summary"], {"merge_threshold": 0.9, "merge_on": "summary"})])
def test_video_qa_hands_its_options_to_the_pipeline(monkeypatch, capsys, flags, expected):
    """`vistok video-qa` builds the VideoQAConfig its options say (the merge threshold's default follows
    --merge-on: 0.75 on selection rows, 0.98 on frame summaries; --no-temporal-merge turns it off) and answers with
    --seed, --temperature and --top-p; CLIP is loaded for text selection only."""
    import vistok.models as models
    import vistok.video.qa as qa

    built, calls = [], []

    class Recorder:
        def __init__(self, model, tokenizer, config, clip=None, sampling=None, progress=False):
            built.append((config, clip, sampling))

        def __call__(self, video, question, seed=0):
            calls.append((video, question, seed))
            return SimpleNamespace(answer="yes", frames=[0, 1], visual_tokens=8, seconds={"decode": 0.0})

    monkeypatch.setattr(models, "create_video_vlm", lambda pretrained, checkpoint: (None, None))
    monkeypatch.setattr(models, "create_clip", lambda pretrained: pytest.fail("CLIP loaded for another selection"))
    monkeypatch.setattr(qa, "VideoQA", Recorder)
    assert main(["video-qa", "--video", "v.mp4", "--question", "Is there a bag?", "--seed", "9", "--temperature",
                 "0.5", "--top-p", "0.8", *flags]) == 0
    config, clip, sampling = built[0]
    assert {key: getattr(config, key) for key in expected} == expected and clip is None
    assert (sampling.temperature, sampling.top_p) == (0.5, 0.8) and calls == [("v.mp4", "Is there a bag?", 9)]
    assert "answer: yes" in capsys.readouterr().out


def test_ask_feeds_the_reference_vlm_the_image_as_it_was_trained(tmp_path, monkeypatch, capsys):
    """`vistok ask` turns the image grey, 56 x 56 (bilinear) and normalised with Fashion-MNIST's mean and std, as
    the reference VLM was trained, and loads the model --checkpoint and --fine say (computed here from the file
    with Pillow: a swapped mean and std, another resampling or a dropped --fine fed the model another input)."""
    from PIL import Image

    import vistok.models.reference_vlm as reference_vlm

    picture = np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "items.png")
    made, fed = [], []

    def answer(model, tokenizer, image, questions, sampling, seeds):
        fed.append((image, questions, seeds))
        return SimpleNamespace(answers=["no"], visual_tokens=36, total_seconds=0.0)

    monkeypatch.setattr(reference_vlm, "create_reference_vlm", lambda **kwargs: made.append(kwargs) or (None, None))
    monkeypatch.setattr(reference_vlm, "answer_questions", answer)
    monkeypatch.setattr(reference_vlm, "prefill_seconds", lambda *args: 0.0)
    assert main(["ask", "--image", str(tmp_path / "items.png"), "--question", "Is there a bag?", "--fine",
                 "--checkpoint", "w.safetensors", "--seed", "4"]) == 0
    assert made == [{"pretrained": False, "checkpoint": "w.safetensors", "fine": True}]
    grey = np.asarray(Image.open(tmp_path / "items.png").convert("L").resize((56, 56), Image.BILINEAR), np.float32)
    expected = (torch.from_numpy(grey / 255) - 0.2860) / 0.3530
    image, questions, seeds = fed[0]
    assert image.shape == (1, 1, 56, 56) and torch.allclose(image[0, 0], expected, atol=1e-5)
    assert questions == ["Is there a bag?"] and seeds == 4
    assert "visual tokens: 36 (all)" in capsys.readouterr().out


def test_reports_errors_turns_vistok_errors_into_status_2_and_lets_others_through(capsys):
    """A decorated main prints ``<script>: error: <message>`` and returns 2 for a VistokError; any other exception
    is a bug and keeps its traceback (caught too, it would be reported as a user's mistake)."""
    from vistok.cli import reports_errors

    def refuses(argv):
        raise vistok.InvalidConfigError("no such option")

    def breaks(argv):
        raise ZeroDivisionError("a bug")

    assert reports_errors(refuses)([]) == 2
    assert capsys.readouterr().err == f"{Path(__file__).name}: error: no such option\n"
    with pytest.raises(ZeroDivisionError):
        reports_errors(breaks)([])
    assert reports_errors(lambda argv: 0)([]) == 0


# --- the plots --------------------------------------------------------------------------------------------------


def _kept(batch, num_patches, keep, grid_size=None):
    """A layout with a class token that keeps, per image, the patches ``keep[b]`` (in that order; padded where the
    images keep fewer)."""
    layout = TokenLayout.original(torch.zeros(batch, 1 + num_patches, 4), 1, True, grid_size=grid_size)
    width = 1 + max(len(patches) for patches in keep)
    index = torch.tensor([[0] + [1 + p for p in patches] + [0] * (width - 1 - len(patches)) for patches in keep])
    valid = torch.arange(width)[None] <= torch.tensor([len(patches) for patches in keep])[:, None]
    return layout.select(index, valid)


def _scaled(x):
    """``[..., C, H, W]`` min-max scaled over all of it, as ``[..., H, W, 3]`` numpy."""
    x = (x - x.min()) / (x.max() - x.min())
    return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).movedim(-3, -1).numpy()


def test_patch_groups_give_the_position_of_the_token_carrying_each_patch():
    """A kept patch maps to the position of its token in the layout (not to its own patch index), a dropped one to
    -1."""
    layout = _kept(2, 6, [[4, 1, 5], [0, 2, 3]])
    groups = viz.patch_groups(layout, 6)
    assert groups.tolist() == [[-1, 2, -1, -1, 1, 3], [1, -1, 2, 3, -1, -1]]
    source = layout.source_index()
    for b in range(2):
        for patch in range(6):
            if groups[b, patch] >= 0:
                assert int(source[b, groups[b, patch]]) == 1 + patch


def test_overlay_draws_borders_between_rows_and_columns_of_tokens():
    """A border runs wherever neighbouring patches belong to different tokens: between the rows of a grid whose
    rows are one token each, and between the columns of one whose columns are."""
    image = np.zeros((4, 6, 3))
    rows = viz.overlay(image, np.array([0, 0, 0, 1, 1, 1]), (2, 3))
    columns = viz.overlay(image, np.array([0, 1, 2, 0, 1, 2]), (2, 3))
    is_border = [np.all(np.isclose(drawn, BORDER), axis=-1) for drawn in (rows, columns)]
    assert is_border[0].tolist() == [[False] * 6, [False] * 6, [True] * 6, [False] * 6]
    assert is_border[1].tolist() == [[False, False, True, False, True, False]] * 4


def test_overlay_grid_scales_each_image_on_its_own_and_draws_it_upright(tmp_path, monkeypatch):
    """The input column shows each image min-max scaled by itself (a dim image beside a bright one stays visible),
    rows first as stored (a transposed panel of a square image would pass a shape check), and each overlay is the
    image's own token groups drawn on it."""
    shown = []
    monkeypatch.setattr(viz, "_show", lambda axis, panel: shown.append(panel))
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    images[1] = images[1] * 100 + 50
    layout = _kept(2, 4, [[0, 3], [1, 2]], grid_size=(2, 2))
    viz.save_overlay_grid(tmp_path / "grid.png", images, {"kept": layout}, grid=(2, 2), upscale=1)
    inputs, overlays = shown[:2], shown[2:]  # column by column: the inputs, then the overlays
    for b in range(2):
        assert np.allclose(inputs[b], _scaled(images[b]), atol=1e-6)
        assert np.allclose(overlays[b], viz.overlay(_scaled(images[b]), viz.patch_groups(layout, 4)[b].numpy(),
                                                    (2, 2)))


def test_clip_overlay_draws_the_clips_own_tokens_on_the_frames_of_their_slice(tmp_path, monkeypatch):
    """Frame f of a clip shows the tokens of tubelet slice f // tubelet_frames of clip ``index`` of the batch, all
    frames on one scale (a clip's frames are compared with each other)."""
    shown = []
    monkeypatch.setattr(viz, "_show", lambda axis, panel: shown.append(panel))
    # clip 1 keeps patch 0 of slice 0 and the other three of slice 1
    layout = _kept(2, 8, [[0, 1, 2, 3, 4, 5, 6, 7], [0, 5, 6, 7]], grid_size=(2, 2, 2))
    clip = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    clip[3] *= 3  # a bright last frame: scaled on its own, the others would look alike
    viz.save_clip_overlay(tmp_path / "clip.png", clip, {"kept": layout}, tubelet_frames=2, index=1, upscale=1)
    frames = _scaled(clip)
    groups = viz.patch_groups(layout, 8)[1].reshape(2, 4).numpy()
    assert len(shown) == 8
    for f in range(4):
        assert np.allclose(shown[f], frames[f], atol=1e-6)
        assert np.allclose(shown[4 + f], viz.overlay(frames[f], groups[f // 2], (2, 2)))


def test_page_budget_lays_the_crops_out_in_their_grid_and_dims_what_is_dropped(tmp_path, monkeypatch):
    """Crop v of a 2 x 3 grid is drawn at row (v - 1) // 3, column 1 + (v - 1) % 3 beside the global view, titled
    with its place; on a 2 x 4 patch grid only the kept patches keep their pixels (row-major, as the tower numbers
    its patches)."""
    placed = []
    monkeypatch.setattr(viz, "_show", lambda axis, panel: placed.append((axis, panel)))
    views = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    kept = [torch.arange(8)] * 6 + [torch.tensor([1, 6])]
    viz.save_page_budget(tmp_path / "page.png", views, (2, 3), (2, 4), kept, torch.full((7,), 8))
    panels = _scaled(views)
    for v, (axis, panel) in enumerate(placed):
        spec = axis.get_subplotspec()
        if v == 0:
            assert axis.get_title().startswith("global") and spec.colspan.start == 0 and len(spec.rowspan) == 2
            continue
        row, column = (v - 1) // 3, (v - 1) % 3
        assert axis.get_title().startswith(f"crop {row},{column}:")
        assert (spec.rowspan.start, spec.colspan.start) == (row, 1 + column)
        if v < 6:
            assert np.allclose(panel, panels[v], atol=1e-6)
    last = placed[6][1]
    same = np.all(np.isclose(last, panels[6], atol=1e-6), axis=-1)
    expected = np.zeros((8, 8), dtype=bool)
    expected[0:4, 2:4] = expected[4:8, 4:6] = True  # patch 1: row 0, column 1; patch 6: row 1, column 2
    assert np.array_equal(same, expected)


def test_pareto_plot_draws_one_sorted_line_per_method_and_the_baseline_as_a_star(tmp_path, monkeypatch):
    """Top-1 (y) against GFLOPs (x): each method one line labelled with its name, points in increasing GFLOPs
    whatever the rows' order; the unpatched model a black star; the file written, its missing folders made."""
    from matplotlib.figure import Figure

    figures, save = [], viz._save
    monkeypatch.setattr(viz, "_save", lambda plt, figure, path, dpi: figures.append(figure) or save(plt, figure,
                                                                                                     path, dpi))
    rows = [{"method": "merge", "gflops": 3.0, "top1": 70.0, "label": "r=4"},
            {"method": "unpatched", "gflops": 4.6, "top1": 80.0, "label": "-"},
            {"method": "merge", "gflops": 1.5, "top1": 50.0, "label": "r=16"},
            {"method": "ats", "gflops": 2.0, "top1": 60.0, "label": "k=40"},
            {"method": "merge", "gflops": 2.2, "top1": 65.0, "label": "r=8"}]
    path = viz.save_pareto_plot(tmp_path / "plots" / "new" / "pareto.png", rows, unit="clip")
    assert path == tmp_path / "plots" / "new" / "pareto.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = figures[0]
    assert isinstance(figure, Figure)
    axis = figure.axes[0]
    lines = {line.get_label(): line for line in axis.get_lines()}
    assert set(lines) == {"merge", "ats", "unpatched"}
    assert list(lines["merge"].get_xdata()) == [1.5, 2.2, 3.0] and list(lines["merge"].get_ydata()) == [50, 65, 70]
    assert list(lines["ats"].get_xdata()) == [2.0] and list(lines["ats"].get_ydata()) == [60.0]
    star = lines["unpatched"]
    assert star.get_marker() == "*" and (list(star.get_xdata()), list(star.get_ydata())) == ([4.6], [80.0])
    assert "GFLOPs per clip" in axis.get_xlabel() and "top-1" in axis.get_ylabel()
    assert sorted(text.get_text() for text in axis.get_legend().get_texts()) == ["ats", "merge", "unpatched"]


# --- the datasets -----------------------------------------------------------------------------------------------


def _write_idx(path, values, compress=False):
    header = bytes([0, 0, 8, values.ndim]) + b"".join(side.to_bytes(4, "big") for side in values.shape)
    with (gzip.open if compress else open)(path, "wb") as handle:
        handle.write(header + values.astype(np.uint8).tobytes())


def _tiny_fashion_mnist(folder, compress_test=False, offset=0):
    """Both splits of a Fashion-MNIST copy of 3 (train) and 2 (test) images with distinct pixels and labels."""
    folder.mkdir(parents=True)
    made = {}
    for split, count in (("train", 3), ("test", 2)):
        images = np.arange(count * 784).reshape(count, 28, 28) % 251 + (offset if split == "train" else 3)
        labels = np.arange(count)[::-1] + (0 if split == "train" else 5)
        names = vdata._FILES[split]
        gz = compress_test and split == "test"
        _write_idx(folder / (names[0] + (".gz" if gz else "")), images, gz)
        _write_idx(folder / (names[1] + (".gz" if gz else "")), labels, gz)
        made[split] = (images, labels)
    return made


def test_vistok_data_is_read_before_the_other_copies(tmp_path, monkeypatch):
    """$VISTOK_DATA is looked in before the vistok cache and Debian's package, its test split read from ``.gz``
    files beside plain ones; the images and labels are the files' own, in order."""
    made = _tiny_fashion_mnist(tmp_path / "mine", compress_test=True)
    _tiny_fashion_mnist(tmp_path / "home" / ".cache" / "vistok" / "fashion-mnist", offset=1)  # looked in later
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VISTOK_DATA", str(tmp_path / "mine"))
    assert vdata.find_fashion_mnist() == tmp_path / "mine"
    for split in ("train", "test"):
        images, labels = vdata.load_fashion_mnist(split)
        assert np.array_equal(images.numpy(), made[split][0]) and labels.tolist() == made[split][1].tolist()
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64


def test_idx_files_of_another_type_or_cut_short_are_refused(tmp_path):
    """An idx file of another element type (not unsigned bytes) or holding fewer values than its header says is
    refused by name, not read as garbage or reshaped with a numpy error."""
    _tiny_fashion_mnist(tmp_path / "copy")
    labels = tmp_path / "copy" / "train-labels-idx1-ubyte"
    labels.write_bytes(bytes([0, 0, 9, 1]) + (3).to_bytes(4, "big") + bytes(3))  # 0x09: signed bytes
    with pytest.raises(vistok.VistokError, match="is not an unsigned-byte idx file"):
        vdata.load_fashion_mnist("train", tmp_path / "copy")
    labels.write_bytes(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes(2))
    with pytest.raises(vistok.VistokError, match="is truncated: expected 3 values, found 2"):
        vdata.load_fashion_mnist("train", tmp_path / "copy")


def test_augmentation_shifts_reach_every_offset_up_to_pad():
    """Shifts are drawn from -pad to +pad pixels, both ends included, in rows and columns."""
    images = torch.zeros(64, 28, 28, dtype=torch.uint8)
    images[:, 14, 14] = 255
    moved = vdata.GreyBatchTransform(augment=True, seed=0, flip=False, pad=2)(images)[:, 0].flatten(1).argmax(1)
    assert set((moved // 28 - 14).tolist()) == set((moved % 28 - 14).tolist()) == {-2, -1, 0, 1, 2}


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_folder_images_are_resized_as_asked(tmp_path, interpolation):
    """image_folder_dataset resizes with the interpolation asked for (the model's pretrained config's: bicubic for
    most ViTs), here 40 px images to 28 px: the result is Pillow's own resize of the file with it."""
    from PIL import Image

    (tmp_path / "train" / "bag").mkdir(parents=True)
    picture = np.random.default_rng(3).integers(0, 256, (40, 40), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "train" / "bag" / "0.png")
    dataset = vdata.image_folder_dataset(tmp_path, "train", 28, False, (0.0,), (1.0,), interpolation=interpolation,
                                         crop_pct=1.0, channels=1)
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation]
    expected = np.asarray(Image.fromarray(picture).resize((28, 28), resample), dtype=np.float32) / 255
    assert torch.allclose(dataset[0][0][0], torch.from_numpy(expected), atol=1.5 / 255)


def test_float_greys_outside_0_1_and_class_folders_without_images_are_refused(tmp_path):
    """read_image refuses float greys past white (they would wrap around in 8 bits), naming the file; a class
    folder without an image file is refused (as ImageFolder does), not left a class no image has."""
    from PIL import Image

    Image.fromarray(np.full((8, 8), 1.5, np.float32), "F").save(tmp_path / "wide.tif")
    with pytest.raises(vistok.InputShapeError, match=r"wide.tif: F grey levels from 1.5 to 1.5 are outside \[0, 1\]"):
        vdata.read_image(tmp_path / "wide.tif", "L")
    for name in ("bag", "coat"):
        (tmp_path / "images" / name).mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "images" / "bag" / "0.png")
    (tmp_path / "images" / "coat" / "notes.txt").write_text("no image")
    with pytest.raises(FileNotFoundError, match="Found no valid file for the classes coat"):
        vdata.image_folder(tmp_path / "images", None, vdata.image_loader(1))
