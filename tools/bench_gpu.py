#!/usr/bin/env python
"""Issue 15's figures on a GPU in one run: patched vs unpatched timm ViTs, eager and compiled, bf16.

    PYTHONPATH=. python3 tools/bench_gpu.py --out $OUT/gpu.json     # on the GPU machine, about 5 minutes
    python tools/bench_gpu.py --smoke --out out/gpu_smoke.json      # every step on tiny CPU models (a dry run)

For each model it builds the unpatched model and ATS (k=108, blocks 3..), merging (ToMe's r for the model) and
ATS followed by merging, in eager mode and compiled (``torch.compile(fullgraph=True)``, the batch dimension dynamic,
so one compile serves every batch size); on ViT-B the compiled ATS and merging also run with ``attention="sdpa"``
beside ``"auto"`` (which takes FlexAttention there), the measurement that decides ``"auto"``'s rule (compiled after
the three ``"auto"`` variants, the issue's rows). Per batch
size (256, 64, 1024) the models are timed interleaved (median of ``--runs``), and the peak CUDA memory of one
forward is read for each. Ratios are patched / unpatched within one mode and batch, measured in this run.

Compiling is what takes the time, so the cheap phases go first: ViT-B, ViT-S and ViT-L eager, a vision-LLM
prefill (LLaVA-1.5's shapes: a CLIP ViT-L/14 tower at 336 px, 576 visual tokens, random weights, a 360M Llama; all
tokens vs a quarter); then ViT-B compiled (its figures decide the issue; every method on ``"auto"``, then ATS and
merging on ``"sdpa"``), then ViT-S and ViT-L compiled while ``--budget-s`` lasts. No compile starts in the budget's last
quarter; what did compile is timed at the first batch size even past the budget.

Every row goes to the JSON as soon as it is measured, so a run cut short still reports what it reached.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

import vistok
from vistok.cli import check_writable, reports_errors
from vistok.measure import allow_recompiles, synchronize, time_models
from vistok.methods.ats import default_ats_blocks


@dataclass(frozen=True)
class ModelCase:
    """A model and its methods' settings (the papers' for its depth)."""

    name: str
    merge_r: int
    depth: int
    timm_kwargs: dict[str, Any] = field(default_factory=dict)

    def variants(self, attention_paths: tuple[str, ...]) -> dict[str, tuple[Any, dict, str]]:
        """``{label: (method, options, attention)}`` of the patched variants."""
        blocks = default_ats_blocks(self.depth)  # the paper's 3..11 of 12, scaled
        ats = {"k": 108, "blocks": blocks}
        merge_after = list(range(blocks[0] + 1, self.depth))
        methods = {
            "ats k=108": ("ats", ats),
            f"merge r={self.merge_r}": ("merge", {"r": self.merge_r}),
            "ats+merge": ([("ats", {"k": 108, "blocks": blocks[:1]}),
                           ("merge", {"r": max(1, self.merge_r // 2), "blocks": merge_after})], {}),
        }
        # the rows (every method on the first path) before the comparison copies on the other paths (ATS
        # and merging): a compile phase cut short loses a comparison, not a headline row
        return {f"{label} [{path}]" if len(attention_paths) > 1 else label: (method, options, path)
                for path in attention_paths for label, (method, options) in methods.items()
                if path == attention_paths[0] or label != "ats+merge"}


FULL_CASES = [
    ModelCase("vit_base_patch16_224", merge_r=13, depth=12),
    ModelCase("vit_small_patch16_224", merge_r=16, depth=12),
    ModelCase("vit_large_patch16_224", merge_r=8, depth=24),
]
SMOKE_CASES = [ModelCase("vit_tiny_patch16_224", merge_r=13, depth=4, timm_kwargs={"depth": 4})]


class Recorder:
    """Collects rows and rewrites the JSON after every one."""

    def __init__(self, path: Path | None, meta: dict[str, Any]) -> None:
        self.path = path
        self.record: dict[str, Any] = {"meta": meta, "rows": [], "prefill": [], "skipped": [], "errors": [],
                                       "headline": [], "finished": False, "total_s": None}

    def add(self, section: str, row: dict[str, Any]) -> None:
        self.record[section].append(row)
        self.write()

    def finish(self, headline: list[str], total_s: float) -> None:
        self.record.update(headline=headline, finished=True, total_s=total_s)
        self.write()

    def write(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.record, indent=2, default=str))


def _peak_bytes(model: Callable, images: torch.Tensor) -> int | None:
    """Peak CUDA memory above what was allocated before one forward (``None`` off CUDA)."""
    if images.device.type != "cuda":
        return None
    synchronize(images.device)
    before = torch.cuda.memory_allocated(images.device)
    torch.cuda.reset_peak_memory_stats(images.device)
    with torch.inference_mode():
        model(images)
    synchronize(images.device)
    return torch.cuda.max_memory_allocated(images.device) - before


def _build(case: ModelCase, attention_paths: tuple[str, ...], device: torch.device, dtype: torch.dtype
           ) -> dict[str, nn.Module]:
    """The unpatched model, then the patched variants path by path (the first path's first: they matter most)."""
    torch.manual_seed(0)
    base = timm.create_model(case.name, pretrained=False, **case.timm_kwargs).eval().to(device=device, dtype=dtype)
    models = {"unpatched": base}
    for label, (method, options, path) in case.variants(attention_paths).items():
        models[label] = copy.deepcopy(base)
        vistok.patch(models[label], method, attention=path, **options)
    return models


def _compile(recorder: Recorder, case: ModelCase, models: dict[str, nn.Module], example: torch.Tensor,
             args: argparse.Namespace, deadline: float) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """Each model compiled whole, the batch dimension dynamic (one compile for every batch size), in order, while
    the deadline allows; the first call (compile + run) is timed. A model that fails to compile is recorded and
    left out, and the others go on."""
    compiled, seconds = {}, {}
    for label, model in models.items():
        if time.perf_counter() > deadline:
            recorder.add("skipped", {"model": case.name, "variant": label, "why": "time budget (compile)"})
            continue
        function = torch.compile(model, backend=args.backend, mode=args.compile_mode, fullgraph=True)
        images = example.clone()
        torch._dynamo.maybe_mark_dynamic(images, 0)
        synchronize(images.device)
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                function(images)
        except Exception as error:
            recorder.add("errors", {"model": case.name, "variant": label, "stage": "compile", "error": repr(error)})
            print(f"{case.name} {label}: compile failed: {error!r:.300}", flush=True)
            continue
        synchronize(images.device)
        seconds[label] = time.perf_counter() - start
        compiled[label] = function
        print(f"{case.name} {label}: compiled in {seconds[label]:.1f} s", flush=True)
    return compiled, seconds


def _measure(recorder: Recorder, case: ModelCase, mode: str, models: dict[str, nn.Module], batch: int,
             images: torch.Tensor, runs: int, compile_seconds: dict[str, float]) -> None:
    if "unpatched" not in models:  # it did not compile (recorded), and ratios need it
        recorder.add("skipped", {"model": case.name, "mode": mode, "batch": batch, "why": "no unpatched model"})
        return
    graphs_before = _graph_count()
    timings = time_models(models, images, warmup=2, runs=runs)
    recompiled = _graph_count() - graphs_before  # 0 when the dynamic batch held (the warm-up would hide a compile)
    base = timings["unpatched"].images_per_s
    base_peak = _peak_bytes(models["unpatched"], images)
    for label, timing in timings.items():
        peak = _peak_bytes(models[label], images)
        row = {"model": case.name, "mode": mode, "batch": batch, "variant": label,
               "attention": _attention_of(models[label]), "graphs_compiled_during_timing": recompiled,
               "images_per_s": timing.images_per_s, "median_s": timing.median_s,
               "speedup": timing.images_per_s / base, "peak_bytes": peak,
               "peak_ratio": None if peak is None or not base_peak else peak / base_peak,
               "compile_s": compile_seconds.get(label)}
        recorder.add("rows", row)
        memory = "" if row["peak_ratio"] is None else f"  peak {row['peak_ratio']:.3f}x"
        print(f"{case.name:<24}{mode:<9}B={batch:<5}{label:<28}{timing.images_per_s:>10.1f} img/s  "
              f"{row['speedup']:.3f}x{memory}", flush=True)


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _attention_of(model: nn.Module) -> str | None:
    handle = vistok.find_handle(getattr(model, "_orig_mod", model))
    return None if handle is None else handle.attention


def _images(args: argparse.Namespace, batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch)  # the same images for eager and compiled
    images = torch.randn(batch, 3, args.image_size, args.image_size, generator=generator)
    return images.to(device=torch.device(args.device), dtype=getattr(torch, args.dtype))


def _time_batches(recorder: Recorder, case: ModelCase, mode: str, models: dict[str, nn.Module],
                  args: argparse.Namespace, deadline: float, compile_seconds: dict[str, float],
                  first_always: bool = False) -> None:
    for index, batch in enumerate(args.batches):
        if time.perf_counter() > deadline and not (first_always and index == 0):
            recorder.add("skipped", {"model": case.name, "mode": mode, "batch": batch, "why": "time budget"})
            continue
        runs = max(3, args.runs // 2) if batch >= 1024 else args.runs
        try:
            _measure(recorder, case, mode, models, batch, _images(args, batch), runs, compile_seconds)
        except Exception as error:  # e.g. out of memory at the largest batch: the other rows stand
            recorder.add("errors", {"model": case.name, "mode": mode, "batch": batch, "error": repr(error)})
            print(f"{case.name} {mode} B={batch}: {error!r:.300}", flush=True)


def _bench_eager(recorder: Recorder, case: ModelCase, args: argparse.Namespace, deadline: float) -> None:
    models = _build(case, ("auto",), torch.device(args.device), getattr(torch, args.dtype))  # eager "auto": SDPA
    _time_batches(recorder, case, "eager", models, args, deadline, {})


def _bench_compiled(recorder: Recorder, case: ModelCase, args: argparse.Namespace, attention_paths: tuple[str, ...],
                    deadline: float) -> None:
    models = _build(case, attention_paths, torch.device(args.device), getattr(torch, args.dtype))
    # no compile starts in the budget's last quarter; what compiled is timed at the first batch size regardless
    compiled, seconds = _compile(recorder, case, models, _images(args, args.batches[0]), args,
                                 deadline - args.budget_s / 4)
    _time_batches(recorder, case, "compiled", compiled, args, deadline, seconds, first_always=True)


def _phase(recorder: Recorder, label: str, run: Callable[[], None]) -> None:
    """One model's eager or compiled measurements; its failure must not lose the others' figures."""
    try:
        run()
    except Exception as error:
        recorder.add("errors", {"model": label, "error": repr(error)})
        print(f"{label}: {error!r}", flush=True)
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _prefill(recorder: Recorder, args: argparse.Namespace, smoke: bool) -> None:
    """Time to first token of a LLaVA-shaped model (random weights), all 576 visual tokens vs 144."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from vistok.adapters.vlm import _check_transformers

    _check_transformers("LlavaForConditionalGeneration")  # before building 660M parameters it would refuse
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if smoke:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=64, patch_size=8)
        text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128)
    else:  # LLaVA-1.5's tower (CLIP ViT-L/14, 336 px) and SmolLM2-360M's shape as the language model
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        text = LlamaConfig(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                           num_key_value_heads=5, vocab_size=49152)
    image_token = text.vocab_size - 1
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval().to(device=device, dtype=dtype)
    visual = (vision.image_size // vision.patch_size) ** 2
    batch = 2 if smoke else 8
    text_ids = torch.randint(0, image_token, (batch, 32), generator=torch.Generator().manual_seed(0))
    input_ids = torch.cat([text_ids[:, :4], torch.full((batch, visual), image_token), text_ids[:, 4:]], 1).to(device)
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size).to(device=device, dtype=dtype)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels,
              "logits_to_keep": 1}  # as generate's prefill: the next token's logits only
    variants = {"all tokens": None, "merge_to_budget 25%": ("merge_to_budget", {"keep": 0.25}),
                "pool 25%": ("pool", {"keep": 0.25}), "dominant 25%": ("dominant", {"keep": 0.25})}
    seconds: dict[str, list[float]] = {label: [] for label in variants}
    with torch.inference_mode():
        for step in range(2 + args.runs):
            for label, spec in variants.items():
                handle = None if spec is None else vistok.patch(model, spec[0], **spec[1])
                synchronize(device)
                start = time.perf_counter()
                model(**inputs)
                synchronize(device)
                if step >= 2:
                    seconds[label].append(time.perf_counter() - start)
                if handle is not None:
                    handle.remove()
    full = sorted(seconds["all tokens"])[len(seconds["all tokens"]) // 2]
    for label, values in seconds.items():
        median = sorted(values)[len(values) // 2]
        recorder.add("prefill", {"variant": label, "batch": batch, "visual_tokens": visual, "median_s": median,
                                 "ratio": median / full})
        print(f"prefill {label:<22} {median * 1e3:8.1f} ms  {median / full:.3f}x", flush=True)


def _headline(record: dict[str, Any]) -> list[str]:
    """The issue's targets, read off the rows of ViT-B (compiled, attention "auto")."""
    rows = [r for r in record["rows"] if r["model"] == "vit_base_patch16_224" and r["mode"] == "compiled"]

    def find(batch: int, prefix: str) -> dict | None:
        matching = [r for r in rows if r["batch"] == batch and r["variant"].startswith(prefix)]
        auto = [r for r in matching if "[sdpa]" not in r["variant"]]
        return (auto or matching or [None])[0]  # "auto"; the SDPA copy where auto did not compile

    lines = []
    for batch, prefix, target in [(256, "merge r=13", 1.5), (256, "ats k=108", 1.3), (64, "merge r=13", 1.0),
                                  (64, "ats k=108", 1.0)]:
        row = find(batch, prefix)
        if row is None:
            lines.append(f"ViT-B B={batch} {prefix}: not measured")
            continue
        memory = "" if row["peak_ratio"] is None else f", peak memory {row['peak_ratio']:.3f}x (target <= 1)"
        lines.append(f"ViT-B B={batch} compiled {row['variant']}: {row['speedup']:.3f}x unpatched (target >= "
                     f"{target}){memory}")
    return lines


def _commit() -> str | None:
    """The checkout's commit, where the run has its git folder (a device machine's copy may not)."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="the JSON to write")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, aot_eager: a dry run")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--models", nargs="+", default=None, help="a subset of the models, by timm name")
    parser.add_argument("--budget-s", type=float, default=270.0, help="start no new measurement after this")
    parser.add_argument("--backend", default=None, help="torch.compile backend (inductor; smoke: aot_eager)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead")
    parser.add_argument("--no-prefill", action="store_true")
    args = parser.parse_args(argv)
    if args.out is not None:
        check_writable("--out", args.out)  # before any measurement
    smoke = args.smoke
    args.device = args.device or ("cpu" if smoke else "cuda")
    args.batches = args.batches or ([2, 3] if smoke else [256, 64, 1024])
    args.runs = args.runs or (2 if smoke else 10)
    args.backend = args.backend or ("aot_eager" if smoke else "inductor")
    args.image_size = 224
    if smoke:
        args.dtype = "float32"
    cases = SMOKE_CASES if smoke else FULL_CASES
    if args.models:
        cases = [case for case in cases if case.name in args.models]
    # Every model compiles the same code objects (VisionTransformer.forward, the patched block): one cache entry
    # per model and batch mode, more than dynamo keeps by default.
    allow_recompiles(256)
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):  # never time eager code as "compiled"
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    start = time.perf_counter()
    deadline = start + args.budget_s
    device = torch.device(args.device)
    import transformers

    meta = {"torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__,
            "vistok_commit": _commit(), "device": torch.cuda.get_device_name(device)
            if device.type == "cuda" else f"cpu ({platform.machine()})", "dtype": args.dtype,
            "backend": args.backend, "compile_mode": args.compile_mode, "batches": args.batches, "runs": args.runs}
    print(json.dumps(meta), flush=True)
    recorder = Recorder(args.out, meta)
    # The first model compares the attention paths, except under inductor on the CPU, which cannot compile flex
    # with the bias vistok computes in the graph (and where "auto" is SDPA anyway); on the CPU "auto" is SDPA, so
    # the dry run traces flex explicitly.
    if device.type == "cpu" and args.backend == "inductor":
        compared: tuple[str, ...] = ("auto",)
    else:
        compared = ("auto", "sdpa") if device.type == "cuda" else ("auto", "sdpa", "flex")
    # the cheap phases first (seconds each), then the compiles, which a slow compiler could otherwise let crowd out
    plan: list[tuple[str, Callable[[], None]]] = [
        (f"{case.name} eager", lambda case=case: _bench_eager(recorder, case, args, deadline)) for case in cases]
    if not args.no_prefill:
        plan.append(("llava prefill", lambda: _prefill(recorder, args, smoke)))
    plan += [(f"{case.name} compiled", lambda case=case, index=index: _bench_compiled(
        recorder, case, args, compared if index == 0 else ("auto",), deadline)) for index, case in enumerate(cases)]
    for label, run in plan:
        compiles = label.endswith("compiled")
        if time.perf_counter() > deadline - (args.budget_s / 4 if compiles else 0):  # no compile could start
            recorder.add("skipped", {"model": label, "why": "time budget"})
            continue
        _phase(recorder, label, run)
    headline = _headline(recorder.record)
    recorder.finish(headline, time.perf_counter() - start)
    print("\n".join(headline))
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
