"""Fashion-MNIST questions: a visual question answering set whose answers need spatial detail, made from real
Fashion-MNIST images, for vistok's reference vision-LLM.

Each image is a 56 x 56 canvas cut into four 28 x 28 cells (top left, top right, bottom left, bottom right); each
cell holds, with probability 3/4, one Fashion-MNIST item (its 28 x 28 image), else stays black.
Three kinds of question, equally often:

* ``where``: "What is at the top left?" -> the item's name (``ITEM_NAMES``) or "nothing";
* ``exists``: "Is there a bag?" -> "yes" / "no" (asked about a present item half of the time);
* ``count``: "How many shoes are there?" -> "0" ... "4" (sandals, sneakers and ankle boots are shoes).

Example ``i`` of a split is a deterministic function of ``(seed, split, i)``: the train split draws items from
Fashion-MNIST's training images, the test split from its test images. Examples are made on the fly from the
installed Fashion-MNIST; nothing is written to disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._checks import is_int
from .data import load_fashion_mnist
from .errors import InvalidConfigError

__all__ = ["ITEM_NAMES", "CELLS", "SHOES", "QAExample", "FashionQA", "make_example"]

ITEM_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
CELLS = ("top left", "top right", "bottom left", "bottom right")
CELL = 28  # pixels per cell side: a whole Fashion-MNIST image
SHOES = (5, 7, 9)  # sandal, sneaker, ankle boot
KINDS = ("where", "exists", "count")
SPLIT_SEEDS = {"train": 0, "test": 1}


@dataclass(frozen=True)
class QAExample:
    """``image`` ``uint8 [56, 56]``; ``cells``: the Fashion-MNIST class in each cell (``-1``: empty)."""

    image: np.ndarray
    cells: tuple[int, ...]
    kind: str
    question: str
    answer: str


def make_example(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray) -> QAExample:
    """One example drawn with ``rng`` from the split's ``images`` ``uint8 [N, 28, 28]`` and ``labels``."""
    canvas = np.zeros((2 * CELL, 2 * CELL), dtype=np.uint8)
    cells = []
    for cell in range(4):
        if rng.random() < 0.75:
            index = int(rng.integers(len(images)))
            row, col = divmod(cell, 2)
            canvas[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL] = images[index]
            cells.append(int(labels[index]))
        else:
            cells.append(-1)
    kind = KINDS[int(rng.integers(len(KINDS)))]
    if kind == "where":
        cell = int(rng.integers(4))
        question = f"What is at the {CELLS[cell]}?"
        answer = ITEM_NAMES[cells[cell]] if cells[cell] >= 0 else "nothing"
    elif kind == "exists":
        present = [c for c in cells if c >= 0]
        if present and rng.random() < 0.5:
            asked = present[int(rng.integers(len(present)))]
        else:
            absent = [c for c in range(10) if c not in present]
            asked = absent[int(rng.integers(len(absent)))]
        question = f"Is there a {ITEM_NAMES[asked]}?"
        answer = "yes" if asked in cells else "no"
    else:
        question = "How many shoes are there?"
        answer = str(sum(c in SHOES for c in cells))
    return QAExample(canvas, tuple(cells), kind, question, answer)


class FashionQA(torch.utils.data.Dataset):
    """``size`` examples of a split (``"train"`` or ``"test"``); item ``i`` is ``(image [1, 56, 56] float in
    [0, 1], question, answer)``, the same for every run with the same ``seed``.

    Raises:
        InvalidConfigError: an unknown split, a size below 1 or a seed outside [0, 2**32).
        DatasetNotFoundError: Fashion-MNIST is not on this machine (see :func:`vistok.data.load_fashion_mnist`).
    """

    def __init__(self, split: str, size: int, seed: int = 0, root: str | None = None) -> None:
        if split not in SPLIT_SEEDS:
            raise InvalidConfigError(f"FashionQA: split must be 'train' or 'test', got {split!r}")
        if not is_int(size, 1):
            raise InvalidConfigError(f"FashionQA: size must be a positive int, got {size!r}")
        if not is_int(seed, 0) or seed >= 2**32:  # numpy reads a larger seed as two words: seed 2**32 was seed 0's
            raise InvalidConfigError(f"FashionQA: seed must be an int in [0, 2**32), got {seed!r}")
        images, labels = load_fashion_mnist(split, root)
        self.images = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        self.labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        self.split, self.size, self.seed = split, size, seed

    def __len__(self) -> int:
        return self.size

    def example(self, index: int) -> QAExample:
        if not 0 <= index < self.size:
            raise IndexError(f"FashionQA has {self.size} examples, asked for {index}")
        rng = np.random.default_rng([self.seed, SPLIT_SEEDS[self.split], index])
        return make_example(rng, self.images, self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, str]:
        example = self.example(index)
        image = torch.from_numpy(example.image).float().div(255)[None]
        return image, example.question, example.answer

