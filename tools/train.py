#!/usr/bin/env python
"""Train a timm model, optionally with a vistok method on, with Hugging Face accelerate.

    python tools/train.py --config configs/fmnist_vit.yaml
    python tools/train.py --config configs/fmnist_vit.yaml train.epochs=1 output=runs/try
    python tools/train.py --config configs/fmnist_vit_ats_finetune.yaml          # fine-tune with ATS on
    accelerate launch --multi_gpu tools/train.py --config configs/imagenet_deit_s_ats.yaml data.root=/imagenet

Overrides are ``key.sub=value`` (YAML values). Each epoch writes ``<output>/metrics.jsonl``, the weights
``<output>/model.safetensors`` and a resumable ``<output>/checkpoint/`` (``--resume`` continues from it).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vistok
from vistok._checks import is_int, is_real
from vistok.config import ConfigError, load_config, parse_overrides
from vistok.experiment import (
    DATA_DEFAULTS,
    MODEL_DEFAULTS,
    UNSET_KINDS,
    LabelledBatches,
    build_data,
    build_model,
    check_model_classes,
    check_model_takes_images,
    check_resumed_settings,
    check_run_folder,
    fit_head_to_data,
    loader,
    save_whole,
    set_fused_attention,
    truncate_log,
    underlying,
    upgrade_saved_config,
    wrap_for_data,
)
from vistok.measure.accuracy import topk_correct
from vistok.video import VideoClassifier

MIXED_PRECISION = ("no", "fp16", "bf16", "fp8")  # accelerate's
# what a resume may change: where things are and how fast they run; the rest defines the run
RESUME_MAY_CHANGE = ("output", "train.threads", "train.eval_batch_size", "data.workers", "data.root", "data.download")

DEFAULTS = {
    **MODEL_DEFAULTS,
    "data": DATA_DEFAULTS,
    "train": {"epochs": 10, "batch_size": 128, "lr": 1.0e-3, "min_lr": 1.0e-5, "weight_decay": 0.05,
              "warmup_epochs": 1.0, "label_smoothing": 0.1, "grad_accum": 1, "clip_grad": 1.0,
              "mixed_precision": "no", "fused_attn": True, "seed": 0, "threads": 0, "eval_batch_size": 500},
    "output": "runs/train",
}


def cosine_with_warmup(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    """Learning rate at ``step``: linear warm-up to ``base``, then cosine down to ``floor``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def optimizer_steps_per_epoch(batches: int, grad_accum: int) -> int:
    """Optimizer steps in an epoch of ``batches``: one per ``grad_accum`` batches, and one more for a trailing
    partial accumulation, which accelerate steps at the end of the loader."""
    return -(-batches // grad_accum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (configs/*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from <output>/checkpoint")
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings over the config")
    args = parser.parse_intermixed_args(argv)
    try:
        config = load_config(DEFAULTS, args.config, parse_overrides(args.overrides), UNSET_KINDS)
        return train(config, args.resume)
    except vistok.VistokError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2


def train(config: dict, resume: bool = False) -> int:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    settings = config["train"]
    _check_settings(settings)
    check_run_folder("output", Path(config["output"]))  # a file there failed at mkdir, after the setup
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    if AcceleratorState._shared_state:  # an earlier run in this process (tests, a notebook) fixed its settings
        AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = Accelerator(mixed_precision=settings["mixed_precision"],
                                  gradient_accumulation_steps=settings["grad_accum"])
    except (ValueError, ImportError) as error:  # fp8 without transformer_engine or torchao, fp16 on a CPU, ...
        if settings["mixed_precision"] == "no":
            raise
        raise ConfigError(f"train.mixed_precision={settings['mixed_precision']}: accelerate cannot train with it "
                          f"here ({error})") from error
    set_seed(settings["seed"])
    output = Path(config["output"])
    train_set, val_set, train_transform, val_transform = build_data(config["data"], settings["seed"], model=config)
    config = fit_head_to_data(config, train_set, val_set)  # a class-folder dataset: a head of its class count
    model = build_model(config)
    check_model_classes(model, val_set, config, "train.py")
    if config["data"]["name"] != "video":
        check_model_takes_images(model, val_set, val_transform, "train.py")
    if not settings["fused_attn"] and not set_fused_attention(model, False):
        raise ConfigError(f"train.fused_attn=false: {config['model']} has no attention module with timm's "
                          "fused_attn switch")
    model = wrap_for_data(model, config["data"])

    workers = config["data"]["workers"]
    train_loader = loader(train_set, settings["batch_size"], shuffle=True, drop_last=True, num_workers=workers)
    val_loader = loader(val_set, settings["eval_batch_size"], num_workers=workers)
    from timm.optim import param_groups_weight_decay

    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, settings["weight_decay"]), lr=settings["lr"])
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    if len(train_loader) == 0:
        raise ConfigError(f"the training set ({len(train_set)} items) is smaller than one batch "
                          f"(train.batch_size={settings['batch_size']}): an epoch would train nothing")
    steps_per_epoch = optimizer_steps_per_epoch(len(train_loader), settings["grad_accum"])
    total_steps = steps_per_epoch * settings["epochs"]
    warmup_steps = int(settings["warmup_epochs"] * steps_per_epoch)

    generators = run_generators(train_transform, train_loader)
    start_epoch = 0
    checkpoint = output / "checkpoint"
    if resume:
        start_epoch = _resume(accelerator, checkpoint, generators, config, output) + 1
    output.mkdir(parents=True, exist_ok=True)
    if resume and start_epoch >= settings["epochs"] and accelerator.is_main_process:
        _save_weights(accelerator, model, output)  # the last epoch's weights, whole (a kill may have cut them off)

    for epoch in range(start_epoch, settings["epochs"]):
        model.train()
        started, loss_sum, seen = time.time(), 0.0, 0
        clips = underlying(train_set)
        if hasattr(clips, "set_epoch"):
            clips.set_epoch(epoch)  # video: fresh clips each epoch
        # accelerate's loader tells a dataset of its own its count of passes, which starts at 0 in a resumed
        # process (and would redraw epoch 0's clips) unless it is told the epoch
        train_loader.set_epoch(epoch)
        labelled = LabelledBatches(train_loader)
        bar = tqdm(labelled, desc=f"epoch {epoch + 1}/{settings['epochs']}",
                   disable=not accelerator.is_local_main_process)
        for batch_index, (images, labels) in enumerate(bar):
            step = epoch * steps_per_epoch + batch_index // settings["grad_accum"]
            for group in optimizer.param_groups:
                group["lr"] = cosine_with_warmup(step, total_steps, warmup_steps, settings["lr"], settings["min_lr"])
            with accelerator.accumulate(model):
                inputs = train_transform(images) if train_transform else images
                loss = F.cross_entropy(model(inputs), labels, label_smoothing=settings["label_smoothing"])
                accelerator.backward(loss)
                if accelerator.sync_gradients and settings["clip_grad"]:
                    accelerator.clip_grad_norm_(model.parameters(), settings["clip_grad"])
                optimizer.step()
                optimizer.zero_grad()
            loss_sum += float(loss.detach()) * labels.shape[0]
            seen += labels.shape[0]
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "seconds": time.time() - started,
                   **validate(model, val_loader, val_transform, accelerator)}
        if config["data"]["name"] == "video":  # unreadable clips are skipped, never silently
            metrics["train_skipped_clips"] = labelled.skipped
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # a fresh run's first epoch replaces an earlier run's config and log in the folder (not before: a run
            # that fails earlier leaves that run whole, its weights and checkpoint with their own config)
            first = not resume and epoch == start_epoch
            (output / "config.json").write_text(json.dumps(config, indent=2))
            with open(output / "metrics.jsonl", "w" if first else "a") as log:
                log.write(json.dumps(metrics) + "\n")
            accelerator.print(json.dumps(metrics))
        _save_checkpoint(accelerator, checkpoint, epoch, generators, config, output / "metrics.jsonl")
        if accelerator.is_main_process:
            _save_weights(accelerator, model, output)
    return 0


def _save_weights(accelerator, model, output: Path) -> None:
    """``<output>/model.safetensors``: the model's weights (not its video wrapper's), written beside it and moved
    over it, so a kill mid-write leaves the previous file whole."""
    from safetensors.torch import save_file

    trained = accelerator.unwrap_model(model)
    trained = trained.model if isinstance(trained, VideoClassifier) else trained
    weights = {k: v.contiguous() for k, v in trained.state_dict().items()}
    save_whole(weights, output / "model.safetensors", save=save_file)


def _check_settings(settings: dict) -> None:
    """Refuse training settings that would fail deep inside a library, train nothing or train the wrong way (a
    negative ``clip_grad`` reverses the gradient)."""
    for key in ("epochs", "batch_size", "eval_batch_size", "grad_accum"):
        if not is_int(settings[key], 1):
            raise ConfigError(f"train.{key} must be an int >= 1, got {settings[key]!r}")
    if not is_int(settings["threads"], 0):
        raise ConfigError(f"train.threads must be an int >= 0 (0: torch's default), got {settings['threads']!r}")
    if not is_int(settings["seed"], 0) or settings["seed"] >= 2**32:
        raise ConfigError(f"train.seed must be an int in [0, 2**32), got {settings['seed']!r}")
    for key, low, strict in (("lr", 0, True), ("min_lr", 0, False), ("weight_decay", 0, False),
                             ("warmup_epochs", 0, False), ("clip_grad", 0, False), ("label_smoothing", 0, False)):
        value = settings[key]
        if not is_real(value) or not math.isfinite(value) or value < low or (strict and value == low):
            raise ConfigError(f"train.{key} must be a finite number {'>' if strict else '>='} {low}"
                              f"{' (0: no clipping)' if key == 'clip_grad' else ''}, got {value!r}")
    if settings["label_smoothing"] >= 1:
        raise ConfigError(f"train.label_smoothing must be below 1, got {settings['label_smoothing']!r}")
    if settings["min_lr"] > settings["lr"]:
        raise ConfigError(f"train.min_lr ({settings['min_lr']!r}) must not exceed train.lr ({settings['lr']!r}): "
                          "the cosine decay would climb instead")
    if settings["warmup_epochs"] >= settings["epochs"]:
        raise ConfigError(f"train.warmup_epochs ({settings['warmup_epochs']!r}) must be below train.epochs "
                          f"({settings['epochs']!r}): the warm-up would take the whole run and the learning rate "
                          "would never decay")
    if settings["mixed_precision"] not in MIXED_PRECISION:
        raise ConfigError(f"train.mixed_precision must be one of {MIXED_PRECISION}, got "
                          f"{settings['mixed_precision']!r}")


def augmentation_rng(transform) -> torch.Generator | None:
    """The generator of a batch transform's augmentation (Fashion-MNIST's shifts and flips), which the checkpoint
    must carry: accelerate saves the global generators only. ``None`` where nothing augments."""
    return getattr(transform, "generator", None) if getattr(transform, "augment", False) else None


def run_generators(transform, train_loader) -> dict[str, torch.Generator]:
    """The generators the checkpoint must carry beside accelerate's global ones, by the file each is saved in: the
    augmentation's (:func:`augmentation_rng`), and the shuffling sampler's own generator that ``accelerator.prepare``
    gives the training loader when several processes share it (``synchronized_generator``; a single process
    shuffles from the global generator, which accelerate saves)."""
    found = {"augmentation_rng.pt": augmentation_rng(transform),
             "sampler_rng.pt": getattr(train_loader, "synchronized_generator", None)}
    return {name: generator for name, generator in found.items() if generator is not None}


def _save_checkpoint(accelerator, checkpoint: Path, epoch: int, generators: dict[str, torch.Generator],
                     config: dict, log: Path | None = None) -> None:
    """Everything a resume needs, the run's settings, the states of ``generators`` (:func:`run_generators`) and a
    copy of the metrics ``log`` too, written beside ``checkpoint`` and swapped in whole: an interrupted save leaves
    the previous epoch's checkpoint as it was, never a mix of two epochs."""
    partial = checkpoint.with_name(checkpoint.name + ".partial")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    torch.save(torch.get_rng_state(), partial / _torch_rng_file(accelerator))  # to check that a resume restored it
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, generator in generators.items():
            torch.save(generator.get_state(), partial / name)
        if log is not None and log.is_file():
            shutil.copyfile(log, partial / log.name)
        (partial / "vistok_state.json").write_text(json.dumps({"epoch": epoch, "config": config}))
        previous = checkpoint.with_name(checkpoint.name + ".previous")
        if previous.exists():  # left by a save cut off after its swap: the checkpoint is newer
            shutil.rmtree(previous)
        if checkpoint.exists():
            checkpoint.rename(previous)
        partial.rename(checkpoint)
        if previous.exists():
            shutil.rmtree(previous)
    accelerator.wait_for_everyone()


def _torch_rng_file(accelerator) -> str:
    return f"torch_rng_{accelerator.process_index}.pt"


def _resume(accelerator, checkpoint: Path, generators: dict[str, torch.Generator], config: dict,
            output: Path) -> int:
    """Load the newest complete checkpoint (``vistok_state.json`` is written last): the checkpoint, else, where a
    save was cut off during its swap, the new one beside it or the previous one; returns the epoch it ended. A
    checkpoint of other settings than ``config`` is refused (:data:`RESUME_MAY_CHANGE` aside). The main process
    puts back ``output``'s log as the checkpoint saved it and the run's ``config.json``: a run started in the folder
    since may have replaced both before it was cut off."""
    candidates = [checkpoint.with_name(checkpoint.name + suffix) for suffix in ("", ".partial", ".previous")]
    found = next((folder for folder in candidates if (folder / "vistok_state.json").is_file()), None)
    if found is None:
        raise ConfigError(f"--resume: no checkpoint at {checkpoint}")
    state = json.loads((found / "vistok_state.json").read_text())
    saved = state.get("config")
    saved = saved if saved is None else upgrade_saved_config(saved)  # a run from before data.crop_pct, in its terms
    # folder data's augmentation draws from the main process's generator or from each worker's
    may_change = tuple(key for key in RESUME_MAY_CHANGE
                       if key != "data.workers" or config["data"]["name"] != "folder")
    check_resumed_settings(saved, json.loads(json.dumps(config)), may_change, found)
    accelerator.load_state(str(found))
    # accelerate logs a random state it cannot load (numpy < 1.25 under torch.load's weights_only) at INFO level and
    # goes on: the data order and dropout would restart from the run's seed, a silent second run
    expected_rng = found / _torch_rng_file(accelerator)
    if expected_rng.is_file() and not torch.equal(torch.get_rng_state(), torch.load(expected_rng)):
        raise ConfigError(f"--resume: accelerate did not restore the random state saved in {found} (numpy >= 1.25 "
                          "and accelerate >= 1.1 can); resumed, the run would not continue as one")
    for name, generator in generators.items():
        saved = found / name
        if not saved.is_file():
            why, restarts = (("an older vistok", "augmentation") if name == "augmentation_rng.pt" else
                             ("an older vistok or a single process", "data order of several processes"))
            raise ConfigError(f"--resume: {found} has no {name} (written by {why}): the {restarts} would restart "
                              "from its seed; train again without --resume")
        generator.set_state(torch.load(saved))
    if accelerator.is_main_process:
        log = output / "metrics.jsonl"
        if (found / log.name).is_file():
            shutil.copyfile(found / log.name, log)
        else:  # a checkpoint from before the log was saved in it
            truncate_log(log, "epoch", state["epoch"] + 1)
        (output / "config.json").write_text(json.dumps(config, indent=2))
    return state["epoch"]


def validate(model, loader, transform, accelerator) -> dict[str, float]:
    model.eval()
    correct, total = torch.zeros(2, dtype=torch.long), 0
    labelled = LabelledBatches(loader)
    with torch.inference_mode():
        for images, labels in labelled:
            logits = model(transform(images) if transform else images)
            logits, labels = accelerator.gather_for_metrics((logits, labels))
            hits = topk_correct(logits, labels)
            correct += torch.tensor([hits[1], hits[5]])
            total += labels.shape[0]
    result = {"val_top1": 100.0 * int(correct[0]) / total, "val_top5": 100.0 * int(correct[1]) / total}
    if labelled.skipped:
        result["val_skipped_clips"] = labelled.skipped
    return result


if __name__ == "__main__":
    sys.exit(main())
