"""Measurement: FLOPs that count attention, tokens per block, throughput, peak memory, patched-vs-unpatched
benchmark."""

from .bench import BenchReport, Variant, VariantResult, run_benchmark
from .flops import count_flops, flop_counter
from .memory import LiveTensorBytes, peak_memory
from .throughput import Timing, allow_recompiles, synchronize, time_models
from .tokens import tokens_per_block

__all__ = [
    "count_flops",
    "flop_counter",
    "tokens_per_block",
    "peak_memory",
    "LiveTensorBytes",
    "time_models",
    "Timing",
    "synchronize",
    "allow_recompiles",
    "run_benchmark",
    "Variant",
    "VariantResult",
    "BenchReport",
]
