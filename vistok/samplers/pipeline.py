"""A sampling configuration applied as one chain of processors in a fixed, documented order.

The order (:data:`PROCESSOR_ORDER`)::

    temperature -> min-p -> top-H -> top-k -> top-p -> typical -> epsilon -> eta

Each processor sees the logits left by the ones before it (the renormalised remaining distribution). This is
Hugging Face's order except for min-p, which comes right after temperature, where vLLM applies it:

* Hugging Face (``generate``): temperature, top-H, top-k, top-p, **min-p**, typical, epsilon, eta.
* vLLM: temperature, **min-p**, then top-k and top-p (it has no top-H, typical, epsilon or eta).

Min-p's own cut only depends on probability ratios, so it removes the same tokens wherever it stands (as long
as the top token is still there). What its position changes is what the later filters measure: here top-p,
typical, epsilon and eta (and top-H) work on the distribution min-p left, renormalised, so top-p's mass is the
mass of the plausible tokens (as in vLLM); in Hugging Face top-p measures the mass before min-p and min-p cuts
afterwards, which keeps more tokens when both are set.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ..errors import InvalidConfigError
from ._params import RowParam, checked
from ._processor import LogitsFilter, check_min_tokens
from .sampling import sample
from .temperature import Temperature
from .truncation import (
    EpsilonFilter,
    EtaFilter,
    MinPFilter,
    TopHFilter,
    TopKFilter,
    TopPFilter,
    TypicalFilter,
    check_top_h_options,
)

__all__ = ["SamplingConfig", "SamplingPipeline", "PROCESSOR_ORDER", "FILTER_CLASSES"]

PROCESSOR_ORDER = ("temperature", "min_p", "top_h", "top_k", "top_p", "typical_p", "epsilon", "eta")
FILTER_CLASSES = {
    "temperature": Temperature,
    "min_p": MinPFilter,
    "top_h": TopHFilter,
    "top_k": TopKFilter,
    "top_p": TopPFilter,
    "typical_p": TypicalFilter,
    "epsilon": EpsilonFilter,
    "eta": EtaFilter,
}


@dataclass(frozen=True, eq=False)
class SamplingConfig:
    """How to turn next-token logits into a distribution. Every value may be a number or a ``[B]`` tensor (one
    value per row). The defaults change nothing (plain sampling at temperature 1).

    Attributes:
        temperature: ``>= 0``; ``0`` is greedy.
        min_p: in ``[0, 1]``, ``0`` off.
        top_h: Top-H's ``alpha`` in ``(0, 1]``, ``None`` off. ``top_h_rule``: ``"paper"`` or ``"reference"``;
            ``top_h_top_n``: ``None`` (exact) or the candidate count (see :func:`top_h_filter`).
        top_k: an int, ``<= 0`` off.
        top_p: in ``[0, 1]``, ``1`` off.
        typical_p: in ``[0, 1]``, ``1`` off.
        epsilon: in ``[0, 1)``, ``0`` off.
        eta: in ``[0, 1)``, ``0`` off.
        min_tokens_to_keep: every truncation keeps at least this many tokens.
    """

    temperature: RowParam = 1.0
    min_p: RowParam = 0.0
    top_h: RowParam | None = None
    top_h_rule: str = "paper"
    top_h_top_n: int | None = None
    top_k: RowParam = 0
    top_p: RowParam = 1.0
    typical_p: RowParam = 1.0
    epsilon: RowParam = 0.0
    eta: RowParam = 0.0
    min_tokens_to_keep: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "_processors", self._build())  # validates every option

    def _build(self) -> list[LogitsFilter]:
        keep = check_min_tokens(self.min_tokens_to_keep)
        chain: list[LogitsFilter] = []
        if _active(checked(self.temperature, "temperature"), 1.0):
            chain.append(Temperature(self.temperature))
        if _active(checked(self.min_p, "min_p"), 0.0):
            chain.append(MinPFilter(self.min_p, keep))
        check_top_h_options(self.top_h_rule, self.top_h_top_n)  # also while top_h is off: a later replace(top_h=)
        if self.top_h is not None:
            chain.append(TopHFilter(self.top_h, self.top_h_rule, self.top_h_top_n, keep))
        top_k = checked(self.top_k, "top_k")
        if isinstance(top_k, Tensor) or top_k > 0:
            chain.append(TopKFilter(top_k, keep))
        if _active(checked(self.top_p, "top_p"), 1.0):
            chain.append(TopPFilter(self.top_p, keep))
        if _active(checked(self.typical_p, "typical_p"), 1.0):
            chain.append(TypicalFilter(self.typical_p, keep))
        if _active(checked(self.epsilon, "epsilon"), 0.0):
            chain.append(EpsilonFilter(self.epsilon, keep))
        if _active(checked(self.eta, "eta"), 0.0):
            chain.append(EtaFilter(self.eta, keep))
        return chain

    @property
    def processors(self) -> list[LogitsFilter]:
        """The active processors, in :data:`PROCESSOR_ORDER`."""
        return list(self._processors)

    def process(self, logits: Tensor) -> Tensor:
        """``[B, V]`` logits through the chain; a new tensor (the input when nothing is active, as a copy)."""
        for processor in self._processors:
            logits = processor.apply(logits)
        return logits if self._processors else logits.clone()

    def sample(self, logits: Tensor, *, seeds: Tensor | None = None, counter: int | Tensor = 0,
               generator: torch.Generator | None = None) -> Tensor:
        """``[B]`` tokens: :meth:`process`, then :func:`~vistok.samplers.sample`."""
        return sample(self.process(logits), seeds=seeds, counter=counter, generator=generator)

    def for_rows(self, rows: Tensor) -> SamplingConfig:
        """The config of the rows ``rows`` ``[R]`` (indices into the batch, repeats allowed): each per-row tensor
        indexed by them; the config itself where nothing is per row."""
        changes = {name: value.to(rows.device)[rows] for name, value in vars(self).items() if isinstance(value, Tensor)}
        return self.replace(**changes) if changes else self

    def replace(self, **changes) -> SamplingConfig:
        """A copy with some fields changed (the config itself is frozen)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return SamplingConfig(**values)


def _active(value: RowParam, neutral: float) -> bool:
    return isinstance(value, Tensor) or value != neutral


class SamplingPipeline(LogitsFilter):
    """A :class:`SamplingConfig` as one Hugging Face-compatible processor (the whole chain, in order).

    ``model.generate(ids, do_sample=True, logits_processor=LogitsProcessorList([SamplingPipeline(config)]))``;
    pass ``top_k=None`` (or ``0``) to ``generate`` so that Hugging Face's own default ``top_k=50`` does not add
    itself after the chain, and ``SeededSampling`` last for per-row reproducible draws. Hugging Face also adds,
    after the chain, the warpers the model's ``generation_config`` sets (an instruct model's temperature, top-p,
    ...): with ``SeededSampling`` last they change nothing (it leaves one finite logit); without it, pass their
    neutral values to ``generate`` (``temperature=1.0, top_p=1.0, min_p=None, top_h=None, typical_p=1.0,
    epsilon_cutoff=0.0, eta_cutoff=0.0``), or the temperature applies twice.
    """

    def __init__(self, config: SamplingConfig | None = None, **options) -> None:
        if config is not None and options:
            raise InvalidConfigError("pass either a SamplingConfig or keyword options, not both")
        if config is not None and not isinstance(config, SamplingConfig):
            raise InvalidConfigError(f"config must be a SamplingConfig, got {type(config).__name__}")
        unknown = sorted(set(options) - {f.name for f in fields(SamplingConfig)})
        if unknown:
            raise InvalidConfigError(f"SamplingPipeline: unknown option(s) {unknown}")
        self.config = config if config is not None else SamplingConfig(**options)

    def apply(self, scores: Tensor) -> Tensor:
        return self.config.process(scores)
