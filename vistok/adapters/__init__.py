"""Compressed visual tokens into a language model: the methods at a vision-LLM's boundary (exact budgets per
image) and the per-family glue that ``vistok.patch`` uses on Hugging Face vision-LLMs (:mod:`.vlm`)."""

from .budget import Budgeted, merge_regions_to_budget, merge_to_budget, pool_to_budget, select_dominant, select_random
from .methods import (
    BoundaryConfig,
    BoundaryInputs,
    DominantConfig,
    MergeToBudgetConfig,
    PoolConfig,
    RandomSelectConfig,
    RegionMergeConfig,
)

__all__ = [
    "Budgeted",
    "merge_to_budget",
    "merge_regions_to_budget",
    "select_dominant",
    "pool_to_budget",
    "select_random",
    "BoundaryConfig",
    "BoundaryInputs",
    "MergeToBudgetConfig",
    "RegionMergeConfig",
    "DominantConfig",
    "PoolConfig",
    "RandomSelectConfig",
]
