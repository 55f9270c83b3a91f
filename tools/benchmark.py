#!/usr/bin/env python
"""The ATS figures of the core issue: for each model, unpatched vs ATS (k=108 in blocks 3..11) vs
keep-everything ATS (the overhead of the patched code path), CPU, fp32, random init, one run.

    python tools/benchmark.py                      # vit_small_patch16_224 and vit_base_patch16_224
    python tools/benchmark.py --models vit_small_patch16_224 --runs 5 --json out/ats.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from vistok.measure import Variant, run_benchmark


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    parser.add_argument("--k", type=int, default=108)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    reports = []
    for name in args.models:
        blocks = list(range(3, 12))
        patches = 196  # both default models: 224 px, patch 16
        variants = [
            Variant(f"ats k={args.k}", "ats", {"k": args.k, "blocks": blocks}),
            Variant("ats keep-everything", "ats", {"k": patches, "min_tokens": patches, "blocks": blocks}),
        ]
        report = run_benchmark(name, variants, batch_size=args.batch_size, runs=args.runs, warmup=args.warmup)
        print(report.format_table())
        ats, keep_all = report.results[1], report.results[2]
        efficiency = report.speedup(ats) * report.gflops_ratio(ats)
        overhead = 1 / report.speedup(keep_all) - 1
        print(f"-> ATS: GFLOPs ratio {report.gflops_ratio(ats):.3f}, speedup {report.speedup(ats):.3f}x, "
              f"speedup / FLOPs reduction = {efficiency:.3f} (target >= 0.85)")
        print(f"-> keep-everything overhead: {overhead * 100:+.1f}% time (target <= +10%)\n")
        reports.append(report.to_dict())
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"torch": torch.__version__, "reports": reports}, handle, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
