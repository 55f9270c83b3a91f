#!/usr/bin/env python
"""Evaluate a model, unpatched or with a vistok method: top-1/top-5 on the whole validation set, tokens kept
per block (averaged over every image), GFLOPs per image (averaged over the first ``eval.flops_images``
images, each counted on its own), and images/s.

    python tools/eval.py pretrained=true                              # the shipped reference model
    python tools/eval.py pretrained=true method=ats method_options.k=60
    python tools/eval.py --config configs/eval_fmnist_ats.yaml --json out/ats.json
    python tools/eval.py model=deit_small_patch16_224 pretrained=true data.name=folder data.root=/imagenet
    python tools/eval.py --config configs/kinetics400_videomae_eval.yaml data.root=/data/kinetics400   # 5 x 3 views
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import vistok
from vistok._checks import is_int
from vistok.cli import check_writable
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
from vistok.measure import count_flops, time_models
from vistok.measure.accuracy import evaluate

DEFAULTS = {
    **MODEL_DEFAULTS,
    "data": {**DATA_DEFAULTS, "augment": False},
    "eval": {"batch_size": 500, "flops_images": 1000, "throughput_batch": 32, "throughput_runs": 5, "threads": 0},
}


def run_eval(config: dict, progress: bool = True) -> dict:
    """The evaluation of one config, as a JSON-ready dict."""
    settings = config["eval"]
    for key in ("batch_size", "flops_images", "throughput_batch", "throughput_runs"):  # before the long pass
        if not is_int(settings[key], 1):
            raise ConfigError(f"eval.{key} must be an int >= 1, got {settings[key]!r}")
    if not is_int(settings["threads"], 0):
        raise ConfigError(f"eval.threads must be an int >= 0 (0: torch's default), got {settings['threads']!r}")
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    _, val_set, _, transform = build_data(config["data"], train=False, model=config)
    config = fit_head_to_data(config, val_set)  # a class-folder dataset: a head of its class count
    check_head_is_trained(config, "eval.py")
    model = build_model(config)
    check_model_classes(model, val_set, config, "eval.py")
    if config["data"]["name"] != "video":
        check_model_takes_images(model, val_set, transform, "eval.py")
    model = wrap_for_data(model, config["data"]).eval()
    prepare = transform or (lambda images: images)
    labelled = batches(val_set, settings["batch_size"], workers=config["data"]["workers"])
    result = evaluate(model, labelled, prepare, progress=progress, total=len(labelled))
    if config["data"]["name"] == "video":  # test views are averaged; unreadable clips skipped and counted
        result["skipped_clips"] = labelled.skipped
        result["views"] = config["data"]["test_clips"] * config["data"]["test_crops"]
    flops_batches = [prepare(images) for images in first_inputs(val_set, settings["batch_size"],
                                                                settings["flops_images"])]
    result["gflops"] = count_flops(model, flops_batches) / 1e9
    result["flops_images"] = sum(b.shape[0] for b in flops_batches)
    size = settings["throughput_batch"]
    sample = prepare(torch.cat(first_inputs(val_set, size, size)))  # flops_images may be fewer
    timing = time_models({"model": model}, sample, warmup=1, runs=settings["throughput_runs"])["model"]
    result["images_per_s"] = timing.images_per_s
    result["throughput_batch"] = sample.shape[0]
    result.update(model=config["model"], method=config["method"], method_options=config["method_options"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (configs/eval_*.yaml)")
    parser.add_argument("--json", default=None, help="write the result here")
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings over the config")
    args = parser.parse_intermixed_args(argv)
    try:
        config = load_config(DEFAULTS, args.config, parse_overrides(args.overrides), UNSET_KINDS)
        if args.json:
            check_writable("--json", Path(args.json))  # before the evaluation, not after it
        result = run_eval(config)
    except vistok.VistokError as error:
        print(f"eval.py: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
