#!/usr/bin/env python
"""Correlation-guided compression (vistok.document) on real scanned pages: where the tokens go.

Each page is cut as mPLUG-DocOwl 1.5 cuts it (a global view and a shape-adaptive grid of ``--crop-size`` crops) and
run through a vision tower (``--model``, a timm vision transformer; no pretrained weights exist on these machines,
so a seeded random initialisation: its keys still tell blank from ink, its class token knows nothing), normalised
with the model's own mean and std (timm's data config). A page is read as it is displayed (EXIF orientation,
transparency on white paper, 16-bit greys by their range) and must be dark ink on light paper: a patch is *ink* when
at least 1 % of its pixels are darker than mid-grey. Reported per page:

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
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from vistok.backbones import resolve_backbone
from vistok.cli import beside, count, count_or_zero, reports_errors, seed
from vistok.data import upright, white_level
from vistok.document import (
    CorrelationGuidedConfig,
    allocate_budget,
    choose_grid,
    compress_views,
    crop_page,
    page_budgets,
    view_signals,
)
from vistok.errors import InputShapeError, InvalidConfigError, UnsupportedModelError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

PAGES = Path(__file__).resolve().parents[1] / "data" / "pages"


ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def load_page(path: Path) -> torch.Tensor:
    """A page as grey levels ``[1, H, W]`` in ``[0, 1]``, as it is displayed: its EXIF orientation applied,
    transparent parts on white paper, 16-bit greys divided by 65535 (Pillow's ``convert("L")`` clips them to
    white), float greys as they are.

    Raises:
        InputShapeError: grey levels outside their bit depth or floats outside ``[0, 1]``, 32-bit integer greys
            (their white level is unknown), or dark paper (the ink test counts pixels darker than mid-grey, so
            light ink on dark paper would be all ink).
    """
    from PIL import Image

    with Image.open(path) as opened:
        pages = _page_count(opened)
        if pages > 1:
            raise InputShapeError(f"{path.name} holds {pages} pages (or frames): only the first would be read; save "
                                  "each page as its own file")
        white = white_level(opened, path)  # read from the file: the transposed copy has no format or tags
        transparent = opened.info.get("transparency")
        image = upright(opened, path)
        image.load()
    grey = _grey_levels(image, white, transparent, path)
    _check_dark_ink(grey, path)
    return torch.from_numpy(grey)[None]


def _page_count(opened: PILImage) -> int:
    """The pages of an opened image file: its frames, but a camera JPEG's embedded previews (Pillow opens a JPEG
    with an MPF segment as MPO; its first frame is the photo) and a TIFF's reduced-resolution thumbnails
    (NewSubfileType bit 0)."""
    frames = getattr(opened, "n_frames", 1)
    if frames == 1 or opened.format == "MPO":
        return 1
    if opened.format != "TIFF":
        return frames
    pages = 0
    for frame in range(frames):
        opened.seek(frame)
        pages += not int(opened.tag_v2.get(254, 0)) & 1
    opened.seek(0)
    return pages


def _grey_levels(image: PILImage, white: float | None, transparent: object, path: Path) -> np.ndarray:
    """``[H, W]`` float32 in ``[0, 1]`` from a Pillow image of any mode (see :func:`load_page`): wide greys divided
    by ``white``, and pixels at the ``transparent`` level (a PNG's tRNS) on white paper."""
    from PIL import Image

    if white is not None:
        values = np.asarray(image, dtype=np.float64)
        if values.size and not (values.min() >= 0 and values.max() <= white):
            raise InputShapeError(f"{path.name}: {image.mode} grey levels from {values.min():g} to {values.max():g} "
                                  f"are outside [0, {white:g}]; save the page as an 8- or 16-bit image")
        if isinstance(transparent, (int, float)) and image.mode != "F":  # transparent paper is white, not black
            values = np.where(values == transparent, white, values)
        return (values / white).astype(np.float32)
    if image.mode in ALPHA or transparent is not None:  # transparent paper is white, not black
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return np.asarray(image.convert("L"), dtype=np.float32) / 255


def _check_dark_ink(grey: np.ndarray, path: Path) -> None:
    """Refuse a page whose paper (its median grey) is darker than mid-grey: white on black, or a negative."""
    median = float(np.median(grey))
    if median < 0.5:
        raise InputShapeError(f"{path.name}: the paper is dark (median grey {median:.2f} < 0.5): the ink test counts "
                              "pixels darker than mid-grey, so every patch would be ink; invert the page first "
                              "(PIL.ImageOps.invert)")


def tower_input(model: torch.nn.Module, grey: torch.Tensor) -> torch.Tensor:
    """``grey`` ``[1, H, W]`` in ``[0, 1]`` as ``model`` takes it: ``[C, H, W]``, ``(grey - mean) / std`` with the
    mean and std (``C`` entries) of its timm data config."""
    from timm.data import resolve_data_config

    config = resolve_data_config(model=model)
    mean = torch.tensor(config["mean"], dtype=grey.dtype)[:, None, None]
    std = torch.tensor(config["std"], dtype=grey.dtype)[:, None, None]
    return (grey.expand(mean.shape[0], -1, -1) - mean) / std


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


def evaluate_page(model, path: Path, grey: torch.Tensor, args: argparse.Namespace, out: Path) -> list[dict]:
    crops = crop_page(tower_input(model, grey), args.crop_size)
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
        # the compressor's own weights (each view's tokens that are not redundant), so its budgets exactly
        density_budgets = page_budgets((~adaptive.redundant).sum(-1), total, per_view, True,
                                       CorrelationGuidedConfig(keep=keep))
        row("density budgets, random tokens", keep, density_budgets,
            random_kept(density_budgets, per_view, args.seed))
        uniform = allocate_budget(torch.ones(count), total, per_view)
        row("uniform budgets, random tokens", keep, uniform, random_kept(uniform, per_view, args.seed), uniform=True)
    return rows


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() < 2 or float(a.std()) == 0 or float(b.std()) == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def read_pages(parser: argparse.ArgumentParser, pages: list[str]) -> dict[Path, torch.Tensor]:
    """Every page loaded (:func:`load_page`) before the tower runs on the first, or a parser error: also for a
    file given twice, or two files of one name (``<out>.csv`` labels a page by its name, ``<out>_<stem>.png`` is
    its picture: they would mix two pages)."""
    missing = [page for page in pages if not Path(page).is_file()]
    if missing:
        parser.error(f"--pages: no such file: {', '.join(missing)}")
    by_file: dict[Path, str] = {}
    by_stem: dict[str, str] = {}
    for page in pages:
        file, stem = Path(page).resolve(), Path(page).stem
        if file in by_file:
            also = f" (also as {by_file[file]})" if by_file[file] != page else ""
            parser.error(f"--pages: {page} is given twice{also}")
        if stem in by_stem:
            parser.error(f"--pages: {by_stem[stem]} and {page} have the same name ({stem}): their rows and pictures "
                         "would mix; rename one")
        by_file[file], by_stem[stem] = page, page
    from PIL.Image import DecompressionBombError  # a scan over Pillow's pixel limit: no OSError

    loaded = {}
    for page in map(Path, pages):
        try:
            loaded[page] = load_page(page)
        except InputShapeError as error:  # its message names the file
            parser.error(f"--pages: {error}")
        except (OSError, DecompressionBombError) as error:  # PIL.UnidentifiedImageError, a truncated file
            parser.error(f"--pages: {page}: {error}")
    return loaded


def check_options(args: argparse.Namespace) -> None:
    """``--similarity``, ``--repeats`` and each ``--keep`` as the configs of :func:`evaluate_page` take them, before
    anything is loaded: a :class:`~vistok.errors.InvalidConfigError` (status 2) instead of a failure after the
    first page."""
    CorrelationGuidedConfig(similarity=args.similarity, repeats=args.repeats, layer=args.layer)
    for keep in args.keep:
        CorrelationGuidedConfig(keep=keep, similarity=args.similarity, repeats=args.repeats, layer=args.layer)


def check_budgets(model: torch.nn.Module, pages: dict[Path, torch.Tensor], args: argparse.Namespace) -> None:
    """``--layer`` within the tower's blocks and each ``--keep`` at least one token per view on every page (its
    views from its size, :func:`~vistok.document.choose_grid`), once the tower is built and before it runs:
    a :class:`~vistok.errors.InvalidConfigError` (status 2) instead of the rows of the pages before it lost."""
    blocks = len(resolve_backbone(model).blocks())
    if not -blocks <= args.layer < blocks:
        raise InvalidConfigError(f"--layer {args.layer}: {args.model} has {blocks} blocks (give one in "
                                 f"[-{blocks}, {blocks}))")
    per_view = resolve_backbone(model).info.num_patches
    for path, grey in pages.items():
        views = 1 + math.prod(choose_grid(grey.shape[1], grey.shape[2], args.crop_size))
        for keep in args.keep:
            config = CorrelationGuidedConfig(keep=keep)
            total = config.page_budget(views * per_view)
            if total < config.minimum * views:
                raise InvalidConfigError(f"--keep {keep:g}: {total} of the {views * per_view} tokens of "
                                         f"{path.name} ({views} views) cannot give each view minimum="
                                         f"{config.minimum}; give a larger --keep (one token per view is "
                                         f"{1 / per_view:.3g} of them)")


def build_tower(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.nn.Module:
    """The seeded random timm ``--model`` at ``--crop-size`` px, eval mode; a parser error for a name timm does not
    know, a model that is not a vision transformer vistok reads, or a crop size its patches do not tile."""
    import timm

    if not timm.is_model(args.model):
        parser.error(f"--model: timm has no model {args.model!r}")
    torch.manual_seed(args.seed)
    not_a_vit = f"--model {args.model} is not a vision transformer vistok reads (e.g. vit_small_patch16_224)"
    try:
        model = timm.create_model(args.model, pretrained=False, img_size=args.crop_size).eval()
    except TypeError as error:  # a CNN takes no img_size
        parser.error(f"{not_a_vit}: {error}")
    try:
        resolve_backbone(model)
    except UnsupportedModelError as error:
        parser.error(f"{not_a_vit}: {error}")
    if getattr(model, "patch_embed", None) is None:
        parser.error(f"{not_a_vit}: it has no patch_embed")
    patch = model.patch_embed.patch_size[0]
    if args.crop_size % patch:
        parser.error(f"--crop-size {args.crop_size} is not a multiple of {args.model}'s {patch} px patches")
    return model


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
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--threads", type=count_or_zero, default=0, help="0: torch's default")
    args = parser.parse_args(argv)
    check_options(args)
    pages = read_pages(parser, args.pages)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_tower(parser, args)
    check_budgets(model, pages, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for path, grey in pages.items():
        for row in evaluate_page(model, path, grey, args, out):
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
