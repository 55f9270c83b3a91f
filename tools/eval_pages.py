#!/usr/bin/env python
"""Correlation-guided compression (vistok.document) on real scanned pages: where the tokens go.

Each page is cut as mPLUG-DocOwl 1.5 cuts it (a global view and a shape-adaptive grid of ``--crop-size`` crops) and
run through a vision tower (``--model``, a timm name; no pretrained weights exist on these machines, so a seeded
random initialisation: its keys still tell blank from ink, its class token knows nothing). A patch is *ink* when at
least 1 % of its pixels are darker than mid-grey. Reported per page:

* the paper's adaptive setting (each view keeps its density's share): tokens before and after;
* at page budgets ``--keep``: the share of kept tokens on ink, for the compressor (density budgets, tokens ranked
  by class-token attention or key similarity), density budgets with random tokens, and uniform per-view budgets
  with random tokens, against the page's share of ink patches;
* seconds of the density computation (redundancy, budgets, selection) against the tower's forward.

Writes ``<out>.csv`` and ``<out>_<page>.png`` (vistok.viz.save_page_budget at the first budget).

    python tools/eval_pages.py --out results/pages
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vistok.cli import beside, count, reports_errors
from vistok.document import (
    CorrelationGuidedConfig,
    allocate_budget,
    compress_views,
    crop_page,
    page_budgets,
    view_signals,
)

PAGES = Path(__file__).resolve().parents[1] / "data" / "pages"


def load_page(path: Path) -> torch.Tensor:
    """A page as grey levels ``[1, H, W]`` in ``[0, 1]``."""
    from PIL import Image

    return torch.from_numpy(np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255)[None]


def ink_patches(grey_views: torch.Tensor, patch: int) -> torch.Tensor:
    """``[V, N]`` bool: patches with at least 1 % of their pixels darker than 0.5."""
    dark = (grey_views[:, 0] < 0.5).float()
    return (dark.unfold(1, patch, patch).unfold(2, patch, patch).mean((-1, -2)) >= 0.01).flatten(1)


def kept_on_ink(kept: list[torch.Tensor], ink: torch.Tensor) -> float:
    hits = sum(int(ink[v, index].sum()) for v, index in enumerate(kept))
    return hits / max(1, sum(index.numel() for index in kept))


def random_kept(budgets: torch.Tensor, per_view: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(per_view, generator=generator)[: int(b)].sort().values for b in budgets]


def evaluate_page(model, path: Path, args: argparse.Namespace, out: Path) -> list[dict]:
    grey = load_page(path)
    crops = crop_page((grey.expand(3, -1, -1) - 0.5) / 0.5, args.crop_size)
    grey_views = crop_page(grey, args.crop_size).views
    started = time.perf_counter()
    signals = view_signals(model, crops.views, args.layer)
    tower_s = time.perf_counter() - started
    count, per_view = signals.tokens.shape[:2]
    patch = args.crop_size // int(round(per_view ** 0.5))
    ink = ink_patches(grey_views, patch)
    base = {"page": path.name, "size": f"{grey.shape[2]}x{grey.shape[1]}", "grid": "x".join(map(str, crops.grid)),
            "views": count, "tokens_all": count * per_view, "ink_share": float(ink.float().mean()),
            "tower_s": tower_s}
    rows = []

    def row(method: str, keep: float | None, budgets: torch.Tensor, kept: list[torch.Tensor], seconds: float = 0.0,
            uniform: bool = False) -> None:
        # uniform budgets differ by rounding only: their correlation with ink would be noise
        correlation = float("nan") if uniform else _corr(budgets[1:].float(), ink[1:].float().mean(-1))
        rows.append({**base, "method": method, "keep": keep, "tokens": int(budgets.sum()),
                     "saved": 1 - int(budgets.sum()) / (count * per_view), "kept_on_ink": kept_on_ink(kept, ink),
                     "crop_budget_ink_corr": correlation, "density_s": seconds})

    started = time.perf_counter()
    adaptive = compress_views(signals, CorrelationGuidedConfig(similarity=args.similarity, repeats=args.repeats,
                                                               layer=args.layer), True, crops.positions)
    row("paper (adaptive)", None, adaptive.budgets, adaptive.index, time.perf_counter() - started)
    for keep in args.keep:
        for score in ("attention", "similarity"):
            config = CorrelationGuidedConfig(keep=keep, similarity=args.similarity, repeats=args.repeats,
                                             score=score, layer=args.layer)
            started = time.perf_counter()
            result = compress_views(signals, config, True, crops.positions)
            row(f"correlation_guided ({score})", keep, result.budgets, result.index, time.perf_counter() - started)
            if score == "attention" and keep == args.keep[0]:
                from vistok.viz import save_page_budget

                side = int(round(per_view ** 0.5))
                save_page_budget(out.parent / f"{out.name}_{path.stem}.png", grey_views, crops.grid, (side, side),
                                 result.index, result.budgets, result.density,
                                 title=f"{path.name}: correlation_guided keep={keep} ({int(result.budgets.sum())} of "
                                       f"{count * per_view} tokens)")
        total = max(1, round(keep * count * per_view))
        density_budgets = page_budgets(adaptive.density, total, per_view, True, CorrelationGuidedConfig(keep=keep))
        row("density budgets, random tokens", keep, density_budgets,
            random_kept(density_budgets, per_view, args.seed))
        uniform = allocate_budget(torch.ones(count), total, per_view)
        row("uniform budgets, random tokens", keep, uniform, random_kept(uniform, per_view, args.seed), uniform=True)
    return rows


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() < 2 or float(a.std()) == 0 or float(b.std()) == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/pages")
    parser.add_argument("--pages", nargs="+", default=[str(PAGES / "linn.png"), str(PAGES / "typewriter.png")])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--crop-size", type=count, default=448, help="DocOwl 1.5: 448")
    parser.add_argument("--layer", type=int, default=-1)
    parser.add_argument("--similarity", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--keep", nargs="+", type=float, default=[0.33, 0.5])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    missing = [page for page in args.pages if not Path(page).is_file()]
    if missing:
        parser.error(f"--pages: no such file: {', '.join(missing)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    import timm

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False, img_size=args.crop_size).eval()
    patch = model.patch_embed.patch_size[0]
    if args.crop_size % patch:
        parser.error(f"--crop-size {args.crop_size} is not a multiple of {args.model}'s {patch} px patches")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for page in args.pages:
        for row in evaluate_page(model, Path(page), args, out):
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    with open(beside(out, ".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {beside(out, '.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
