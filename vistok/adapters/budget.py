"""Visual tokens to an exact budget: small pure functions over one batch of images' tokens ``[B, N, D]``, each
returning what it computed as a :class:`Budgeted` (the tokens, how many originals each stands for, and where each
original went).

These run at the boundary between a vision tower and a language model, where every image must arrive with the
same, exact number of tokens (the prompt has one placeholder per token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import is_int
from .._modes import autocast_off
from ..errors import InputShapeError, InvalidConfigError
from ..ops.merging import bipartite_soft_matching, group_means, merge_weighted, size_dtype

__all__ = ["Budgeted", "merge_to_budget", "merge_regions_to_budget", "select_dominant", "pool_to_budget",
           "select_random", "pool_grid", "in_patch_order"]


@dataclass(frozen=True)
class Budgeted:
    """``tokens`` ``[B, T, D]``; ``sizes`` ``[B, T]`` (how many input tokens each output token stands for; they
    sum to ``N`` where nothing was dropped; float32, or float64 for float64 tokens); ``owner`` ``[B, N]`` long:
    for each input token, the output token that carries it, ``-1`` if it was dropped."""

    tokens: Tensor
    sizes: Tensor
    owner: Tensor

    def positions(self) -> Tensor:
        """``[B, T]`` long: for each output token, the first input position it carries."""
        batch, count = self.tokens.shape[:2]
        n = self.owner.shape[1]
        first = torch.full((batch, count + 1), n, dtype=torch.long, device=self.owner.device)
        where = torch.arange(n, device=self.owner.device).expand(batch, -1)
        slot = torch.where(self.owner >= 0, self.owner, count)  # dropped tokens go to a spare column
        first.scatter_reduce_(1, slot, where, reduce="amin")
        return first[:, :count]


def in_patch_order(result: Budgeted, first: Tensor | None = None) -> Budgeted:
    """``result`` with each image's tokens sorted by the first input position they carry (VisionZip's contextual
    tokens, appended after the dominant ones, move to where their first member is), or by ``first`` ``[B, T]``
    where given (e.g. the first patch each carries when the inputs were a tower's reduced tokens)."""
    order = (result.positions() if first is None else first).argsort(dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                            .expand_as(order))
    tokens = result.tokens.gather(1, order[..., None].expand(-1, -1, result.tokens.shape[-1]))
    owner = torch.where(result.owner >= 0, rank.gather(1, result.owner.clamp_min(0)), -1)
    return Budgeted(tokens, result.sizes.gather(1, order), owner)


def _check(x: Tensor, tokens: int, name: str) -> None:
    if x.dim() != 3:
        raise InputShapeError(f"{name}: expected tokens [B, N, D], got {tuple(x.shape)}")
    if not is_int(tokens) or not 1 <= tokens <= x.shape[1]:
        raise InvalidConfigError(f"{name}: the budget must be an int in [1, {x.shape[1]}] (the tokens there are), "
                                 f"got {tokens!r}")


def _check_grid(x: Tensor, grid: tuple[int, int], name: str) -> None:
    rows, cols = grid
    if rows * cols != x.shape[1]:
        raise InputShapeError(f"{name}: a {rows} x {cols} grid needs N = {rows * cols} tokens, got {x.shape[1]}")


def _metric_or_tokens(x: Tensor, metric: Tensor | None, name: str) -> Tensor:
    """``metric`` (``[B, N, d]``, checked against ``x``), or ``x`` itself when there is none."""
    if metric is not None and metric.shape[:2] != x.shape[:2]:
        raise InputShapeError(f"{name}: metric {tuple(metric.shape)} does not fit tokens {tuple(x.shape)}")
    return x if metric is None else metric


def _selected(x: Tensor, keep: Tensor) -> Budgeted:
    """The tokens at ``keep`` ``[B, T]`` (sorted positions) as a :class:`Budgeted` of size-1 tokens."""
    batch, n = x.shape[:2]
    owner = torch.full((batch, n), -1, dtype=torch.long, device=x.device)
    owner.scatter_(1, keep, torch.arange(keep.shape[1], device=x.device).expand_as(keep))
    tokens = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
    return Budgeted(tokens, torch.ones(keep.shape, dtype=size_dtype(x.dtype), device=x.device), owner)


def _check_real(valid: Tensor, tokens: int, name: str) -> Tensor:
    counts = valid.sum(dim=1)
    if counts.numel() and int(counts.min()) < tokens:
        raise InputShapeError(f"{name}: an image has only {int(counts.min())} real tokens (the rest is padding), "
                              f"fewer than the budget of {tokens}")
    return counts


def merge_to_budget(x: Tensor, tokens: int, metric: Tensor | None = None, sizes: Tensor | None = None,
                    valid: Tensor | None = None, order: Tensor | None = None) -> Budgeted:
    """Bipartite soft matching repeated until exactly ``tokens`` remain (B-VLLM's spatial merge; ToMe's matching
    and size-weighted means, :mod:`vistok.ops.merging`), the survivors in their original order.

    Args:
        x: ``[B, N, D]`` tokens.
        tokens: the budget ``T``, ``1 <= T <=`` each image's real tokens.
        metric: ``[B, N, d]`` what similarity is measured on (default: ``x`` itself).
        sizes: ``[B, N]`` how many patches each token already stands for (default 1), e.g. after merging in
            the tower; ``> 0`` on every real token.
        valid: ``[B, N]`` bool, ``False`` for padding (a ragged set from an adaptive method in the tower). Padding
            is never merged and never returned.
        order: ``[B, N]`` what "original order" means (default the position), e.g. each token's source patch.

    Raises:
        InputShapeError: ``sizes``, ``valid`` or ``order`` not ``[B, N]``, or a real token of size ``<= 0`` (it
            would come out with size 0 and no owner).
    """
    _check(x, tokens, "merge_to_budget")
    batch, n, _ = x.shape
    device = x.device
    metric = _metric_or_tokens(x, metric, "merge_to_budget")
    for name, given in (("sizes", sizes), ("valid", valid), ("order", order)):
        if given is not None and given.shape != (batch, n):
            raise InputShapeError(f"merge_to_budget: {name} must be [B, N] = {(batch, n)} like the tokens "
                                  f"{tuple(x.shape)}, got {tuple(given.shape)}")
    valid = torch.ones(batch, n, dtype=torch.bool, device=device) if valid is None else valid.bool()
    if sizes is not None and bool((valid & ~(sizes > 0)).any()):
        raise InputShapeError(f"merge_to_budget: sizes must be > 0 on every real token, got "
                              f"{sizes[valid].min().item()!r} (padding, valid=False, may have any size)")
    order = torch.arange(n, device=device).expand(batch, -1) if order is None else order.long()
    alive_count = _check_real(valid, tokens, "merge_to_budget")
    last = int(order.max()) + 1 if order.numel() else 1
    ordered = torch.where(valid, order, last)
    start = ordered.argsort(dim=1, stable=True)  # each row's real tokens first, in order; padding after
    x, metric = (t.gather(1, start[..., None].expand(-1, -1, t.shape[-1])) for t in (x, metric))
    counted = size_dtype(x.dtype)
    weights = torch.ones(batch, n, dtype=counted, device=device) if sizes is None else sizes.to(counted)
    weights = (weights * valid).gather(1, start)
    first = ordered.gather(1, start)  # each current token's first original position
    owner = torch.full((batch, n), -1, dtype=torch.long, device=device)
    owner.scatter_(1, start, torch.arange(n, device=device).expand(batch, -1))
    owner = torch.where(valid, owner, -1)
    while bool((alive_count > tokens).any()):
        current = x.shape[1]
        r = torch.minimum(alive_count - tokens, alive_count // 2)  # real tokens lead, so only real ones merge
        matching = bipartite_soft_matching(metric, r, valid=weights > 0)
        merged_x, merged_weights = merge_weighted(x, weights, matching)
        metric, _ = merge_weighted(metric, weights.to(metric.dtype), matching)
        # where each old position lands in the merged layout (set A, then set B)
        na = len(matching.a_positions)
        dest = torch.empty(batch, current, dtype=torch.long, device=device)
        dest[:, matching.a_positions] = torch.where(matching.merged, na + matching.target,
                                                    torch.arange(na, device=device))
        dest[:, matching.b_positions] = na + torch.arange(len(matching.b_positions), device=device)
        laid_first = torch.full((batch, current), last, dtype=torch.long, device=device)
        laid_first.scatter_reduce_(1, dest, first, reduce="amin")
        alive_count = alive_count - r
        # the survivors back in their original order, dead ones after them
        survivor_first = torch.where(merged_weights > 0, laid_first, last + 1)
        keep = survivor_first.argsort(dim=1, stable=True)[:, : int(alive_count.max())]
        rank = torch.full((batch, current), -1, dtype=torch.long, device=device)
        rank.scatter_(1, keep, torch.arange(keep.shape[1], device=device).expand_as(keep))
        owner = torch.where(owner >= 0, rank.gather(1, dest.gather(1, owner.clamp_min(0))), -1)
        x = merged_x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        metric = metric.gather(1, keep[..., None].expand(-1, -1, metric.shape[-1]))
        weights = merged_weights.gather(1, keep)
        first = laid_first.gather(1, keep)
    return Budgeted(x[:, :tokens], weights[:, :tokens], owner)


def _grid_edges(grid: tuple[int, int], device: torch.device) -> tuple[Tensor, Tensor]:
    """The ``[E]`` pairs of 4-neighbour patches (row-major indices) of a ``rows x cols`` grid."""
    rows, cols = grid
    index = torch.arange(rows * cols, device=device).view(rows, cols)
    return (torch.cat([index[:, :-1].flatten(), index[:-1].flatten()]),
            torch.cat([index[:, 1:].flatten(), index[1:].flatten()]))


def merge_regions_to_budget(x: Tensor, grid: tuple[int, int], tokens: int, metric: Tensor | None = None) -> Budgeted:
    """Adjacent regions of the patch grid merged, most similar first, until exactly ``tokens`` remain: an adaptive
    pooling. Every output token is the mean of a 4-connected region of patches (pooling's locality: only
    neighbouring regions merge), but regions follow the content (a blank area becomes one token, an object keeps
    several).

    Each round, every region finds its most similar adjacent region (cosine similarity of its ``metric`` sum, which
    points where its mean does; ties: the smaller region id); pairs that chose each other merge, the most similar
    first, unless a region outside the pairs has a more similar neighbour (that merge would come first), and at most
    half of what the image still needs. At least one pair merges per round (the most similar adjacent pair chose
    each other), and an image's last merge is its most similar adjacent pair; as several pairs of one round merge
    together, the regions can differ from merging one pair at a time. Rounds: about 60 on smooth 24 x 24 features
    brought to 64, up to one per merge where one growing region stays every neighbour's most similar (near-constant
    features); each costs O(N^2), whatever the feature width. A region's id is its first patch, so the output is in
    patch order. Memory: a ``[B, N, N]`` float32 (float64 for float64 input) matrix of the regions' dot products.

    Args:
        x: ``[B, N, D]`` tokens of a row-major ``grid`` (``rows * cols == N``).
        grid: ``(rows, cols)``.
        tokens: the budget ``T``, ``1 <= T <= N``.
        metric: ``[B, N, d]`` what similarity is measured on (default: ``x`` itself).
    """
    _check(x, tokens, "merge_regions_to_budget")
    _check_grid(x, grid, "merge_regions_to_budget")
    metric = _metric_or_tokens(x, metric, "merge_regions_to_budget")
    batch, n, _ = x.shape
    device = x.device
    ids = torch.arange(n, device=device).expand(batch, -1)
    with autocast_off(device):  # merge decisions in float32 also under autocast
        owner = _region_owners(metric.detach(), _grid_edges(grid, device), tokens)
    means, sizes = group_means(x, owner, n)
    keep = torch.where(sizes > 0, ids, n).sort(dim=1).values[:, :tokens]  # the surviving ids, in patch order
    slot = torch.full((batch, n), -1, dtype=torch.long, device=device).scatter_(
        1, keep, torch.arange(tokens, device=device).expand(batch, -1))
    merged = means.gather(1, keep[..., None].expand(-1, -1, means.shape[-1]))
    return Budgeted(merged, sizes.gather(1, keep), slot.gather(1, owner))


def _region_owners(metric: Tensor, edges: tuple[Tensor, Tensor], tokens: int) -> Tensor:
    """The rounds of :func:`merge_regions_to_budget`: ``[B, N]`` each patch's region (its first patch) once every
    image has ``tokens`` regions. The dot products of the regions' metric sums (a sum points where its mean does)
    are kept up to date by adding rows and columns, so a round costs O(N^2) whatever the feature width."""
    batch, n, _ = metric.shape
    first, second = edges
    ids = torch.arange(n, device=metric.device).expand(batch, -1)
    owner = ids.clone()
    wide = metric.to(torch.promote_types(metric.dtype, torch.float32))
    gram = wide @ wide.transpose(1, 2)
    gram = (gram + gram.transpose(1, 2)) / 2
    alive = torch.full((batch,), n, device=metric.device)
    while bool((alive > tokens).any()):
        a, b = owner[:, first], owner[:, second]  # [B, E] the regions on the two sides of each grid edge
        norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt().clamp_min(1e-12)
        score = gram.flatten(1).gather(1, a * n + b) / (norms.gather(1, a) * norms.gather(1, b))
        score = score.masked_fill(a == b, float("-inf"))
        absorbs, partner = _mutual_best_merges(score, a, b, n, (alive - tokens + 1) // 2)
        if bool(((alive > tokens) & ~absorbs.any(dim=1)).any()):  # finite scores always give a pair
            raise InputShapeError("merge_regions_to_budget: the similarities are not finite (NaN or inf in the "
                                  "features or the metric)")
        owner = torch.cat([ids, ids.new_full((batch, 1), n)], 1).scatter(
            1, torch.where(absorbs, partner, n), ids).gather(1, owner)
        image, region = absorbs.nonzero(as_tuple=True)  # the pairs are disjoint: no index is written twice
        taken = partner[image, region]
        gram[image, region] += gram[image, taken]
        gram[image, :, region] += gram[image, :, taken]
        alive = alive - absorbs.sum(1)
    return owner


def _mutual_best_merges(score: Tensor, a: Tensor, b: Tensor, n: int, most: Tensor) -> tuple[Tensor, Tensor]:
    """One round of :func:`merge_regions_to_budget`: from ``score`` ``[B, E]`` (similarity across each grid edge
    between regions ``a`` and ``b``, ``-inf`` inside a region), which regions absorb their partner: ``absorbs``
    ``[B, n]`` bool and ``partner`` ``[B, n]`` (each region's most similar neighbour, ``n`` if none); at most
    ``most`` ``[B]`` merges per image."""
    batch = score.shape[0]
    ids = torch.arange(n, device=score.device).expand(batch, -1)
    ends, others, both = torch.cat([a, b], 1), torch.cat([b, a], 1), torch.cat([score, score], 1)
    best = both.new_full((batch, n), float("-inf")).scatter_reduce(1, ends, both, reduce="amax")
    at_best = (both == best.gather(1, ends)) & (both > float("-inf"))
    partner = torch.full((batch, n), n, device=score.device).scatter_reduce(
        1, ends, torch.where(at_best, others, n), reduce="amin")
    in_pair = (partner < n) & (partner.clamp_max(n - 1).gather(1, partner.clamp_max(n - 1)) == ids)
    mutual = in_pair & (ids < partner)  # each pair once, from its smaller id
    # a pair merges only if no region outside the pairs has a more similar neighbour (that merge would come first)
    bar = torch.where(in_pair, float("-inf"), best).amax(dim=1, keepdim=True)
    mutual = mutual & (best >= bar)
    pairs = torch.minimum(most, mutual.sum(1))
    order = torch.where(mutual, best, float("-inf")).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, ids)
    return mutual & (rank < pairs[:, None]), partner


def select_dominant(x: Tensor, scores: Tensor, tokens: int, contextual: int = 0) -> Budgeted:
    """VisionZip's dominant tokens: the ``tokens - contextual`` highest-``scores`` tokens in their original
    order, then ``contextual`` tokens that each average a group of the rest: targets evenly
    spaced over the unselected tokens, every other unselected token joining its most similar target (cosine).
    The contextual tokens are vistok's variant of VisionZip's: each is the mean of its group, target included,
    grouped by the features' cosine; VisionZip's code adds the target to the mean of the others (a token of about
    twice the norm) and groups by the keys averaged over heads.

    Args:
        x: ``[B, N, D]``; scores: ``[B, N]`` (e.g. the class token's attention); ``0 <= contextual < tokens``.
    """
    _check(x, tokens, "select_dominant")
    if scores.shape != x.shape[:2]:
        raise InputShapeError(f"select_dominant: scores {tuple(scores.shape)} must be [B, N] = {tuple(x.shape[:2])}")
    if not is_int(contextual) or not 0 <= contextual < tokens:
        raise InvalidConfigError(f"select_dominant: contextual must be an int in [0, {tokens - 1}], got "
                                 f"{contextual!r}")
    n = x.shape[1]
    dominant = tokens - contextual
    if contextual > n - dominant:
        raise InvalidConfigError(f"select_dominant: {contextual} contextual tokens need as many unselected tokens; "
                                 f"only {n - dominant} are left")
    ranked = scores.float().argsort(dim=1, descending=True, stable=True)
    chosen = _selected(x, ranked[:, :dominant].sort(dim=1).values)
    if contextual == 0:
        return chosen
    rest = ranked[:, dominant:].sort(dim=1).values  # [B, R] unselected positions, in order
    step = rest.shape[1] / contextual
    target_slots = (torch.arange(contextual, device=x.device) * step).long()
    rest_x = x.gather(1, rest[..., None].expand(-1, -1, x.shape[-1]))
    unit = F.normalize(rest_x.float(), dim=-1)
    similarity = unit @ unit[:, target_slots].transpose(1, 2)  # [B, R, contextual]
    group = similarity.argmax(dim=-1)
    group[:, target_slots] = torch.arange(contextual, device=x.device)  # a target is in its own group
    means, sizes = group_means(rest_x, group, contextual)
    owner = chosen.owner.scatter(1, rest, dominant + group)
    return Budgeted(torch.cat([chosen.tokens, means], dim=1), torch.cat([chosen.sizes, sizes], dim=1), owner)


def pool_grid(grid: tuple[int, int], tokens: int) -> tuple[int, int]:
    """The ``(rows, cols)`` with ``rows * cols == tokens``, each at most the grid's, whose aspect is closest to the
    grid's. Raises InvalidConfigError where none is within a factor 2 of it (e.g. a prime budget)."""
    best = _pooled_shape(grid, tokens)
    if best is None:
        rows, cols = grid
        raise InvalidConfigError(f"pooling a {rows} x {cols} grid cannot give exactly {tokens} tokens on a grid of "
                                 f"about its shape; choose a budget such as {_near_pool_budgets(grid, tokens)}")
    return best


def poolable(grid: tuple[int, int], tokens: int) -> bool:
    """Whether :func:`pool_grid` can pool ``grid`` to exactly ``tokens`` cells."""
    return _pooled_shape(grid, tokens) is not None


def _pooled_shape(grid: tuple[int, int], tokens: int) -> tuple[int, int] | None:
    """:func:`pool_grid`'s shape, or ``None`` where no shape is within a factor 2 of the grid's aspect."""
    rows, cols = grid
    pairs = [(r, tokens // r) for r in range(1, rows + 1) if tokens % r == 0 and tokens // r <= cols]
    aspect = math.log(rows / cols)
    best = min(pairs, key=lambda p: abs(math.log(p[0] / p[1]) - aspect), default=None)
    if best is None or abs(math.log(best[0] / best[1]) - aspect) > math.log(2):
        return None
    return best


def _near_pool_budgets(grid: tuple[int, int], tokens: int) -> list[int]:
    """The three budgets nearest ``tokens`` that the grid pools to (at most its own size)."""
    rows, cols = grid
    return sorted((t for t in range(1, rows * cols + 1) if poolable(grid, t)), key=lambda t: (abs(t - tokens), t))[:3]


def pool_to_budget(x: Tensor, grid: tuple[int, int], tokens: int) -> Budgeted:
    """Average pooling of the ``grid`` (row-major tokens) to a grid of exactly ``tokens`` cells
    (:func:`pool_grid`); 2 x 2 pooling (LLaVA-OneVision's) at a quarter of an even grid. Where the grid does not
    divide, adaptive pooling's windows overlap: a patch in two windows is owned by the later one, so that each
    token's first patch (its position) is its window's first, and ``sizes`` count the patches owned."""
    _check(x, tokens, "pool_to_budget")
    _check_grid(x, grid, "pool_to_budget")
    rows, cols = grid
    out_rows, out_cols = pool_grid(grid, tokens)
    batch = x.shape[0]
    image = x.transpose(1, 2).reshape(batch, -1, rows, cols)
    pooled = F.adaptive_avg_pool2d(image, (out_rows, out_cols)).flatten(2).transpose(1, 2)
    row_of, col_of = _last_window(rows, out_rows, x.device), _last_window(cols, out_cols, x.device)
    cell = (row_of[:, None] * out_cols + col_of[None, :]).flatten()
    sizes = torch.bincount(cell, minlength=tokens).to(size_dtype(x.dtype))
    return Budgeted(pooled, sizes.expand(batch, -1), cell.expand(batch, -1))


def _last_window(size: int, windows: int, device: torch.device) -> Tensor:
    """``[size]``: the last of adaptive pooling's ``windows`` over ``size`` cells that each cell falls in (window
    ``o`` starts at ``floor(o * size / windows)``)."""
    starts = (torch.arange(windows, device=device) * size) // windows
    return torch.searchsorted(starts, torch.arange(size, device=device), right=True) - 1


def select_random(x: Tensor, tokens: int, generator: torch.Generator | None = None,
                  valid: Tensor | None = None) -> Budgeted:
    """``tokens`` tokens of each image chosen uniformly at random among its real ones (``valid``, default all),
    in their original order (the baseline)."""
    _check(x, tokens, "select_random")
    noise = torch.rand(x.shape[:2], generator=generator, device="cpu" if generator is None else generator.device)
    noise = noise.to(x.device)
    if valid is not None:
        valid = valid.bool()
        _check_real(valid, tokens, "select_random")
        noise = noise.masked_fill(~valid, 2.0)  # padding ranks after every real token
    keep = noise.argsort(dim=1)[:, :tokens].sort(dim=1).values
    return _selected(x, keep)
