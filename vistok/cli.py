"""The ``vistok`` command.

``vistok bench --model vit_small_patch16_224 --method ats --batch-size 32 -o k=108`` compares the
unpatched model with the patched one (random init, CPU, fp32): tokens per block, GFLOPs per image,
images per second, and their ratios.

``vistok ask --image shirt.png --question "Is there a bag?" --method dominant --tokens 12`` answers a question
about an image with the reference vision-LLM under a visual token budget: the answer, the visual tokens used and
the prefill time.

``vistok video-qa --video clip.mp4 --question "Is there a bag?" --budget 256`` answers a question about a video
with the reference video-LLM (:mod:`vistok.video.qa`): decode, choose frames, encode, compress to the budget,
answer; it prints the answer, the frames kept, the visual tokens and the seconds of each stage.

``vistok tune --model vistok_vit_fmnist --pretrained --target 0.5 --out results/tune`` searches vistok's methods
for the one that agrees best with the unpatched model within half its GFLOPs (``--cost tokens`` or ``latency``:
its tokens per block or its latency measured here) (:func:`vistok.tune`), on
Fashion-MNIST training images (with ``--labels``, scored by accuracy: test images, which the reference models were
not trained on) or a ``--folder`` of images: it prints the pick and writes ``<out>.json`` (the pick first:
``vistok.config_from_saved("<out>.json")`` gives the config for ``vistok.patch``) and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidConfigError, VistokError
from .ops.attention import ATTENTION_PATHS

__all__ = ["main", "reports_errors"]


def _parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` for argparse (:func:`vistok.config.parse_option`)."""
    from .config import ConfigError, parse_option

    try:
        return parse_option(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def count(text: str, least: int = 1) -> int:
    """An int >= 1 (or ``least``) for argparse (images, runs, batch sizes, threads, budgets); the tools use it
    too."""
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
    return value


def count_or_zero(text: str) -> int:
    """An int >= 0 for argparse (warm-up runs)."""
    return count(text, least=0)


def seed(text: str) -> int:
    """A seed for argparse: an int in ``[0, 2**32)`` (what the question sets take)."""
    value = count(text, least=0)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"expected a seed below 2**32, got {text!r}")
    return value


def _number(text: str) -> float:
    """``text`` as a float; NaN (which every range check refuses) where it is not a number."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def _positive(text: str, zero_allowed: bool) -> float:
    value = _number(text)
    if not (math.isfinite(value) and (value >= 0 if zero_allowed else value > 0)):
        raise argparse.ArgumentTypeError(f"expected a finite number {'>=' if zero_allowed else '>'} 0, got {text!r}")
    return value


def positive(text: str) -> float:
    """A finite number > 0 for argparse (learning rates, minutes)."""
    return _positive(text, zero_allowed=False)


def positive_or_zero(text: str) -> float:
    """A finite number >= 0 for argparse (weight decay)."""
    return _positive(text, zero_allowed=True)


def _unit_interval(text: str, zero_allowed: bool) -> float:
    value = _number(text)
    if not ((0.0 <= value) if zero_allowed else (0.0 < value)) or not value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in {'[' if zero_allowed else '('}0, 1], got {text!r}")
    return value


def share(text: str) -> float:
    """A number in [0, 1] for argparse (a share of batches)."""
    return _unit_interval(text, zero_allowed=True)


def fraction(text: str) -> float:
    """A number in (0, 1] for argparse (a fraction of the visual tokens)."""
    return _unit_interval(text, zero_allowed=False)


def beside(prefix: str | Path, suffix: str) -> Path:
    """``<prefix><suffix>`` for a tool's ``--out`` prefix: ``results/ats_k0.5`` -> ``results/ats_k0.5.csv``
    (``Path.with_suffix`` would cut the prefix at its last dot, and write ``results/ats_k0.csv``)."""
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + suffix)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vistok", description="Spend fewer visual tokens.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="unpatched vs patched: tokens, GFLOPs, images/s")
    bench.add_argument("--model", required=True, help="timm model name (random init)")
    bench.add_argument("--method", default=None, help="vistok method (see `vistok methods`)")
    bench.add_argument("-o", "--option", action="append", type=_parse_option, default=[],
                       metavar="KEY=VALUE", help="method option, repeatable (e.g. -o k=108)")
    bench.add_argument("--batch-size", type=count, default=32)
    bench.add_argument("--runs", type=count, default=10, help="timed runs (median reported)")
    bench.add_argument("--warmup", type=count_or_zero, default=3)
    bench.add_argument("--seed", type=seed, default=0)
    bench.add_argument("--threads", type=count, default=None, help="torch intra-op threads")
    bench.add_argument("--flops-images", type=count, default=None,
                       help="count FLOPs on this many images (default: the whole batch)")
    bench.add_argument("--device", default="cpu", help="where to time the models: cpu or cuda (cuda:1, ...); "
                       "FLOPs are counted on the CPU")
    bench.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    bench.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                       help="time every model compiled whole (torch.compile, fullgraph; backend: inductor)")
    bench.add_argument("--attention", default="auto", choices=ATTENTION_PATHS,
                       help="the patched model's attention path")
    bench.add_argument("--json", default=None, help="also write the report to this JSON file")
    bench.add_argument("--no-progress", action="store_true")
    commands.add_parser("methods", help="list the registered methods")
    ask = commands.add_parser("ask", help="answer a question about an image with the reference vision-LLM")
    ask.add_argument("--image", required=True, help="an image file (made grey and 56 x 56: four Fashion-MNIST cells)")
    ask.add_argument("--question", required=True)
    ask.add_argument("--method", default=None, help="a boundary method (merge_to_budget, region_merge, "
                     "dominant, pool, random_select, correlation_guided), options after a colon "
                     "(merge_to_budget:positions=original); default: all visual tokens")
    ask.add_argument("--tokens", type=count, default=None, help="visual tokens per image for --method")
    ask.add_argument("--temperature", type=float, default=0.0, help="0: greedy (vistok.samplers)")
    ask.add_argument("--top-p", type=float, default=1.0)
    ask.add_argument("--seed", type=seed, default=0)
    ask.add_argument("--checkpoint", default=None, help="trained tensors (.safetensors); default: the shipped")
    ask.add_argument("--fine", action="store_true", help="the fine reference VLM (vistok_vlm_fmnist_fine: 196 "
                     "visual tokens per image instead of 36; with --checkpoint "
                     "models/vistok_vlm_fmnist_fine_plain/model.safetensors, the one trained on full grids only)")
    video = commands.add_parser("video-qa", help="answer a question about a video under a visual token budget")
    video.add_argument("--video", required=True, help="a video file (frames made grey and 28 x 28)")
    video.add_argument("--question", required=True)
    video.add_argument("--budget", type=count, default=256, help="visual tokens at most")
    video.add_argument("--selection", default="learned", help="learned, text, uniform, drop or all")
    video.add_argument("--frames", type=count, default=None, help="frames text and uniform selection keep (default "
                       "16; learned: the selector's 16 queries; drop and all take none)")
    video.add_argument("--merge-threshold", type=float, default=None, help="temporal merge threshold (default: "
                       "B-VLLM's 0.75 on selection rows, 0.98 on frame summaries)")
    video.add_argument("--merge-on", default="selection", choices=("selection", "summary"),
                       help="what the temporal merge compares: selection rows (B-VLLM) or frame summaries "
                            "(near-duplicate content; use --merge-threshold 0.98)")
    video.add_argument("--no-temporal-merge", action="store_true")
    video.add_argument("--temperature", type=float, default=0.0, help="0: greedy (vistok.samplers)")
    video.add_argument("--top-p", type=float, default=1.0)
    video.add_argument("--seed", type=seed, default=0)
    video.add_argument("--checkpoint", default=None, help="trained tensors (.safetensors); default: the shipped")
    tuner = commands.add_parser("tune", help="pick the method and setting for a model within a cost target")
    tuner.add_argument("--model", required=True, help="timm model name (vistok's reference models included)")
    tuner.add_argument("--pretrained", action="store_true", help="load its pretrained weights")
    tuner.add_argument("--checkpoint", default=None, help="weights (.safetensors) to load")
    tuner.add_argument("--target", type=fraction, default=0.5, help="cost ratio in (0, 1] to stay within (of "
                       "--cost)")
    tuner.add_argument("--cost", default="gflops", choices=("gflops", "tokens", "latency"),
                       help="what the target bounds: GFLOPs, tokens per block, or latency measured on this machine")
    tuner.add_argument("--images", type=partial(count, least=4), default=512, help="calibration images (4 or more)")
    tuner.add_argument("--folder", default=None, help="calibration images from this folder (timm's eval "
                       "transforms); default: the first Fashion-MNIST images for 28 x 28 grey models (training "
                       "images; with --labels, test images)")
    tuner.add_argument("--labels", action="store_true", help="score by accuracy on the labels, not agreement (with "
                       "--folder: the sub-folders' sorted order, as ImageFolder numbers them, must be the model's "
                       "class order; without --folder: Fashion-MNIST's test split, as the reference models were "
                       "trained on its training split)")
    tuner.add_argument("--flops-images", type=count, default=8, help="images each candidate's GFLOPs are counted on")
    tuner.add_argument("--out", default="tune", help="a path prefix (not a folder): writes <out>.json and "
                       "<out>.png, making missing folders")
    tuner.add_argument("--threads", type=count, default=None)
    return parser


def reports_errors(main: Callable[..., int]) -> Callable[..., int]:
    """A script's ``main`` that prints a :class:`~vistok.VistokError` as ``<script>: error: <message>`` and
    returns 2, as the ``vistok`` command does, instead of a traceback."""
    import functools
    import inspect
    from pathlib import Path

    script = Path(inspect.getfile(main)).name

    @functools.wraps(main)
    def reporting(*args: Any, **kwargs: Any) -> int:
        try:
            return main(*args, **kwargs)
        except VistokError as error:
            print(f"{script}: error: {error}", file=sys.stderr)
            return 2

    return reporting


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "methods":
            from . import list_methods

            print("\n".join(list_methods()))
            return 0
        if args.command == "ask":
            return _ask(args)
        if args.command == "video-qa":
            return _video_qa(args)
        if args.command == "tune":
            return _tune(args)
        return _bench(args)
    except VistokError as error:
        print(f"vistok: error: {error}", file=sys.stderr)
        return 2


def _bench(args: argparse.Namespace) -> int:
    from .measure.bench import Variant, run_benchmark
    from .methods import create_config

    if args.threads:
        torch.set_num_threads(args.threads)
    check_device(args.device)
    if args.json and not Path(args.json).parent.is_dir():  # found out now, not after the benchmark
        raise InvalidConfigError(f"vistok bench: --json {args.json}: no folder {Path(args.json).parent}")
    if args.json:
        check_writable("vistok bench: --json", Path(args.json))
    if args.compile is not None and args.compile not in torch._dynamo.list_backends(exclude_tags=()):
        raise InvalidConfigError(f"vistok bench: unknown torch.compile backend {args.compile!r}")
    if args.attention == "flex" and args.compile is None:
        raise InvalidConfigError("vistok bench: --attention flex is fused only compiled; add --compile (eager flex is "
                         "PyTorch's slow reference implementation)")
    if args.attention == "flex" and args.compile == "inductor" and torch.device(args.device).type == "cpu":
        raise InvalidConfigError("vistok bench: torch's CPU inductor cannot compile FlexAttention with the bias vistok "
                         "computes; on the CPU use --attention auto (SDPA)")
    variants = []
    if args.method is not None:
        options = dict(args.option)
        if len(options) < len(args.option):
            twice = sorted({key for key, _ in args.option if [k for k, _ in args.option].count(key) > 1})
            raise InvalidConfigError(f"vistok bench: -o {', '.join(twice)} given more than once")
        create_config(args.method, **options)  # fail fast on a bad name or option
        variants.append(Variant(args.method, args.method, options))
    elif args.option:
        raise InvalidConfigError("vistok bench: -o/--option needs --method")
    report = run_benchmark(args.model, variants, batch_size=args.batch_size, runs=args.runs,
                           warmup=args.warmup, seed=args.seed, flops_images=args.flops_images,
                           progress=not args.no_progress, device=args.device, dtype=getattr(torch, args.dtype),
                           compile=args.compile, attention=args.attention)
    print(report.format_table())
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report.to_dict(), handle, indent=2, default=str)
    return 0


def check_device(name: str, caller: str = "vistok bench") -> None:
    """Refuse, before any work, a ``--device`` that is not a torch device, not CPU or CUDA (timing synchronises
    CUDA only: ``vistok.measure.throughput``), or CUDA on a machine without it."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise InvalidConfigError(f"{caller}: --device {name!r} is not a torch device ({error})") from None
    if device.type not in ("cpu", "cuda"):
        raise InvalidConfigError(f"{caller}: --device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidConfigError(f"{caller}: --device {name}: this machine has no CUDA device")


def check_writable(option: str, path: Path) -> None:
    """Refuse, before any work, an output file ``path`` that cannot be written: it is a folder, or a path above it
    is a file (missing folders are fine: they are made)."""
    if path.is_dir():
        raise InvalidConfigError(f"{option} {path}: a folder, not a file")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InvalidConfigError(f"{option} {path}: {parent} is a file, not a folder")
            return


def _ask(args: argparse.Namespace) -> int:
    from .data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
    from .models.reference_vlm import answer_questions, create_reference_vlm, prefill_seconds
    from .samplers import SamplingConfig

    if (args.method is None) != (args.tokens is None):
        raise InvalidConfigError("vistok ask: give --method and --tokens together (or neither, for all tokens)")
    if not args.question.strip():
        raise InvalidConfigError("vistok ask: --question is blank")
    from PIL import Image

    from .data import read_image

    grey = read_image(args.image, "L").resize((56, 56), Image.BILINEAR)
    image = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).reshape(1, 1, 56, 56).float() / 255
    image = (image - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    model, tokenizer = create_reference_vlm(pretrained=args.checkpoint is None, checkpoint=args.checkpoint,
                                            fine=args.fine)
    handle = None
    if args.method is not None:
        from .config import parse_method_spec
        from .patching import patch

        name, options = parse_method_spec(args.method)
        if {"tokens", "keep"} & set(options):
            raise InvalidConfigError(f"vistok ask: give the budget with --tokens, not in --method {args.method}")
        handle = patch(model, name, **options, tokens=args.tokens)
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p)
    result = answer_questions(model, tokenizer, image, [args.question], sampling=sampling, seeds=args.seed)
    prefill = min(prefill_seconds(model, tokenizer, image, [args.question]) for _ in range(3))
    if handle is not None:
        handle.remove()
    print(f"answer: {result.answers[0]}")
    print(f"visual tokens: {result.visual_tokens}" + (f" ({args.method})" if args.method else " (all)"))
    print(f"prefill: {1000 * prefill:.1f} ms (best of 3); generation: {1000 * result.total_seconds:.1f} ms")
    return 0


def _video_qa(args: argparse.Namespace) -> int:
    from .models import create_clip, create_video_vlm
    from .samplers import SamplingConfig
    from .video.qa import VideoQA, VideoQAConfig

    threshold = args.merge_threshold
    if args.no_temporal_merge and threshold is not None:
        raise InvalidConfigError("vistok video-qa: --merge-threshold sets the temporal merge that "
                                 "--no-temporal-merge turns off; give one of them")
    if threshold is None:
        threshold = 0.98 if args.merge_on == "summary" else 0.75
    if args.frames is not None and args.selection in ("drop", "all"):
        raise InvalidConfigError(f"vistok video-qa: --frames is not read by --selection {args.selection} (drop keeps "
                                 "as many frames as the budget holds whole, all keeps every frame)")
    frames = {} if args.frames is None else {"frames": args.frames}
    config = VideoQAConfig(budget=args.budget, selection=args.selection, **frames,
                           merge_threshold=None if args.no_temporal_merge else threshold, merge_on=args.merge_on)
    model, tokenizer = create_video_vlm(pretrained=args.checkpoint is None, checkpoint=args.checkpoint)
    clip = create_clip(pretrained=True) if config.selection == "text" else None
    qa = VideoQA(model, tokenizer, config, clip=clip, sampling=SamplingConfig(temperature=args.temperature,
                                                                             top_p=args.top_p), progress=True)
    result = qa(args.video, args.question, seed=args.seed)
    print(f"answer: {result.answer}")
    print(f"frames kept: {len(result.frames)} {result.frames} ({len(set(result.frames))} distinct)")
    print(f"visual tokens: {result.visual_tokens} (budget {args.budget}, {args.selection})")
    print("seconds: " + ", ".join(f"{stage} {seconds:.3f}" for stage, seconds in result.seconds.items()))
    return 0


def _tune(args: argparse.Namespace) -> int:
    from ._timm import create_timm_model
    from .tuner import COSTS, tune

    if args.out.endswith(("/", "\\")) or Path(args.out).is_dir():
        raise InvalidConfigError(f"vistok tune: --out {args.out} is a folder; give a path prefix such as "
                                 f"{Path(args.out) / 'tune'} (writes <out>.json and <out>.png)")
    for suffix in (".json", ".png"):
        check_writable("vistok tune: --out", Path(f"{args.out}{suffix}"))
    if args.threads:
        torch.set_num_threads(args.threads)
    model = create_timm_model(args.model, "vistok tune", pretrained=args.pretrained).eval()
    if args.checkpoint:
        from .models.reference import load_checkpoint

        load_checkpoint(model, args.checkpoint)
    _check_image_model(model, args.model)
    images, labels = _calibration_images(model, args.folder, args.images, "test" if args.labels else "train",
                                         args.labels)
    result = tune(model, images, args.target, labels if args.labels else None, flops_images=args.flops_images,
                  progress=True, cost=args.cost)
    best = result.best
    result.save(f"{args.out}.json")
    result.plot(f"{args.out}.png")
    print(f"pick: {best['label']} -> {result.config!r}")
    measured = ", ".join(f"{label} ratio {best[f'{name}_ratio']:.3f}" for name, label in COSTS.items()
                         if f"{name}_ratio" in best)
    print(f"{measured} (target {args.target:g} of {args.cost}); {result.metric} {best['score']:.2f} % on "
          f"{best['images']} images")
    print(f"search: {len(result.rows)} candidates, {result.images_scored} images through patched models "
          f"({result.images_scored / result.images:.1f} passes over the {result.images}), {result.seconds:.1f} s")
    print(f"wrote {args.out}.json and {args.out}.png")
    return 0


def _calibration_images(model: Any, folder: str | None, count: int, split: str = "train",
                        labels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` calibration images as the model takes them, and their labels: from ``folder``, a seeded random
    draw (an image folder is ordered class by class, and the tuner's first rung scores the first quarter); else
    the first of Fashion-MNIST's ``split``. With ``labels``, a folder must hold one class folder per model class
    (numbered names in numeric order): a missing class shifts every id after it."""
    if folder is not None:
        from timm.data import create_transform, resolve_data_config

        from .data import image_folder, image_loader

        settings = resolve_data_config({}, model=model)
        try:  # read with the model's channel count (grey for a 1-channel model: RGB images crashed it)
            dataset = image_folder(folder, create_transform(**settings), image_loader(settings["input_size"][0]))
        except FileNotFoundError as error:  # no such folder, or no class folders with images in it
            raise InvalidConfigError(f"vistok tune --folder {folder}: {error}") from None
        if labels:
            _check_label_folders(dataset.classes, getattr(model, "num_classes", None), folder)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:count]
        picked = [dataset[int(i)] for i in order]
        return torch.stack([p[0] for p in picked]), torch.tensor([p[1] for p in picked])
    from .data import GreyBatchTransform, load_fashion_mnist

    embed = getattr(model, "patch_embed", None)
    conv = next((m for m in embed.modules() if isinstance(m, torch.nn.Conv2d)), None) if embed is not None else None
    if conv is None or tuple(embed.img_size) != (28, 28) or conv.in_channels != 1:
        raise InvalidConfigError(f"vistok tune: {type(model).__name__} does not take 28 x 28 grey images; give "
                                 "--folder with calibration images (class sub-folders, as ImageFolder reads)")
    images, labels = load_fashion_mnist(split)
    return GreyBatchTransform()(images[:count]), labels[:count]


def _check_image_model(model: Any, name: str) -> None:
    """Refuse, before any images are read, a model vistok cannot patch or one that takes clips: the command reads
    calibration images (its advice to give --folder would not help either)."""
    from .backbones import resolve_backbone

    grid = resolve_backbone(model).info.grid_size  # UnsupportedModelError names what vistok patches
    if grid is not None and len(grid) == 3:
        raise InvalidConfigError(f"vistok tune: {name} takes video clips and the command reads images; tune it "
                                 "from Python: vistok.tune(model, clips, target) with clips [B, C, T, H, W]")


def _check_label_folders(classes: list[str], num_classes: int | None, folder: str) -> None:
    """Refuse class folders that cannot be the model's class ids in sorted order: another count, or numbered
    names that sort out of numeric order (``10`` before ``2``)."""
    if num_classes and len(classes) != num_classes:  # 0: a model of embeddings, which the tuner refuses itself
        raise InvalidConfigError(
            f"vistok tune --folder {folder} --labels: {len(classes)} class folders for a model of {num_classes} "
            "classes; the sorted folders are the class ids, so every class needs its folder (a missing one shifts "
            "the ids after it)")
    numbered = all(name.isascii() and name.isdigit() for name in classes)
    if numbered and [int(name) for name in classes] != sorted(map(int, classes)):
        raise InvalidConfigError(
            f"vistok tune --folder {folder} --labels: numbered class folders sort as {classes[:4]}..., not in "
            "numeric order: pad the numbers with zeros (00, 01, ..., 10)")


if __name__ == "__main__":
    sys.exit(main())
