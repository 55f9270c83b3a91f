#!/usr/bin/env python
"""Evaluate video question answering under visual token budgets (vistok.video.qa) on held-out Fashion-MNIST video
questions: exact-match accuracy (and per question kind), visual tokens, frames kept and seconds per stage
(decode, encode, select + compress, answer) for each frame selection at each budget, and every frame's every
token as the reference. Writes <out>.csv and <out>.png (accuracy vs budget per selection). Every row also says
how far it is from every frame's every token (``vs_all``) and from ``--baseline`` (uniform frames) at the same
budget (``vs_baseline``), in points on the same questions with paired standard errors (``*_se``).

The questions come from an MVBench-style manifest (``--manifest``: a JSON list of {"video", "question",
"answer"}, video paths relative to the manifest, decoded with vistok.video.read_video), or are made on the fly
(``vistok.video.fmnist_qa``, test split, ``--seed``; no decoding). ``--seed`` also seeds the random frame choice of
selection ``drop`` (question ``i`` draws from its own generator, so every budget and selection sees the same draw
for the same question).

    python tools/eval_video_qa.py --out results/video_qa --questions 300 --clip
    python tools/eval_video_qa.py --out results/video_qa_sample --manifest data/fmnist_video_qa_sample/test.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vistok.cli import beside, count, count_or_zero, reports_errors, seed
from vistok.errors import InvalidConfigError
from vistok.measure.accuracy import add_paired_differences
from vistok.models import create_video_vlm
from vistok.models.reference_vlm import answer_questions
from vistok.video.frames import text_frame_scores
from vistok.video.qa import (
    SELECTIONS,
    VideoQAConfig,
    comparison_config,
    compress_video,
    encode_frames,
    frames_to_input,
    question_embeddings,
)


def manifest_rows(manifest: Path) -> list[dict]:
    """The rows of a question manifest (a JSON list of ``{"video", "question", "answer"}``, each a non-empty string,
    and optionally ``"kind"``, a non-empty string too), checked before the model loads.

    Raises:
        InvalidConfigError: no such file, not JSON, not a non-empty list, or a row without those keys or with a
            value that is not a non-empty string (the row named).
    """
    if not manifest.is_file():
        raise InvalidConfigError(f"--manifest: {manifest} does not exist")
    try:
        rows = json.loads(manifest.read_text())
    except ValueError as error:
        raise InvalidConfigError(f"--manifest: {manifest} is not JSON ({error})") from None
    if not isinstance(rows, list) or not rows:
        raise InvalidConfigError(f"--manifest: {manifest} must hold a non-empty list of questions")
    for number, row in enumerate(rows):
        missing = [key for key in ("video", "question", "answer") if not isinstance(row, dict) or key not in row]
        if missing:
            raise InvalidConfigError(f"--manifest: {manifest} row {number} has no {', '.join(missing)} (a manifest "
                                     "row needs video, question and answer)")
        for key in ("video", "question", "answer", *(["kind"] if "kind" in row else [])):  # kind: optional
            if not isinstance(row[key], str) or not row[key].strip():
                raise InvalidConfigError(f"--manifest: {manifest} row {number}: {key} must be a non-empty string, got "
                                         f"{row[key]!r}")
    return rows


def load_questions(args: argparse.Namespace) -> list[dict]:
    """``{"frames", "question", "answer", "kind", "decode"}`` per question (``kind`` ``None`` where a manifest row
    gives none)."""
    if args.manifest:
        from vistok.video import read_video

        manifest = Path(args.manifest)
        rows = manifest_rows(manifest)[: args.questions]
        out = []
        for row in rows:
            started = time.perf_counter()
            frames = read_video(manifest.parent / row["video"], timeout=60.0)  # as VideoQA (vistok video-qa) allows
            out.append({"kind": None, **row, "frames": frames, "decode": time.perf_counter() - started})
        return out
    from vistok.video.fmnist_qa import FashionVideoQA

    data = FashionVideoQA("test", args.questions, seed=args.seed)
    out = []
    for index in range(args.questions):
        example = data.example(index)
        out.append({"frames": torch.from_numpy(example.frames(data.images)), "question": example.question,
                    "answer": example.answer, "kind": example.kind, "decode": 0.0})
    return out


def question_generator(seed: int, index: int) -> torch.Generator:
    """The generator of question ``index``'s random choices under ``seed``: ``manual_seed(index)`` for seed 0 (the
    published figures' draw), otherwise seeded from numpy's ``SeedSequence((seed, index))``, so that no two seeds
    share a question's stream (torch's CPU generator keeps only a seed's low 32 bits: packing seed and index into
    one int would repeat them)."""
    if seed == 0:
        return torch.Generator().manual_seed(index)
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))


def evaluate(model, tokenizer, questions: list[dict], config: VideoQAConfig, batch_size: int, seed: int = 0
             ) -> tuple[dict, list[bool]]:
    """Accuracy, tokens, frames and seconds per stage (means per question) of one selection at one budget; and
    which questions it answered right."""
    selector = getattr(model, "frame_selector", None)
    features, frames_kept, compress_seconds = [], [], 0.0
    for index, item in enumerate(questions):
        started = time.perf_counter()
        with torch.no_grad():
            asked = question_embeddings(model, tokenizer, [item["question"]]) if config.selection == "learned" \
                else None
            scores = None
            if config.selection == "text":
                scores = item["text_scores"]
                compress_seconds += item["text_scores_s"]
            compressed = compress_video(item["encoded"], config, selector, asked, scores,
                                        question_generator(seed, index))
        compress_seconds += time.perf_counter() - started
        features.append(compressed.tokens)
        frames_kept.append(len(compressed.frames))
    answers, answer_seconds = [], 0.0
    for start in range(0, len(questions), batch_size):
        chunk = questions[start: start + batch_size]
        result = answer_questions(model, tokenizer, None, [q["question"] for q in chunk],
                                  features=features[start: start + batch_size])
        answers.extend(result.answers)
        answer_seconds += result.total_seconds
    # case-insensitive: a manifest's answers may be capitalised ("Yes"); vistok's own questions' answers are lowercase
    correct = [a.strip().lower() == q["answer"].strip().lower() for a, q in zip(answers, questions, strict=True)]
    kinds = sorted({q["kind"] for q in questions if q["kind"] is not None})
    count = len(questions)
    row = {"selection": config.selection, "budget": config.budget, "accuracy": 100 * sum(correct) / count,
           "visual_tokens": sum(f.shape[0] for f in features) / count, "frames": sum(frames_kept) / count,
           "decode_s": sum(q["decode"] for q in questions) / count,
           "encode_s": sum(q["encode_s"] for q in questions) / count,
           "select_compress_s": compress_seconds / count, "answer_s": answer_seconds / count}
    row["total_s"] = row["decode_s"] + row["encode_s"] + row["select_compress_s"] + row["answer_s"]
    for kind in kinds:
        hits = [c for c, q in zip(correct, questions, strict=True) if q["kind"] == kind]
        row[f"accuracy_{kind}"] = 100 * sum(hits) / len(hits)
    return row, correct


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    every = max(r["visual_tokens"] for r in rows if r["selection"] == "all") if any(
        r["selection"] == "all" for r in rows) else None
    reference = [r for r in rows if r["selection"] == "all" and r["visual_tokens"] == every
                 and r["budget"] == every]
    for selection in dict.fromkeys(r["selection"] for r in rows):
        points = sorted((r["budget"], r["accuracy"]) for r in rows if r["selection"] == selection
                        and r not in reference)
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", label=selection)
    for r in reference:
        axis.axhline(r["accuracy"], color="black", linestyle="--", label=f"every token ({r['visual_tokens']:.0f})")
    axis.set_xlabel("visual token budget")
    axis.set_ylabel("exact-match accuracy (%)")
    axis.set_title("Fashion-MNIST video questions")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def row_config(selection: str, budget: int, args: argparse.Namespace) -> VideoQAConfig:
    """The config of one row: ``"all+merge"`` is every frame with the temporal merge on, the others as vistok's
    comparison runs them."""
    if selection == "all+merge":
        return VideoQAConfig(budget=budget, selection="all", frames=None, merge_threshold=args.merge_threshold,
                             merge_on=args.merge_on)
    return comparison_config(selection, budget, args.merge_on, args.merge_threshold)


@reports_errors
def main(argv: list[str] | None = None, model_and_tokenizer=None) -> int:
    """``model_and_tokenizer``: a video-LLM to evaluate instead of the shipped one (tests)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/video_qa")
    parser.add_argument("--questions", type=count, default=300)
    parser.add_argument("--manifest", default=None)
    parser.add_argument("--checkpoint", default=None, help="trained tensors instead of the shipped ones")
    parser.add_argument("--selections", nargs="+", default=["learned", "text", "uniform", "drop", "all"],
                        choices=SELECTIONS)
    parser.add_argument("--budgets", nargs="+", type=count, default=[128, 256, 512])
    parser.add_argument("--clip", action="store_true", help="load the reference CLIP for selection 'text'")
    parser.add_argument("--merge-on", default="summary", choices=("selection", "summary"),
                        help="what the temporal merge after learned and text selection compares")
    parser.add_argument("--merge-threshold", type=float, default=0.98)
    parser.add_argument("--merge-all", action="store_true", help="also every frame with the temporal merge on "
                        "(rows 'all+merge'): deduplication alone, without the question")
    parser.add_argument("--baseline", default=None, choices=SELECTIONS,
                        help="the selection every other is compared with at the same budget (vs_baseline, paired "
                        "on the same questions); default uniform, where evaluated")
    parser.add_argument("--batch-size", type=count, default=16)
    parser.add_argument("--threads", type=count_or_zero, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=seed, default=0,
                        help="the question set made on the fly and selection drop's frames (default 0)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    selections = [s for s in args.selections if s != "text" or args.clip]
    if len(selections) < len(args.selections):
        print("eval_video_qa.py: selection 'text' needs --clip (the reference CLIP scores the frames); skipped",
              file=sys.stderr)
    if not selections and not args.merge_all:
        parser.error("no selection is left to evaluate")
    if args.merge_all and args.merge_on == "selection":
        parser.error("--merge-all with --merge-on selection merges nothing: every frame's one-hot selection row "
                     "differs from the others (the rows would equal 'all'); use --merge-on summary")
    if args.baseline is not None and args.baseline not in selections:
        parser.error(f"--baseline {args.baseline} is not among the selections evaluated ({' '.join(selections)})")
    if args.manifest:
        manifest_rows(Path(args.manifest))  # a bad manifest is refused before the model loads
    for selection in selections + (["all+merge"] if args.merge_all else []):  # a bad --merge-threshold too
        row_config(selection, args.budgets[0], args)
    if model_and_tokenizer is None:
        model_and_tokenizer = create_video_vlm(pretrained=args.checkpoint is None, checkpoint=args.checkpoint)
    model, tokenizer = model_and_tokenizer
    clip = None
    if "text" in selections:
        from vistok.models import create_clip

        clip = create_clip(pretrained=True)
    questions = load_questions(args)
    for item in questions:
        started = time.perf_counter()
        item["pixels"] = frames_to_input(item["frames"])
        item["encoded"] = encode_frames(model, item["pixels"])
        item["encode_s"] = time.perf_counter() - started
        if clip is not None:  # the frames' CLIP scores, once for every budget (counted in each text row's selection)
            started = time.perf_counter()
            with torch.no_grad():
                item["text_scores"] = text_frame_scores(clip[0], clip[1], item["pixels"].expand(-1, 3, -1, -1),
                                                        item["question"])
            item["text_scores_s"] = time.perf_counter() - started
    every = max(q["encoded"].tokens.shape[0] * q["encoded"].tokens.shape[1] for q in questions)  # the longest's
    plans = [(s, b) for s in selections for b in args.budgets] + ([("all", every)] if "all" in selections else [])
    plans += [("all+merge", b) for b in args.budgets] if args.merge_all else []
    rows, hits = [], []
    for selection, budget in plans:
        config = row_config(selection, budget, args)
        row, answered = evaluate(model, tokenizer, questions, config, args.batch_size, args.seed)
        rows.append({**row, "selection": selection})
        hits.append(answered)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    baseline = args.baseline or "uniform"
    reference = next((index for index, (selection, budget) in enumerate(plans)
                      if (selection, budget) == ("all", every)), None)
    add_paired_differences(rows, hits, reference, key=lambda row: (row["selection"], row["budget"]),
                           baseline=lambda row: (baseline, row["budget"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(beside(out, ".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, beside(out, ".png"))
    print(f"wrote {beside(out, '.csv')} and {beside(out, '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
