"""Pure tensor functions: gathers, attention pieces, token sampling. No model knowledge lives here."""

from .attention import (
    ATTENTION_PATHS,
    attend,
    attention_path,
    check_attention_path,
    class_token_attention,
    probe_attention,
    probe_query,
    received_attention,
)
from .gather import gather_head_tokens, gather_rope, gather_tokens, keep_mask_to_index, kept_count_summary
from .noise import hashed_noise
from .sampling import inverse_transform_sampling, significance_scores

__all__ = [
    "ATTENTION_PATHS",
    "attend",
    "attention_path",
    "check_attention_path",
    "class_token_attention",
    "hashed_noise",
    "probe_attention",
    "received_attention",
    "probe_query",
    "gather_tokens",
    "gather_head_tokens",
    "gather_rope",
    "keep_mask_to_index",
    "kept_count_summary",
    "inverse_transform_sampling",
    "significance_scores",
]
