"""The ``vistok`` command.

``vistok bench --model vit_small_patch16_224 --method ats --batch-size 32 -o k=108`` compares the
unpatched model with the patched one (random init, CPU, fp32): tokens per block, GFLOPs per image,
images per second, and their ratios.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch

from .errors import VistokError

__all__ = ["main"]


def _parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` with a Python literal value (``k=108``, ``k=0.5``, ``blocks=[3,4,5]``); a bare word
    stays a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vistok", description="Spend fewer visual tokens.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="unpatched vs patched: tokens, GFLOPs, images/s")
    bench.add_argument("--model", required=True, help="timm model name (random init)")
    bench.add_argument("--method", default=None, help="vistok method (see `vistok methods`)")
    bench.add_argument("-o", "--option", action="append", type=_parse_option, default=[],
                       metavar="KEY=VALUE", help="method option, repeatable (e.g. -o k=108)")
    bench.add_argument("--batch-size", type=int, default=32)
    bench.add_argument("--runs", type=int, default=10, help="timed runs (median reported)")
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    bench.add_argument("--flops-images", type=int, default=None,
                       help="count FLOPs on this many images (default: the whole batch)")
    bench.add_argument("--json", default=None, help="also write the report to this JSON file")
    bench.add_argument("--no-progress", action="store_true")
    commands.add_parser("methods", help="list the registered methods")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "methods":
            from . import list_methods

            print("\n".join(list_methods()))
            return 0
        return _bench(args)
    except VistokError as error:
        print(f"vistok: error: {error}", file=sys.stderr)
        return 2


def _bench(args: argparse.Namespace) -> int:
    from .measure.bench import Variant, run_benchmark
    from .methods import create_config

    if args.threads:
        torch.set_num_threads(args.threads)
    variants = []
    if args.method is not None:
        options = dict(args.option)
        create_config(args.method, **options)  # fail fast on a bad name or option
        variants.append(Variant(args.method, args.method, options))
    elif args.option:
        raise SystemExit("vistok bench: -o/--option needs --method")
    report = run_benchmark(args.model, variants, batch_size=args.batch_size, runs=args.runs,
                           warmup=args.warmup, seed=args.seed, flops_images=args.flops_images,
                           progress=not args.no_progress)
    print(report.format_table())
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report.to_dict(), handle, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
