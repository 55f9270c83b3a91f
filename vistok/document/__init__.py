"""Documents: shape-adaptive page crops (mPLUG-DocOwl 1.5), information density per crop and a page-level token
budget over them (token-level correlation-guided compression, Zhang et al., arXiv 2407.14439), on any tower vistok
patches.

>>> crops = vistok.document.crop_page(page, crop_size=224)             # global view + shape-adaptive crops
>>> result = vistok.document.compress_page(model, crops, vistok.document.CorrelationGuidedConfig(keep=0.33))
"""

from .cropping import PageCrops, candidate_grids, choose_grid, crop_page
from .density import (
    KeptTokens,
    allocate_budget,
    information_density,
    merge_into_kept,
    redundant_tokens,
    select_over_tiles,
    tile_index,
    top_tokens,
)
from .page import (
    CompressedPage,
    CorrelationGuidedConfig,
    ViewSignals,
    compress_page,
    compress_views,
    page_budgets,
    view_signals,
)

__all__ = [
    "PageCrops",
    "candidate_grids",
    "choose_grid",
    "crop_page",
    "redundant_tokens",
    "information_density",
    "allocate_budget",
    "top_tokens",
    "merge_into_kept",
    "KeptTokens",
    "tile_index",
    "select_over_tiles",
    "CorrelationGuidedConfig",
    "ViewSignals",
    "CompressedPage",
    "view_signals",
    "page_budgets",
    "compress_page",
    "compress_views",
]
