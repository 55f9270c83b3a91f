#!/usr/bin/env python
"""Train vistok's reference video-LLM (``vistok_video_vlm_fmnist``: the reference ViT per 28 x 28 frame, B-VLLM's
frame selector, a projector, SmolLM2-135M with LoRA) on Fashion-MNIST video questions
(:mod:`vistok.video.fmnist_qa`), end to end through the pipeline's own stages (:func:`vistok.video.qa.compress_video`):
the selector learns from the answer loss through its Gumbel-softmax, as in B-VLLM. The ViT and SmolLM2 stay frozen.

Each batch goes through one way of choosing frames, drawn from the step's seed: the learned selector (16 frames;
``--learned`` of the batches), uniform frames (as many as the budget holds), CLIP-scored frames (with
``--clip``), or every frame's every token; and one budget of ``--budgets``. So the language model learns to read
every way the evaluation compares. Stops after ``--steps`` steps or ``--minutes``; ``--resume`` continues from
``<out>/checkpoint.pt``. Writes ``<out>/model.safetensors`` (the trained tensors) and ``<out>/log.jsonl``.

    python tools/train_video_vlm.py --out runs/video_vlm2 --minutes 50 --threads 2 --clip --lr 1e-3 \
        --budgets 128 256 --learned 0.3 --every 0.15 --save-every 50 \
        --init models/vistok_vlm_fmnist/model.safetensors     # the shipped one (its card says which --init)
    python tools/train_video_vlm.py ... --resume
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vistok.cli import count, count_or_zero, positive, reports_errors, seed, share
from vistok.experiment import check_run_folder
from vistok.models.reference_vlm import (
    TrainingRun,
    answer_batch,
    answer_loss,
    create_video_vlm,
    encoded_features,
    train_trained_tensors,
    warm_start,
)
from vistok.video.fmnist_qa import FRAMES, FashionVideoQA
from vistok.video.frames import text_frame_scores
from vistok.video.qa import EncodedVideo, comparison_config, compress_video, frames_to_input, question_embeddings


def batch_plan(step: int, seed: int, learned: float, with_clip: bool, budgets: list[int], every: float
               ) -> tuple[str, int]:
    """``(selection, budget)`` of the batch of ``step``."""
    rng = torch.Generator().manual_seed(seed * 1_000_003 + step)
    draw = float(torch.rand((), generator=rng))
    budget = budgets[int(torch.randint(len(budgets), (), generator=rng))]
    if draw < learned:
        return "learned", budget
    if draw < learned + every:
        return "all", FRAMES * 9
    if with_clip and float(torch.rand((), generator=rng)) < 0.5:
        return "text", budget
    return "uniform", budget


@torch.no_grad()
def encode_videos(model, videos: list[torch.Tensor]) -> list[EncodedVideo]:
    """Every frame of every video through the tower, each distinct frame once (the videos repeat few images)."""
    flat = torch.cat(videos)  # [B * T, 28, 28] uint8
    distinct, where = torch.unique(flat.reshape(flat.shape[0], -1), dim=0, return_inverse=True)
    tower = model.model.vision_tower
    states = tower(frames_to_input(distinct.reshape(-1, 28, 28)), output_hidden_states=True).hidden_states
    states = states[model.config.vision_feature_layer][where]
    return [EncodedVideo(part[:, 1:], part[:, 0]) for part in states.split([v.shape[0] for v in videos])]


@reports_errors
def main(argv: list[str] | None = None, language_model=None) -> int:
    """``language_model``: ``(causal LM, tokenizer)`` instead of SmolLM2 (tests)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/video_vlm")
    parser.add_argument("--steps", type=count, default=100_000)
    parser.add_argument("--minutes", type=positive, default=60.0, help="training time budget (checkpoints excluded)")
    parser.add_argument("--batch-size", type=count, default=8)
    parser.add_argument("--lr", type=positive, default=1e-3)
    parser.add_argument("--warmup", type=count, default=30)
    parser.add_argument("--lora-rank", type=count, default=8)
    parser.add_argument("--learned", type=share, default=0.6, help="share of batches through the learned selector")
    parser.add_argument("--every", type=share, default=0.1, help="share of batches with every frame's every token")
    parser.add_argument("--budgets", nargs="+", type=count, default=[128, 256, 512])
    parser.add_argument("--clip", action="store_true", help="some batches choose frames by the reference CLIP")
    parser.add_argument("--merge-on", default="summary", choices=("selection", "summary"),
                        help="what the temporal merge after learned and text selection compares")
    parser.add_argument("--merge-threshold", type=float, default=0.98)
    parser.add_argument("--save-every", type=count, default=25)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--threads", type=count_or_zero, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--init", default=None, help="start from these trained tensors (.safetensors) where names "
                        "and shapes fit, e.g. the image VLM's models/vistok_vlm_fmnist/model.safetensors")
    args = parser.parse_args(argv)
    if args.learned + args.every > 1:
        parser.error(f"--learned {args.learned} and --every {args.every} are shares of the batches: at most 1 together")
    for selection in ("learned", "text", "uniform", "all"):  # a bad --merge-threshold is named before any work
        for budget in args.budgets:
            comparison_config(selection, budget, args.merge_on, args.merge_threshold)
    check_run_folder("--out", Path(args.out))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer = create_video_vlm(lora_rank=args.lora_rank, language_model=language_model)
    if args.init and not args.resume:
        print(f"started from {args.init}: {', '.join(warm_start(model, args.init))}")
    model.train()
    clip = None
    if args.clip:
        from vistok.models import create_clip

        clip = create_clip(pretrained=True)
    data = FashionVideoQA("train", 10_000_000, seed=args.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def step_loss(step: int) -> tuple[torch.Tensor, dict]:
        examples = [data[step * args.batch_size + i] for i in range(args.batch_size)]
        selection, budget = batch_plan(step, args.seed, args.learned, clip is not None, args.budgets, args.every)
        config = comparison_config(selection, budget, args.merge_on, args.merge_threshold)
        encoded = encode_videos(model, [frames for frames, _, _ in examples])
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        features = []
        for (frames, question, _), video in zip(examples, encoded, strict=True):
            asked = question_embeddings(model, tokenizer, [question]) if selection == "learned" else None
            scores = None
            if selection == "text":
                scores = text_frame_scores(clip[0], clip[1], frames_to_input(frames).expand(-1, 3, -1, -1), question)
            features.append(compress_video(video, config, model.frame_selector, asked, scores, generator).tokens)
        batch = answer_batch(tokenizer, [q for _, q, _ in examples], [a for _, _, a in examples],
                             [f.shape[0] for f in features], pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = answer_loss(model, {**batch, "mm_encoder_outputs": encoded_features(model, features)})
        return loss, {"selection": selection, "budget": budget,
                      "tokens": sum(f.shape[0] for f in features) / len(features)}

    run = TrainingRun.from_args(args)
    steps = train_trained_tensors(model, run, step_loss)
    print(f"{steps * args.batch_size} videos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
