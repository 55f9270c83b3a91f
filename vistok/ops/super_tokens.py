"""Super tokens (Huang et al., "Vision Transformer with Super Token Sampling", CVPR 2023): a grid of super
tokens, each token softly associated with the 3x3 super tokens around its grid cell.

Shapes: a feature map ``[B, C, H, W]`` is cut into ``S = (H / h) * (W / w)`` cells of ``P = h * w`` tokens
(``h x w`` the super-token size); token features are held per cell as ``[B, S, P, C]``, super tokens as
``[B, C, H / h, W / w]``, associations as ``[B, S, P, 9]`` (one weight per neighbouring super token).
Neighbours outside the grid get no weight, so every token's association sums to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._modes import autocast_off
from ..errors import InvalidConfigError

__all__ = [
    "to_cells",
    "from_cells",
    "neighbours",
    "associate",
    "super_token_features",
    "super_token_mass",
    "map_back",
    "super_token_grid",
]


def _check_divisible(height: int, width: int, size: tuple[int, int]) -> None:
    if height % size[0] or width % size[1]:
        raise InvalidConfigError(
            f"a {height}x{width} token grid does not divide into {size[0]}x{size[1]} super-token cells")


def to_cells(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, S, P, C]``, the tokens of each ``h x w`` cell together."""
    batch, channels, height, width = x.shape
    _check_divisible(height, width, size)
    h, w = size
    cells = x.reshape(batch, channels, height // h, h, width // w, w)
    return cells.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // h) * (width // w), h * w, channels)


def from_cells(cells: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Inverse of :func:`to_cells`: ``[B, S, P, C]`` -> ``[B, C, H, W]`` for a ``grid`` of super tokens."""
    batch, _, _, channels = cells.shape
    rows, cols = grid
    h, w = size
    x = cells.reshape(batch, rows, cols, h, w, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(batch, channels, rows * h, cols * w)


def super_token_grid(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Initial super tokens: the mean of each cell. ``[B, C, H, W]`` -> ``[B, C, H / h, W / w]``."""
    _check_divisible(x.shape[-2], x.shape[-1], size)
    return F.avg_pool2d(x, kernel_size=size, stride=size)


def neighbours(super_tokens: Tensor) -> Tensor:
    """The 3x3 neighbourhood of every cell: ``[B, C, R, K]`` -> ``[B, S, C, 9]`` (zeros outside the grid)."""
    batch, channels, rows, cols = super_tokens.shape
    unfolded = F.unfold(super_tokens, kernel_size=3, padding=1)  # [B, C * 9, S]
    return unfolded.transpose(1, 2).reshape(batch, rows * cols, channels, 9)


def _neighbour_exists(rows: int, cols: int, device: torch.device) -> Tensor:
    """``[S, 9]`` bool: whether each of a cell's 3x3 neighbours lies inside the grid."""
    ones = torch.ones(1, 1, rows, cols, device=device)
    return F.unfold(ones, kernel_size=3, padding=1)[0].transpose(0, 1) > 0


def _fold(per_neighbour: Tensor, grid: tuple[int, int]) -> Tensor:
    """Sum contributions addressed to neighbours back onto the super tokens they name:
    ``[B, S, C, 9]`` -> ``[B, C, R, K]``."""
    batch, cells, channels, _ = per_neighbour.shape
    columns = per_neighbour.reshape(batch, cells, channels * 9).transpose(1, 2)
    return F.fold(columns, output_size=grid, kernel_size=3, padding=1)


def associate(cells: Tensor, super_tokens: Tensor, scale: float) -> Tensor:
    """Soft association of every token with the 3x3 super tokens around its cell:
    ``softmax(scale * <token, super token>)`` over the neighbours inside the grid.

    Args:
        cells: ``[B, S, P, C]`` token features.
        super_tokens: ``[B, C, R, K]`` with ``R * K = S``.

    Returns:
        ``[B, S, P, 9]``, each row summing to one (0 for neighbours outside the grid).
    """
    rows, cols = super_tokens.shape[-2:]
    # in float32 at least: a float16 product of two wide tokens overflows to inf (a NaN softmax) where the
    # model's own attention, which scales before its product, stays finite
    work = torch.promote_types(cells.dtype, torch.float32)
    with autocast_off(cells.device):  # autocast would run the product in float16 again
        logits = (cells.to(work) @ neighbours(super_tokens).to(work)) * scale
    exists = _neighbour_exists(rows, cols, cells.device)[None, :, None, :]
    return logits.masked_fill(~exists, float("-inf")).softmax(dim=-1).to(cells.dtype)


def super_token_mass(association: Tensor, grid: tuple[int, int]) -> Tensor:
    """How many tokens' worth of association each super token receives: ``[B, S, P, 9]`` -> ``[B, 1, R, K]``
    (the masses sum to the number of tokens)."""
    return _fold(association.sum(dim=2, keepdim=True), grid)


def super_token_features(cells: Tensor, association: Tensor, grid: tuple[int, int]) -> Tensor:
    """Each super token as the association-weighted mean of the tokens associated with it:
    ``[B, S, P, C]``, ``[B, S, P, 9]`` -> ``[B, C, R, K]``."""
    weighted = cells.transpose(-1, -2) @ association  # [B, S, C, 9]
    work = torch.promote_types(weighted.dtype, torch.float32)  # in float16 a clamp of 1e-12 is 0, and 0 / 0 a NaN
    mass = super_token_mass(association, grid).to(work)
    return (_fold(weighted, grid).to(work) / mass.clamp_min(1e-12)).to(weighted.dtype)


def map_back(super_tokens: Tensor, association: Tensor) -> Tensor:
    """Every token as its association-weighted mix of the neighbouring super tokens:
    ``[B, C, R, K]``, ``[B, S, P, 9]`` -> ``[B, S, P, C]``."""
    return association @ neighbours(super_tokens).transpose(-1, -2)
