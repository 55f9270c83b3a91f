"""Shape-adaptive cropping of document pages, as mPLUG-DocOwl 1.5's processor does it: choose a crop grid that fits
the page's aspect ratio first and its resolution second, resize the page to that grid of ``crop_size`` crops, cut
them, and put a global view (the whole page at ``crop_size``) in front.

>>> grid = choose_grid(3300, 2550)                    # a US-letter scan at 300 dpi -> (3, 2)
>>> crops = crop_page(page, crop_size=448)            # page [C, H, W] -> views [1 + 6, C, 448, 448]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import is_int
from ..errors import InputShapeError, InvalidConfigError

__all__ = ["PageCrops", "candidate_grids", "choose_grid", "crop_page"]


@dataclass(frozen=True)
class PageCrops:
    """A page cut for a vision tower: ``views`` ``[1 + rows * cols, C, S, S]`` (the global view first, then the
    crops in row-major order), ``grid`` ``(rows, cols)``, and ``positions`` ``[1 + rows * cols, 2]`` long, each
    view's ``(row, col)`` in the grid (``(-1, -1)`` for the global view), so the language side can mark them."""

    views: Tensor
    grid: tuple[int, int]
    positions: Tensor

    @property
    def num_crops(self) -> int:
        return self.grid[0] * self.grid[1]


def candidate_grids(max_crops: int = 9) -> list[tuple[int, int]]:
    """Every ``(rows, cols)`` with ``rows * cols <= max_crops``, fewer crops first (ties: fewer rows first)."""
    if not is_int(max_crops, 1):
        raise InvalidConfigError(f"candidate_grids: max_crops must be a positive int, got {max_crops!r}")
    grids = [(rows, cols) for rows in range(1, max_crops + 1) for cols in range(1, max_crops // rows + 1)]
    return sorted(grids, key=lambda grid: (grid[0] * grid[1], grid[0]))


def _overlap(width_a: Tensor, height_a: Tensor, width_b: Tensor, height_b: Tensor) -> Tensor:
    """IoU of boxes that share their top-left corner."""
    inter = torch.minimum(width_a, width_b) * torch.minimum(height_a, height_b)
    return inter / (width_a * height_a + width_b * height_b - inter)


def choose_grid(height: int, width: int, crop_size: int = 448, max_crops: int = 9) -> tuple[int, int]:
    """DocOwl 1.5's choice of crop grid for a ``height x width`` page, in exact arithmetic.

    Each candidate grid is a box of ``cols * crop_size`` by ``rows * crop_size``. Its shape match is the IoU with
    a box of the same width and the page's aspect ratio (resolution does not count); its resolution match is the
    IoU with the page itself (both boxes at the origin). The grid with the largest ``100 * shape + resolution``
    wins: the aspect ratio first, then the size; ties go to fewer crops. DocOwl's processor keeps its boxes in an
    integer tensor, which truncates the shape box's height and picks another grid for a few page sizes (231 of the
    46,683 sizes from 400 to 3,600 px); it also breaks ties by its list's order and resizes bicubically.
    """
    for name, value in (("height", height), ("width", width), ("crop_size", crop_size)):
        if not is_int(value, 1):
            raise InvalidConfigError(f"choose_grid: {name} must be a positive int, got {value!r}")
    grids = candidate_grids(max_crops)
    rows = torch.tensor([g[0] for g in grids], dtype=torch.float64)
    cols = torch.tensor([g[1] for g in grids], dtype=torch.float64)
    box_w, box_h = cols * crop_size, rows * crop_size
    shape = _overlap(box_w, box_h, box_w, box_w * height / width)
    resolution = _overlap(box_w, box_h, torch.tensor(float(width)), torch.tensor(float(height)))
    return grids[int(torch.argmax(100 * shape + resolution))]


def _checked_grid(grid: object, max_crops: int) -> tuple[int, int]:
    """``grid`` as ``(rows, cols)``: two ints >= 1 (not bools) with ``rows * cols <= max_crops``, or an
    :class:`InvalidConfigError` that says which part is wrong."""
    if not is_int(max_crops, 1):
        raise InvalidConfigError(f"crop_page: max_crops must be a positive int, got {max_crops!r}")
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(is_int(side, 1) for side in grid)):
        raise InvalidConfigError(f"crop_page: grid must be (rows, cols), two ints >= 1, got {grid!r}")
    rows, cols = grid
    if rows * cols > max_crops:
        raise InvalidConfigError(f"crop_page: grid {rows} x {cols} is {rows * cols} crops, more than "
                                 f"max_crops={max_crops}")
    return rows, cols


def crop_page(page: Tensor, crop_size: int = 448, max_crops: int = 9, grid: tuple[int, int] | None = None
              ) -> PageCrops:
    """Cut ``page`` ``[C, H, W]`` (float, as the tower takes it) into its shape-adaptive grid (:func:`choose_grid`,
    or ``grid``) of ``crop_size`` crops, behind a global view of the whole page; bilinear resizing with
    antialiasing.

    ``page`` is cropped as given: normalise it for the tower first (e.g. ``(page - mean) / std`` with the tower's
    own mean and std, ``timm.data.resolve_data_config(model=tower)``). ``grid`` ``(rows, cols)``, when given, is two
    ints >= 1 with ``rows * cols <= max_crops``.

    Raises:
        InputShapeError: ``page`` is not a float ``[C, H, W]`` tensor (or looks channel-last), is empty, or holds
            NaN or infinite values.
        InvalidConfigError: ``crop_size``, ``max_crops`` or ``grid`` is not as above.
    """
    if page.dim() != 3 or not page.is_floating_point():
        raise InputShapeError(f"crop_page: expected a float page [C, H, W], got {page.dtype} "
                              f"{tuple(page.shape)}")
    if page.numel() == 0:
        raise InputShapeError(f"crop_page: the page is empty ({' x '.join(map(str, page.shape))})")
    bad = int((~torch.isfinite(page)).sum())
    if bad:
        raise InputShapeError(f"crop_page: the page holds {bad} non-finite values (NaN or inf) of {page.numel()}: "
                              "the tower's tokens and the budgets would be NaN; fill or mask them first")
    if page.shape[0] not in (1, 3, 4) and page.shape[2] in (1, 3, 4):
        raise InputShapeError(f"crop_page: a page {tuple(page.shape)} looks channel-last [H, W, C]; pass it "
                              "channels first, [C, H, W] (page.permute(2, 0, 1))")
    if not is_int(crop_size, 1):
        raise InvalidConfigError(f"crop_page: crop_size must be a positive int, got {crop_size!r}")
    if grid is None:
        rows, cols = choose_grid(page.shape[1], page.shape[2], crop_size, max_crops)
    else:
        rows, cols = _checked_grid(grid, max_crops)

    def resized(height: int, width: int) -> Tensor:
        # half precision resized in float32: antialiased bilinear has no float16 / bfloat16 kernel on the CPU
        work = torch.promote_types(page.dtype, torch.float32)
        return F.interpolate(page[None].to(work), size=(height, width), mode="bilinear", antialias=True,
                             align_corners=False)[0].to(page.dtype)

    whole = resized(rows * crop_size, cols * crop_size)
    crops = whole.unflatten(1, (rows, crop_size)).unflatten(3, (cols, crop_size))  # [C, R, S, Cc, S]
    crops = crops.permute(1, 3, 0, 2, 4).reshape(rows * cols, page.shape[0], crop_size, crop_size)
    views = torch.cat([resized(crop_size, crop_size)[None], crops])
    cells = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1)
    positions = torch.cat([torch.full((1, 2), -1), cells.reshape(-1, 2)])
    return PageCrops(views, (rows, cols), positions)
