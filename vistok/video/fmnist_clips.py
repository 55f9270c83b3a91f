"""Fashion-MNIST clips: a video classification dataset whose labels need time, made from real Fashion-MNIST
images and written as real H.264 ``.mp4`` files with a Kinetics-style CSV, so training reads it through
:mod:`vistok.video` exactly as it would read Kinetics.

Each clip is ``FRAMES`` frames of a black 28 x 28 canvas on which one Fashion-MNIST item, shrunk to 14 x 14, slides
from one edge to the other: left, right, up or down. In half of the clips the item is replaced, at a random frame
in the middle third, by an item of another category. The label is the direction and whether the swap happened
(8 classes). A single frame tells little: a swap is a change between frames, and the direction is not in one
frame. The axis of motion leaks a little: the item passes positions ``round(linspace(0, 14, 16))``, where 7
comes twice (frames 7 and 8), so the middle frame (8) shows the item at column 7 for left / right clips and at row
7 for up / down clips; guessing the axis from that frame scores 24.18 % of the 4,000 test clips against 12.5 %
chance (a review's count). Most tokens are black background, as in real video.

The clips are a deterministic function of ``seed`` and of both splits' sizes (one generator draws the training clips,
then the test clips: another ``--train`` count gives other test clips): the train split uses Fashion-MNIST's
training images, the test split its test images.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import load_fashion_mnist
from ..errors import InvalidConfigError

__all__ = ["CLASSES", "FRAMES", "FPS", "ClipSpec", "make_clip", "draw_specs", "write_dataset", "write_grey_mp4"]

DIRECTIONS = ("left", "right", "up", "down")
CLASSES = tuple(f"moving {d}{', swapped' if swap else ''}" for d in DIRECTIONS for swap in (False, True))
FRAMES = 16
FPS = 8
CANVAS, ITEM = 28, 14


@dataclass(frozen=True)
class ClipSpec:
    """One clip: the item (an index into the split's images), the direction, the cross-axis offset, and the swap
    (the replacing item and the frame it appears at, or ``None``)."""

    item: int
    direction: int
    offset: int
    swap_item: int | None
    swap_frame: int | None

    @property
    def label(self) -> int:
        return 2 * self.direction + int(self.swap_item is not None)


def _shrink(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` ``[N, 28, 28]`` -> ``float`` ``[N, 14, 14]`` in ``[0, 255]`` (area averaging)."""
    return F.avg_pool2d(images.float()[:, None], 2)[:, 0]


def make_clip(spec: ClipSpec, items: torch.Tensor) -> np.ndarray:
    """``uint8`` frames ``[FRAMES, 28, 28]`` of ``spec``; ``items`` are the split's shrunk images ``[N, 14, 14]``."""
    travel = CANVAS - ITEM
    along = np.linspace(0, travel, FRAMES).round().astype(int)
    if spec.direction in (0, 2):  # left / up: from the far edge to the near one
        along = along[::-1]
    frames = np.zeros((FRAMES, CANVAS, CANVAS), dtype=np.uint8)
    for t in range(FRAMES):
        swapped = spec.swap_frame is not None and t >= spec.swap_frame
        picture = items[spec.swap_item if swapped else spec.item].round().clamp(0, 255).to(torch.uint8).numpy()
        row, col = (spec.offset, along[t]) if spec.direction < 2 else (along[t], spec.offset)
        frames[t, row:row + ITEM, col:col + ITEM] = picture
    return frames


def draw_specs(count: int, labels: torch.Tensor, generator: torch.Generator) -> list[ClipSpec]:
    """``count`` clips with balanced classes over the images whose categories are ``labels``."""
    specs = []
    for index in range(count):
        label = index % len(CLASSES)
        item = int(torch.randint(len(labels), (), generator=generator))
        offset = int(torch.randint(CANVAS - ITEM + 1, (), generator=generator))
        swap_item = swap_frame = None
        if label % 2:
            others = torch.nonzero(labels != labels[item]).squeeze(1)
            swap_item = int(others[torch.randint(len(others), (), generator=generator)])
            swap_frame = int(torch.randint(FRAMES // 3, 2 * FRAMES // 3 + 1, (), generator=generator))
        specs.append(ClipSpec(item, label // 2, offset, swap_item, swap_frame))
    order = torch.randperm(count, generator=generator).tolist()
    return [specs[i] for i in order]


def write_grey_mp4(path: Path, frames: np.ndarray, fps: int = FPS) -> None:
    """``uint8`` grey frames ``[T, H, W]`` (even ``H``, ``W``) as an H.264 ``.mp4`` at crf 0: lossless in its
    limited-range YUV 4:2:0, so a grey level reads back within 1 of what was written (256 levels share 220 luma
    values)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "0", "preset": "veryfast"}  # lossless coding of the (limited-range) luma
        for grey in frames:
            rgb = np.repeat(grey[..., None], 3, axis=2)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_dataset(root: str | Path, train_clips: int = 24_000, test_clips: int = 4_000, seed: int = 0,
                  fmnist_root: str | None = None, progress: bool = True) -> Path:
    """Write the clips under ``root``: ``train/`` and ``test/`` ``.mp4`` files, ``train.csv`` and ``test.csv``
    (``label,youtube_id,time_start,time_end,split``), ``classes.txt`` (the class names in the order of the label
    indices :func:`~vistok.video.kinetics_csv` gives, which a trained model's outputs follow: sorted) and
    ``manifest.json`` (how it was made).
    Existing files of the same name are overwritten."""
    from tqdm.auto import tqdm

    if min(train_clips, test_clips) < len(CLASSES):
        raise InvalidConfigError(f"make at least {len(CLASSES)} clips per split (one per class)")
    root = Path(root)
    generator = torch.Generator().manual_seed(seed)
    counts = {}
    for split, count in (("train", train_clips), ("test", test_clips)):
        images, labels = load_fashion_mnist(split, fmnist_root)
        items = _shrink(images)
        specs = draw_specs(count, labels, generator)
        (root / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for index, spec in enumerate(tqdm(specs, desc=f"{split} clips", disable=not progress)):
            clip_id = f"fm{split[:2]}{index:06d}"
            write_grey_mp4(root / split / f"{clip_id}_000000_000002.mp4", make_clip(spec, items))
            rows.append({"label": CLASSES[spec.label], "youtube_id": clip_id, "time_start": 0, "time_end": 2,
                         "split": split, "item": spec.item, "category": int(labels[spec.item])})
        with open(root / f"{split}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        counts[split] = count
    labels = sorted(CLASSES)  # the label indices kinetics_csv gives (the names sorted), so a model's logits' order
    (root / "classes.txt").write_text("\n".join(labels) + "\n")
    manifest = {"name": "fmnist-clips", "seed": seed, "clips": counts, "frames": FRAMES, "fps": FPS,
                "size": [CANVAS, CANVAS], "item_size": ITEM, "codec": "libx264 crf 0, yuv420p",
                "classes": labels, "source": "Fashion-MNIST (train images -> train clips, test -> test)",
                "command": f"python tools/make_video_data.py --out {root} --train {train_clips} --test {test_clips} "
                           f"--seed {seed}"}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return root
