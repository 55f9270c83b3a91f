"""Top-k accuracy and tokens kept per block over a dataset; the paired difference of two methods' accuracies."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._modes import evaluating
from ..errors import InputShapeError

__all__ = ["topk_correct", "broken_rows", "evaluate", "paired_difference", "add_paired_differences"]


def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """How many of the ``[B]`` labels are among the top-k of ``logits`` ``[B, classes]``, for each k.

    Raises:
        InputShapeError: logits not ``[B, classes]``, labels not ``B`` integers in ``[0, classes)`` (a model for
            other classes), or NaN logits (a row of NaN would count as its first classes: chance-level numbers from a
            broken forward, e.g. a float16 overflow).
    """
    if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise InputShapeError(f"topk_correct: expected logits [B, classes] and labels [B], got logits "
                              f"{tuple(logits.shape)} and labels {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise InputShapeError(f"topk_correct: labels must be class ids (integers), got {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise InputShapeError(f"topk_correct: labels must be class ids in [0, {logits.shape[1]}) (the logits' "
                              f"classes), got ids from {int(labels.min())} to {int(labels.max())}: a model for other "
                              "classes?")
    broken = broken_rows(logits)
    if bool(broken.any()):
        raise InputShapeError(f"topk_correct: the model gave NaN or +inf logits (rows "
                              f"{broken.nonzero().flatten()[:8].tolist()}); no accuracy to count")
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    hits = top == labels.to(top.device)[:, None]  # labels stay on the loader's device; the model may be elsewhere
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


def broken_rows(logits: Tensor) -> Tensor:
    """``[B]`` bool: the rows of ``logits`` ``[B, C]`` holding NaN or ``+inf`` (an overflow, tied with any other
    ``+inf``; ``-inf`` only masks a class)."""
    return (logits.isnan() | (logits == math.inf)).any(dim=-1)


def paired_difference(hits: Sequence[bool], baseline_hits: Sequence[bool]) -> tuple[float, float]:
    """Accuracy minus the baseline's on the same questions, in percentage points, and its standard error.

    Pairing removes what both runs share (the questions' difficulty): the standard error is that of the mean of the
    per-question differences ``d_i = hit_i - baseline_i`` (sample variance, ``n - 1``), far below the unpaired
    ``sqrt(p (1 - p) / n)`` when two methods mostly agree. ``hits[i]`` and ``baseline_hits[i]`` must be the same
    question's.
    """
    if len(hits) != len(baseline_hits):
        raise InputShapeError(f"paired_difference: {len(hits)} answers against {len(baseline_hits)} of the baseline; "
                              "a paired difference needs the same questions")
    if len(hits) < 2:
        raise InputShapeError(f"paired_difference: needs at least 2 questions, got {len(hits)}")
    differences = torch.tensor([float(a) - float(b) for a, b in zip(hits, baseline_hits, strict=True)],
                               dtype=torch.float64)
    return 100.0 * float(differences.mean()), 100.0 * float(differences.std() / len(hits) ** 0.5)


def add_paired_differences(rows: list[dict], hits: Sequence[Sequence[bool]], reference: int | None,
                           key: Callable[[dict], Hashable], baseline: Callable[[dict], Hashable | None]) -> None:
    """Evaluation rows (``hits[i]``: row ``i``'s answers, right or wrong, question by question) get, in place,
    ``vs_all``: their accuracy minus ``rows[reference]``'s (all tokens; not for that row itself), and
    ``vs_baseline``: minus the row whose ``key`` is ``baseline(row)`` (e.g. the baseline method at the same
    tokens; ``None`` or no such row: none), in points with their paired standard errors (``*_se``). Nothing
    with fewer than two questions."""
    if not hits or len(hits[0]) < 2:
        return
    at = {key(row): index for index, row in enumerate(rows)}
    for index, (row, answered) in enumerate(zip(rows, hits, strict=True)):
        if reference is not None and index != reference:
            row["vs_all"], row["vs_all_se"] = paired_difference(answered, hits[reference])
        other = at.get(baseline(row))
        if other is not None and baseline(row) != key(row):  # not the baseline itself (nor a twin of it)
            row["vs_baseline"], row["vs_baseline_se"] = paired_difference(answered, hits[other])


def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], transform: Callable | None = None,
             progress: bool = False, total: int | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (in %) and, for a vistok-patched model, the mean tokens each block outputs,
    averaged over all images. ``transform`` turns a loaded batch into model input."""
    from ..patching import find_handle

    handle = find_handle(model)
    correct = {1: 0, 5: 0}
    seen = 0
    token_sums: list[float] | None = None
    with evaluating(model), torch.inference_mode():
        for images, labels in tqdm(batches, disable=not progress, total=total, desc="eval", leave=False):
            if transform is not None:
                images = transform(images)
            logits = model(images)
            if not isinstance(logits, Tensor):  # a Hugging Face classifier's output
                if not isinstance(getattr(logits, "logits", None), Tensor):
                    raise InputShapeError(f"evaluate: {type(model).__name__} returned {type(logits).__name__}, "
                                          "neither logits nor an output with .logits")
                logits = logits.logits
            for k, count in topk_correct(logits, labels).items():
                correct[k] += count
            seen += labels.shape[0]
            if handle is not None:
                counts = [c * labels.shape[0] for c in handle.tokens_per_block()]
                token_sums = counts if token_sums is None else [a + b for a, b in zip(token_sums, counts, strict=True)]
    if seen == 0:
        raise InputShapeError("evaluate: the dataset is empty")
    result = {"top1": 100.0 * correct[1] / seen, "top5": 100.0 * correct[5] / seen, "images": seen}
    if token_sums is not None:
        result["tokens_per_block"] = [s / seen for s in token_sums]
    return result
