"""Compare an unpatched timm model with patched variants: tokens per block, GFLOPs per image, images/s.

Used by ``vistok bench`` and ``tools/benchmark.py``. Ratios are measured in one run (same process, same
inputs, interleaved timing), never compared with numbers from another run.
"""

from __future__ import annotations

import copy
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._checks import is_int
from ..errors import InvalidConfigError, UnsupportedModelError
from .flops import count_flops
from .throughput import Timing, allow_recompiles, synchronize, time_models
from .tokens import tokens_per_block

__all__ = ["Variant", "VariantResult", "BenchReport", "run_benchmark"]


@dataclass(frozen=True)
class Variant:
    """A way to run the model: ``method=None`` is the unpatched model (``run_benchmark`` runs it first, as
    ``"unpatched"``; the variants it is given each name a method and a label of their own)."""

    label: str
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VariantResult:
    label: str
    method: str | None
    options: dict[str, Any]
    tokens_per_block: list[float]
    gflops: float
    timing: Timing
    cosine_to_unpatched: float | None  # None: the model outputs a token sequence, which a patch shortens
    top1_agreement: float | None
    compile_s: float | None = None  # the first compiled call (compile + one forward), when compiled

    @property
    def mean_tokens(self) -> float:
        return sum(self.tokens_per_block) / len(self.tokens_per_block)


@dataclass(frozen=True)
class BenchReport:
    model_name: str
    batch_size: int
    image_size: tuple[int, int]
    dtype: str
    device: str
    threads: int
    runs: int
    warmup: int
    results: list[VariantResult]
    compiled: str | None = None
    attention: str = "auto"

    @property
    def baseline(self) -> VariantResult:
        return self.results[0]

    def gflops_ratio(self, result: VariantResult) -> float:
        """Patched / unpatched GFLOPs per image."""
        return result.gflops / self.baseline.gflops

    def speedup(self, result: VariantResult) -> float:
        """Patched / unpatched images per second."""
        return result.timing.images_per_s / self.baseline.timing.images_per_s

    def format_table(self) -> str:
        head = (f"{self.model_name}: batch {self.batch_size}, {self.image_size[0]}x{self.image_size[1]}, "
                f"{self.dtype}, {self.device} ({self.threads} threads), median of {self.runs} runs after "
                f"{self.warmup} warm-up" + (f", compiled ({self.compiled}, fullgraph)" if self.compiled else "")
                + f", attention {self.attention}")
        columns = f"{'variant':<22}{'tokens/block':>13}{'GFLOPs/img':>12}{'img/s':>9}" \
                  f"{'GFLOPs ratio':>14}{'speedup':>9}{'speedup x ratio':>17}{'cos':>7}{'top-1 agree':>13}"
        lines = [head, columns, "-" * len(columns)]
        for result in self.results:
            ratio, speedup = self.gflops_ratio(result), self.speedup(result)
            lines.append(f"{result.label:<22}{result.mean_tokens:>13.1f}{result.gflops:>12.3f}"
                         f"{result.timing.images_per_s:>9.1f}{ratio:>14.3f}{speedup:>9.3f}{speedup * ratio:>17.3f}"
                         f"{_figure(result.cosine_to_unpatched):>7}{_figure(result.top1_agreement):>13}")
        lines.append("GFLOPs = 2 x multiply-accumulates, attention included (papers often quote MACs). "
                     "'speedup x ratio' >= 1 means wall-clock gains match the FLOPs saved. 'cos' and 'top-1 "
                     "agree': mean cosine similarity and argmax agreement of the outputs with the unpatched "
                     "model's, on the same inputs ('-' for a model whose output is its token sequence, "
                     "last_hidden_state: a patch shortens it).")
        for result in self.results[1:]:
            per_block = ", ".join(f"{count:.1f}" for count in result.tokens_per_block)
            lines.append(f"{result.label} tokens per block: [{per_block}]")
        if self.compiled:
            times = ", ".join(f"{result.label} {result.compile_s:.1f} s" for result in self.results)
            lines.append(f"compile time (first call, with the compiler's caches as found: the first model also pays "
                         f"its start-up): {times}")
        if self.compiled or not self.device.startswith("cpu"):
            lines.append("Tokens and GFLOPs are counted eagerly on the CPU, padding excluded; compiled or on a GPU the "
                         "blocks pad to their static bounds (adaptive ATS computes k tokens), so the real saving can "
                         "be smaller than the GFLOPs ratio says.")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for entry, result in zip(data["results"], self.results, strict=True):
            entry["images_per_s"] = result.timing.images_per_s
            entry["median_s"] = result.timing.median_s
            entry["gflops_ratio"] = self.gflops_ratio(result)
            entry["speedup"] = self.speedup(result)
        return data


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _prediction(output: Any) -> Tensor | None:
    """A model's output as one ``[B, D]`` tensor: itself, or a Hugging Face output's ``logits`` (else its pooled
    output); ``None`` for an output that is a token sequence (``[B, N, C]``, or ``last_hidden_state`` alone: a
    patched model's is shorter and padded, so it cannot be compared with the unpatched one's)."""
    if isinstance(output, Tensor):
        return output if output.dim() == 2 else None
    for name in ("logits", "pooler_output"):
        value = getattr(output, name, None)
        if value is not None:
            return value if value.dim() == 2 else value.flatten(1)
    if getattr(output, "last_hidden_state", None) is not None:
        return None
    raise InvalidConfigError(f"run_benchmark: cannot read predictions from a {type(output).__name__}")


def run_benchmark(
    model_name: str | Callable[[], nn.Module],
    variants: list[Variant],
    batch_size: int = 32,
    runs: int = 10,
    warmup: int = 3,
    seed: int = 0,
    flops_images: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    input_shape: tuple[int, ...] | None = None,
    label: str | None = None,
    compile: str | None = None,
    attention: str = "auto",
) -> BenchReport:
    """Benchmark a randomly initialised model, unpatched and with each variant (CPU, fp32 by default).

    ``model_name`` is a timm model name, or a function that builds any model vistok patches (then give
    ``input_shape``, one input without the batch dimension, e.g. ``(16, 3, 224, 224)`` for a VideoMAE clip, and a
    ``label``). Inputs are ``batch_size`` standard-normal samples (seeded). FLOPs are counted on the CPU in fp32
    (the same count on every device) and averaged over the first ``flops_images`` inputs (all by default); tokens
    per block, outputs and timings come from ``device`` in ``dtype``.

    ``compile``: a ``torch.compile`` backend (``"inductor"``): every model, unpatched too, is then compiled whole
    (``fullgraph=True``) and outputs and timings come from the compiled models; the first call's time is
    reported. ``attention``: the patched models' attention path (``"auto"``, ``"sdpa"``, ``"flex"``).
    """
    from ..patching import patch

    labels = [variant.label for variant in variants]
    for variant in variants:
        if variant.method is None or variant.label == "unpatched" or labels.count(variant.label) > 1:
            raise InvalidConfigError(
                f"run_benchmark: {variant!r}: every variant needs a method and its own label other than "
                "'unpatched' (the unpatched model always runs first, under that label)")
    if flops_images is not None and not (is_int(flops_images, 1) and flops_images <= batch_size):
        raise InvalidConfigError(f"run_benchmark: flops_images must be an int from 1 to the batch size {batch_size} "
                                 f"(FLOPs are counted on the batch's images; None: all of them), got {flops_images!r}")
    torch.manual_seed(seed)
    if isinstance(model_name, str):
        from .._timm import create_timm_model

        base = create_timm_model(model_name, "run_benchmark", pretrained=False, **(model_kwargs or {})).eval()
        if not isinstance(getattr(base, "patch_embed", None), nn.Module):
            raise UnsupportedModelError(f"run_benchmark: {model_name} ({type(base).__name__}) has no patch_embed: "
                                        "vistok benchmarks vision transformers")
        stem = next((m for m in base.patch_embed.modules() if isinstance(m, nn.Conv2d)), None)
        channels = 3 if stem is None else stem.in_channels
        input_shape = input_shape or (channels, *base.patch_embed.img_size)
    else:
        if input_shape is None:
            raise InvalidConfigError("run_benchmark: give input_shape with a model-building function")
        base = model_name().eval()
        model_name = label or type(base).__name__
    image_size = tuple(input_shape[-2:])
    images = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(seed))
    models: dict[str, nn.Module] = {"unpatched": base}
    all_variants = [Variant("unpatched")] + list(variants)
    for variant in all_variants[1:]:
        models[variant.label] = copy.deepcopy(base)
        patch(models[variant.label], variant.method, attention=attention, **variant.options)

    bar = tqdm(total=len(models) * (warmup + runs + 1), disable=not progress, desc=model_name, leave=False)
    counted = images if flops_images is None else images[:flops_images]
    timed_images = images.to(device=device, dtype=dtype)
    if compile is not None:  # every model below adds a cache entry on the same code (the model class's forward)
        torch._dynamo.reset()
        allow_recompiles(4 * len(models))
    costs, outputs, compile_seconds = {}, {}, {}
    for name, model in list(models.items()):
        bar.set_postfix_str(f"{name}: counting FLOPs")
        flops = count_flops(model, counted) / 1e9
        model.to(device=device, dtype=dtype)
        costs[name] = (tokens_per_block(model, timed_images), flops)
        if compile is not None:
            models[name] = model = torch.compile(model, backend=compile, fullgraph=True)
        synchronize(timed_images.device)
        start = time.perf_counter()
        with torch.inference_mode():
            outputs[name] = _prediction(model(timed_images))
        synchronize(timed_images.device)
        compile_seconds[name] = time.perf_counter() - start if compile is not None else None
        bar.update()
    reference = outputs["unpatched"]
    agreement = {label: (None, None) if out is None else (
        float(F.cosine_similarity(out.float(), reference.float(), dim=-1).mean()),
        float((out.argmax(-1) == reference.argmax(-1)).float().mean())) for label, out in outputs.items()}

    def step(message: str) -> None:
        bar.set_postfix_str(message)
        bar.update()

    timings = time_models(models, timed_images, warmup=warmup, runs=runs, progress=step)
    bar.close()
    results = [VariantResult(v.label, v.method, dict(v.options), *costs[v.label], timings[v.label],
                             *agreement[v.label], compile_seconds[v.label]) for v in all_variants]
    where = torch.device(device)
    processor = platform.processor() or platform.machine()
    hardware = torch.cuda.get_device_name(where) if where.type == "cuda" else f"cpu ({processor})"
    return BenchReport(model_name, batch_size, image_size, str(dtype).removeprefix("torch."), hardware,
                       torch.get_num_threads(), runs, warmup, results, compile, attention)
