#!/usr/bin/env python
"""Train vistok's reference vision-LLM (vistok.models.reference_vlm) on Fashion-MNIST questions
(vistok.fmnist_qa): the projector and the LoRA adapters learn, the ViT and SmolLM2 stay frozen. Stops after
``--steps`` steps or ``--minutes`` of training, whichever comes first; ``--resume`` continues from
``<out>/checkpoint.pt``. Writes ``<out>/model.safetensors`` (the trained tensors only) and ``<out>/log.jsonl``.

With ``--compressed`` p, a share p of the batches is seen through a vistok boundary method (one of
``--compress-methods``, each ``method`` or ``method:key=value,...``, at one of ``--compress-tokens`` visual tokens
per image, drawn per batch from the step's seed), so the language model learns to read compressed visual tokens
as well as the full grid.

``--page`` trains the page variant (``vistok_page_vlm_fmnist``) on sparse pages
(vistok.document.fmnist_pages); ``--fine`` the fine variant (``vistok_vlm_fmnist_fine``, 196 visual tokens per
image) on the same questions as the default (without ``--compressed``: ``vistok_vlm_fmnist_fine_plain``, trained on
full grids only). ``--init`` starts from trained tensors where names and shapes fit
(the image VLM's projector and adapters; its grid positions resized to the fine variant's grid).

    python tools/train_vlm.py --out runs/vlm_rm --minutes 55 --lr 1e-3 --threads 2 --compressed 0.75   # the shipped one
    python tools/train_vlm.py --out runs/vlm_rm --minutes 55 --lr 1e-3 --threads 2 --compressed 0.75 --resume
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import vistok
from vistok.cli import count, count_or_zero, positive, reports_errors, seed
from vistok.config import parse_method_spec
from vistok.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from vistok.document.fmnist_pages import SparsePageQA
from vistok.experiment import check_run_folder
from vistok.fmnist_qa import FashionQA
from vistok.methods import create_config
from vistok.models.reference_vlm import (
    TrainingRun,
    answer_batch,
    answer_loss,
    create_reference_vlm,
    train_trained_tensors,
    warm_start,
)


def qa_batch(tokenizer, examples, image_tokens: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts + answers, the loss on the answer and its ``<|im_end|>`` only."""
    batch = answer_batch(tokenizer, [q for _, q, _ in examples], [a for _, _, a in examples],
                         [image_tokens] * len(examples), pad_id)
    pixels = torch.stack([image for image, _, _ in examples])
    return {**batch, "pixel_values": (pixels - FASHION_MNIST_MEAN) / FASHION_MNIST_STD}


def batch_method(step: int, seed: int, share: float, methods: list[str], tokens: list[int]) -> tuple | None:
    """``(method, options)`` the batch of ``step`` is seen through, or ``None`` (all visual tokens); ``methods``
    are ``method`` or ``method:key=value,...`` words."""
    step_seed = seed * 1_000_003 + step
    rng = torch.Generator().manual_seed(step_seed)
    if float(torch.rand((), generator=rng)) >= share:
        return None
    method, options = parse_method_spec(methods[int(torch.randint(len(methods), (), generator=rng))])
    options["tokens"] = tokens[int(torch.randint(len(tokens), (), generator=rng))]
    if method == "random_select":
        options["seed"] = step_seed
    return method, options


def check_budgets_fit(model, methods: list[str], tokens: list[int]) -> None:
    """Patch ``model`` with every method of ``methods`` at every budget of ``tokens`` and remove it again, so that a
    pair the model cannot take (``pool`` at 7 tokens of a 6 x 6 grid, 40 tokens of 36) is refused before the first
    step, not at the step that first draws it (patching changes neither the model nor the random state).

    Raises:
        InvalidConfigError: naming the method word and the budget.
    """
    for spec in methods:
        name, options = parse_method_spec(spec)
        for budget in tokens:
            try:
                vistok.patch(model, name, **options, tokens=budget).remove()
            except vistok.VistokError as error:
                raise vistok.InvalidConfigError(f"--compress-methods {spec} at --compress-tokens {budget}: "
                                                f"{error}") from None


@reports_errors
def main(argv: list[str] | None = None, language_model=None) -> int:
    """``language_model``: ``(causal LM, tokenizer)`` instead of SmolLM2 (tests)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/vlm")
    parser.add_argument("--steps", type=count, default=100_000)
    parser.add_argument("--minutes", type=positive, default=85.0, help="training time budget (checkpoints excluded)")
    parser.add_argument("--batch-size", type=count, default=16)
    parser.add_argument("--lr", type=positive, default=2e-3)
    parser.add_argument("--warmup", type=count, default=30)
    parser.add_argument("--lora-rank", type=count, default=8)
    parser.add_argument("--save-every", type=count, default=50)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--threads", type=count_or_zero, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--compressed", type=float, default=0.0, help="share of batches seen through a method")
    parser.add_argument("--compress-methods", nargs="+", default=["merge_to_budget", "region_merge", "dominant", "pool",
                                                                   "random_select"])
    parser.add_argument("--compress-tokens", nargs="+", type=count, default=None,
                        help="default 24 18 12 9 6 4 (of 36); with --page 72 48 36 24 16 (of 144); with --fine "
                        "98 64 49 32 20 12 (of 196)")
    parser.add_argument("--page", action="store_true", help="the page variant on sparse pages")
    parser.add_argument("--fine", action="store_true", help="the fine variant (196 visual tokens per image)")
    parser.add_argument("--init", default=None, help="start from these trained tensors (.safetensors) where names "
                        "and shapes fit (grid positions resized between the image and fine variants), e.g. the "
                        "image VLM's models/vistok_vlm_fmnist/model.safetensors")
    args = parser.parse_args(argv)
    if not 0.0 <= args.compressed <= 1.0:
        parser.error(f"--compressed must be a share in [0, 1], got {args.compressed}")
    if args.page and args.fine:
        parser.error("--page and --fine are different variants; give at most one")
    if args.compress_tokens is None:
        args.compress_tokens = ([72, 48, 36, 24, 16] if args.page else [98, 64, 49, 32, 20, 12] if args.fine
                                else [24, 18, 12, 9, 6, 4])
    try:  # every method word and budget checked now, not at the step that first draws it
        for spec in args.compress_methods:
            name, options = parse_method_spec(spec)
            if {"tokens", "keep"} & set(options):
                parser.error(f"--compress-methods {spec}: the budget comes from --compress-tokens, not from the "
                             "method's options")
            if name == "random_select" and "seed" in options:
                parser.error(f"--compress-methods {spec}: random_select's seed comes from --seed (one per step), "
                             "not from the method's options")
            for tokens in args.compress_tokens:
                create_config(name, **options, tokens=tokens)
    except vistok.VistokError as error:
        parser.error(f"--compress-methods / --compress-tokens: {error}")
    check_run_folder("--out", Path(args.out))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer = create_reference_vlm(lora_rank=args.lora_rank, language_model=language_model,
                                            page=args.page, fine=args.fine)
    if args.init and not args.resume:
        print(f"started from {args.init}: {', '.join(warm_start(model, args.init))}")
    model.train()
    check_budgets_fit(model, args.compress_methods, args.compress_tokens)
    data = (SparsePageQA if args.page else FashionQA)("train", 10_000_000, seed=args.seed)
    rows, cols = model.model.vision_tower.token_grid
    image_tokens = rows * cols
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def step_loss(step: int) -> tuple[torch.Tensor, dict]:
        examples = [data[step * args.batch_size + i] for i in range(args.batch_size)]
        batch = qa_batch(tokenizer, examples, image_tokens, pad_id)
        seen_through = batch_method(step, args.seed, args.compressed, args.compress_methods, args.compress_tokens)
        handle = vistok.patch(model, seen_through[0], **seen_through[1]) if seen_through else None
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = answer_loss(model, batch)
        finally:
            if handle is not None:
                handle.remove()
        return loss, {"method": seen_through}

    run = TrainingRun.from_args(args)
    steps = train_trained_tensors(model, run, step_loss)
    print(f"{steps * args.batch_size} examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
