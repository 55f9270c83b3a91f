"""Fashion-MNIST video questions: video question answering whose answers sit in a few frames, made from real
Fashion-MNIST images, for B-VLLM-style frame selection under a token budget.

Each video is ``FRAMES`` (64) black 28 x 28 frames at ``FPS`` (8); two to five items of different categories each
appear, whole, for a short run of 1 to 4 frames, in turn, with black frames between (at least one). Three kinds of
question, equally often:

* ``exists``: "Is there a bag?" -> "yes" / "no" (asked about a present category half of the time);
* ``after``: "What appears after the bag?" -> the next item's name (``ITEM_NAMES``), or "nothing" after the last;
* ``count``: "How many items appear?" -> "2" ... "5".

An item fills 1 to 4 of the 64 frames, so 16 evenly spaced frames (every fourth) miss an item shown for 1, 2 or 3
frames 3/4, 1/2 or 1/4 of the time: a question about it needs the right frames.

Example ``i`` of a split is a deterministic function of ``(seed, split, i)``; the train split draws items from
Fashion-MNIST's training images, the test split from its test images. :func:`write_dataset` writes a split as
H.264 ``.mp4`` files (crf 0: grey levels read back within 1) with an MVBench-style manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._checks import is_int
from ..data import load_fashion_mnist
from ..errors import InvalidConfigError
from ..fmnist_qa import ITEM_NAMES
from .fmnist_clips import write_grey_mp4

__all__ = ["FRAMES", "FPS", "KINDS", "Appearance", "VideoQuestion", "make_video_question", "FashionVideoQA",
           "write_dataset"]

FRAMES, FPS, SIZE = 64, 8, 28
KINDS = ("exists", "after", "count")
ITEMS = (2, 5)  # items per video, at least and at most
RUN = (1, 4)  # frames an item is shown for, at least and at most
SPLIT_SEEDS = {"train": 10, "test": 11}  # FashionQA's image questions use 0 and 1


@dataclass(frozen=True)
class Appearance:
    """One item on screen: ``image`` (an index into the split's images), its ``category``, its first frame
    ``start`` and how many frames it stays (``length``)."""

    image: int
    category: int
    start: int
    length: int


@dataclass(frozen=True)
class VideoQuestion:
    """A video (its appearances, in time order) with one question."""

    appearances: tuple[Appearance, ...]
    kind: str
    question: str
    answer: str

    def frames(self, images: np.ndarray) -> np.ndarray:
        """``uint8`` ``[FRAMES, 28, 28]`` from the split's ``images`` ``uint8 [N, 28, 28]``."""
        video = np.zeros((FRAMES, SIZE, SIZE), dtype=np.uint8)
        for shown in self.appearances:
            video[shown.start: shown.start + shown.length] = images[shown.image]
        return video

    def evidence(self) -> list[int]:
        """The frames that show an item: every frame the answers can depend on."""
        return [t for shown in self.appearances for t in range(shown.start, shown.start + shown.length)]


def _timeline(rng: np.random.Generator, count: int) -> list[tuple[int, int]]:
    """``count`` ``(start, length)`` runs in order, at least one black frame between, anywhere in the video."""
    lengths = rng.integers(RUN[0], RUN[1] + 1, size=count)
    slack = FRAMES - int(lengths.sum()) - (count - 1)
    cuts = np.sort(rng.integers(0, slack + 1, size=count))  # the spare black frames before each run
    runs, start = [], 0
    for index, length in enumerate(lengths):
        start += int(cuts[index] - (cuts[index - 1] if index else 0)) + (1 if index else 0)
        runs.append((start, int(length)))
        start += int(length)
    return runs


def make_video_question(rng: np.random.Generator, labels: np.ndarray) -> VideoQuestion:
    """One video and question drawn with ``rng`` over the split's image ``labels``."""
    count = int(rng.integers(ITEMS[0], ITEMS[1] + 1))
    categories = rng.choice(len(ITEM_NAMES), size=count, replace=False)
    appearances = []
    for category, (start, length) in zip(categories, _timeline(rng, count), strict=True):
        pool = np.flatnonzero(labels == category)
        appearances.append(Appearance(int(pool[rng.integers(len(pool))]), int(category), start, length))
    shown = [a.category for a in appearances]
    kind = KINDS[int(rng.integers(len(KINDS)))]
    if kind == "exists":
        absent = [c for c in range(len(ITEM_NAMES)) if c not in shown]
        asked = shown[int(rng.integers(count))] if rng.random() < 0.5 else absent[int(rng.integers(len(absent)))]
        question, answer = f"Is there a {ITEM_NAMES[asked]}?", "yes" if asked in shown else "no"
    elif kind == "after":
        position = int(rng.integers(count))
        question = f"What appears after the {ITEM_NAMES[shown[position]]}?"
        answer = ITEM_NAMES[shown[position + 1]] if position + 1 < count else "nothing"
    else:
        question, answer = "How many items appear?", str(count)
    return VideoQuestion(tuple(appearances), kind, question, answer)


class FashionVideoQA(torch.utils.data.Dataset):
    """``size`` video questions of a split (``"train"`` or ``"test"``); item ``i`` is ``(frames uint8 [FRAMES, 28,
    28], question, answer)``, the same for every run with the same ``seed``.

    Raises:
        InvalidConfigError: an unknown split, a size below 1 or a seed outside [0, 2**32).
        DatasetNotFoundError: Fashion-MNIST is not on this machine.
    """

    def __init__(self, split: str, size: int, seed: int = 0, root: str | None = None) -> None:
        if split not in SPLIT_SEEDS:
            raise InvalidConfigError(f"FashionVideoQA: split must be 'train' or 'test', got {split!r}")
        if not is_int(size, 1):
            raise InvalidConfigError(f"FashionVideoQA: size must be a positive int, got {size!r}")
        if not is_int(seed, 0) or seed >= 2**32:  # numpy reads a larger seed as two words: seed 2**32 was seed 0's
            raise InvalidConfigError(f"FashionVideoQA: seed must be an int in [0, 2**32), got {seed!r}")
        images, labels = load_fashion_mnist(split, root)
        self.images, self.labels = images.numpy(), labels.numpy()
        self.split, self.size, self.seed = split, size, seed

    def __len__(self) -> int:
        return self.size

    def example(self, index: int) -> VideoQuestion:
        if not 0 <= index < self.size:
            raise IndexError(f"FashionVideoQA has {self.size} examples, asked for {index}")
        return make_video_question(np.random.default_rng([self.seed, SPLIT_SEEDS[self.split], index]), self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, str]:
        example = self.example(index)
        return torch.from_numpy(example.frames(self.images)), example.question, example.answer


def write_dataset(root: str | Path, split: str, size: int, seed: int = 0, fmnist_root: str | None = None,
                  progress: bool = True) -> Path:
    """Write ``size`` questions of ``split`` under ``root``: ``<split>/fvqa<i>.mp4`` and ``<split>.json``, an
    MVBench-style list of ``{"video", "question", "answer", "candidates", "kind", "evidence"}`` (paths relative to
    ``root``; ``candidates``: the answers a question of its kind can have). Returns the manifest's path."""
    from tqdm.auto import tqdm

    data = FashionVideoQA(split, size, seed, fmnist_root)
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    candidates = {"exists": ["yes", "no"], "after": [*ITEM_NAMES, "nothing"],
                  "count": [str(n) for n in range(ITEMS[0], ITEMS[1] + 1)]}
    rows = []
    for index in tqdm(range(size), desc=f"{split} videos", disable=not progress):
        example = data.example(index)
        name = f"{split}/fvqa{index:06d}.mp4"
        write_grey_mp4(root / name, example.frames(data.images), FPS)
        rows.append({"video": name, "question": example.question, "answer": example.answer,
                     "candidates": candidates[example.kind], "kind": example.kind, "evidence": example.evidence()})
    manifest = root / f"{split}.json"
    manifest.write_text(json.dumps(rows, indent=1) + "\n")
    (root / "README.md").write_text(
        f"Fashion-MNIST video questions (vistok.video.fmnist_qa), seed {seed}: {FRAMES} frames of {SIZE} x {SIZE} "
        f"at {FPS} fps, H.264 at crf 0 (grey levels within 1). Made by `python tools/make_video_qa.py --out {root} "
        f"--split {split} --size {size} --seed {seed}`.\n")
    return manifest
