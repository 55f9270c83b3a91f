#!/usr/bin/env python
"""The figures of the vision issues, each measured in one run (patched and unpatched in the same process,
timing interleaved), CPU, fp32, random init, batch 32:

    python tools/benchmark.py ats           # ViT-S/B: ATS k=108 in blocks 3..11, and keep-everything ATS
    python tools/benchmark.py merge         # ViT-S r=16, ViT-B r=13, and r=0 (the patched path's overhead)
    python tools/benchmark.py super_token   # ViT-S/B: super-token attention (2x2) in blocks 0..2
    python tools/benchmark.py stvit         # STViT-S/B parameters and GMACs next to the paper's
    python tools/benchmark.py memory        # ViT-S peak forward memory, ATS / merging vs unpatched, batch 8 and 64
    python tools/benchmark.py videomae --batch-size 4 --runs 3 --warmup 1
                                            # HF VideoMAE-Base (16 x 224 x 224, 1,568 tokens): ATS, merging at ~0.5x
    python tools/benchmark.py all --json out/figures.json
    python tools/benchmark.py ats --device cuda --dtype bfloat16 --batch-size 256   # the same on a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch

import vistok
from vistok.cli import check_device, check_writable, count, count_or_zero, reports_errors
from vistok.measure import BenchReport, Variant, run_benchmark

PATCHES = 196  # the ViT-S/B figures use 224 px input, patch 16
FIGURES = {
    "ats": [
        ("vit_small_patch16_224", [Variant("ats k=108", "ats", {"k": 108, "blocks": list(range(3, 12))}),
                                   Variant("ats keep-everything", "ats", {"k": PATCHES, "min_tokens": PATCHES,
                                                                          "blocks": list(range(3, 12))})]),
        ("vit_base_patch16_224", [Variant("ats k=108", "ats", {"k": 108, "blocks": list(range(3, 12))}),
                                  Variant("ats keep-everything", "ats", {"k": PATCHES, "min_tokens": PATCHES,
                                                                         "blocks": list(range(3, 12))})]),
    ],
    "merge": [
        ("vit_small_patch16_224", [Variant("merge r=16", "merge", {"r": 16}), Variant("merge r=0", "merge", {"r": 0})]),
        ("vit_base_patch16_224", [Variant("merge r=13", "merge", {"r": 13}), Variant("merge r=0", "merge", {"r": 0})]),
    ],
    "super_token": [
        ("vit_small_patch16_224", [Variant("super_token 2x2 b0-2", "super_token", {"stoken_size": 2})]),
        ("vit_base_patch16_224", [Variant("super_token 2x2 b0-2", "super_token", {"stoken_size": 2})]),
    ],
}
PAPER_STVIT = {"stvit_small": (25e6, 4.4), "stvit_base": (52e6, 9.9)}
VIDEOMAE_TOKENS = 8 * 14 * 14
VIDEOMAE_VARIANTS = [
    Variant("ats k=576 b3-11", "ats", {"k": 576, "blocks": list(range(3, 12))}),
    Variant("merge r=120", "merge", {"r": 120}),
    Variant("ats keep-everything", "ats", {"k": VIDEOMAE_TOKENS, "min_tokens": VIDEOMAE_TOKENS,
                                           "blocks": list(range(3, 12))}),
]
MEMORY_VARIANTS = [Variant("ats k=108", "ats", {"k": 108, "blocks": list(range(3, 12))}),
                   Variant("merge r=16", "merge", {"r": 16})]


def _summary(figure: str, report: BenchReport) -> list[str]:
    lines = []
    for result in report.results[1:]:
        ratio, speedup = report.gflops_ratio(result), report.speedup(result)
        if result.gflops < 0.999 * report.baseline.gflops:
            target = {"ats": 0.85, "merge": 0.9, "videomae": 0.85}.get(figure)
            goal = f" (target >= {target})" if target else ""
            lines.append(f"-> {result.label}: GFLOPs ratio {ratio:.3f}, speedup {speedup:.3f}x, speedup / FLOPs "
                         f"reduction = {speedup * ratio:.3f}{goal}")
        else:
            limit = 5 if figure == "videomae" else 10
            lines.append(f"-> {result.label}: overhead {(1 / speedup - 1) * 100:+.1f}% time (target <= +{limit}%)")
    return lines


def _stvit() -> dict:
    rows = {}
    for name, (paper_params, paper_gmacs) in PAPER_STVIT.items():
        model = timm.create_model(name).eval()
        params = sum(p.numel() for p in model.parameters())
        gmacs = vistok.measure.count_flops(model, torch.randn(1, 3, 224, 224)) / 2e9
        print(f"{name}: {params / 1e6:.2f}M parameters (paper {paper_params / 1e6:.0f}M), {gmacs:.2f} GMACs at 224 px "
              f"(paper {paper_gmacs} 'GFLOPs' = MACs)")
        rows[name] = {"params": params, "gmacs": gmacs, "paper_params": paper_params, "paper_gmacs": paper_gmacs}
    return rows


def _videomae_base() -> torch.nn.Module:
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    return VideoMAEForVideoClassification(VideoMAEConfig(num_labels=400))  # VideoMAE-Base's shape, random init


def _memory(model_name: str = "vit_small_patch16_224", batch_sizes: tuple[int, ...] = (8, 64)) -> list[dict]:
    """Peak bytes of the tensors a forward pass creates (``vistok.measure.peak_memory``), patched vs unpatched."""
    torch.manual_seed(0)
    model = timm.create_model(model_name).eval()
    rows = []
    for batch_size in batch_sizes:
        images = torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        unpatched = vistok.measure.peak_memory(model, images)
        print(f"{model_name}, batch {batch_size}: unpatched peak {unpatched / 2**20:.1f} MiB")
        for variant in MEMORY_VARIANTS:
            with vistok.patch(model, variant.method, **variant.options):
                patched = vistok.measure.peak_memory(model, images)
            print(f"-> {variant.label}: peak {patched / 2**20:.1f} MiB, {patched / unpatched:.3f}x unpatched "
                  "(target <= 1)")
            rows.append({"model": model_name, "batch_size": batch_size, "variant": variant.label,
                         "peak_bytes": patched, "unpatched_peak_bytes": unpatched, "ratio": patched / unpatched})
    return rows


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figure", choices=[*FIGURES, "stvit", "memory", "videomae", "all"])
    parser.add_argument("--batch-size", type=count, default=32)
    parser.add_argument("--runs", type=count, default=10)
    parser.add_argument("--warmup", type=count_or_zero, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cpu", help="where to time the models (FLOPs are counted on the CPU; "
                        "stvit and memory always run on the CPU in float32, memory at batches 8 and 64)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--flops-images", type=count, default=None, help="count FLOPs on the first N images only")
    args = parser.parse_args(argv)
    check_device(args.device, "benchmark.py")
    if args.json:
        check_writable("--json", Path(args.json))  # before the benchmark, not after it
    dtype = getattr(torch, args.dtype)

    figures = [*FIGURES, "stvit", "memory"] if args.figure == "all" else [args.figure]
    record: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
                    "dtype": args.dtype}
    for figure in figures:
        if figure in ("stvit", "memory"):  # counted on the CPU in float32, whatever --device and --dtype say
            record[figure] = {"device": "cpu", "dtype": "float32",
                              "rows": _stvit() if figure == "stvit" else _memory()}
            continue
        if figure == "videomae":
            report = run_benchmark(_videomae_base, VIDEOMAE_VARIANTS, batch_size=args.batch_size, runs=args.runs,
                                   warmup=args.warmup, device=args.device, dtype=dtype, flops_images=args.flops_images,
                                   input_shape=(16, 3, 224, 224), label="VideoMAE-Base 16x224")
            print(report.format_table())
            print("\n".join(_summary(figure, report)) + "\n")
            record["videomae"] = report.to_dict()
            continue
        for model_name, variants in FIGURES[figure]:
            report = run_benchmark(model_name, variants, batch_size=args.batch_size, runs=args.runs,
                                   warmup=args.warmup, device=args.device, dtype=dtype,
                                   flops_images=args.flops_images)
            print(report.format_table())
            print("\n".join(_summary(figure, report)) + "\n")
            record.setdefault(figure, []).append(report.to_dict())
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
