#!/usr/bin/env python
"""The main job: vistok on the shipped reference model and the real Fashion-MNIST test images.

Prints top-1 (whole test set), GFLOPs per image (averaged over the first 256 test images, each counted on
its own) and images/s (batch 32) for the unpatched model, ATS and token merging, and writes the token-overlay
PNG and the accuracy-vs-compute (Pareto) plot of the committed sweep (results/sweep.csv):

    python tools/demo.py                    # the whole test set (a few minutes on 2 cores)
    python tools/demo.py --limit 2000       # quicker
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import timm
import torch

import vistok
from vistok.data import GreyBatchTransform, fashion_mnist_dataset
from vistok.experiment import batches
from vistok.measure import count_flops, time_models
from vistok.measure.accuracy import evaluate
from vistok.viz import save_overlay_grid, save_pareto_plot

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [("unpatched", None, {}), ("ATS k=48", "ats", {"k": 48}), ("merge r=12", "merge", {"r": 12})]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="use the first N test images (default: all)")
    parser.add_argument("--out", default="out/demo", help="folder for the PNGs")
    parser.add_argument("--sweep", default=str(ROOT / "results" / "sweep.csv"), help="sweep CSV to plot")
    args = parser.parse_args(argv)
    try:
        test_set = fashion_mnist_dataset("test")
    except vistok.VistokError as error:
        print(f"demo.py: error: {error}", file=sys.stderr)
        return 2
    if args.limit:
        test_set = torch.utils.data.Subset(test_set, range(args.limit))
    transform = GreyBatchTransform()
    out = Path(args.out)
    model = timm.create_model("vistok_vit_fmnist", pretrained=True).eval()
    counted = transform(torch.stack([test_set[i][0] for i in range(min(256, len(test_set)))]))
    sample = counted[:32]

    print(f"vistok demo: reference ViT (models/vistok_vit_fmnist) on {len(test_set)} Fashion-MNIST test images")
    print(f"{'variant':<14}{'top-1 %':>9}{'GFLOPs/img':>12}{'img/s':>9}{'tokens/block':>14}")
    layouts, baseline = {}, None
    for label, method, options in VARIANTS:
        handle = vistok.patch(model, method, **options, trace_source=True) if method == "merge" else \
            vistok.patch(model, method, **options) if method else None
        result = evaluate(model, batches(test_set, 500), transform, progress=True,
                          total=-(-len(test_set) // 500))
        gflops = count_flops(model, counted) / 1e9
        speed = time_models({label: model}, sample, warmup=1, runs=5)[label].images_per_s
        tokens = result.get("tokens_per_block", [197.0])
        baseline = baseline or (result["top1"], gflops, speed)
        print(f"{label:<14}{result['top1']:>9.2f}{gflops:>12.3f}{speed:>9.0f}{sum(tokens) / len(tokens):>14.1f}"
              f"   ({result['top1'] - baseline[0]:+.2f} top-1, {gflops / baseline[1]:.2f}x GFLOPs, "
              f"{speed / baseline[2]:.2f}x speed)")
        if handle is not None:
            with torch.no_grad():
                model(sample[:6])
            layouts[label] = handle.layouts[len(model.blocks) - 1]
            handle.remove()
    overlay = save_overlay_grid(out / "tokens.png", sample[:6], layouts, grid=(14, 14))
    print(f"token overlay: {overlay}")
    sweep = Path(args.sweep)
    if sweep.is_file():
        with open(sweep) as handle:
            rows = [dict(row, gflops=float(row["gflops"]), top1=float(row["top1"])) for row in csv.DictReader(handle)]
        print(f"Pareto plot of {sweep}: {save_pareto_plot(out / 'pareto.png', rows, 'reference ViT, FMNIST test')}")
    else:
        print(f"no sweep at {sweep}; run tools/sweep.py to make one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
