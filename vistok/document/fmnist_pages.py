"""Sparse pages: Fashion-MNIST questions (:mod:`vistok.fmnist_qa`) asked about items scattered over a large,
mostly blank page, for the page-reading reference VLM (``vistok_page_vlm_fmnist``) and the correlation-guided
compressor's evaluation.

A page is 112 x 112 pixels, a 4 x 4 grid of 28 x 28 crops (the reference ViT's input size), in four quadrants of
2 x 2 crops (top left, top right, bottom left, bottom right). Each quadrant holds, with probability 3/4, one real
Fashion-MNIST item in one of its four crops, drawn uniformly; every other crop stays black. So a page has 0 to 4
items on 16 crops (3 on average: 81 % of the page is blank), each item filling one whole crop. The questions are
:class:`~vistok.fmnist_qa.FashionQA`'s, about the page's quadrants: "What is at the top left?", "Is there a
bag?", "How many shoes are there?".

Example ``i`` of a split is a deterministic function of ``(seed, split, i)``: the FashionQA example ``i`` (its
items, question and answer), then each item's crop within its quadrant from a generator of its own, seeded with
``(seed, split, i, 1)``. Nothing is written to disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..fmnist_qa import CELL, SPLIT_SEEDS, FashionQA, QAExample

__all__ = ["SparsePageQA", "PageExample", "PAGE_CROPS", "QUADRANT_CROPS"]

QUADRANT_CROPS = 2  # crops per quadrant side
PAGE_CROPS = 2 * QUADRANT_CROPS  # crops per page side


@dataclass(frozen=True)
class PageExample:
    """``image`` ``uint8 [112, 112]``; ``crops``: the Fashion-MNIST class in each of the 16 crops, row-major
    (``-1``: blank); ``cells``: the class in each quadrant, as :class:`~vistok.fmnist_qa.QAExample` has it."""

    image: np.ndarray
    crops: tuple[int, ...]
    cells: tuple[int, ...]
    kind: str
    question: str
    answer: str


def scatter_over_page(example: QAExample, rng: np.random.Generator) -> PageExample:
    """Move each quadrant's item of a 56 x 56 :class:`~vistok.fmnist_qa.QAExample` into one of its quadrant's
    crops of a 112 x 112 page, drawn with ``rng``."""
    side = PAGE_CROPS * CELL
    page = np.zeros((side, side), dtype=np.uint8)
    crops = [-1] * PAGE_CROPS**2
    for quadrant, label in enumerate(example.cells):
        slot = int(rng.integers(QUADRANT_CROPS**2))  # drawn for every quadrant, so the page depends on the seed only
        if label < 0:
            continue
        q_row, q_col = divmod(quadrant, 2)
        s_row, s_col = divmod(slot, QUADRANT_CROPS)
        row, col = q_row * QUADRANT_CROPS + s_row, q_col * QUADRANT_CROPS + s_col
        source_row, source_col = q_row * CELL, q_col * CELL
        page[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL] = \
            example.image[source_row:source_row + CELL, source_col:source_col + CELL]
        crops[row * PAGE_CROPS + col] = label
    return PageExample(page, tuple(crops), example.cells, example.kind, example.question, example.answer)


class SparsePageQA(torch.utils.data.Dataset):
    """``size`` sparse-page questions of a split (``"train"`` or ``"test"``); item ``i`` is ``(page [1, 112, 112]
    float in [0, 1], question, answer)``, the same for every run with the same ``seed``.

    Raises:
        InvalidConfigError: an unknown split, a size below 1 or a seed outside [0, 2**32).
        DatasetNotFoundError: Fashion-MNIST is not on this machine.
    """

    def __init__(self, split: str, size: int, seed: int = 0, root: str | None = None) -> None:
        self.questions = FashionQA(split, size, seed, root)

    def __len__(self) -> int:
        return len(self.questions)

    def example(self, index: int) -> PageExample:
        example = self.questions.example(index)
        questions = self.questions
        rng = np.random.default_rng([questions.seed, SPLIT_SEEDS[questions.split], index, 1])  # placement's own
        return scatter_over_page(example, rng)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, str]:
        example = self.example(index)
        return torch.from_numpy(example.image).float().div(255)[None], example.question, example.answer
