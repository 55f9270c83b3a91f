#!/usr/bin/env python
"""The tuner (vistok.tune) on a reference model: pick a method within each GFLOPs target on Fashion-MNIST
training images (the calibration batch), then measure the pick's top-1 on the whole test set beside the
unpatched model's. Writes <out>_<model>.json (and the tuner's own <out>_<model>_<target>.json / .png per target).

    python tools/tune_reference.py --model vistok_vit_fmnist --images 2000 --targets 0.5 0.7 --out results/tune
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch

import vistok
from vistok.cli import check_writable, count, count_or_zero, fraction, reports_errors
from vistok.data import GreyBatchTransform, load_fashion_mnist
from vistok.measure.accuracy import evaluate


def test_top1(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    batches = [(images[i: i + batch_size], labels[i: i + batch_size]) for i in range(0, len(images), batch_size)]
    return evaluate(model, batches, GreyBatchTransform())["top1"]


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vistok_vit_fmnist")
    parser.add_argument("--images", type=count, default=2000, help="calibration images (training split)")
    parser.add_argument("--targets", nargs="+", type=fraction, default=[0.5, 0.7], help="GFLOPs ratios in (0, 1]")
    parser.add_argument("--flops-images", type=count, default=8)
    parser.add_argument("--test-images", type=count, default=10000)
    parser.add_argument("--out", default="results/tune")
    parser.add_argument("--threads", type=count_or_zero, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    for target in args.targets:  # every file it writes, before the model loads
        for suffix in (f"_{target:g}.json", f"_{target:g}.png"):
            check_writable("--out", Path(f"{out}_{args.model}{suffix}"))
    check_writable("--out", Path(f"{out}_{args.model}.json"))
    if args.threads:
        torch.set_num_threads(args.threads)
    model = timm.create_model(args.model, pretrained=True).eval()
    train_images, _ = load_fashion_mnist("train")
    calibration = GreyBatchTransform()(train_images[: args.images])
    test_images, test_labels = load_fashion_mnist("test")
    test_images, test_labels = test_images[: args.test_images], test_labels[: args.test_images]
    report = {"model": args.model, "calibration_images": args.images,
              "unpatched_test_top1": test_top1(model, test_images, test_labels), "targets": []}
    for target in args.targets:
        result = vistok.tune(model, calibration, target=target, flops_images=args.flops_images, progress=True)
        result.save(f"{out}_{args.model}_{target:g}.json")
        result.plot(f"{out}_{args.model}_{target:g}.png")
        with vistok.patch(model, result.config):
            top1 = test_top1(model, test_images, test_labels)
        entry = {"target": target, "pick": result.best["label"], "gflops_ratio": result.best["gflops_ratio"],
                 "calibration_agreement": result.best["score"], "test_top1": top1,
                 "tuner_seconds": result.seconds, "images_scored": result.images_scored,
                 "candidates": len(result.rows)}
        report["targets"].append(entry)
        print(json.dumps(entry), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}_{args.model}.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out}_{args.model}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
