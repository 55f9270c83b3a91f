#!/usr/bin/env python
"""Accuracy vs compute of the reference model (or any model/dataset in the config) on the whole test set:
unpatched; ATS at several k (as in the paper: at most k tokens, fewer where the scores are concentrated), and
ATS with a fixed budget (``min_tokens = k``: exactly k), also with fusion (``sweep.ats_fusion_k``: the tokens not
sampled merge into the kept ones); merging at several r; and two baselines -- random token
dropping at the same counts, and the unpatched model on downsampled input (images) or on fewer frames (video:
``sweep.num_frames`` sets ``data.num_frames`` and ``model_kwargs.num_frames``). Writes a CSV and a Pareto plot
(top-1 vs GFLOPs).

    python tools/sweep.py --out results/sweep                    # configs/sweep_fmnist.yaml
    python tools/sweep.py --config configs/sweep_fmnist.yaml sweep.ats_k=[64,32] --out results/quick
    python tools/sweep.py --config configs/sweep_fmnist_video.yaml --out results/sweep_video   # the video model
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import vistok
from vistok._checks import is_int
from vistok.cli import beside, check_writable
from vistok.config import ConfigError, load_config, parse_overrides
from vistok.experiment import (
    DATA_DEFAULTS,
    MODEL_DEFAULTS,
    UNSET_KINDS,
    batches,
    build_data,
    build_model,
    check_head_is_trained,
    check_model_classes,
    check_model_takes_images,
    first_inputs,
    fit_head_to_data,
    wrap_for_data,
)
from vistok.measure import count_flops, tokens_per_block
from vistok.measure.accuracy import evaluate
from vistok.viz import save_pareto_plot

DEFAULTS = {
    **MODEL_DEFAULTS,
    "data": {**DATA_DEFAULTS, "augment": False},
    "sweep": {"ats_k": [108, 64, 32], "ats_fixed_k": [], "ats_fusion_k": [],
              "ats_blocks": [3, 4, 5, 6, 7, 8, 9, 10, 11], "merge_r": [8, 16], "random_k": [108, 64, 32],
              "input_sizes": [24, 20], "num_frames": [],
              "batch_size": 500, "flops_images": 500},
}


def variants(sweep: dict) -> list[dict]:
    """Every point of the sweep: a label, the method and options, the input size (None: native)."""
    blocks = sweep["ats_blocks"]
    points = [{"method": "unpatched", "label": "full", "patch": None, "size": None}]
    points += [{"method": "ats", "label": f"k={k}", "patch": ("ats", {"k": k, "blocks": blocks}), "size": None}
               for k in sweep["ats_k"]]
    points += [{"method": "ats_fixed", "label": f"k={k}", "patch": ("ats", {"k": k, "min_tokens": k, "blocks": blocks}),
                "size": None} for k in sweep["ats_fixed_k"]]
    points += [{"method": "ats_fusion", "label": f"k={k}",
                "patch": ("ats", {"k": k, "min_tokens": k, "blocks": blocks, "fusion": True}), "size": None}
               for k in sweep["ats_fusion_k"]]
    points += [{"method": "merge", "label": f"r={r}", "patch": ("merge", {"r": r}), "size": None}
               for r in sweep["merge_r"]]
    points += [{"method": "random_drop", "label": f"k={k}", "patch": ("random_drop", {"k": k, "blocks": blocks}),
                "size": None} for k in sweep["random_k"]]
    points += [{"method": "downsample", "label": f"{s}px", "patch": None, "size": s} for s in sweep["input_sizes"]]
    points += [{"method": "fewer_frames", "label": f"{t} frames", "patch": None, "size": None, "frames": t}
               for t in sweep["num_frames"]]
    return points


def run_point(config: dict, point: dict, val_set, transform) -> dict:
    settings = config["sweep"]
    model_config = dict(config, method=None)
    if point["size"] is not None:
        model_config["model_kwargs"] = {**config["model_kwargs"], "dynamic_img_size": True}
    if "frames" in point:
        model_config["model_kwargs"] = {**config["model_kwargs"], "num_frames": point["frames"]}
    torch.manual_seed(0)  # whatever is not loaded (random weights, a head for other classes) is the same at each point
    model = build_model(model_config).eval()
    check_model_classes(model, val_set, config, "sweep.py")  # before its evaluation (the first: before any)
    if point["size"] is None and config["data"]["name"] != "video":
        check_model_takes_images(model, val_set, transform, "sweep.py")
    if point["patch"] is not None:
        vistok.patch(model, point["patch"][0], **point["patch"][1])
    model = wrap_for_data(model, config["data"])
    size = point["size"]

    def prepare(images: torch.Tensor) -> torch.Tensor:
        x = transform(images) if transform else images
        return x if size is None else F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                                    align_corners=False)

    labelled = batches(val_set, settings["batch_size"], workers=config["data"]["workers"])
    result = evaluate(model, labelled, prepare, progress=True, total=len(labelled))
    counted = [prepare(images) for images in first_inputs(val_set, settings["batch_size"], settings["flops_images"])]
    result["gflops"] = count_flops(model, counted) / 1e9
    result["flops_images"] = sum(batch.shape[0] for batch in counted)
    tokens = result.pop("tokens_per_block", None) or tokens_per_block(model, counted[0])  # unpatched: every token
    result["mean_tokens"] = sum(tokens) / len(tokens)
    return {"method": point["method"], "label": point["label"], **result}


def check_points(config: dict, points: list[dict]) -> None:
    """Every point's settings, before the first evaluation: each method's options are patched onto the model
    built on the meta device (no weights, nothing run), and each fewer-frames model is built there, so a bad ``k``,
    block or frame count is found now, not after the points before it.

    Raises:
        ConfigError: an input size or frame count that is not an int >= 1, or an input size the patch size does
            not divide.
        VistokError: a method option the method or the model refuses.
    """
    for point in points:
        for key, name in (("size", "input_sizes"), ("frames", "num_frames")):
            if point.get(key) is not None and not is_int(point[key], 1):
                raise ConfigError(f"sweep.{name} must hold ints >= 1, got {point[key]!r}")
    sizes = [point["size"] for point in points if point["size"] is not None]
    patched = [point for point in points if point["patch"] is not None]
    frames = [point["frames"] for point in points if point.get("frames") is not None]
    if config["model"].startswith("hf:") and config["pretrained"]:
        return  # a pretrained Hugging Face model's architecture is in its files: checked as each point patches it

    def on_meta(**model_kwargs) -> torch.nn.Module:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # weights a model loads as it is built (a video model's image weights)
            return build_model({**config, "method": None, "checkpoint": None, "pretrained": False,
                                "model_kwargs": {**config["model_kwargs"], **model_kwargs}})

    if patched:
        model = on_meta()
        for point in patched:
            vistok.patch(model, point["patch"][0], **point["patch"][1]).remove()
    if sizes:  # the downsampled inputs must cut into whole patches
        embed = getattr(on_meta(dynamic_img_size=True), "patch_embed", None)
        patch = None if getattr(embed, "dynamic_img_pad", False) else getattr(embed, "patch_size", None)  # pads
        uneven = [size for size in sizes if patch is not None and (size % patch[0] or size % patch[1])]
        if uneven:
            raise ConfigError(f"sweep.input_sizes {uneven} are not multiples of the model's patch size "
                              f"{tuple(patch)}: the downsampled images would not cut into whole patches")
    for count in frames:  # the model for fewer frames (a count its tubelets must divide)
        on_meta(num_frames=count)


def write_rows(out: Path, rows: list[dict]) -> None:
    """``rows`` (the unpatched row first) with their GFLOPs ratio and top-1 change to it, as ``<out>.csv``."""
    base = rows[0]
    rows = [{**row, "gflops_ratio": row["gflops"] / base["gflops"], "top1_change": row["top1"] - base["top1"]}
            for row in rows]
    with open(beside(out, ".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sweep_fmnist.yaml")
    parser.add_argument("--out", required=True, help="output prefix: <out>.csv (rewritten as each point finishes) "
                                                     "and <out>.png")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    out = Path(args.out)
    if out.is_dir() or beside(out, ".csv").is_dir():
        parser.error(f"--out {out} is a folder; give a prefix such as {out / 'sweep'}")
    try:
        for written in (beside(out, ".csv"), beside(out, ".png")):  # the plot was refused after every point
            check_writable("--out", written)
        config = load_config(DEFAULTS, args.config, parse_overrides(args.overrides), UNSET_KINDS)
        if config["method"] is not None or config["method_options"]:
            raise ConfigError("the sweep patches each point with its own method (sweep.*); method and "
                              "method_options do not apply to it")
        if config["data"]["name"] == "video" and config["sweep"]["input_sizes"]:
            raise ConfigError("sweep.input_sizes (the downsampled-input baseline) is for images; set it to [] for "
                              "video")
        if config["data"]["name"] != "video" and config["sweep"]["num_frames"]:
            raise ConfigError("sweep.num_frames (the fewer-frames baseline) is for video data")
        for key in ("batch_size", "flops_images"):  # before the first point's evaluation
            if not is_int(config["sweep"][key], 1):
                raise ConfigError(f"sweep.{key} must be an int >= 1, got {config['sweep'][key]!r}")
        _, val_set, _, transform = build_data(config["data"], train=False, model=config)
        config = fit_head_to_data(config, val_set)  # a class-folder dataset: a head of its class count
        check_head_is_trained(config, "sweep.py")
        points = variants(config["sweep"])
        check_points(config, points)
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        for point in points:
            if "frames" in point:
                _, frames_set, _, _ = build_data({**config["data"], "num_frames": point["frames"]}, train=False,
                                                 model=config)
                rows.append(run_point(config, point, frames_set, transform))
            else:
                rows.append(run_point(config, point, val_set, transform))
            print(json.dumps(rows[-1]), flush=True)
            write_rows(out, rows)  # an interrupted sweep keeps the points it finished
    except vistok.VistokError as error:
        print(f"sweep.py: error: {error}", file=sys.stderr)
        return 2
    save_pareto_plot(beside(out, ".png"), rows, title=f"{config['model']} on {config['data']['name']} (test set)",
                     unit="clip" if config["data"]["name"] == "video" else "image")
    print(f"wrote {beside(out, '.csv')} and {beside(out, '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
