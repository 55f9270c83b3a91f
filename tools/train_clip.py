#!/usr/bin/env python
"""Train vistok's reference CLIP (``vistok.models.clip``, an open_clip ``CLIP``) contrastively on Fashion-MNIST
training images with captions ("a photo of a bag", one of ``CAPTION_TEMPLATES`` per image), with open_clip's own
``ClipLoss``. Stops after ``--steps`` steps or ``--minutes`` of training, whichever comes first; ``--resume``
continues from ``<out>/checkpoint.pt``. Writes ``<out>/model.safetensors`` (float16), ``<out>/log.jsonl`` and
``<out>/metrics.json`` (zero-shot top-1 on the 10,000 test images, the class text embedding averaged over the
templates).

    python tools/train_clip.py --out runs/clip --steps 3000 --minutes 40 --threads 2      # the shipped one
    python tools/train_clip.py --out runs/clip --steps 3000 --minutes 40 --threads 2 --resume
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from vistok.cli import count, count_or_zero, positive, positive_or_zero, reports_errors, seed
from vistok.data import GreyBatchTransform, load_fashion_mnist
from vistok.experiment import check_resumed_settings, check_run_folder, resumed_log, save_whole
from vistok.fmnist_qa import ITEM_NAMES
from vistok.models.clip import CAPTION_TEMPLATES, captions_for, create_clip, zero_shot_classifier


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
                       ) -> float:
    """Top-1 of the nearest class text embedding (templates averaged) over ``uint8`` ``images`` ``[N, 28, 28]``."""
    classes = zero_shot_classifier(model, tokenizer, list(ITEM_NAMES))
    to_input = GreyBatchTransform()
    correct = 0
    for start in range(0, len(images), batch_size):
        x = to_input(images[start: start + batch_size]).expand(-1, 3, -1, -1)
        predicted = (model.encode_image(x, normalize=True) @ classes.T).argmax(dim=1)
        correct += int((predicted == labels[start: start + batch_size]).sum())
    return correct / len(images)


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/clip")
    parser.add_argument("--steps", type=count, default=1_000_000)
    parser.add_argument("--minutes", type=positive, default=25.0, help="training time budget (checkpoints excluded)")
    parser.add_argument("--batch-size", type=count, default=256)
    parser.add_argument("--lr", type=positive, default=1e-3)
    parser.add_argument("--weight-decay", type=positive_or_zero, default=0.1)
    parser.add_argument("--warmup", type=count, default=100)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--threads", type=count_or_zero, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--checkpoint-every", type=count, default=200)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    if args.batch_size < 2:
        parser.error(f"--batch-size must be at least 2, got {args.batch_size}: the contrastive loss over one pair is "
                     "0, and nothing would train")
    check_run_folder("--out", Path(args.out))
    if args.threads:
        torch.set_num_threads(args.threads)
    from open_clip.loss import ClipLoss

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model, tokenizer = create_clip()
    model.train()
    images, labels = load_fashion_mnist("train")
    # every (class, template) caption tokenized once
    captions = tokenizer([caption for name in ITEM_NAMES for caption in captions_for(name)])
    captions = captions.reshape(len(ITEM_NAMES), len(CAPTION_TEMPLATES), -1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loss_fn = ClipLoss()
    augment = GreyBatchTransform(augment=True)
    step, elapsed, losses = 0, 0.0, []
    logged: list[str] = []  # the run's log lines so far, kept in the checkpoint: a resume writes its log from them
    checkpoint = out / "checkpoint.pt"
    if args.resume and not checkpoint.is_file():
        print(f"train_clip.py: error: --resume: no checkpoint at {checkpoint}", file=sys.stderr)
        return 2
    settings = {name: value for name, value in vars(args).items()  # what a resume must share with its run
                if name not in ("out", "threads", "checkpoint_every", "resume")}
    if args.resume:
        state = torch.load(checkpoint, weights_only=False)
        check_resumed_settings(state.get("settings"), settings, (), checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed = state["step"], state["elapsed"]
        torch.set_rng_state(state["rng"])
        losses = state.get("losses", [])  # the steps since the last log line, which the next one averages
        logged = resumed_log(out / "log.jsonl", state, "step", step)
        print(f"resumed at step {step} ({elapsed / 60:.1f} min)", file=sys.stderr)
    budget = args.minutes * 60
    log = (out / "log.jsonl").open("a" if args.resume else "w")  # a fresh run starts its own log
    started = time.perf_counter() - elapsed
    while step < args.steps and elapsed < budget:
        step_seed = args.seed * 1_000_003 + step  # the step's draws (examples, captions, shifts): resumable
        generator = torch.Generator().manual_seed(step_seed)
        augment.generator.manual_seed(step_seed)
        index = torch.randint(len(images), (args.batch_size,), generator=generator)
        template = torch.randint(len(CAPTION_TEMPLATES), (args.batch_size,), generator=generator)
        x = augment(images[index]).expand(-1, 3, -1, -1)
        text = captions[labels[index], template]
        progress = min(max(step / args.steps, elapsed / budget), 1.0)  # the cosine runs to whichever ends first
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        image_features, text_features, logit_scale = model(x, text)
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        losses.append(loss.item())
        elapsed = time.perf_counter() - started
        if step % 50 == 0:
            record = {"step": step, "loss": sum(losses) / len(losses), "lr": lr, "minutes": elapsed / 60}
            logged.append(json.dumps(record))
            log.write(logged[-1] + "\n")
            log.flush()
            print(record, file=sys.stderr)
            losses = []
        if step % args.checkpoint_every == 0:
            paused = time.perf_counter()
            save_whole({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "elapsed": elapsed, "rng": torch.get_rng_state(), "settings": settings, "losses": losses,
                        "log": logged}, checkpoint)
            started += time.perf_counter() - paused  # checkpoints do not count against the budget
    model.eval()
    from safetensors.torch import save_file

    # shipped in float16 (half the size; open_clip loads it into its float32 model)
    save_whole({name: (tensor.half() if tensor.is_floating_point() else tensor).contiguous()
                for name, tensor in model.state_dict().items()}, out / "model.safetensors", save=save_file)
    test_images, test_labels = load_fashion_mnist("test")
    accuracy = zero_shot_accuracy(model, tokenizer, test_images, test_labels)
    metrics = {"steps": step, "minutes": elapsed / 60, "zero_shot_top1": accuracy, "batch_size": args.batch_size}
    save_whole(metrics, out / "metrics.json", save=lambda state, path: path.write_text(json.dumps(state, indent=1)))
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
