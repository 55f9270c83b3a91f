"""Plain sampling with a Hugging Face causal LM: the baseline the other decoders are measured against."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .._checks import is_int, is_integer_tensor
from ..errors import InvalidConfigError
from ._decoding import CausalLMState, check_causal_lm
from ._params import check_token_ids
from .pipeline import SamplingConfig
from .sampling import as_seeds

__all__ = ["generate", "GenerationOutput", "prepare_prompt", "eos_set"]


@dataclass
class GenerationOutput:
    """What a vistok decoder returns.

    Attributes:
        sequences: ``[B, T + N]`` the prompt as given, then ``N`` generated columns (``pad_token_id`` after a
            row's end).
        new_tokens: ``[B, N]`` the generated columns alone.
        lengths: ``[B]`` generated tokens per row (up to and including EOS).
        stats: counters of the run (forward calls, seconds, method-specific figures).
    """

    sequences: Tensor
    new_tokens: Tensor
    lengths: Tensor
    stats: dict = field(default_factory=dict)


def prepare_prompt(input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Validate a ``[B, T]`` prompt and its mask (padding on the left); the mask as bool."""
    if not is_integer_tensor(input_ids) or input_ids.dim() != 2:
        what = f"a {input_ids.dtype} tensor of shape {tuple(input_ids.shape)}" if isinstance(input_ids, Tensor) \
            else type(input_ids).__name__
        raise InvalidConfigError(f"input_ids must be a [batch, length] integer tensor, got {what}")
    if input_ids.numel() == 0:
        raise InvalidConfigError(f"input_ids must hold at least one row of at least one token, got shape "
                                 f"{tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise InvalidConfigError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                                 f"{tuple(input_ids.shape)}")
    attention_mask = attention_mask.bool()
    if not bool(attention_mask[:, -1].all()):
        raise InvalidConfigError("pad prompts on the left: the last column must be a real token in every row")
    return input_ids, attention_mask


def eos_set(eos_token_id: int | list[int] | None, device) -> Tensor:
    """The end-of-sequence ids as a 1-D long tensor (empty for ``None``)."""
    if eos_token_id is None:
        return torch.zeros(0, dtype=torch.long, device=device)
    if isinstance(eos_token_id, (str, bytes)):
        raise InvalidConfigError(f"eos_token_id must be token ids, got {eos_token_id!r}")
    if is_int(eos_token_id):
        eos_token_id = [eos_token_id]
    elif isinstance(eos_token_id, Tensor) and eos_token_id.dim() == 0:
        eos_token_id = eos_token_id.reshape(1)
    return check_token_ids(eos_token_id, "eos_token_id").to(device)


def check_decoding(config: SamplingConfig | None, pad_token_id: int) -> SamplingConfig:
    """The sampling config of a decoding loop (``None``: the default) after checking it and ``pad_token_id``."""
    if config is not None and not isinstance(config, SamplingConfig):
        raise InvalidConfigError(f"config must be a vistok.samplers.SamplingConfig (or None), got "
                                 f"{type(config).__name__}: build one with SamplingConfig(**options)")
    if not is_int(pad_token_id):
        raise InvalidConfigError(f"pad_token_id must be an int (what fills a row after its end), got "
                                 f"{pad_token_id!r}")
    return config or SamplingConfig()


def check_max_new_tokens(max_new_tokens: int) -> int:
    if not is_int(max_new_tokens, 1):
        raise InvalidConfigError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    return max_new_tokens


@torch.no_grad()
def generate(model: nn.Module, input_ids: Tensor, config: SamplingConfig | None = None, *,
             attention_mask: Tensor | None = None, max_new_tokens: int = 32, seeds: int | Tensor | None = None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int = 0,
             generator: torch.Generator | None = None) -> GenerationOutput:
    """Sample up to ``max_new_tokens`` tokens per row: one forward per token, ``config`` applied to each
    next-token distribution, then :func:`~vistok.samplers.sample`.

    With ``seeds`` the draw of row ``b`` at its ``n``-th token depends only on ``(seeds[b], n)`` (``n`` counts
    the row's valid tokens, so padding does not matter): a row gives the same text alone or in any batch.

    Args:
        model: a Hugging Face causal LM.
        input_ids: ``[B, T]`` prompt; ``attention_mask`` marks padding (False/0).
        seeds: an int or ``[B]`` int64 tensor; ``None`` uses torch's generator.
        eos_token_id: id(s) that end a row (the EOS itself is kept).
    """
    check_causal_lm(model, "model")
    config = check_decoding(config, pad_token_id)
    input_ids, mask = prepare_prompt(input_ids, attention_mask)
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    batch = input_ids.shape[0]
    device = next(model.parameters()).device
    seeds = None if seeds is None else as_seeds(seeds, batch, device)
    eos = eos_set(eos_token_id, device)
    started = time.perf_counter()
    state = CausalLMState(model, batch, device)
    logits = state.prefill(input_ids, mask)
    new_tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        token = config.sample(logits.float(), seeds=seeds, counter=state.lengths, generator=generator)
        token = torch.where(done, pad_token_id, token)
        new_tokens[:, step] = token
        lengths += ~done
        done = done | torch.isin(token, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = state.feed(token[:, None], ~done[:, None], last_only=True)[:, -1]
    stats = {"forward_calls": state.forward_calls, "seconds": time.perf_counter() - started,
             "new_tokens": int(lengths.sum())}
    return GenerationOutput(torch.cat([input_ids.to(device), new_tokens], dim=1), new_tokens, lengths, stats)
