"""Token-level correlation-guided compression (Zhang et al., arXiv 2407.14439) as small pure tensor functions:
patch-patch correlation -> redundant tokens -> each view's information density -> a page budget split over the
views -> within a view, the tokens the class token correlates with most, in their order.

The paper's code was never released; the choices it leaves open are ours and are written where they are made:

* a token is *redundant* when at least ``repeats`` other tokens of its view have keys whose cosine similarity with
  its key passes ``similarity`` (the paper: "many counterparts with high similarity"; both numbers are ours);
* a view's *information density* is the share of its tokens that are not redundant (as the paper);
* a page budget is split over its views in proportion to density (largest remainders in exact rational arithmetic,
  ties to the earlier view, exact total, each view at least ``minimum`` and at most its token count), the global
  view first taking its own share;
* within a view, the top tokens by class-token attention (or by the cosine of each token with the class token),
  in their original order; the others dropped or merged into the kept token they are most similar to; a tower
  without a class token (SigLIP) ranks by the attention each token receives, every query and head averaged
  (our choice; the paper's towers all have a class token).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import is_int, is_real
from ..errors import InputShapeError, InvalidConfigError
from ..ops.merging import group_means, size_dtype

__all__ = ["redundant_tokens", "information_density", "allocate_budget", "top_tokens", "merge_into_kept",
           "KeptTokens", "tile_index", "select_over_tiles"]


def _check_tokens(tokens: Tensor, name: str, what: str) -> None:
    if tokens.dim() != 3:
        raise InputShapeError(f"{name}: expected {what} [V, N, D] (views, tokens, channels), got "
                              f"{tuple(tokens.shape)}")


def redundant_tokens(keys: Tensor, similarity: float = 0.9, repeats: int = 4, groups: Tensor | None = None
                     ) -> Tensor:
    """``[V, N]`` bool: tokens whose key has at least ``repeats`` other tokens of the same view past
    ``similarity`` (cosine) -- blank margins, flat fills and repeated texture.

    Args:
        keys: ``[V, N, D]`` patch tokens' keys (heads concatenated), one row of tokens per view.
        groups: ``[V, N]`` long, optional: only tokens of the same group count (the tiles of a crop grid).
    """
    _check_tokens(keys, "redundant_tokens", "keys")
    if not is_real(similarity) or not -1 <= similarity < 1:
        raise InvalidConfigError(f"redundant_tokens: similarity must be a cosine in [-1, 1) (tokens count as "
                                 f"repeats past it), got {similarity!r}")
    if not is_int(repeats, 1):
        raise InvalidConfigError(f"redundant_tokens: repeats must be a positive int, got {repeats!r}")
    unit = F.normalize(keys.float(), dim=-1)
    zero = (keys == 0).all(dim=-1)  # no direction: a zero key repeats the other zero keys only
    either_zero = zero[:, :, None] | zero[:, None, :]  # its cosine of 0 would pass a negative similarity
    close = (((unit @ unit.transpose(1, 2)) > similarity) & ~either_zero) | (zero[:, :, None] & zero[:, None, :])
    close &= ~torch.eye(keys.shape[1], dtype=torch.bool, device=keys.device)  # others only
    if groups is not None:
        close &= groups[:, :, None] == groups[:, None, :]
    return close.sum(dim=-1) >= repeats


def information_density(keys: Tensor, similarity: float = 0.9, repeats: int = 4) -> Tensor:
    """``[V]``: each view's share of tokens that are not redundant (:func:`redundant_tokens`), in ``[0, 1]``."""
    return 1 - redundant_tokens(keys, similarity, repeats).float().mean(dim=-1)


def _cpu_float64(weights: Tensor) -> Tensor:
    """``weights`` ``[V]`` as a float64 CPU tensor, or an :class:`InputShapeError` for a tensor without values (the
    meta device)."""
    if weights.is_meta:
        raise InputShapeError("allocate_budget: weights on the meta device have no values to split a budget by")
    return weights.detach().to(device="cpu", dtype=torch.float64)


def _capacities(capacity: int | Sequence[int] | Tensor, views: int) -> Tensor:
    """``capacity`` (an int, or one per view: a list, numpy array or tensor of ints) as ``[views]`` long on the CPU.

    Raises:
        InvalidConfigError: not a non-negative int, or ints of ``[]`` or ``[views]`` (a float would be truncated).
    """
    if isinstance(capacity, (list, tuple, np.ndarray, np.integer)) and np.asarray(capacity).dtype.kind in "iu":
        capacity = torch.from_numpy(np.asarray(capacity).astype(np.int64))  # not floats, bools or objects
    if isinstance(capacity, Tensor):
        good = (not capacity.is_floating_point() and not capacity.is_complex() and capacity.dtype != torch.bool
                and capacity.shape in ((), (views,)) and bool((capacity >= 0).all()))
    else:
        good = is_int(capacity, 0)
    if not good:
        shown = f"{capacity.dtype} {tuple(capacity.shape)}" if isinstance(capacity, Tensor) else repr(capacity)
        raise InvalidConfigError(f"allocate_budget: capacity must be an int >= 0 or a [{views}] integer tensor "
                                 f"(or list, or array) of them (one per view), got {shown}")
    return torch.as_tensor(capacity, dtype=torch.long).cpu().expand(views).clone()


def allocate_budget(weights: Tensor, total: int, capacity: int | Sequence[int] | Tensor, minimum: int = 0
                    ) -> Tensor:
    """``[V]`` long: ``total`` tokens split over views in proportion to ``weights`` ``[V]`` (non-negative), each
    view getting at least ``minimum`` and at most its ``capacity`` (an int or ``[V]``), summing to ``total``.

    Water-filling: views that would pass their capacity are filled and the rest is shared again; the integer
    split takes the floors and gives the leftover tokens to the largest remainders (ties to the earlier view).
    Views of zero weight get ``minimum``, or more only when the others are full. The split runs on the CPU in
    exact rational arithmetic on the weights' values whatever their device (a tower's, often), so equal
    remainders are equal and no sum of large weights overflows: the budgets are a handful of integers, returned
    on the CPU.
    """
    if weights.dim() != 1 or weights.numel() == 0:
        raise InputShapeError(f"allocate_budget: expected weights [V] with V >= 1, got {tuple(weights.shape)}")
    weights = _cpu_float64(weights)
    if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
        raise InvalidConfigError("allocate_budget: weights must be finite and non-negative")
    views = weights.shape[0]
    cap = _capacities(capacity, views)
    if not is_int(minimum, 0) or bool((cap < minimum).any()):
        raise InvalidConfigError(f"allocate_budget: minimum must be an int in [0, capacity], got {minimum!r}")
    if not is_int(total) or not minimum * views <= total <= int(cap.sum()):
        raise InvalidConfigError(f"allocate_budget: total must be an int in [{minimum * views}, {int(cap.sum())}] "
                                 f"({views} views, at least {minimum} and at most their capacity each), got "
                                 f"{total!r}")
    exact = [Fraction(w) for w in weights.tolist()]  # a float is a dyadic rational: Fraction holds it exactly
    caps = cap.tolist()
    share = [Fraction(minimum)] * views
    room = [Fraction(c - minimum) for c in caps]
    left = Fraction(total - minimum * views)
    # each pass either gives all that is left or fills at least one view: at most V passes
    while left > 0 and any(r > 0 for r in room):
        w = [x if r > 0 else Fraction(0) for x, r in zip(exact, room, strict=True)]
        if sum(w) == 0:  # only zero-weight views have room: share evenly
            w = [Fraction(int(r > 0)) for r in room]
        whole = sum(w)
        give = [min(left * x / whole, r) for x, r in zip(w, room, strict=True)]
        share = [s + g for s, g in zip(share, give, strict=True)]
        room = [r - g for r, g in zip(room, give, strict=True)]
        left -= sum(give)
    counts = [min(math.floor(s), c) for s, c in zip(share, caps, strict=True)]
    remainder = [s - n if n < c else Fraction(-1) for s, n, c in zip(share, counts, caps, strict=True)]
    extra = total - sum(counts)
    for index in sorted(range(views), key=lambda i: (-remainder[i], i))[:extra]:
        counts[index] += 1
    return torch.tensor(counts, dtype=torch.long)


def top_tokens(scores: Tensor, count: int) -> Tensor:
    """``[count]`` long: the indices of the ``count`` highest ``scores`` ``[N]`` (ties to the earlier), ascending
    (the tokens keep their order in the view)."""
    if scores.dim() != 1:
        raise InputShapeError(f"top_tokens: expected scores [N], got {tuple(scores.shape)}")
    if not is_int(count) or not 0 <= count <= scores.shape[0]:
        raise InvalidConfigError(f"top_tokens: count must be an int in [0, {scores.shape[0]}], got {count!r}")
    return scores.float().argsort(descending=True, stable=True)[:count].sort().values


@dataclass(frozen=True)
class KeptTokens:
    """One view after selection: ``tokens`` ``[k, D]`` in their order, ``index`` ``[k]`` each one's position among
    the view's tokens, ``sizes`` ``[k]`` how many tokens each stands for (1 without merging), and ``owner`` ``[N]``
    which kept token each original token went to (``-1``: dropped)."""

    tokens: Tensor
    index: Tensor
    sizes: Tensor
    owner: Tensor


def merge_into_kept(tokens: Tensor, metric: Tensor, index: Tensor, merge: bool = True) -> KeptTokens:
    """Keep ``tokens[index]`` (``tokens`` ``[N, D]``, ``index`` ascending); with ``merge``, every other token is
    averaged into the kept token whose ``metric`` row ``[N, C]`` (e.g. its key) is most similar (cosine), so
    the kept tokens carry what the dropped ones showed, weighted by how many each stands for."""
    if tokens.dim() != 2 or metric.dim() != 2 or metric.shape[0] != tokens.shape[0]:
        raise InputShapeError(f"merge_into_kept: expected tokens [N, D] and metric [N, C], got "
                              f"{tuple(tokens.shape)} and {tuple(metric.shape)}")
    count = tokens.shape[0]
    owner = torch.full((count,), -1, dtype=torch.long, device=tokens.device)
    owner[index] = torch.arange(index.shape[0], device=tokens.device)
    if not merge or index.shape[0] == 0 or index.shape[0] == count:
        sizes = torch.ones(index.shape[0], dtype=size_dtype(tokens.dtype), device=tokens.device)
        return KeptTokens(tokens[index], index, sizes, owner)
    unit = F.normalize(metric.float(), dim=-1)
    rest = (owner < 0).nonzero().squeeze(1)
    owner[rest] = (unit[rest] @ unit[index].T).argmax(dim=-1)
    means, sizes = group_means(tokens[None], owner[None], index.shape[0])
    return KeptTokens(means[0], index, sizes[0], owner)


def tile_index(grid: tuple[int, int], tile: tuple[int, int]) -> Tensor:
    """``[rows * cols]`` long: which tile (row-major, of ``tile`` patches from the top-left, the last ones cut at the
    edges) each patch of a row-major ``grid`` is in: the crops of a crop grid that arrives as one grid."""
    (rows, cols), (tile_rows, tile_cols) = grid, tile
    if min(rows, cols, tile_rows, tile_cols) < 1:
        raise InvalidConfigError(f"tile_index: grid {grid} and tile {tile} must be positive")
    across = -(-cols // tile_cols)
    r = torch.arange(rows)[:, None] // tile_rows
    c = torch.arange(cols)[None, :] // tile_cols
    return (r * across + c).flatten()


def select_over_tiles(keys: Tensor, scores: Tensor, tiles: Tensor, budget: int, similarity: float = 0.9,
                      repeats: int = 4, minimum: int = 1, by_density: bool = True, within_tiles: bool = True
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """One unit whose patches fall into tiles (crops): each tile's density from the keys of its own tokens
    (:func:`redundant_tokens` within the tile), ``budget`` split over the tiles in proportion to their tokens
    that are not redundant (density times size: a tile cut at the grid's edge weighs what it holds;
    :func:`allocate_budget`, at least ``minimum`` each where the budget allows), and in each tile its top
    ``scores``. Without ``by_density`` the budget is split by the tiles' sizes alone (uniform per-crop budgets,
    the baseline the density split is measured against). Without ``within_tiles`` a token's repeats are counted
    over the whole unit (every tile of the page), so a pattern that recurs across crops (blank margins) is
    redundant even where each crop's own tokens differ.

    Args:
        keys: ``[N, D]``; scores: ``[N]``; tiles: ``[N]`` long, each patch's tile ``0 .. G - 1``.

    Returns:
        The kept indices ``[budget]`` ascending, the tiles' density ``[G]`` and budgets ``[G]``.
    """
    if keys.dim() != 2 or scores.shape != keys.shape[:1] or tiles.shape != keys.shape[:1]:
        raise InputShapeError(f"select_over_tiles: expected keys [N, D], scores [N] and tiles [N], got "
                              f"{tuple(keys.shape)}, {tuple(scores.shape)} and {tuple(tiles.shape)}")
    count = int(tiles.max()) + 1
    redundant = redundant_tokens(keys[None], similarity, repeats, tiles[None] if within_tiles else None)[0]
    tiles_cpu = tiles.cpu()  # the budgets are a handful of integers: split them on the CPU
    sizes = torch.bincount(tiles_cpu, minlength=count)
    informative = torch.zeros(count).index_add_(0, tiles_cpu, (~redundant).float().cpu())  # whole numbers
    density = informative / sizes.clamp_min(1)
    # density times size, as counts: float density * size would break equal shares apart by rounding
    weights = informative if by_density else sizes.double()
    budgets = allocate_budget(weights, budget, sizes, min(minimum, budget // count, int(sizes.min())))
    kept = []
    for index in range(count):
        members = (tiles == index).nonzero().squeeze(1)
        kept.append(members[top_tokens(scores[members], int(budgets[index]))])
    return torch.cat(kept).sort().values, density, budgets
