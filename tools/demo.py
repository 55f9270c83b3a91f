#!/usr/bin/env python
"""The main job: vistok on the shipped reference model with registers (``vistok_vit_fmnist_reg4``, the one that
meets the accuracy target) and the real Fashion-MNIST test images.

Prints top-1 (whole test set), GFLOPs per image (averaged over the first 256 test images, each counted on its own;
``--flops-images``) and images/s (batch 32, or --limit when fewer; the four timed interleaved in one loop) for
the unpatched model, ATS, ATS with fusion and token merging; then runs the tuner (vistok.tune) at 0.5x GFLOPs on
Fashion-MNIST training images, measures its pick on the test set and sets it beside the best point of the
committed sweep at that cost; writes the token-overlay PNG and the accuracy-vs-compute (Pareto) plot of the
committed sweep (results/sweep_reg4.csv: every method and both baselines, and results/sweep_fusion_reg4.csv: ATS
with fusion):

    python tools/demo.py                    # the whole test set (a few minutes on 2 cores)
    python tools/demo.py --limit 2000       # quicker
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
from pathlib import Path

import timm
import torch

import vistok
from vistok.cli import count, reports_errors
from vistok.data import GreyBatchTransform, fashion_mnist_dataset, load_fashion_mnist
from vistok.experiment import batches
from vistok.measure import count_flops, time_models
from vistok.measure.accuracy import evaluate
from vistok.viz import save_overlay_grid, save_pareto_plot

ROOT = Path(__file__).resolve().parents[1]
MODEL = "vistok_vit_fmnist_reg4"
SWEEPS = {"vistok_vit_fmnist_reg4": ["sweep_reg4.csv", "sweep_fusion_reg4.csv"],
          "vistok_vit_fmnist": ["sweep.csv", "sweep_fusion.csv"]}  # the committed sweeps of each reference model
VARIANTS = [("unpatched", None, {}), ("ATS k=108", "ats", {"k": 108}),
            ("ATS+fusion k=108", "ats", {"k": 108, "fusion": True}), ("merge r=12", "merge", {"r": 12})]


def read_sweeps(paths: list[Path]) -> list[dict]:
    """The rows of the sweep CSVs that exist, the unpatched row once."""
    rows: list[dict] = []
    for path in paths:
        if not path.is_file():
            print(f"no sweep at {path}; run tools/sweep.py to make one")
            continue
        with open(path) as handle:
            for row in csv.DictReader(handle):
                if row["method"] == "unpatched" and any(r["method"] == "unpatched" for r in rows):
                    continue
                rows.append(dict(row, gflops=float(row["gflops"]), top1=float(row["top1"]),
                                 gflops_ratio=float(row["gflops_ratio"])))
    return rows


def best_swept(rows: list[dict], target: float) -> dict | None:
    """The sweep's most accurate patched point within ``target`` times the unpatched GFLOPs."""
    within = [r for r in rows if r["method"] != "unpatched" and r["gflops_ratio"] <= target]
    return max(within, key=lambda r: r["top1"], default=None)


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=count, default=None, help="use the first N test images (default: all)")
    parser.add_argument("--out", default="out/demo", help="folder for the PNGs")
    parser.add_argument("--model", default=MODEL, choices=sorted(SWEEPS), help="a reference model vistok ships")
    parser.add_argument("--sweep", nargs="*", default=None, help="sweep CSVs to plot (default: the model's)")
    parser.add_argument("--target", type=float, default=0.5, help="the tuner's GFLOPs target")
    parser.add_argument("--calibration", type=count, default=500, help="training images the tuner scores on")
    parser.add_argument("--flops-images", type=count, default=256, help="test images the GFLOPs are averaged over "
                        "(each counted on its own)")
    args = parser.parse_args(argv)
    if args.calibration < 4:  # the tuner's three rungs score a quarter, a half and all of them
        parser.error(f"--calibration must be at least 4 images, got {args.calibration}")
    if not 0 < args.target <= 1:  # before the evaluations, not after them in the tuner
        parser.error(f"--target must be a GFLOPs ratio in (0, 1], got {args.target:g}")
    if args.sweep is None:
        args.sweep = [str(ROOT / "results" / name) for name in SWEEPS[args.model]]
    test_set = fashion_mnist_dataset("test")
    train_images, _ = load_fashion_mnist("train")
    if args.limit:
        test_set = torch.utils.data.Subset(test_set, range(min(args.limit, len(test_set))))
    transform = GreyBatchTransform()
    out = Path(args.out)
    model = timm.create_model(args.model, pretrained=True).eval()
    first = transform(torch.stack([test_set[i][0] for i in range(min(max(args.flops_images, 32), len(test_set)))]))
    counted, sample = first[: args.flops_images], first[:32]  # GFLOPs are counted on one, speed timed on the other

    def test_top1() -> dict:
        return evaluate(model, batches(test_set, 500), transform, progress=True, total=-(-len(test_set) // 500))

    print(f"vistok demo: reference ViT (models/{args.model}) on {len(test_set)} Fashion-MNIST test images")
    layouts, rows, timed = {}, [], {}
    for label, method, options in VARIANTS:
        timed[label] = copy.deepcopy(model)  # timed below, patched without the overlay's source tracing
        if method:
            vistok.patch(timed[label], method, **options)
        handle = vistok.patch(model, method, **options, trace_source=True) if method else None
        result = test_top1()
        tokens = result.get("tokens_per_block", [float(model.patch_embed.num_patches + model.num_prefix_tokens)])
        rows.append((label, result["top1"], count_flops(model, counted) / 1e9, sum(tokens) / len(tokens)))
        if handle is not None:
            with torch.no_grad():
                model(sample[:6])
            layouts[label] = handle.layouts[len(model.blocks) - 1]
            handle.remove()
    speeds = time_models(timed, sample, warmup=1, runs=5)  # interleaved in one loop: the ratios share the machine
    print(f"{'variant':<18}{'top-1 %':>9}{'GFLOPs/img':>12}{'img/s':>9}{'tokens/block':>14}")
    top1_0, gflops_0, speed_0 = rows[0][1], rows[0][2], speeds[rows[0][0]].images_per_s
    for label, top1, gflops, tokens in rows:
        speed = speeds[label].images_per_s
        print(f"{label:<18}{top1:>9.2f}{gflops:>12.3f}{speed:>9.0f}{tokens:>14.1f}   ({top1 - top1_0:+.2f} top-1, "
              f"{gflops / gflops_0:.2f}x GFLOPs, {speed / speed_0:.2f}x speed)")
    overlay = save_overlay_grid(out / "tokens.png", sample[:6], layouts, grid=(14, 14))
    print(f"token overlay: {overlay}")

    calibration = transform(train_images[: args.calibration])
    tuned = vistok.tune(model, calibration, target=args.target)
    with vistok.patch(model, tuned.config):
        picked = test_top1()["top1"]
    print(f"tuner at {args.target:g}x GFLOPs ({args.calibration} training images, {tuned.seconds:.0f} s, "
          f"{len(tuned.rows)} candidates): {tuned.best['label']} ({tuned.best['gflops_ratio']:.2f}x GFLOPs) -> "
          f"{picked:.2f} % top-1 on {len(test_set)} test images ({picked - top1_0:+.2f} vs unpatched)")
    rows = read_sweeps([Path(p) for p in args.sweep])
    best = best_swept(rows, args.target)
    if best is not None and not args.limit:
        print(f"best swept point within {args.target:g}x GFLOPs: {best['method']} {best['label']} "
              f"({best['gflops_ratio']:.2f}x) {best['top1']:.2f} % on the whole test set -> the tuner's pick is "
              f"{picked - best['top1']:+.2f} points from it")
    elif best is not None:  # other images: compare each with its own unpatched model, not the two accuracies
        print(f"best swept point within {args.target:g}x GFLOPs: {best['method']} {best['label']} "
              f"({best['gflops_ratio']:.2f}x) {float(best['top1_change']):+.2f} vs unpatched on the whole test set; "
              f"the tuner's pick {picked - top1_0:+.2f} vs unpatched on the first {len(test_set)} (--limit: not the "
              "same images)")
    if rows:
        plot = save_pareto_plot(out / "pareto.png", rows, f"{args.model}, FMNIST test")
        print(f"Pareto plot of {', '.join(args.sweep)}: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
