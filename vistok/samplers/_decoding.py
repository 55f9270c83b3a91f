"""A Hugging Face causal LM with its KV cache, decoded row by row at different paces.

Speculative sampling accepts a different number of tokens in each row, and cautious next-token prediction
appends trials of different lengths. Instead of one cache per row, every row shares one cache of equal length
whose columns can be *invalid* for some rows: a column fed with a padding token, or a drafted token that was
rejected later. An attention mask hides invalid columns, and position ids count only a row's valid tokens, so
each row computes exactly what it would compute alone (up to float rounding of batched kernels). Columns that
are invalid in every row at the end are cropped from the cache.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError

__all__ = ["CausalLMState", "check_full_attention", "output_vocab_size"]


class CausalLMState:
    """The decoding state of ``model`` for a batch of rows.

    Args:
        model: a Hugging Face causal LM (``model(input_ids, attention_mask, position_ids, cache) -> .logits``).
        batch: number of rows.
        device: where the state lives (the model's device by default).
    """

    def __init__(self, model: nn.Module, batch: int, device: torch.device | None = None) -> None:
        self.model = model
        parameters = inspect.signature(model.forward).parameters
        self._cache_name = "cache" if "cache" in parameters else "past_key_values"
        self._keep_name = next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in parameters), None)
        self.device = device or next(model.parameters()).device
        self.cache = _new_cache(model)
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)  # [B, cache length]
        self.forward_calls = 0

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def lengths(self) -> Tensor:
        """``[B]`` number of valid tokens of each row."""
        return self.valid.sum(dim=1)

    @torch.no_grad()
    def feed(self, tokens: Tensor, valid: Tensor | None = None, last_only: bool = False) -> Tensor:
        """Append ``tokens`` (``[B, k]``) to every row and return the next-token logits after each of them.

        Args:
            valid: ``[B, k]`` bool, False where the column is padding for that row (its token is ignored by
                every later position). ``None``: all valid.
            last_only: return only the logits after the last column (``[B, 1, V]``); they are meaningful for
                the rows whose last column is valid. Columns invalid in every row are then not fed at all.

        Returns:
            ``[B, k, V]`` (or ``[B, 1, V]``) float logits.
        """
        if valid is None:
            valid = torch.ones_like(tokens, dtype=torch.bool)
        valid = valid.to(device=self.device, dtype=torch.bool)
        used = valid.any(dim=0)
        if last_only and bool(used.any()) and not bool(used.all()):
            # A column no row uses would only leave a hole in every row (and force an explicit mask from then on).
            tokens, valid = tokens[:, used.to(tokens.device)], valid[:, used]
        positions = (self.lengths[:, None] + valid.long().cumsum(dim=1) - 1).clamp_(min=0)
        mask = torch.cat([self.valid, valid], dim=1)
        kwargs = {self._cache_name: self.cache, "use_cache": True, "position_ids": positions}
        # An all-valid mask is the same as none; leaving it out keeps the fast causal path of the attention.
        kwargs["attention_mask"] = None if bool(mask.all()) else mask.long()
        if last_only and self._keep_name is not None:
            kwargs[self._keep_name] = 1
        # An invalid column's id is never attended to; 0 keeps a fill value such as pad_token_id=-1 off the embedding.
        output = self.model(input_ids=tokens.to(self.device).masked_fill(~valid, 0), **kwargs)
        self.valid = mask
        self.forward_calls += 1
        logits = output.logits
        return logits[:, -1:] if last_only else logits

    def prefill(self, tokens: Tensor, valid: Tensor) -> Tensor:
        """Feed the prompt (``[B, T]``, mask ``valid``) into an empty state; ``[B, V]`` next-token logits.

        Identical rows (``n`` samples of one prompt) are computed once and their cache copied."""
        if self.valid.shape[1]:
            raise RuntimeError("prefill needs an empty state")
        valid = valid.to(device=self.device, dtype=torch.bool)
        tokens = tokens.to(self.device).masked_fill(~valid, 0)
        unique, inverse = torch.unique(torch.cat([tokens, valid.long()], dim=1), dim=0, return_inverse=True)
        if unique.shape[0] == tokens.shape[0]:
            return self.feed(tokens, valid, last_only=True)[:, -1]
        first = torch.full((unique.shape[0],), tokens.shape[0], dtype=torch.long, device=self.device)
        first = first.scatter_reduce(0, inverse, torch.arange(tokens.shape[0], device=self.device), "amin")
        self.valid = self.valid[first]
        logits = self.feed(tokens[first], valid[first], last_only=True)[:, -1]
        self.select(inverse)
        return logits[inverse]

    def invalidate(self, keep: Tensor) -> None:
        """Mark some of the last ``keep.shape[1]`` columns invalid (``keep``: ``[B, n]`` bool, False = drop),
        then crop the trailing columns that no row uses."""
        n = keep.shape[1]
        if n:
            self.valid[:, -n:] &= keep.to(self.valid.device)
        used = self.valid.any(dim=0)
        unused_tail = int(used.shape[0] - (used.nonzero().max() + 1)) if bool(used.any()) else used.shape[0]
        if unused_tail:
            self.cache.crop(-unused_tail)
            self.valid = self.valid[:, : self.valid.shape[1] - unused_tail]

    def select(self, rows: Tensor) -> None:
        """Keep (or repeat) rows: row ``i`` becomes the old row ``rows[i]`` (``[R]`` long)."""
        rows = rows.to(self.device)
        self.cache.reorder_cache(rows)
        self.valid = self.valid[rows]


def _new_cache(model: nn.Module) -> object:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers < 4.56: no config argument
        return DynamicCache()


def check_full_attention(model: nn.Module, role: str, method: str) -> None:
    """Refuse a model with sliding-window attention for ``method``, which leaves invalid columns inside a row
    (rejected drafts, short trials): a window counts cache columns, so a hole would push a row's own tokens out of
    its window, and a sliding cache cannot be cropped back past its window."""
    layers = getattr(_new_cache(model), "layers", None)
    if layers is not None:
        sliding = any(getattr(layer, "is_sliding", False) for layer in layers)
    else:  # an older cache that does not say: read the config
        config = model.config
        sliding = bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True)
    if sliding:
        raise UnsupportedModelError(
            f"the {role} ({type(model).__name__}) uses sliding-window attention; {method} leaves gaps in a row's "
            "cache that a window would count as tokens, so it supports models with full attention only")


def output_vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's output embedding (the width of its logits), if it exposes one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    width = getattr(head, "out_features", None)  # e.g. an Int8Linear head
    return int(width) if width is not None else None


def check_causal_lm(model: nn.Module, role: str) -> None:
    """Refuse what is not a decoder-only Hugging Face model with a croppable cache."""
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "forward", None)):
        raise UnsupportedModelError(f"the {role} must be a Hugging Face causal LM, got {type(model).__name__}")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"the {role} ({type(model).__name__}) is an encoder-decoder model; vistok "
                                    "decodes decoder-only causal LMs")
