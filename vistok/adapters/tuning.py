"""The tuner on a vision-LLM (``vistok.tune(model, batches, target=...)`` with a model ``vistok.patch`` compresses at
the boundary): which boundary method keeps the language model's next token closest to the unpatched model's at a
share of the visual tokens.

The cost is the visual tokens per unit (an image; an Idefics3 tile), so every candidate gets the largest budget within
the target (pooling: the largest budget its grid can make within it; where images differ in size, ``keep=target``,
each unit's budget rounded to the nearest token (at least one), so it can exceed the target, and ``tokens_ratio``
is the target) and the search is over the methods: bipartite merging to the budget, merging adjacent regions (an
adaptive pooling), VisionZip's dominant tokens (alone and with contextual tokens), the correlation-guided compressor
(per-crop redundancy, and page redundancy where a unit is a grid of crops), pooling and random selection (the
baselines); those that rank patches only where the family can (a class token, or LLaVA's and LLaVA-OneVision's SigLIP
towers: :attr:`VisionLLMFamily.ranks_patches`).
Each candidate runs the calibration prompts once per rung of successive halving, as :func:`vistok.tune` does for towers:
all on a quarter of the batches, the better half on half of them, the best quarter on all (``rungs=3``). The score is
top-1 agreement of the next-token prediction at the end of each prompt with the unpatched model's (ties: the lower KL
divergence), or accuracy against ``labels`` (the expected next-token ids).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import is_real
from .._modes import evaluating
from ..errors import InputShapeError, InvalidConfigError, VistokError
from ..methods import MethodConfig, create_config
from .budget import poolable

__all__ = ["tune_vision_llm", "boundary_candidates"]


def boundary_candidates(grid: tuple[int, int], ranks_patches: bool, target: float, num_prefix: int = 0,
                        crop_grids: bool = False) -> list[tuple[str, str, MethodConfig, float]]:
    """``(label, method, config, tokens ratio)`` for every boundary setting the tuner tries on a unit of ``grid``
    patches (``num_prefix`` class-token features in front, kept) at no more than ``target`` of its visual tokens.
    A family whose images differ in size (``grid`` ``(0, 0)``: Qwen2-VL; LLaVA-OneVision's crops) gets
    ``keep=target`` for every method and no pooling candidate. ``ranks_patches``: the family can rank patches
    (:attr:`~vistok.adapters.family.VisionLLMFamily.ranks_patches`), so dominant and correlation_guided are tried;
    ``crop_grids``: a unit can be a grid of crops (:attr:`~vistok.adapters.family.VisionLLMFamily.has_crop_grids`),
    so correlation_guided with page redundancy is tried too (on a single view it is the per-crop one).

    Raises:
        InvalidConfigError: ``target`` is below one token per unit.
    """
    available = grid[0] * grid[1]
    if available == 0:  # each image its own grid: a share of each
        options: dict = {"keep": target}
        budget = None
    else:
        budget = math.floor(target * (available + num_prefix) + 1e-9) - num_prefix
        if budget < 1:
            raise InvalidConfigError(f"tune: a target of {target:g} keeps less than one of the {available} visual "
                                     "tokens per unit")
        options = {"tokens": budget}
    out = [("merge_to_budget", "merge_to_budget", create_config("merge_to_budget", **options)),
           ("region_merge", "region_merge", create_config("region_merge", **options)),
           ("random_select", "random_select", create_config("random_select", **options))]
    if ranks_patches:  # a class token, or a SigLIP tower's received attention
        out.append(("dominant", "dominant", create_config("dominant", **options)))
        if budget is not None and budget >= 4:
            contextual = max(1, budget // 8)
            out.append((f"dominant contextual={contextual}", "dominant",
                        create_config("dominant", **options, contextual=contextual)))
        out.append(("correlation_guided", "correlation_guided", create_config("correlation_guided", **options)))
        if crop_grids:  # on one view page redundancy keeps the same tokens
            out.append(("correlation_guided redundancy=page", "correlation_guided",
                        create_config("correlation_guided", **options, redundancy="page")))
    if budget is not None:
        pooled = next((t for t in range(budget, 0, -1) if poolable(grid, t)), None)
        if pooled is not None:
            out.append((f"pool tokens={pooled}", "pool", create_config("pool", tokens=pooled)))
    if budget is None:
        return [(label, method, config, float(target)) for label, method, config in out]
    return [(label, method, config, (config.tokens + num_prefix) / (available + num_prefix))
            for label, method, config in out]


@torch.no_grad()
def _next_token_logits(model: nn.Module, batches: Sequence[Mapping[str, Any]]) -> Tensor:
    """``[P, V]``: the logits for the token after each prompt (prompts left-padded), batch after batch."""
    return torch.cat([model(**batch, logits_to_keep=1).logits[:, -1].float() for batch in batches])


def tune_vision_llm(model: nn.Module, batches: Sequence[Mapping[str, Any]], target: float = 0.25,
                    labels: Tensor | None = None, rungs: int = 3, progress: bool = False) -> Any:
    """:func:`vistok.tune` on a vision-LLM: ``batches`` are the model's keyword inputs (a processor's output:
    ``input_ids``, ``attention_mask``, ``pixel_values``, ...), prompts left-padded; ``target`` the share of the
    visual tokens per unit; ``labels`` ``[P]`` optional, the expected next token of each of the ``P`` prompts
    (integer ids in ``[0, vocab)``)."""
    from ..patching import find_handle
    from ..tuner import TuneResult, check_counts, check_labels
    from .vlm import vision_llm_family

    if not is_real(target) or not 0 < target <= 1:
        raise InvalidConfigError(f"tune: target must be a share of the visual tokens in (0, 1], got {target!r}")
    if isinstance(batches, Mapping) or not isinstance(batches, Sequence) or \
            not all(isinstance(b, Mapping) and "input_ids" in b for b in batches):
        raise InputShapeError("tune: on a vision-LLM give the calibration prompts as a list of batches, each the "
                              "model's keyword inputs (input_ids, attention_mask, pixel_values, ...)")
    check_counts(rungs=rungs)
    if len(batches) < 2 ** (rungs - 1):
        raise InputShapeError(f"tune: {rungs} rungs of successive halving need at least {2 ** (rungs - 1)} batches, "
                              f"got {len(batches)}")
    for batch in batches:
        mask = batch.get("attention_mask")
        if mask is not None and not bool(mask[:, -1].all()):
            raise InputShapeError("tune: the prompts must be left-padded (the processor's padding_side='left'), so "
                                  "that each one's next token is the last position")
    prompts = sum(int(batch["input_ids"].shape[0]) for batch in batches)
    if labels is not None:
        check_labels(labels, prompts, "P", "next-token ids")
    if find_handle(model) is not None:
        raise InvalidConfigError("tune: give the unpatched model (remove its patch first)")
    family = vision_llm_family(model).inspect(model)
    grid = (0, 0) if family.encodes_up_front else family.grid
    candidates = boundary_candidates(grid, family.ranks_patches, target, family.num_prefix, family.has_crop_grids)
    rows = [{"label": label, "method": method, "config": config, "tokens_ratio": ratio}
            for label, method, config, ratio in candidates]
    started = time.perf_counter()
    with evaluating(model):
        best, scored = _search(model, batches, rows, labels, rungs, progress)
    metric = "next-token accuracy" if labels is not None else "next-token agreement"
    return TuneResult(rows, best, best["config"], float(target), metric, prompts, scored,
                      time.perf_counter() - started, cost="tokens")


def _search(model: nn.Module, batches: Sequence[Mapping[str, Any]], rows: list[dict[str, Any]],
            labels: Tensor | None, rungs: int, progress: bool) -> tuple[dict[str, Any], int]:
    """Successive halving of ``rows`` over the batches; the best row and the prompts scored."""
    from ..patching import patch
    from ..tuner import agreement_scores, check_finite_reference, check_label_range, successive_halving

    reference = _next_token_logits(model, batches)
    check_finite_reference(reference, "prompts")
    if labels is not None:
        check_label_range(labels, reference.shape[-1], "next-token ids")

    def score(row: dict[str, Any], count: int, rung: int) -> int | None:
        try:
            with patch(model, row["config"]):
                logits = _next_token_logits(model, batches[:count])
        except VistokError as error:  # a method this model cannot run (e.g. these images' grids)
            row["error"] = str(error)
            return None
        used = logits.shape[0]
        row.update(agreement_scores(logits, reference[:used], None if labels is None else labels[:used], rung))
        return used

    return successive_halving(rows, list(rows), rungs, len(batches), score, progress, "batches")
