"""VocabTrim (Goel et al., 2025): a draft whose output head covers only the target's most frequent tokens.

On a small model the output head is a large share of the draft's cost (SmolLM2-135M: 28M of 135M parameters).
The trimmed draft proposes tokens among the ``M`` kept ids only (``q = 0`` elsewhere); speculative sampling
stays exact because the residual ``max(0, p - q)`` equals ``p`` on the trimmed tokens, so they are still
emitted with the target's probability, through rejections.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import is_int
from ..errors import InvalidConfigError
from ._params import check_token_ids
from .drafts import self_draft

__all__ = ["VocabTrim"]


@dataclass(frozen=True)
class VocabTrim:
    """The kept token ids, most frequent first.

    Build it with :meth:`from_token_ids` (any token stream), :meth:`from_texts` (calibration text) or
    :meth:`from_generations` (text the target itself samples, the paper's calibration).
    """

    token_ids: Tensor

    @classmethod
    def from_token_ids(cls, sequences: Tensor | Iterable[Tensor], size: int, *, always: Iterable[int] = (),
                       fill: int | None = None) -> VocabTrim:
        """The ``size`` most frequent ids in ``sequences`` (ties: lower id first), ``always`` first (special
        tokens such as EOS).

        Args:
            fill: a vocabulary size. When the calibration data holds fewer than ``size`` distinct ids, the rest
                is filled with the lowest unused ids: in a BPE vocabulary the id order is the merge order, which
                roughly follows frequency. ``None``: keep only ids seen in the data.
        """
        if not is_int(size, 1):
            raise InvalidConfigError(f"size must be an int >= 1, got {size!r}")
        if fill is not None and not is_int(fill, 1):
            raise InvalidConfigError(f"fill must be a vocabulary size (an int >= 1) or None, got {fill!r}")
        if fill is not None and size > fill:
            raise InvalidConfigError(f"size {size} is larger than the vocabulary (fill={fill})")
        chunks = [sequences] if isinstance(sequences, Tensor) else list(sequences)
        ids = torch.cat([check_token_ids(torch.as_tensor(chunk).flatten(), "sequences").cpu() for chunk in chunks]) \
            if chunks else torch.zeros(0).long()
        always = check_token_ids(list(always), "always").unique()
        beyond = [int(chunk.max()) for chunk in (ids, always) if chunk.numel() and fill is not None
                  and int(chunk.max()) >= fill]
        if beyond:
            raise InvalidConfigError(f"token id {max(beyond)} is not in the vocabulary of fill={fill} ids")
        if always.numel() > size:  # some would be dropped without a word
            raise InvalidConfigError(f"size {size} cannot hold the {always.numel()} ids of always")
        length = max(int(ids.max()) + 1 if ids.numel() else 0, int(always.max()) + 1 if always.numel() else 0,
                     fill or 0)
        counts = torch.bincount(ids, minlength=length).double()
        counts[always] = float("inf")
        # Descending count, then ascending id: a stable sort of the ids by -count.
        order = torch.sort(-counts, stable=True).indices
        seen = order[counts[order] > 0][:size]
        if fill is not None and seen.numel() < size:
            unused = torch.ones(length, dtype=torch.bool)
            unused[seen] = False
            seen = torch.cat([seen, unused.nonzero().flatten()[: size - seen.numel()]])
        return cls(seen)

    @classmethod
    def from_texts(cls, tokenizer, texts: Iterable[str], size: int, *, always: Iterable[int] = (),
                   fill: int | None = None) -> VocabTrim:
        """Calibrate on ``texts`` tokenized with ``tokenizer`` (its special tokens always kept)."""
        sequences = [torch.tensor(tokenizer(text)["input_ids"]) for text in texts]
        specials = set(getattr(tokenizer, "all_special_ids", []) or []) | set(always)
        return cls.from_token_ids(sequences, size, always=specials, fill=fill)

    @classmethod
    def from_generations(cls, model: nn.Module, prompts: Iterable[Tensor], size: int, *, max_new_tokens: int = 128,
                         config=None, seed: int = 0, always: Iterable[int] = (), fill: int | None = None,
                         eos_token_id: int | list[int] | None = None) -> VocabTrim:
        """Calibrate on what ``model`` samples after each prompt (``[1, T]`` id tensors) and the prompts.
        ``eos_token_id``: stop each generation at these tokens (an instruct model's end of turn), so that what it
        samples past its end (new turns) does not count; ``None``: every generation runs ``max_new_tokens``."""
        from .generation import generate

        sequences = []
        for index, prompt in enumerate(prompts):
            out = generate(model, prompt, config, max_new_tokens=max_new_tokens, seeds=torch.tensor([seed + index]),
                           eos_token_id=eos_token_id)
            sequences.append(out.sequences[0, : prompt.shape[1] + int(out.lengths[0])])
        return cls.from_token_ids(sequences, size, always=always, fill=fill)

    @property
    def size(self) -> int:
        return int(self.token_ids.numel())

    def coverage(self, sequences: Tensor | Iterable[Tensor]) -> float:
        """Share of the tokens of ``sequences`` that are kept."""
        chunks = [sequences] if isinstance(sequences, Tensor) else list(sequences)
        ids = [check_token_ids(torch.as_tensor(chunk).flatten(), "sequences").cpu() for chunk in chunks]
        ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
        if ids.numel() == 0:
            raise InvalidConfigError("coverage: sequences hold no tokens")
        return float(torch.isin(ids, self.token_ids).double().mean())

    def draft(self, model: nn.Module, *, num_layers: int | None = None, dtype: torch.dtype | None = None,
              quantize: str | None = None) -> nn.Module:
        """:func:`self_draft` of ``model`` with the trimmed head (pass ``token_ids`` as ``draft_vocab``)."""
        return self_draft(model, num_layers=num_layers, dtype=dtype, vocab=self.token_ids, quantize=quantize)
