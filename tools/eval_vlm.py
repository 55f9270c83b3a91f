#!/usr/bin/env python
"""The reference vision-LLM on held-out Fashion-MNIST questions (vistok.fmnist_qa, test split): exact-match
accuracy (overall and per question kind), visual tokens per image, prefill time (one forward over the first
batch's prompts after an untimed one, the median of ``--prefill-runs``) and total generation time (all
batches), with all visual tokens and with each boundary method at fractions of them. Greedy decoding through
vistok.samplers. Writes ``<out>.csv`` and ``<out>.png`` (accuracy vs visual tokens).

With ``--page``, the page VLM (``vistok_page_vlm_fmnist``) on sparse pages (vistok.document.fmnist_pages): 144
visual tokens per page (16 crops of 9), the correlation-guided compressor (every crop at least one token where
the budget allows, and with ``minimum=0``) against uniform per-crop budgets, random selection and merging, every
compressed view numbered as the full page (``positions=original``, as the weights were trained). With
``--fine``, the fine VLM (``vistok_vlm_fmnist_fine``, 196 visual tokens per image) on the same questions as the
default; ``--fine --checkpoint models/vistok_vlm_fmnist_fine_plain/model.safetensors`` the one trained on full grids
only (training-free compression). A method is ``name`` or ``name:key=value,...``.

Every row also says how far it is from the all-token run (``vs_all``) and from ``--baseline`` at the same visual
tokens (``vs_baseline``: pooling; with ``--page``, uniform per-crop budgets), in points on the same questions, with
paired standard errors (``*_se``): whether one method beats another is read from these, not from two accuracies.

    python tools/eval_vlm.py --out results/vlm_eval                       # the shipped weights, 500 questions
    python tools/eval_vlm.py --questions 200 --fractions 0.25 --methods dominant merge_to_budget
    python tools/eval_vlm.py --page --out out/sparse_pages                # the shipped page VLM, its default methods
    python tools/eval_vlm.py --fine --out out/vlm_fine --questions 300    # the fine VLM (196 tokens per image),
                                                                          # its methods with positions=original
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch

import vistok
from vistok.cli import beside, count, fraction, reports_errors, seed
from vistok.config import parse_method_spec
from vistok.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from vistok.document.fmnist_pages import SparsePageQA
from vistok.errors import InvalidConfigError
from vistok.fmnist_qa import FashionQA
from vistok.measure.accuracy import add_paired_differences
from vistok.models.reference_vlm import answer_questions, create_reference_vlm, prefill_seconds

SHIPPED = Path(__file__).resolve().parents[1] / "models"  # a checkpoint in models/<name>/ is titled by its name
METHODS = ("merge_to_budget", "region_merge", "dominant", "pool", "random_select")
# the page VLM was trained on every compressed view numbered as the full page: it is evaluated so
BASELINE, PAGE_BASELINE = "pool", "correlation_guided:redundancy=page,allocation=uniform,positions=original"
PAGE_METHODS = ("correlation_guided:redundancy=page,positions=original",
                "correlation_guided:redundancy=page,minimum=0,positions=original", PAGE_BASELINE,
                "random_select:positions=original", "merge_to_budget:positions=original")
PAGE_FRACTIONS = (0.5, 0.33, 0.17, 0.11, 0.083, 0.056)
# the fine VLM was trained with every method numbering the kept tokens as the full image: evaluated so too
FINE_METHODS = tuple(f"{method}:positions=original" for method in METHODS)
FINE_BASELINE = "pool:positions=original"


def settings(methods: list[str], fractions: list[float], full: int, grid: tuple[int, int],
             baseline: str | None = None) -> list[tuple]:
    """``(method or None, tokens)`` for every point; pooling takes the nearest budget its grid can make, and where
    pooling is the ``baseline`` (and evaluated) every method takes that budget (``vs_baseline`` compares equal
    token counts)."""
    from vistok.adapters.budget import poolable

    def pooled(tokens: int) -> int:
        return next(t for t in sorted(range(1, full + 1), key=lambda t: (abs(t - tokens), t)) if poolable(grid, t))

    aligned = baseline in methods and parse_method_spec(baseline)[0] == "pool"
    points = [(None, full)]
    for method in methods:
        for share in fractions:
            tokens = max(1, round(share * full))
            if aligned or parse_method_spec(method)[0] == "pool":
                tokens = pooled(tokens)
            points.append((method, tokens))
    return points


def check_method(method: str) -> None:
    """Refuse a method word whose name or options vistok refuses, or that carries a budget (each point gives its
    own): before the model loads, not after the all-token run."""
    from vistok.errors import VistokError
    from vistok.methods import create_config

    try:
        name, options = parse_method_spec(method)
        if {"tokens", "keep"} & set(options):
            raise InvalidConfigError("the budget comes from --fractions, not from the method's options")
        create_config(name, **options, keep=1.0)
    except VistokError as error:
        raise InvalidConfigError(f"--methods {method}: {error}") from None


def patch(model, method: str, **budget):
    """``vistok.patch`` with a ``name:key=value,...`` method word and a budget."""
    name, options = parse_method_spec(method)
    return vistok.patch(model, name, **options, **budget)


def evaluate(model, tokenizer, data: FashionQA | SparsePageQA, method: str | None, tokens: int, batch_size: int,
             prefill_runs: int = 3, config=None) -> tuple[dict, list[bool]]:
    """One row: ``method`` (a method word) at ``tokens``, or ``config`` (a config object, e.g. the tuner's pick,
    ``method`` its label), or neither (all tokens); and whether each question was answered right."""
    hits, kinds, prefills, total = [], {}, [], 0.0
    handle = vistok.patch(model, config) if config is not None else patch(model, method, tokens=tokens) \
        if method else None
    try:
        for start in range(0, len(data), batch_size):
            indices = range(start, min(start + batch_size, len(data)))
            examples = [data.example(i) for i in indices]
            images = normalised(examples)
            questions = [e.question for e in examples]
            if start == 0:
                prefill_seconds(model, tokenizer, images, questions)  # untimed: the first call of a run is slower
                prefills = [prefill_seconds(model, tokenizer, images, questions) for _ in range(prefill_runs)]
            result = answer_questions(model, tokenizer, images, questions)
            total += result.total_seconds
            for example, answer in zip(examples, result.answers, strict=True):
                hit = answer == example.answer
                hits.append(hit)
                seen, right = kinds.get(example.kind, (0, 0))
                kinds[example.kind] = (seen + 1, right + hit)
    finally:
        if handle is not None:
            handle.remove()
    row = {"method": method or "all tokens", "visual_tokens": tokens, "accuracy": 100 * sum(hits) / len(data),
           "questions": len(data), "prefill_s": sorted(prefills)[len(prefills) // 2], "total_s": total}
    row.update({f"accuracy_{kind}": 100 * right / seen for kind, (seen, right) in sorted(kinds.items())})
    return row, hits


def normalised(examples) -> torch.Tensor:
    """``[B, 1, S, S]``: the examples' images, normalised like Fashion-MNIST."""
    images = torch.stack([torch.from_numpy(e.image).float().div(255)[None] for e in examples])
    return (images - FASHION_MNIST_MEAN) / FASHION_MNIST_STD


def tune_on_training_questions(model, tokenizer, page: bool, target: float, batches: int, batch_size: int,
                               seed: int) -> object:
    """vistok.tune on ``batches`` batches of training-split questions (prompts, images): the pick at ``target``
    of the visual tokens, scored by next-token agreement with all tokens."""
    from vistok.models.reference_vlm import prompt_batch

    data = (SparsePageQA if page else FashionQA)("train", batches * batch_size, seed=seed)
    calibration = []
    for start in range(0, len(data), batch_size):
        examples = [data.example(i) for i in range(start, start + batch_size)]
        ids, mask, _ = prompt_batch(model, tokenizer, [e.question for e in examples])
        calibration.append({"input_ids": ids, "attention_mask": mask, "pixel_values": normalised(examples)})
    return vistok.tune(model, calibration, target=target, progress=True)


def keep_everything_overhead(model, tokenizer, data: FashionQA, methods: list[str], batch_size: int,
                             runs: int) -> list[dict]:
    """The prefill of the first batch unpatched and with each method keeping every token (``keep=1.0``, the same
    logits), interleaved, the median of ``runs``: what the patched path costs when it removes nothing."""
    examples = [data.example(i) for i in range(min(batch_size, len(data)))]
    images = normalised(examples)
    questions = [e.question for e in examples]
    times: dict[str, list[float]] = {"unpatched": [], **{m: [] for m in methods}}
    for _ in range(runs):
        for name in times:
            handle = patch(model, name, keep=1.0) if name != "unpatched" else None
            try:
                times[name].append(prefill_seconds(model, tokenizer, images, questions))
            finally:
                if handle is not None:
                    handle.remove()
    medians = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
    return [{"method": name, "prefill_s": value, "overhead": value / medians["unpatched"] - 1}
            for name, value in medians.items()]


def save_plot(path: Path, rows: list[dict], page: bool = False, fine: bool = False, checkpoint: str | None = None
              ) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    full = next(r for r in rows if r["method"] == "all tokens")
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "all tokens"):
        points = sorted((r["visual_tokens"], r["accuracy"]) for r in rows if r["method"] == method)
        axis.plot(*zip(*points, strict=True), marker="o", label=method)
    axis.axhline(full["accuracy"], color="k", linestyle="--", label=f"all {full['visual_tokens']} tokens")
    axis.set_xlabel(f"visual tokens per {'page' if page else 'image'}")
    axis.set_ylabel("exact-match accuracy (%)")
    model = "page VLM" if page else f"{'fine ' if fine else ''}reference VLM"
    if checkpoint is not None:  # not the default weights: say whose (a model shipped in models/ by its name)
        weights = Path(checkpoint).resolve()
        shipped = weights.parent.parent == SHIPPED and weights.name == "model.safetensors"
        model += f" ({weights.parent.name if shipped else f'{weights.parent.name}/{weights.name}'})"
    axis.set_title(f"{model},\nheld-out {'sparse pages' if page else 'Fashion-MNIST questions'}", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


@reports_errors
def main(argv: list[str] | None = None, language_model=None) -> int:
    """``language_model``: ``(causal LM, tokenizer)`` instead of SmolLM2 (tests)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="trained tensors (.safetensors); default: the shipped")
    parser.add_argument("--questions", type=count, default=500)
    parser.add_argument("--methods", nargs="*", default=None,
                        help=f"default {' '.join(METHODS)}; with --page {' '.join(PAGE_METHODS)}; with --fine "
                        "each with :positions=original (as it was trained)")
    parser.add_argument("--fractions", nargs="*", type=fraction, default=None,
                        help=f"default 0.5 0.25 0.1; with --page {' '.join(map(str, PAGE_FRACTIONS))}")
    parser.add_argument("--page", action="store_true", help="the page VLM on sparse pages")
    parser.add_argument("--fine", action="store_true", help="the fine VLM (196 visual tokens per image)")
    parser.add_argument("--baseline", default=None,
                        help="the method every other is compared with at equal tokens (vs_baseline, paired on the "
                        f"same questions); default {BASELINE}, with --page {PAGE_BASELINE}, with --fine "
                        f"{FINE_BASELINE}")
    parser.add_argument("--tune", type=float, default=None, metavar="SHARE",
                        help="also run vistok.tune at this share of the visual tokens on training questions and "
                        "evaluate its pick (a row 'tuned: <pick>'; the pick and its search in <out>_tune.json)")
    parser.add_argument("--tune-batches", type=count, default=4, help="calibration batches for --tune")
    parser.add_argument("--batch-size", type=count, default=50)
    parser.add_argument("--prefill-runs", type=count, default=3)
    parser.add_argument("--overhead", action="store_true",
                        help="also time each method keeping every token (its prefill overhead) -> <out>_overhead.csv")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--out", default="results/vlm_eval")
    args = parser.parse_args(argv)
    if args.page and args.fine:
        parser.error("--page and --fine are different variants; give at most one")
    if args.methods is None:
        args.methods = list(PAGE_METHODS if args.page else FINE_METHODS if args.fine else METHODS)
    if args.fractions is None:
        args.fractions = list(PAGE_FRACTIONS) if args.page else [0.5, 0.25, 0.1]
    baseline = args.baseline or (PAGE_BASELINE if args.page else FINE_BASELINE if args.fine else BASELINE)
    for method in args.methods:  # before the model loads and the all-token run
        check_method(method)
    if args.tune is not None and args.tune_batches < 4:
        parser.error(f"--tune-batches {args.tune_batches}: the tuner's three rungs of successive halving need 4 "
                     "batches or more")
    if baseline not in args.methods:
        if args.baseline is not None:
            parser.error(f"--baseline {baseline} is not among the methods evaluated ({' '.join(args.methods)})")
        print(f"eval_vlm.py: the default baseline {baseline} is not among the methods: vs_baseline stays empty "
              "(give --baseline)", file=sys.stderr)
    model, tokenizer = create_reference_vlm(pretrained=args.checkpoint is None, checkpoint=args.checkpoint,
                                            language_model=language_model, page=args.page,
                                            fine=args.fine)
    data = (SparsePageQA if args.page else FashionQA)("test", args.questions, seed=args.seed)
    grid = model.model.vision_tower.token_grid
    rows, hits = [], []
    for method, tokens in settings(args.methods, args.fractions, grid[0] * grid[1], grid, baseline):
        row, answered = evaluate(model, tokenizer, data, method, tokens, args.batch_size, args.prefill_runs)
        rows.append(row)
        hits.append(answered)
        print(json.dumps(row), flush=True)
    if args.tune is not None:
        tuned = tune_on_training_questions(model, tokenizer, args.page, args.tune, args.tune_batches,
                                           args.batch_size, args.seed)
        tuned.save(Path(args.out).with_name(Path(args.out).name + "_tune.json"))
        tokens = tuned.config.tokens
        row, answered = evaluate(model, tokenizer, data, f"tuned: {tuned.best['label']}", tokens,
                                 args.batch_size, args.prefill_runs, config=tuned.config)
        rows.append({**row, "tuner_seconds": tuned.seconds})
        hits.append(answered)
        print(json.dumps(rows[-1]), flush=True)
    if args.overhead:
        overhead = keep_everything_overhead(model, tokenizer, data, args.methods, args.batch_size, args.prefill_runs)
        with open(Path(args.out).with_name(Path(args.out).name + "_overhead.csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(overhead[0]))
            writer.writeheader()
            writer.writerows(overhead)
        print(json.dumps(overhead), flush=True)
    add_paired_differences(rows, hits, 0, key=lambda row: (row["method"], row["visual_tokens"]),
                           baseline=lambda row: (baseline, row["visual_tokens"]))
    full = rows[0]
    for row in rows:
        row["accuracy_kept"] = row["accuracy"] / full["accuracy"] if full["accuracy"] else float("nan")
        row["prefill_ratio"] = row["prefill_s"] / full["prefill_s"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(beside(out, ".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    save_plot(beside(out, ".png"), rows, args.page, args.fine, args.checkpoint)
    print(f"wrote {beside(out, '.csv')} and {beside(out, '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
