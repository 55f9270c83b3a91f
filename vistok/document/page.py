"""A page budget on any vision tower vistok patches (timm, open_clip, Hugging Face CLIP/SigLIP): run the tower on a
page's views (:func:`~vistok.document.crop_page`), read one block's keys and class-token attention through the
block's own modules, and keep the tokens :mod:`vistok.document.density` chooses.

>>> crops = vistok.document.crop_page(page, crop_size=224)
>>> config = vistok.document.CorrelationGuidedConfig(keep=0.33)
>>> result = vistok.document.compress_page(model, crops, config)
>>> result.tokens          # one [k_v, D] tensor per view; result.budgets, result.density
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import is_int
from .._modes import evaluating
from ..adapters.budget import Budgeted, select_dominant
from ..adapters.methods import BoundaryConfig, BoundaryInputs
from ..backbones import resolve_backbone
from ..errors import InputShapeError, InvalidConfigError, PatchStateError, UnsupportedModelError
from ..ops import class_token_attention, received_attention
from ..patching import _PartOfPatch
from .cropping import PageCrops
from .density import (
    KeptTokens,
    allocate_budget,
    merge_into_kept,
    redundant_tokens,
    select_over_tiles,
    tile_index,
    top_tokens,
)

__all__ = ["CorrelationGuidedConfig", "ViewSignals", "CompressedPage", "view_signals", "page_budgets", "compress_page",
           "compress_views"]

SCORES = ("attention", "similarity")
ALLOCATIONS = ("density", "uniform")
REDUNDANCY = ("crop", "page")


@dataclass
class CorrelationGuidedConfig(BoundaryConfig):
    """Token-level correlation-guided compression of a page's views (:mod:`vistok.document.density`).

    On a tower, :func:`compress_page` runs it over a page's views (:func:`~vistok.document.crop_page`). On a
    vision-LLM, ``vistok.patch(model, "correlation_guided", tokens=...)`` runs it at the boundary: a unit that is
    a grid of crops (LLaVA-OneVision's AnyRes) splits its budget over tiles of one view's size by their density,
    and a unit that is one view keeps its top tokens (there, density is read from the features the language model
    gets, as the boundary has no keys).

    Args:
        tokens: the page's visual tokens in all (every view together; on a vision-LLM: per image), or ``keep``:
            a fraction of them; with neither (towers only), the paper's adaptive budget: each view keeps its
            density's share of its tokens.
        similarity, repeats: a token with at least ``repeats`` others past ``similarity`` (key cosine) in its
            view is redundant; a view's density is its share of tokens that are not.
        global_share: the share of the budget the global view keeps (``None``: its share of the page's tokens,
            as a uniform split would give it); the crops share the rest by density. On a vision-LLM it applies
            to ``tokens=`` and ``keep=`` alike (the image's total, then the base view's share). It needs a budget
            (``tokens=`` or ``keep=``): the adaptive setting has no share to give.
        minimum: tokens every view keeps at least.
        score: ``"attention"`` (the class token's attention, heads averaged) or ``"similarity"`` (the cosine of
            each token's key with the class token's key; towers only) ranks the tokens within a view. A tower
            without a class token (SigLIP) ranks by the attention each token receives, every query and head
            averaged, or by key cosine with the view's mean key.
        merge: merge the tokens a view does not keep into the kept token whose key is most similar.
        layer: the block whose keys and attention are read and whose output tokens are kept (default the last;
            towers: a vision-LLM reads its own feature layer).
        allocation: ``"density"`` (the method) splits the crops' budget by their density; ``"uniform"`` by their
            sizes alone, every crop the same share (the baseline: uniform per-crop budgets, the same selection
            within each crop). It needs a budget (``tokens=`` or ``keep=``).
        redundancy: where a token's repeats are counted: ``"crop"`` (the paper's: among its own view's tokens) or
            ``"page"`` (among every view's tokens of the page: a blank crop whose own tokens differ, as a ViT's
            position embeddings can make them, still repeats every other blank crop).
    """

    name: ClassVar[str] = "correlation_guided"
    similarity: float = 0.9
    repeats: int = 4
    global_share: float | None = None
    minimum: int = 1
    score: str = "attention"
    merge: bool = False
    layer: int = -1
    allocation: str = "density"
    redundancy: str = "crop"
    uses_class_attention: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.tokens is not None or self.keep is not None:
            if self.tokens is not None and self.keep is not None:
                raise InvalidConfigError(f"{self.name}: give at most one of tokens= (visual tokens per page) or "
                                         f"keep= (a fraction of them), got tokens={self.tokens!r}, "
                                         f"keep={self.keep!r}")
            super().__post_init__()
        else:
            self._check_positions()
        if self.global_share is not None and (isinstance(self.global_share, bool)
                                              or not isinstance(self.global_share, (int, float))
                                              or not 0 <= self.global_share < 1):
            raise InvalidConfigError(f"{self.name}: global_share must be in [0, 1) or None, got "
                                     f"{self.global_share!r}")
        if self.allocation not in ALLOCATIONS:
            raise InvalidConfigError(f"{self.name}: allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.allocation == "uniform" and self.adaptive:
            raise InvalidConfigError(f"{self.name}: allocation='uniform' splits a budget evenly; give tokens= or keep=")
        if self.global_share is not None and self.adaptive:
            raise InvalidConfigError(f"{self.name}: global_share={self.global_share!r} is the global view's share of a "
                                     "budget; give tokens= or keep= (the adaptive setting keeps each view's density "
                                     "share)")
        if self.redundancy not in REDUNDANCY:
            raise InvalidConfigError(f"{self.name}: redundancy must be one of {REDUNDANCY}, got {self.redundancy!r}")
        if self.score not in SCORES:
            raise InvalidConfigError(f"{self.name}: score must be one of {SCORES}, got {self.score!r}")
        if not isinstance(self.merge, bool):
            raise InvalidConfigError(f"{self.name}: merge must be a bool, got {self.merge!r}")
        if not is_int(self.layer):
            raise InvalidConfigError(f"{self.name}: layer must be a block index, got {self.layer!r}")
        if not is_int(self.minimum, 0):
            raise InvalidConfigError(f"{self.name}: minimum must be a non-negative int, got {self.minimum!r}")
        redundant_tokens(torch.zeros(1, 1, 1), self.similarity, self.repeats)  # checks both

    @property
    def adaptive(self) -> bool:
        """No page budget: each view keeps its density's share of its tokens (the paper's setting)."""
        return self.tokens is None and self.keep is None

    def budget(self, available: int) -> int:
        if self.adaptive:
            raise InvalidConfigError(f"{self.name}: inside a vision-LLM give a budget (tokens= per image or keep=); "
                                     "the adaptive setting is for vistok.document.compress_page")
        return super().budget(available)

    def check_for_vision_llm(self) -> None:
        if self.adaptive:
            self.budget(0)  # raises, saying what to give
        if self.score != "attention":
            raise InvalidConfigError(f"{self.name}: inside a vision-LLM tokens are ranked by class attention "
                                     f"(score='attention'), got score={self.score!r}")

    def page_budget(self, available: int) -> int:
        """The page's tokens out of its ``available`` (every view's), for a fixed budget."""
        if self.tokens is not None and self.tokens > available:
            raise InvalidConfigError(f"{self.name}: tokens={self.tokens} is more than the page's {available} "
                                     "visual tokens")
        return self.budget(available)

    def build(self, info: object) -> dict:
        raise InvalidConfigError(
            f"{self.name} gives a budget to a whole page (its crops and global view), not to each image a vision "
            "transformer sees: call vistok.document.compress_page(model, vistok.document.crop_page(page), config) "
            "with the tower, or patch a vision-LLM (a LlavaOnevisionForConditionalGeneration's AnyRes crops)")

    def compress(self, inputs: BoundaryInputs, budget: int) -> Budgeted:
        """A vision-LLM's units at ``budget`` each: a crop grid (``inputs.tile``) by :func:`select_over_tiles`,
        a single view by its top class-attention tokens."""
        self.check_for_vision_llm()
        features = inputs.features
        if budget == features.shape[1]:
            return select_dominant(features, features.new_zeros(features.shape[:2]), budget)
        tiles = tile_index(inputs.grid, inputs.tile or inputs.grid).to(features.device)
        scores = inputs.class_attention()
        by_density, within_tiles = self.allocation == "density", self.redundancy == "crop"
        kept = [merge_into_kept(row, row, select_over_tiles(row, score, tiles, budget, self.similarity, self.repeats,
                                                            self.minimum, by_density, within_tiles)[0], self.merge)
                for row, score in zip(features, scores, strict=True)]
        return Budgeted(torch.stack([k.tokens for k in kept]), torch.stack([k.sizes for k in kept]),
                        torch.stack([k.owner for k in kept]))


@dataclass(frozen=True)
class ViewSignals:
    """What the tower says about each view at one block: ``tokens`` ``[V, N, D]`` the block's output patch tokens,
    ``keys`` ``[V, N, H * d]`` their keys in that block (before a rotary embedding, which would make one content at
    two positions unlike), ``class_attention`` ``[V, N]`` the class token's attention
    over them (heads averaged, softmax over every token) and ``class_similarity`` ``[V, N]`` the cosine of each key
    with the class token's. A tower without a class token (SigLIP) has no such row: there ``class_attention`` is
    the attention each patch receives, averaged over every query and head (vistok's choice for such towers), and
    ``class_similarity`` the cosine of each patch's key with the view's mean patch key."""

    tokens: Tensor
    keys: Tensor
    class_attention: Tensor | None
    class_similarity: Tensor | None


class _NoGrid:
    """The sink of a tower's input check when no patch listens: the check's errors are what :func:`view_signals`
    wants, not the grid it reports."""

    def note_grid(self, grid: tuple[int, ...] | None) -> None:
        pass


def _check_finite(values: Tensor, what: str) -> None:
    """An :class:`InputShapeError` naming how many of ``values`` are NaN or infinite (they would make every token
    NaN, and the budgets with them), if any are."""
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        raise InputShapeError(f"{what} hold {bad} non-finite values (NaN or inf) of {values.numel()}: the tower's "
                              "tokens and the budgets would be NaN; fill or mask them first")


def _parameter_dtype(model: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype of ``model``'s first floating-point parameter (``default`` when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), default)


@torch.no_grad()
def view_signals(model: nn.Module, views: Tensor, layer: int = -1) -> ViewSignals:
    """Run the tower of ``model`` on ``views`` ``[V, C, S, S]`` and read block ``layer`` through its own modules
    (norm, query/key projections, rotary embedding for the attention): nothing of the tower is re-implemented or
    changed. The tower runs in eval mode (no dropout; its mode is restored after). Float views are cast to the
    dtype of the tower's parameters (a float64 page from numpy runs on a float32 tower).

    Raises:
        InputShapeError: ``views`` is not a float ``[V, C, S, S]`` tensor, holds NaN or infinite values, or has
            channels or a size the tower does not take (the tower's own input check, as a patched tower has it).
        PatchStateError: the tower is patched by vistok (its blocks would see the method's tokens).
    """
    backbone = resolve_backbone(model)
    info = backbone.info
    blocks = backbone.blocks()
    if any(isinstance(vars(block).get("forward"), _PartOfPatch) for block in blocks):
        raise PatchStateError("view_signals: this tower is patched by vistok, so its blocks see the method's tokens, "
                              "not the view's patches (the kept indices would not be patch positions); pass the "
                              "unpatched tower (handle.remove() first)")
    if not -len(blocks) <= layer < len(blocks):
        raise InvalidConfigError(f"layer must be a block index in [-{len(blocks)}, {len(blocks)}), got {layer}")
    if views.dim() != 4 or not views.is_floating_point():
        raise InputShapeError(f"expected float views [V, C, S, S] (a page's crops), got {views.dtype} "
                              f"{tuple(views.shape)}")
    _check_finite(views, "view_signals: the views")
    views = views.to(_parameter_dtype(backbone.model, views.dtype))
    index = layer % len(blocks)
    seen: dict[str, Any] = {}

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["x"], seen["rope"] = backbone.block_inputs(*args, **kwargs)

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        seen["out"] = output[0] if isinstance(output, (tuple, list)) else output

    remove_input_check = backbone.install_input_check(_NoGrid())
    hooks = [blocks[index].register_forward_pre_hook(before, with_kwargs=True),
             blocks[index].register_forward_hook(after, with_kwargs=True)]
    # a Hugging Face tower set to return its attention maps: not needed here (and refused beside vistok's check)
    options = {"output_attentions": False} if hasattr(getattr(backbone.model, "config", None),
                                                      "output_attentions") else {}
    try:
        with evaluating(backbone.model):
            backbone.model(views, **options)
    finally:
        remove_input_check()
        for hook in hooks:
            hook.remove()
    if "out" not in seen:
        raise UnsupportedModelError(f"{type(backbone.model).__name__} did not run block {index} on the views")
    ops = backbone.block_ops(index)
    normed = ops.norm1(seen["x"])
    query, keys, _ = ops.qkv(normed, seen["rope"])  # [V, H, N, d]
    # similarity compares content: rotary positions would make the same content at two places look unlike
    content_keys = keys if seen["rope"] is None else ops.qkv(normed, None)[1]
    prefix = info.num_prefix
    flat_keys = content_keys.transpose(1, 2).flatten(2)  # [V, N, H * d]
    if info.has_class_token:
        attention = class_token_attention(query[:, :, :1], keys, prefix)
        similarity = F.cosine_similarity(flat_keys[:, prefix:], flat_keys[:, :1], dim=-1)
    else:
        attention = received_attention(query, keys)[:, prefix:]
        patches = flat_keys[:, prefix:]
        similarity = F.cosine_similarity(patches, patches.mean(dim=1, keepdim=True), dim=-1)
    return ViewSignals(seen["out"][:, prefix:], flat_keys[:, prefix:], attention, similarity)


@dataclass(frozen=True)
class CompressedPage:
    """A page's visual tokens under one budget: per view, ``tokens`` ``[k_v, D]`` (in order), ``index`` (their
    positions among the view's patches), ``sizes``; ``budgets`` ``[V]`` long, ``density`` ``[V]``, ``redundant``
    ``[V, N]`` bool, and ``positions`` ``[V, 2]`` long, each view's (row, col) in the crop grid (``(-1, -1)``: the
    global view), or ``None`` for bare views, which have no grid."""

    tokens: list[Tensor]
    index: list[Tensor]
    sizes: list[Tensor]
    budgets: Tensor
    density: Tensor
    redundant: Tensor
    positions: Tensor | None

    @property
    def num_tokens(self) -> int:
        return int(self.budgets.sum())


def page_budgets(density: Tensor, total: int, tokens_per_view: int, has_global: bool,
                 config: CorrelationGuidedConfig) -> Tensor:
    """``[V]`` long: the global view's share first (``config.global_share``, or ``1 / V``), then the crops' rest in
    proportion to their density (:func:`~vistok.document.density.allocate_budget`; ``allocation="uniform"``:
    evenly). ``density`` ``[V]`` may be anything proportional to it: :func:`compress_views` passes each view's count
    of tokens that are not redundant, so that equal shares are exactly equal.

    Raises:
        InvalidConfigError: ``total`` is not an int in ``[minimum * V, tokens_per_view * V]`` (each view keeps at
            least ``config.minimum`` and at most its tokens), or ``config.minimum`` is more than a view's tokens.
    """
    if density.dim() != 1 or density.numel() == 0:
        raise InputShapeError(f"page_budgets: expected density [V] with V >= 1, got {tuple(density.shape)}")
    views = density.shape[0]
    if not is_int(tokens_per_view, 1) or config.minimum > tokens_per_view:
        raise InvalidConfigError(f"page_budgets: tokens_per_view must be an int >= minimum={config.minimum}, got "
                                 f"{tokens_per_view!r}")
    if not is_int(total) or not config.minimum * views <= total <= tokens_per_view * views:
        raise InvalidConfigError(f"page_budgets: total must be an int in [{config.minimum * views}, "
                                 f"{tokens_per_view * views}] ({views} views of {tokens_per_view} tokens, each "
                                 f"keeping at least minimum={config.minimum}), got {total!r}")
    if config.allocation == "uniform":
        density = torch.ones_like(density)
    if not has_global or views == 1:
        return allocate_budget(density, total, tokens_per_view, config.minimum)
    share = config.global_share if config.global_share is not None else 1 / views
    crops = views - 1
    low = config.minimum * crops
    high = tokens_per_view * crops
    global_tokens = min(tokens_per_view, max(config.minimum, round(share * total)), total - low)
    global_tokens = max(global_tokens, total - high)
    rest = allocate_budget(density[1:], total - global_tokens, tokens_per_view, config.minimum)
    return torch.cat([torch.tensor([global_tokens]), rest])


def compress_page(model: nn.Module, page: PageCrops | Tensor, config: CorrelationGuidedConfig) -> CompressedPage:
    """The page's views through the tower of ``model`` (:func:`view_signals`), then the page budget of ``config``
    (:func:`compress_views`).

    Args:
        page: a :class:`~vistok.document.PageCrops` (its first view is the global one), or views
            ``[V, C, S, S]`` that all count as crops; those have no place in a grid, so the result's
            ``positions`` is ``None`` (a made-up ``(0, 0)`` would put every view in the top-left crop).

    Raises:
        InputShapeError: views holding NaN or inf, or views the tower does not take (other channels or another size
            than it was built for: its own input check).
    """
    if not isinstance(config, CorrelationGuidedConfig):
        raise InvalidConfigError(f"compress_page needs a CorrelationGuidedConfig, got {type(config).__name__}")
    cropped = isinstance(page, PageCrops)
    signals = view_signals(model, page.views if cropped else page, config.layer)
    return compress_views(signals, config, cropped, page.positions if cropped else None)


def compress_views(signals: ViewSignals, config: CorrelationGuidedConfig, has_global: bool,
                   positions: Tensor | None = None) -> CompressedPage:
    """Density, budgets and kept tokens from a page's :class:`ViewSignals` (the first view global if
    ``has_global``): the tensor part of :func:`compress_page`. ``positions`` ``[V, 2]`` (a
    :class:`~vistok.document.PageCrops`' own) is passed through to the result; ``None`` for views with no grid."""
    count, per_view = signals.tokens.shape[:2]
    if positions is not None and tuple(positions.shape) != (count, 2):
        raise InputShapeError(f"compress_views: expected positions [{count}, 2] (each view's (row, col)), got "
                              f"{tuple(positions.shape)}")
    if config.redundancy == "crop":
        redundant = redundant_tokens(signals.keys, config.similarity, config.repeats)
    else:  # one row of every view's tokens
        page = signals.keys.reshape(1, count * per_view, -1)
        redundant = redundant_tokens(page, config.similarity, config.repeats).reshape(count, per_view)
    density = 1 - redundant.float().mean(dim=-1)
    if config.adaptive:
        budgets = (density * per_view).round().long().clamp(min=min(config.minimum, per_view))
    else:
        total = config.page_budget(count * per_view)
        if total < config.minimum * count:
            raise InvalidConfigError(f"{config.name}: a budget of {total} tokens cannot give each of the {count} "
                                     f"views minimum={config.minimum}")
        # every view has per_view tokens: the counts are proportional to density, and exact
        budgets = page_budgets((~redundant).sum(dim=-1), total, per_view, has_global, config)
    scores = signals.class_attention if config.score == "attention" else signals.class_similarity
    if scores is None:
        raise InvalidConfigError(f"{config.name}: these signals have no class token to rank the tokens by")
    kept: list[KeptTokens] = [
        merge_into_kept(signals.tokens[v], signals.keys[v], top_tokens(scores[v], int(budgets[v])), config.merge)
        for v in range(count)]
    return CompressedPage([k.tokens for k in kept], [k.index for k in kept], [k.sizes for k in kept], budgets,
                          density, redundant, positions)
