"""Training-free super token attention for pretrained ViTs.

In each chosen block, the block's own attention is computed among super tokens instead of all patch tokens:
the normalised patch tokens are grouped into ``h x w`` cells on the patch grid, softly associated with the
3x3 neighbouring super tokens (as in STViT), the super tokens (association-weighted means) and the prefix
tokens go through the block's own q/k/v projections and attention, and each patch token's attention output
is its association-weighted mix of the neighbouring super tokens' outputs. Each super token enters the
attention with a ``log(mass)`` key bias, its association mass being how many tokens it stands for
(proportional attention), so that where all patch tokens agree the block computes exactly what it
computes without super tokens. The token count is unchanged; the attention part of the block runs on
``prefix + N / (h w)`` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .._checks import is_int
from ..backbones.base import BackboneInfo, BlockOps
from ..errors import InvalidConfigError, PatchStateError, UnsupportedModelError
from ..ops import attend
from ..ops.super_tokens import (
    associate,
    from_cells,
    map_back,
    super_token_features,
    super_token_grid,
    super_token_mass,
    to_cells,
)
from ..tokens import TokenLayout
from .ats import default_ats_blocks
from .base import MethodConfig, TokenReducer, is_sequence_option, resolve_block_indices

__all__ = ["SuperTokenConfig", "SuperTokenAttender"]


class SuperTokenAttender(TokenReducer):
    """Super token attention in one block, with the block's own q/k/v and output projection."""

    needs_whole_grid = True

    def __init__(self, grid: tuple[int, int], stoken_size: tuple[int, int], n_iter: int) -> None:
        self.grid = grid
        self.stoken_size = stoken_size
        self.n_iter = n_iter

    def __repr__(self) -> str:
        return f"SuperTokenAttender(stoken_size={self.stoken_size}, n_iter={self.n_iter})"

    def attend(self, ops: BlockOps, h: Tensor, layout: TokenLayout, path: str = "auto") -> Tensor:
        if not layout.is_original:
            raise PatchStateError("super_token needs the whole patch grid; place its blocks before the blocks of "
                                  "methods that drop or merge tokens")
        prefix, (rows, cols) = layout.num_prefix, self.grid
        batch, tokens, channels = h.shape
        if layout.grid_size != (rows, cols):
            got = "an unknown grid" if layout.grid_size is None else "x".join(map(str, layout.grid_size))
            raise PatchStateError(f"super_token was set up for the model's {rows}x{cols} patch grid, but this input "
                                  f"makes {got} ({tokens - prefix} patch tokens)")
        patch_map = h[:, prefix:].transpose(1, 2).reshape(batch, channels, rows, cols)
        cells = to_cells(patch_map, self.stoken_size)
        super_grid = (rows // self.stoken_size[0], cols // self.stoken_size[1])
        association = self._association(cells, patch_map, super_grid)
        super_tokens = super_token_features(cells, association, super_grid).flatten(2).transpose(1, 2)
        mass = super_token_mass(association, super_grid).flatten(1)  # [B, S]
        key_bias = torch.cat([mass.new_zeros(batch, prefix), mass.log()], dim=1)[:, None, None, :].to(h.dtype)
        q, k, v = ops.qkv(torch.cat([h[:, :prefix], super_tokens], dim=1), None)
        out = attend(q, k, v, key_bias, ops.dropout_p, path)  # [B, H, prefix + S, d]
        heads, head_dim = out.shape[1], out.shape[-1]
        super_out = out[:, :, prefix:].transpose(1, 2).flatten(2).transpose(1, 2)
        super_out = super_out.reshape(batch, heads * head_dim, *super_grid)
        patch_out = from_cells(map_back(super_out, association), super_grid, self.stoken_size)
        patch_out = patch_out.flatten(2).reshape(batch, heads, head_dim, rows * cols).transpose(2, 3)
        return torch.cat([out[:, :, :prefix], patch_out], dim=2)

    @torch.no_grad()
    def _association(self, cells: Tensor, patch_map: Tensor, super_grid: tuple[int, int]) -> Tensor:
        scale = patch_map.shape[1] ** -0.5
        super_tokens = super_token_grid(patch_map, self.stoken_size)
        for step in range(self.n_iter):
            association = associate(cells, super_tokens, scale)
            if step < self.n_iter - 1:
                super_tokens = super_token_features(cells, association, super_grid)
        return association


@dataclass
class SuperTokenConfig(MethodConfig):
    """Options of ``vistok.patch(model, "super_token", ...)``.

    Attributes:
        blocks: the blocks whose attention runs among super tokens. ``None``: the first quarter of the
            blocks (0..2 of 12; ``depth / 4`` rounded half up, at least one: the blocks before ATS's default
            start), the early blocks where attention is most local.
        stoken_size: super-token cell size on the patch grid, an int or ``(h, w)``; must divide the grid.
        n_iter: association refinement rounds (STViT uses 1).
    """

    blocks: Sequence[int] | None = None
    stoken_size: int | Sequence[int] = 2
    n_iter: int = 1

    name: ClassVar[str] = "super_token"

    def __post_init__(self) -> None:  # what needs no model; build() checks the grid against it
        size = self._size()
        if len(size) != 2 or any(not is_int(s, 1) for s in size):
            raise InvalidConfigError(f"super_token: stoken_size must be a positive int or (h, w), got "
                                     f"{self.stoken_size!r}")
        if not is_int(self.n_iter, 1):
            raise InvalidConfigError(f"super_token: n_iter must be an int >= 1, got {self.n_iter!r}")

    def _size(self) -> tuple[object, ...]:
        if is_sequence_option(self.stoken_size):
            return tuple(self.stoken_size)
        return (self.stoken_size, self.stoken_size)  # an int, or a value the check refuses by name

    def build(self, info: BackboneInfo) -> dict[int, TokenReducer]:
        if info.rotary:
            raise UnsupportedModelError(f"super_token: {info.model_class} uses rotary position embeddings, and a "
                                        "super token has no single position")
        if len(info.grid_size) != 2:
            raise UnsupportedModelError(f"super_token: {info.model_class} has a {len(info.grid_size)}-D patch grid "
                                        f"{info.grid_size}; super tokens are defined on 2-D (image) grids")
        # the blocks before ATS's default start (depth / 4 rounded half up): the two defaults compose, back to back
        default = list(range(max(1, default_ats_blocks(info.num_blocks)[0])))
        blocks = resolve_block_indices(self.blocks, info.num_blocks, default)
        size = self._size()
        rows, cols = info.grid_size
        if rows % size[0] or cols % size[1] or size == (1, 1):
            raise InvalidConfigError(
                f"super_token: stoken_size {size[0]}x{size[1]} must divide the {rows}x{cols} patch grid of "
                f"{info.model_class} and be larger than 1x1")
        return {block: SuperTokenAttender((rows, cols), size, self.n_iter) for block in sorted(blocks)}
