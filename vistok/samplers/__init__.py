"""Language-side decoding samplers: processors for next-token logits, the sampling step, speculative sampling,
cautious next-token prediction and constrained sampling. Usable on their own with any Hugging Face causal LM.

>>> from vistok.samplers import SamplingConfig, top_p_filter
>>> config = SamplingConfig(temperature=0.7, min_p=0.05, top_p=0.9)   # applied in a fixed order
>>> tokens = config.sample(logits, seeds=torch.arange(logits.shape[0]))  # per-row reproducible

Importing this package does not import transformers; the processors are plain callables that
``model.generate(logits_processor=...)`` accepts.
"""

from . import rng
from .cntp import CNTPConfig, cntp_generate, punctuation_token_ids
from .constrained import AWRSResult, awrs_sample, constrained_generate
from .drafts import self_draft
from .errors import InvalidLogitsError, ModelFileNotFoundError, VocabularyMismatchError
from .generation import GenerationOutput, generate
from .models import load_smollm2, smollm2_cache_dir, smollm2_gguf
from .pipeline import FILTER_CLASSES, PROCESSOR_ORDER, SamplingConfig, SamplingPipeline
from .quantize import Int8Linear, quantize_linears
from .sampling import SeededSampling, sample
from .speculative import SpeculativeDecoder, kseq_rho, kseq_verify, speculative_verify
from .temperature import Temperature, temperature_scale
from .truncation import (
    TOP_H_RULES,
    EpsilonFilter,
    EtaFilter,
    MinPFilter,
    TopHFilter,
    TopKFilter,
    TopPFilter,
    TypicalFilter,
    epsilon_filter,
    eta_filter,
    min_p_filter,
    top_h_filter,
    top_k_filter,
    top_p_filter,
    typical_filter,
)
from .vocab_trim import VocabTrim

__all__ = [
    "SamplingConfig",
    "SamplingPipeline",
    "PROCESSOR_ORDER",
    "FILTER_CLASSES",
    "sample",
    "SeededSampling",
    "temperature_scale",
    "top_k_filter",
    "top_p_filter",
    "min_p_filter",
    "typical_filter",
    "epsilon_filter",
    "eta_filter",
    "top_h_filter",
    "Temperature",
    "TopKFilter",
    "TopPFilter",
    "MinPFilter",
    "TypicalFilter",
    "EpsilonFilter",
    "EtaFilter",
    "TopHFilter",
    "TOP_H_RULES",
    "generate",
    "GenerationOutput",
    "SpeculativeDecoder",
    "speculative_verify",
    "kseq_verify",
    "kseq_rho",
    "self_draft",
    "Int8Linear",
    "quantize_linears",
    "VocabTrim",
    "CNTPConfig",
    "cntp_generate",
    "punctuation_token_ids",
    "awrs_sample",
    "AWRSResult",
    "constrained_generate",
    "load_smollm2",
    "smollm2_cache_dir",
    "smollm2_gguf",
    "InvalidLogitsError",
    "ModelFileNotFoundError",
    "VocabularyMismatchError",
    "rng",
]
