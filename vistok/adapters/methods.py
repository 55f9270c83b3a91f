"""The methods that run at a vision-LLM's boundary (between its vision tower and its language model), as
dataclass configs in vistok's method registry. Each brings every image to exactly the same number of tokens:
``tokens=`` per image, or ``keep=`` a fraction of the tower's tokens (rounded, at least 1).

>>> vistok.patch(llava, "merge_to_budget", tokens=64)
>>> vistok.patch(llava, "region_merge", tokens=64)
>>> vistok.patch(llava, "dominant", keep=0.25, contextual=8)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .._checks import is_int, is_real
from ..errors import InvalidConfigError
from ..methods.base import MethodConfig
from .budget import (
    Budgeted,
    merge_regions_to_budget,
    merge_to_budget,
    pool_grid,
    pool_to_budget,
    select_dominant,
    select_random,
)

__all__ = ["BoundaryConfig", "BoundaryInputs", "MergeToBudgetConfig", "RegionMergeConfig", "DominantConfig",
           "PoolConfig", "RandomSelectConfig"]

POSITION_MODES = ("compact", "original")


@dataclass(frozen=True)
class BoundaryInputs:
    """What a boundary method may use for one batch of images: ``features`` ``[B, N, D]`` (what the language
    model will read), the tower's patch ``grid`` ``(rows, cols)`` and, on demand, ``class_attention()`` ``[B, N]``
    (the class token's attention over the patches at the feature layer).

    After an in-tower method (a composition), the features are the tower's reduced tokens: ``valid`` ``[B, N]``
    marks the real ones (the rest is padding), ``sizes`` ``[B, N]`` how many patches each stands for, and
    ``source`` ``[B, N]`` each one's patch index (its order in the image). ``None`` without a tower method.

    ``tile``: one view's patch grid when each unit is a grid of crops (LLaVA-OneVision's AnyRes crop grid), cut
    into tiles of that size from its top-left; the model removes the crops' padding on both sides, so the tiles
    approximate the crops. ``None`` when a unit is one view.
    """

    features: Tensor
    grid: tuple[int, int]
    class_attention: Callable[[], Tensor]
    valid: Tensor | None = None
    sizes: Tensor | None = None
    source: Tensor | None = None
    tile: tuple[int, int] | None = None


@dataclass
class BoundaryConfig(MethodConfig):
    """A budget per image: exactly one of ``tokens`` (an int) or ``keep`` (a fraction in (0, 1]).

    ``positions``: the language model's positions of the visual tokens. ``"compact"``: the shortened prompt is
    numbered as it stands, so a kept token's position depends on how many were dropped before it. ``"original"``:
    each kept token has the position of the first patch it carries in the full prompt (after an in-tower method,
    the first of its tower tokens' patches), and text after the image (and decoding) keeps the unpatched model's
    positions (FastV's choice; gaps where tokens went). ``None``: the family's own (compact, except Qwen2-VL's 3-D
    rotary positions, which are always original). Every family supports ``"original"``; Qwen2-VL only that."""

    tokens: int | None = None
    keep: float | None = None
    positions: str | None = None
    uses_class_attention: ClassVar[bool] = False  # the tower must then keep the hidden states it needs
    composes: ClassVar[bool] = False  # takes a ragged token set from an in-tower method (BoundaryInputs.valid)

    def __post_init__(self) -> None:
        self._check_positions()
        if (self.tokens is None) == (self.keep is None):
            raise InvalidConfigError(f"{self.name}: give exactly one of tokens= (visual tokens per image) or keep= "
                                     f"(a fraction of them), got tokens={self.tokens!r}, keep={self.keep!r}")
        if self.tokens is not None and not is_int(self.tokens, 1):
            raise InvalidConfigError(f"{self.name}: tokens must be a positive int, got {self.tokens!r}")
        if self.keep is not None and (not is_real(self.keep) or not 0 < self.keep <= 1):
            raise InvalidConfigError(f"{self.name}: keep must be a fraction in (0, 1], got {self.keep!r}")

    def _check_positions(self) -> None:
        if self.positions not in POSITION_MODES + (None,):
            raise InvalidConfigError(f"{self.name}: positions must be one of {POSITION_MODES} (or None: the "
                                     f"model's own), got {self.positions!r}")

    def budget(self, available: int) -> int:
        """The tokens per image out of ``available``."""
        if self.tokens is not None:
            if self.tokens > available:
                raise InvalidConfigError(f"{self.name}: tokens={self.tokens} is more than the {available} visual "
                                         "tokens per image the model has")
            return self.tokens
        return max(1, round(self.keep * available))

    def build(self, info: object) -> dict:
        raise InvalidConfigError(
            f"{self.name} runs between a vision-LLM's vision tower and its language model; patch the vision-LLM "
            "(e.g. a LlavaForConditionalGeneration), or use an in-tower method (ats, merge, random_drop) on a "
            "vision transformer")

    def check_for_vision_llm(self) -> None:
        """Refuse, when patching, options this method cannot honour at a vision-LLM's boundary."""

    def check_budget(self, grid: tuple[int, int], budget: int) -> None:
        """Refuse, when patching a model whose images all have one patch ``grid``, a ``budget`` per image this
        method cannot give."""

    def compress(self, inputs: BoundaryInputs, budget: int) -> Budgeted:
        """The images' tokens at exactly ``budget`` each."""
        raise NotImplementedError


@dataclass
class MergeToBudgetConfig(BoundaryConfig):
    """Bipartite merging repeated down to the budget (B-VLLM's spatial merge), similarity on the features."""

    name: ClassVar[str] = "merge_to_budget"
    composes: ClassVar[bool] = True

    def compress(self, inputs: BoundaryInputs, budget: int) -> Budgeted:
        return merge_to_budget(inputs.features, budget, sizes=inputs.sizes, valid=inputs.valid, order=inputs.source)


@dataclass
class RegionMergeConfig(BoundaryConfig):
    """Adjacent regions of the patch grid merged, most similar first, down to the budget: an adaptive pooling
    (each token the mean of a connected region; blank areas become one token, objects keep several), similarity on
    the features. Any budget on any grid, unlike pooling."""

    name: ClassVar[str] = "region_merge"

    def compress(self, inputs: BoundaryInputs, budget: int) -> Budgeted:
        return merge_regions_to_budget(inputs.features, inputs.grid, budget)


@dataclass
class DominantConfig(BoundaryConfig):
    """VisionZip's dominant tokens: the patches the class token attends to most (a SigLIP tower, which has none:
    those that receive the most attention, every query and head averaged; vistok's choice, as VisionZip's code
    reads CLIP's class token only); with ``contextual > 0``, that many of the budget's tokens average the
    unselected rest (VisionZip's contextual tokens)."""

    name: ClassVar[str] = "dominant"
    contextual: int = 0
    uses_class_attention: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_int(self.contextual, 0):
            raise InvalidConfigError(f"dominant: contextual must be a non-negative int, got {self.contextual!r}")
        if self.tokens is not None and self.contextual >= self.tokens:
            raise InvalidConfigError(f"dominant: contextual={self.contextual} must be less than tokens={self.tokens} "
                                     "(the budget's other tokens are the dominant ones, at least one)")

    def check_budget(self, grid: tuple[int, int], budget: int) -> None:
        if budget < grid[0] * grid[1]:  # the whole grid is kept as it is (compress)
            self._check_contextual(budget, f"each {grid[0]} x {grid[1]} grid gets")

    def _check_contextual(self, budget: int, gets: str) -> None:
        if self.contextual >= budget:
            asked = f"tokens={self.tokens}" if self.tokens is not None else f"keep={self.keep}"
            raise InvalidConfigError(
                f"dominant: contextual={self.contextual} must be less than the budget, but {gets} {budget} tokens "
                f"({asked}); at least one of them is a dominant token")

    def compress(self, inputs: BoundaryInputs, budget: int) -> Budgeted:
        if budget == inputs.features.shape[1]:
            return select_dominant(inputs.features, inputs.features.new_zeros(inputs.features.shape[:2]), budget)
        # a view's share (LLaVA-OneVision splits an image's budget between its base view and its crops)
        self._check_contextual(budget, f"this {inputs.grid[0]} x {inputs.grid[1]} view's share is")
        return select_dominant(inputs.features, inputs.class_attention(), budget, self.contextual)


@dataclass
class PoolConfig(BoundaryConfig):
    """Average pooling of the patch grid to the budget (2 x 2, LLaVA-OneVision's, at a quarter): the baseline."""

    name: ClassVar[str] = "pool"

    def check_budget(self, grid: tuple[int, int], budget: int) -> None:
        pool_grid(grid, budget)

    def compress(self, inputs: BoundaryInputs, budget: int) -> Budgeted:
        return pool_to_budget(inputs.features, inputs.grid, budget)


@dataclass
class RandomSelectConfig(BoundaryConfig):
    """Tokens chosen at random (a fresh generator seeded with ``seed`` for every call): the baseline."""

    name: ClassVar[str] = "random_select"
    seed: int = 0
    composes: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_int(self.seed) or not 0 <= self.seed < 2**62:
            raise InvalidConfigError(f"random_select: seed must be an int in [0, 2**62), got {self.seed!r}")

    def compress(self, inputs: BoundaryInputs, budget: int) -> Budgeted:
        return select_random(inputs.features, budget, torch.Generator().manual_seed(self.seed), valid=inputs.valid)
