#!/usr/bin/env python
"""The figures of the samplers issue, each measured in one run (vistok and its baseline interleaved).

    python tools/bench_samplers.py processors        # latency vs Hugging Face's processors, B=64, V=128000
    python tools/bench_samplers.py speculative       # acceptance and speedup of speculative decoding, SmolLM2
    python tools/bench_samplers.py repetition        # repeated n-grams: typical vs pure sampling, SmolLM2
    python tools/bench_samplers.py all --json out/samplers.json

Options shrink or grow each part (``--runs``, ``--prompts``, ``--tokens``...); see ``--help``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from vistok import samplers
from vistok.cli import check_writable, count, count_or_zero, positive, reports_errors
from vistok.samplers import SamplingConfig

PROCESSOR_SETTINGS = {  # name: (vistok processor, Hugging Face class name, argument)
    "temperature": (samplers.Temperature(0.7), "TemperatureLogitsWarper", 0.7),
    "top_k": (samplers.TopKFilter(50), "TopKLogitsWarper", 50),
    "top_p": (samplers.TopPFilter(0.9), "TopPLogitsWarper", 0.9),
    "min_p": (samplers.MinPFilter(0.05), "MinPLogitsWarper", 0.05),
    "typical": (samplers.TypicalFilter(0.9), "TypicalLogitsWarper", 0.9),
    "epsilon": (samplers.EpsilonFilter(3e-4), "EpsilonLogitsWarper", 3e-4),
    "eta": (samplers.EtaFilter(3e-4), "EtaLogitsWarper", 3e-4),
    "top_h": (samplers.TopHFilter(0.4, rule="reference", top_n=100), "TopHLogitsWarper", 0.4),
}


def synthetic_logits(kind: str, batch: int, vocab: int) -> torch.Tensor:
    """``normal``: N(0, 3^2) logits. ``peaked``: N(0, 2^2) plus 8 tokens raised by 8..16, an LLM-like shape (a
    few likely tokens, a long tail)."""
    g = torch.Generator().manual_seed(0)
    if kind == "normal":
        return torch.randn(batch, vocab, generator=g) * 3
    logits = torch.randn(batch, vocab, generator=g) * 2
    logits[:, :8] += 8 + 8 * torch.rand(batch, 8, generator=g)
    return logits


def bench_processors(args) -> dict:
    from transformers.generation import logits_process as hf

    ids = torch.zeros(args.batch, 1, dtype=torch.long)
    rows = []
    for kind in args.logits:
        logits = synthetic_logits(kind, args.batch, args.vocab)
        for name, (ours, hf_name, value) in PROCESSOR_SETTINGS.items():
            theirs = getattr(hf, hf_name)(value)
            ours(ids, logits), theirs(ids, logits)  # warm up
            ours_times, theirs_times = [], []
            # Interleaved, at least --runs pairs and at least 0.5 s per side (the clock of a busy 2-core machine
            # ticks in steps of a few ms).
            pairs = [(theirs, theirs_times), (ours, ours_times)]
            while len(ours_times) < args.runs or min(sum(ours_times), sum(theirs_times)) < 0.5:
                pairs.reverse()  # alternate which one goes first
                for fn, times in pairs:
                    start = time.perf_counter()
                    fn(ids, logits)
                    times.append(time.perf_counter() - start)
            hf_ms, ours_ms = statistics.median(theirs_times) * 1e3, statistics.median(ours_times) * 1e3
            rows.append({"logits": kind, "processor": name, "hf_ms": hf_ms, "vistok_ms": ours_ms,
                         "ratio": ours_ms / hf_ms})
    print(f"\n### Processor latency, B={args.batch}, V={args.vocab}, CPU, float32, {torch.get_num_threads()} threads, "
          f"median of >= {args.runs} interleaved runs (>= 0.5 s each side)\n")
    print("| logits | processor | Hugging Face (ms) | vistok (ms) | ratio vistok / HF |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['logits']} | {row['processor']} | {row['hf_ms']:.1f} | {row['vistok_ms']:.1f} | "
              f"{row['ratio']:.2f} |")
    return {"batch": args.batch, "vocab": args.vocab, "threads": torch.get_num_threads(), "rows": rows}


def chat_prompts(tokenizer, questions):
    out = []
    for question in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt")
        out.append(ids if isinstance(ids, torch.Tensor) else ids["input_ids"])
    return out


EVAL_QUESTIONS = [
    "Explain how photosynthesis works.",
    "Write a short story about a robot who learns to paint.",
    "What are the benefits of regular exercise?",
    "Describe the water cycle to a child.",
    "Give three tips for learning a new language.",
    "Why do we have seasons on Earth?",
    "Write a poem about the ocean.",
    "How does a bicycle stay upright?",
]
CALIBRATION_QUESTIONS = [
    "Tell me about the history of Rome.", "How do airplanes fly?", "Give me a recipe for pancakes.",
    "What is machine learning?", "Describe a busy market.", "How do vaccines work?",
]


def bench_speculative(args, model, tokenizer) -> dict:
    config = SamplingConfig(temperature=args.temperature)
    prompts = chat_prompts(tokenizer, EVAL_QUESTIONS[: args.prompts])
    calibration = chat_prompts(tokenizer, CALIBRATION_QUESTIONS)
    trim = samplers.VocabTrim.from_generations(model, calibration, args.trim_size, max_new_tokens=64, config=config,
                                               always=tokenizer.all_special_ids, fill=len(tokenizer))
    eval_ids = torch.cat([p[0] for p in prompts])
    bf16_copy = samplers.self_draft(model, dtype=torch.bfloat16)
    int8_copy = samplers.self_draft(model, dtype=torch.bfloat16, quantize="int8")
    drafts = {
        f"first {args.layers} layers": (samplers.self_draft(model, num_layers=args.layers), None, 1),
        f"first {args.layers} layers + VocabTrim {args.trim_size}":
            (trim.draft(model, num_layers=args.layers), trim.token_ids, 1),
        "bf16 copy": (bf16_copy, None, 1),
        f"bf16 copy + VocabTrim {args.trim_size}": (trim.draft(model, dtype=torch.bfloat16), trim.token_ids, 1),
        "bf16 copy, K-SEQ k=2": (bf16_copy, None, 2),
        "int8 weights": (int8_copy, None, 1),
        f"int8 weights + VocabTrim {args.trim_size}":
            (trim.draft(model, dtype=torch.bfloat16, quantize="int8"), trim.token_ids, 1),
        "int8 weights, K-SEQ k=2": (int8_copy, None, 2),
    }
    decoders = {name: samplers.SpeculativeDecoder(model, draft, gamma=args.gamma, num_drafts=k, config=config,
                                                  draft_vocab=vocab)
                for name, (draft, vocab, k) in drafts.items()}
    timings = {name: [] for name in ["plain (vistok.samplers.generate)", "Hugging Face generate", *decoders]}
    acceptance = {name: [] for name in decoders}
    tokens_per_call = {name: [] for name in decoders}
    samplers.generate(model, prompts[0], config, max_new_tokens=4, seeds=0)  # warm up
    for index, prompt in enumerate(prompts):
        seeds = torch.tensor([index])
        plain = samplers.generate(model, prompt, config, max_new_tokens=args.tokens, seeds=seeds)
        timings["plain (vistok.samplers.generate)"].append(plain.stats["seconds"] / plain.stats["new_tokens"])
        start = time.perf_counter()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=None,
                             temperature=args.temperature, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                             pad_token_id=tokenizer.eos_token_id)
        timings["Hugging Face generate"].append((time.perf_counter() - start) / (out.shape[1] - prompt.shape[1]))
        for name, decoder in decoders.items():
            result = decoder.generate(prompt, max_new_tokens=args.tokens, seeds=seeds)
            timings[name].append(result.stats["seconds"] / result.stats["new_tokens"])
            acceptance[name].append(result.stats["acceptance_rate"])
            tokens_per_call[name].append(result.stats["tokens_per_target_call"])
    costs = forward_costs(model, {"bf16": bf16_copy, "int8": int8_copy}, prompts[0], args.gamma)
    base = statistics.mean(timings["plain (vistok.samplers.generate)"])
    rows = []
    for name, values in timings.items():
        ms = statistics.mean(values) * 1e3
        rows.append({"method": name, "ms_per_token": ms, "speedup": base * 1e3 / ms,
                     "acceptance": statistics.mean(acceptance[name]) if name in acceptance else None,
                     "tokens_per_target_call": statistics.mean(tokens_per_call[name]) if name in acceptance
                     else None})
    print(f"\n### Speculative decoding, SmolLM2-135M-Instruct (fp32 target), CPU, {torch.get_num_threads()} threads, "
          f"temperature {args.temperature}, gamma {args.gamma}, {args.prompts} chat prompts x {args.tokens} tokens, "
          f"batch 1, runs interleaved per prompt\n")
    print(f"VocabTrim: {trim.size} ids, calibrated on {len(CALIBRATION_QUESTIONS)} of the model's own answers "
          f"(other questions), filled by BPE id order; it covers {trim.coverage(eval_ids):.3f} of the prompt tokens.\n")
    print("| method | acceptance rate | tokens per target forward | ms / token | speedup vs plain |")
    print("|---|---|---|---|---|")
    for row in rows:
        acc = "" if row["acceptance"] is None else f"{row['acceptance']:.3f}"
        tpc = "" if row["tokens_per_target_call"] is None else f"{row['tokens_per_target_call']:.2f}"
        print(f"| {row['method']} | {acc} | {tpc} | {row['ms_per_token']:.1f} | {row['speedup']:.2f} |")
    print(f"\nForward cost with a KV cache (ms, median of 9): target 1 token {costs['target_1']:.1f}, target "
          f"{args.gamma + 1} tokens {costs['target_block']:.1f}, bf16 draft 1 token {costs['bf16_1']:.1f}, int8 "
          f"draft 1 token {costs['int8_1']:.1f}.")
    return {"temperature": args.temperature, "gamma": args.gamma, "prompts": args.prompts, "tokens": args.tokens,
            "threads": torch.get_num_threads(), "trim_size": trim.size, "rows": rows, "forward_ms": costs}


def forward_costs(target, drafts, prompt, gamma) -> dict:
    """Median ms of a cached forward: the target on 1 and on gamma + 1 new tokens, each draft on 1."""
    from vistok.samplers._decoding import CausalLMState

    def median_ms(model, width):
        state = CausalLMState(model, 1)
        state.prefill(prompt, torch.ones_like(prompt, dtype=torch.bool))
        times = []
        for step in range(10):
            tokens = torch.randint(100, 1000, (1, width), generator=torch.Generator().manual_seed(step))
            start = time.perf_counter()
            state.feed(tokens)
            times.append(time.perf_counter() - start)
            state.invalidate(torch.zeros(1, width, dtype=torch.bool))
        return statistics.median(times[1:]) * 1e3

    return {"target_1": median_ms(target, 1), "target_block": median_ms(target, gamma + 1),
            **{f"{name}_1": median_ms(draft, 1) for name, draft in drafts.items()}}


def repeated_ngrams(tokens: list[int], n: int) -> float:
    """Share of the n-grams of a sequence that already appeared earlier in it (0 = no repetition)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def bench_repetition(args, model, tokenizer) -> dict:
    prompts = chat_prompts(tokenizer, EVAL_QUESTIONS[: args.prompts])
    configs = {"pure sampling": SamplingConfig(), "typical 0.9": SamplingConfig(typical_p=0.9),
               "typical 0.2": SamplingConfig(typical_p=0.2), "top-p 0.9": SamplingConfig(top_p=0.9)}
    rows = []
    for name, config in configs.items():
        scores = {n: [] for n in (2, 3, 4)}
        for index, prompt in enumerate(prompts):
            out = samplers.generate(model, prompt, config, max_new_tokens=args.tokens, seeds=torch.tensor([index]),
                                    eos_token_id=None)
            tokens = out.new_tokens[0].tolist()
            for n in scores:
                scores[n].append(repeated_ngrams(tokens, n))
        rows.append({"sampler": name, **{f"rep{n}": statistics.mean(v) for n, v in scores.items()}})
    print(f"\n### Repeated n-grams, SmolLM2-135M-Instruct, {args.prompts} chat prompts x {args.tokens} tokens (no EOS "
          "stop), same prompts and seeds\n")
    print("share of the n-grams of a generation that repeat an earlier n-gram of it (mean over prompts)\n")
    print("| sampler | 2-grams | 3-grams | 4-grams |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['sampler']} | {row['rep2']:.3f} | {row['rep3']:.3f} | {row['rep4']:.3f} |")
    return {"prompts": args.prompts, "tokens": args.tokens, "rows": rows}


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["processors", "speculative", "repetition", "all"])
    parser.add_argument("--batch", type=count, default=64)
    parser.add_argument("--vocab", type=count, default=128000)
    parser.add_argument("--logits", nargs="+", default=["normal", "peaked"], choices=["normal", "peaked"])
    parser.add_argument("--runs", type=count, default=7)
    parser.add_argument("--prompts", type=count, default=4)
    parser.add_argument("--tokens", type=count, default=64)
    parser.add_argument("--gamma", type=count, default=4)
    parser.add_argument("--layers", type=count, default=4)
    parser.add_argument("--trim-size", type=count, default=16384)
    parser.add_argument("--temperature", type=positive, default=1.0)
    parser.add_argument("--threads", type=count_or_zero, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.json:
        check_writable("--json", Path(args.json))  # before the benchmark, not after it
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    report = {"torch": torch.__version__}
    if args.part in ("processors", "all"):
        report["processors"] = bench_processors(args)
    if args.part in ("speculative", "repetition", "all"):
        import transformers

        transformers.logging.set_verbosity_error()
        model, tokenizer = samplers.load_smollm2()
        if args.part in ("speculative", "all"):
            report["speculative"] = bench_speculative(args, model, tokenizer)
        if args.part in ("repetition", "all"):
            report["repetition"] = bench_repetition(args, model, tokenizer)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
