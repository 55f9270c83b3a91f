"""Token overlays: which patches a method kept (ATS, random drop) or merged together (merging with
``trace_source=True``), drawn on the input images and saved as a PNG grid.

>>> handle = vistok.patch(model, "merge", r=8, trace_source=True)
>>> model(images)
>>> vistok.viz.save_overlay_grid("tokens.png", images, {"merge r=8": handle.layouts[11]}, grid=(14, 14))

For video, :func:`save_clip_overlay` draws one clip's tokens frame by frame (a tubelet token on every frame
it spans).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._checks import is_int
from .errors import InputShapeError, InvalidConfigError
from .tokens import TokenLayout

__all__ = ["patch_groups", "overlay", "save_overlay_grid", "save_clip_overlay", "save_page_budget", "save_pareto_plot"]

_OVERLAY_PIXELS = 224  # an overlay's side before its borders are drawn, where upscale is left to vistok
_DPI = 110


def patch_groups(layout: TokenLayout, num_patches: int) -> Tensor:
    """For each image and original patch, the position of the token that carries it after the layout's
    block, or -1 if the patch was dropped: ``[B, num_patches]`` long.

    Merged patches share a position (needs ``layout.owner``, i.e. ``trace_source=True``); without it, each
    kept token carries only its own source patch, so a layout whose tokens were merged is refused.

    Raises:
        InputShapeError: ``num_patches`` is not the model's patch count (as far as the layout tells it).
        InvalidConfigError: the tokens were merged (sizes above 1, or an ATS fusion) and the layout does not
            trace their patches: the merged patches would be drawn as dropped.
    """
    prefix = layout.num_prefix
    known = None if layout.grid_size is None else math.prod(layout.grid_size)
    if layout.owner is not None:
        known = layout.owner.shape[1] - prefix
    if known is not None and known != num_patches:
        raise InputShapeError(f"patch_groups: the layout is over {known} patches, not {num_patches}")
    source = layout.source_index().cpu() - prefix
    if source.numel() and int(source.max()) >= num_patches:
        raise InputShapeError(f"patch_groups: the layout carries patch {int(source.max())}, beyond {num_patches} "
                              "patches")
    if layout.owner is not None:
        return layout.owner[:, prefix: prefix + num_patches].cpu()
    if layout.fused or (layout.sizes is not None and bool((layout.sizes[layout.valid_mask()] != 1).any())):
        raise InvalidConfigError("patch_groups: these tokens were merged, and the layout does not record which "
                                 "patches each stands for (merged patches would be drawn as dropped); patch with "
                                 "trace_source=True to draw them")
    batch = layout.batch_size
    groups = torch.full((batch, num_patches), -1, dtype=torch.long)
    valid = layout.valid_mask().cpu()
    for b in range(batch):
        real = valid[b] & (source[b] >= 0)
        groups[b, source[b][real]] = torch.nonzero(real).squeeze(1)
    return groups


def overlay(image: np.ndarray, groups: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Draw one image's token groups: dropped patches dimmed to a quarter, each merged group filled with its
    mean colour, and a line wherever neighbouring patches belong to different tokens.

    Args:
        image: ``[H, W, 3]`` floats in ``[0, 1]``.
        groups: ``[gh * gw]`` from :func:`patch_groups` (one image).
    """
    rows, cols = grid
    height, width = image.shape[:2]
    if height % rows or width % cols or groups.size != rows * cols:
        raise InputShapeError(f"overlay: a {height}x{width} image with {groups.size} patch groups does not divide "
                              f"into the {rows}x{cols} patch grid (resize the image to a multiple of it)")
    ph, pw = height // rows, width // cols
    out = image.copy()
    cells = groups.reshape(rows, cols)
    for group in np.unique(groups):
        where = np.kron(cells == group, np.ones((ph, pw), dtype=bool))
        if group < 0:
            out[where] = image[where] * 0.25
        elif (cells == group).sum() > 1:
            out[where] = image[where].mean(axis=0)
    pixel_groups = np.kron(cells, np.ones((ph, pw), dtype=int))
    edges = np.zeros((height, width), dtype=bool)
    edges[:, 1:] |= pixel_groups[:, 1:] != pixel_groups[:, :-1]
    edges[1:, :] |= pixel_groups[1:, :] != pixel_groups[:-1, :]
    out[edges] = (1.0, 0.85, 0.2)
    return out


def _display(images: Tensor, together: bool = False) -> np.ndarray:
    """``[B, C, H, W]`` (any normalisation) -> ``[B, H, W, 3]`` in ``[0, 1]``, each image min-max scaled (all
    with one scale if ``together``: the frames of a clip)."""
    x = images.detach().float().cpu()
    dims = (0, 1, 2, 3) if together else (1, 2, 3)
    low = x.amin(dim=dims, keepdim=True)
    high = x.amax(dim=dims, keepdim=True)
    x = (x - low) / (high - low).clamp_min(1e-8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).numpy()


def save_overlay_grid(path: str | Path, images: Tensor, layouts: Mapping[str, TokenLayout],
                      grid: tuple[int, int], upscale: int | None = None) -> Path:
    """A PNG with one row per image: the input, then one overlay per named layout (e.g. the layout after
    the last block of each method). Returns the path. ``upscale``: how many pixels each image pixel becomes before
    the 1-pixel borders are drawn (``None``: as many as keep it within 224 px); panels are sized to show every pixel,
    so no border is lost."""
    for name, layout in layouts.items():
        if layout.grid_size is not None and tuple(grid) != tuple(layout.grid_size):
            raise InputShapeError(f"save_overlay_grid: grid {tuple(grid)}, but layout {name!r} is over the model's "
                                  f"{tuple(layout.grid_size)} patch grid")
        if layout.batch_size != images.shape[0]:
            raise InputShapeError(f"save_overlay_grid: {images.shape[0]} images, but layout {name!r} is of a batch "
                                  f"of {layout.batch_size}; pass the images of the forward pass it comes from")
    plt = _pyplot()
    pictures = _upscaled(_display(images), upscale)
    num_patches = grid[0] * grid[1]
    columns = {"input": [p for p in pictures]}
    for name, layout in layouts.items():
        groups = patch_groups(layout, num_patches).numpy()
        columns[f"{name}\n({_token_note(layout)})"] = [overlay(p, g, grid) for p, g in zip(pictures, groups,
                                                                                          strict=True)]
    inches = _panel_inches(pictures, 2.2)
    figure, axes = plt.subplots(len(pictures), len(columns), figsize=(inches * len(columns), inches * len(pictures)),
                                squeeze=False)
    for column, (title, panels) in enumerate(columns.items()):
        for row, panel in enumerate(panels):
            _show(axes[row, column], panel)
            if row == 0:
                axes[row, column].set_title(title, fontsize=8)
    return _save(plt, figure, path, dpi=_DPI)


def save_clip_overlay(path: str | Path, clip: Tensor, layouts: Mapping[str, TokenLayout], tubelet_frames: int = 1,
                      index: int = 0, upscale: int | None = None) -> Path:
    """A PNG of one clip's tokens across its frames: the frames in the first row, then one row per named layout
    (video layouts on a ``(t, h, w)`` grid, e.g. ``handle.layouts[block]``), drawn on every frame as
    :func:`overlay` draws images. A token of tubelet slice ``s`` covers frames ``s * tubelet_frames`` to
    ``(s + 1) * tubelet_frames - 1``, so a kept or merged tubelet shows on each of them.

    Args:
        clip: ``[T, C, H, W]`` frames of one clip, any normalisation (``clip[i].transpose(0, 1)`` of a
            ``[B, C, T, H, W]`` batch).
        index: which clip of the layouts' batch ``clip`` is.
        upscale: how many pixels each frame pixel becomes before the borders are drawn (``None``: as many as keep
            a frame within 224 px).

    Raises:
        InputShapeError: a layout without a ``(t, h, w)`` grid, or ``T`` other than ``t * tubelet_frames``.
        InvalidConfigError: a merged layout without ``trace_source=True`` (:func:`patch_groups`).
    """
    if clip.dim() != 4:
        raise InputShapeError(f"save_clip_overlay: expected one clip [T, C, H, W], got {tuple(clip.shape)}")
    plt = _pyplot()
    frames = _upscaled(_display(clip, together=True), upscale)
    rows = {"frames": list(frames)}
    for name, layout in layouts.items():
        if layout.grid_size is None or len(layout.grid_size) != 3:
            raise InputShapeError(f"save_clip_overlay: layout {name!r} has no (t, h, w) patch grid "
                                  f"(grid_size={layout.grid_size}); is it a video model's?")
        slices, height, width = layout.grid_size
        if slices * tubelet_frames != len(frames):
            raise InputShapeError(f"save_clip_overlay: {len(frames)} frames, but layout {name!r} has {slices} "
                                  f"tubelet slices of {tubelet_frames} frames")
        groups = patch_groups(layout, slices * height * width)[index].reshape(slices, height * width).numpy()
        rows[f"{name}\n({_token_note(layout)})"] = [overlay(frame, groups[f // tubelet_frames], (height, width))
                                                    for f, frame in enumerate(frames)]
    inches = _panel_inches(frames, 2.0)
    figure, axes = plt.subplots(len(rows), len(frames), figsize=(inches * len(frames), (inches + 0.1) * len(rows)),
                                squeeze=False)
    for row, (title, panels) in enumerate(rows.items()):
        for column, panel in enumerate(panels):
            _show(axes[row, column], panel)
            if column == 0:
                axes[row, column].set_ylabel(title, fontsize=8)
            if row == 0:
                axes[row, column].set_title(f"frame {column}", fontsize=8)
    return _save(plt, figure, path, dpi=_DPI)


def save_page_budget(path: str | Path, views: Tensor, grid: tuple[int, int], patch_grid: tuple[int, int],
                     kept: list[Tensor], budgets: Tensor, density: Tensor | None = None, title: str = "") -> Path:
    """A page under a page budget (:func:`vistok.document.compress_page`): the global view beside the crops laid
    out in their grid, each titled with its budget (and density), the patches it keeps as they are and the rest
    dimmed and tinted red.

    Args:
        views: ``[1 + rows * cols, C, S, S]`` the page's views as :func:`vistok.document.crop_page` cut them
            (global first), ``grid`` ``(rows, cols)``; ``patch_grid`` the tower's patch grid per view;
            ``kept`` each view's kept patch indices; ``budgets`` ``[V]``; ``density`` ``[V]``.
    """
    rows, cols = grid
    if views.dim() != 4 or views.shape[0] != 1 + rows * cols or len(kept) != views.shape[0]:
        raise InputShapeError(f"save_page_budget: expected views [1 + {rows} * {cols}, C, S, S] and a kept index "
                              f"per view, got views {tuple(views.shape)} and {len(kept)} kept")
    plt = _pyplot()
    panels = _display(views, together=True)  # [V, S, S, 3] in [0, 1]: one scale, so blank paper stays white
    figure = plt.figure(figsize=(1 + 2.2 * (cols + 1.4), 0.6 + 2.2 * rows))
    spec = figure.add_gridspec(rows, cols + 1, width_ratios=[1.4] + [1] * cols)
    for v in range(views.shape[0]):
        axis = figure.add_subplot(spec[:, 0] if v == 0 else spec[(v - 1) // cols, 1 + (v - 1) % cols])
        note = f"{int(budgets[v])} tokens" + (f", density {float(density[v]):.2f}" if density is not None else "")
        axis.set_title(("global: " if v == 0 else f"crop {(v - 1) // cols},{(v - 1) % cols}: ") + note, fontsize=7)
        _show(axis, _dim_dropped(panels[v], kept[v], patch_grid))
    if title:
        figure.suptitle(title, fontsize=9)
    return _save(plt, figure, path, dpi=_DPI)


def _dim_dropped(panel: np.ndarray, kept: Tensor, patch_grid: tuple[int, int]) -> np.ndarray:
    """``panel`` ``[S, S, 3]`` with the patches not in ``kept`` dimmed and tinted red."""
    mask = np.zeros(patch_grid[0] * patch_grid[1], dtype=bool)
    mask[kept.cpu().numpy()] = True
    height, width = panel.shape[:2]
    if height % patch_grid[0] or width % patch_grid[1]:
        raise InputShapeError(f"a {height} x {width} picture does not divide into the {patch_grid[0]} x "
                              f"{patch_grid[1]} patch grid (give views whose sides are multiples of it)")
    mask = np.kron(mask.reshape(patch_grid), np.ones((height // patch_grid[0], width // patch_grid[1]), dtype=bool))
    dimmed = 0.35 * panel + 0.65 * np.array([0.85, 0.35, 0.35])
    return np.where(mask[..., None], panel, dimmed)


def _upscaled(pictures: np.ndarray, upscale: int | None) -> np.ndarray:
    """``[B, H, W, 3]`` with each pixel repeated ``upscale`` times (``None``: as often as stays within 224
    pixels)."""
    if upscale is None:
        upscale = max(1, _OVERLAY_PIXELS // max(pictures.shape[1:3]))
    if not is_int(upscale, 1):
        raise InvalidConfigError(f"upscale must be an int >= 1 or None, got {upscale!r}")
    return pictures.repeat(upscale, axis=1).repeat(upscale, axis=2) if upscale > 1 else pictures


def _panel_inches(pictures: np.ndarray, least: float) -> float:
    """A panel's side in inches that shows each pixel of ``pictures`` at least once on the saved figure (margins
    and titles take about a fifth): a picture drawn smaller than it is loses most of its 1-pixel borders."""
    return max(least, 1.3 * max(pictures.shape[1:3]) / _DPI)


def _show(axis, panel: np.ndarray) -> None:
    axis.imshow(panel, interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(plt, figure, path: str | Path, dpi: int) -> Path:
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


def _token_note(layout: TokenLayout) -> str:
    """The patch tokens each image keeps: one count, or the batch's mean and range where they differ."""
    counts = layout.num_valid() - layout.num_prefix
    low, high = int(counts.min()), int(counts.max())
    if low == high:
        return f"{low} tokens"
    return f"mean {float(counts.float().mean()):.1f} tokens, {low}-{high}"  # a rounded mean read as every image's


def save_pareto_plot(path: str | Path, rows: list[Mapping], title: str = "accuracy vs compute",
                     unit: str = "image") -> Path:
    """Top-1 against GFLOPs per ``unit`` (``"image"``, ``"clip"``), one line per method (rows: dicts with
    ``method``, ``gflops``, ``top1``, ``label``); the unpatched model (method ``"unpatched"``) is a star."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    methods: dict[str, list[Mapping]] = {}
    for row in rows:
        methods.setdefault(row["method"], []).append(row)
    for method, points in methods.items():
        points = sorted(points, key=lambda row: row["gflops"])
        xs, ys = [p["gflops"] for p in points], [p["top1"] for p in points]
        if method == "unpatched":
            axis.plot(xs, ys, "k*", markersize=12, label="unpatched")
            continue
        axis.plot(xs, ys, "o-", label=method, markersize=4)
        for point in points:
            axis.annotate(str(point["label"]), (point["gflops"], point["top1"]), fontsize=6,
                          textcoords="offset points", xytext=(2, 2))
    axis.set_xlabel(f"GFLOPs per {unit} (2 x MACs, mean over the {unit}s counted)")
    axis.set_ylabel("top-1 (%)")
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _save(plt, figure, path, dpi=120)
