"""Which method, how much, for your model: search vistok's methods and settings on a calibration batch and pick the
one that agrees best with the unpatched model within a compute target.

>>> result = vistok.tune(model, images, target=0.5)       # at most half the unpatched GFLOPs
>>> vistok.patch(model, result.config)                     # the pick, ready to use
>>> result.save("tune.json"); result.plot("tune.png")      # every candidate, the Pareto front
>>> vistok.patch(model, vistok.config_from_saved("tune.json"))  # the saved pick, later

Candidates (from the model's patch count ``N`` and depth): ATS with a fixed budget and ATS with fusion at
``k`` = 90 % ... 20 % of ``N`` in the paper's blocks, random dropping at the same ``k`` (the baseline), merging at
several ``r`` with a constant and a decreasing schedule, and ATS in one early block composed with merging in the
later ones.
Each candidate's cost is measured once against the unpatched model's: its GFLOPs ratio (counted exactly on a few
images), its token ratio (the tokens each block outputs, summed over the blocks, padding excluded, over the
unpatched model's) and, with ``cost="latency"``, its measured latency ratio on this machine (the patched and the
unpatched model timed interleaved on one batch, medians). The ``target`` bounds the ``cost`` the user chose (default
GFLOPs). Every candidate is scored on a quarter of the batch (for the Pareto front); of those within the target the
better half goes on to half of it, the best quarter to all of it (``rungs=3``, successive halving), so a candidate
that is clearly worse costs a quarter of a pass. The score is top-1 agreement with the unpatched model (ties: the
lower KL divergence from its distribution), or accuracy when labels are given; a model whose forward gives
embeddings (a timm model made with ``num_classes=0``, an open_clip image tower) or an ``encode=`` function is scored
by the embeddings' cosine similarity with the unpatched model's; a forward that returns an output object with
``logits`` (a Hugging Face classifier: VideoMAE, ViViT) is scored on those. No randomness but random dropping's
fixed seed (and the latency measurement): the same batch gives the same pick.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import is_int, is_integer_tensor, is_real
from ._modes import evaluating
from .backbones import resolve_backbone
from .errors import InputShapeError, InvalidConfigError, UnsupportedModelError, VistokError
from .methods import ATSConfig, MergeConfig, MethodConfig, RandomDropConfig, create_config
from .methods.ats import default_ats_blocks
from .methods.compose import ComposedConfig

__all__ = ["tune", "TuneResult", "tune_candidates", "config_from_saved", "check_labels", "check_label_range"]

KEEP_FRACTIONS = (0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2)
COSTS = {"gflops": "GFLOPs", "tokens": "tokens per block", "latency": "latency"}  # what a target can bound


def tune_candidates(model: nn.Module, patches: int | None = None) -> list[tuple[str, str, MethodConfig]]:
    """``(label, method, config)`` for every setting the tuner tries on ``model`` (see the module docstring), sized
    for inputs of ``patches`` patch tokens (default the model's native count; :func:`tune` gives the calibration
    images' own where the model takes other sizes)."""
    info = resolve_backbone(model).info
    patches, depth = patches or info.num_patches, info.num_blocks
    blocks = default_ats_blocks(depth)
    out: list[tuple[str, str, MethodConfig]] = []
    for fraction in KEEP_FRACTIONS:
        k = max(1, round(fraction * patches))
        out.append((f"ats k={k}", "ats", ATSConfig(k=k, min_tokens=k, blocks=blocks)))
        if not info.rotary:
            out.append((f"ats+fusion k={k}", "ats_fusion", ATSConfig(k=k, min_tokens=k, blocks=blocks, fusion=True)))
        out.append((f"random_drop k={k}", "random_drop", RandomDropConfig(k=k, blocks=blocks)))
    if not info.rotary:
        for divisor in (64, 32, 24, 16, 12):
            r = min(patches // 2, max(1, round(patches / divisor)))
            out.append((f"merge r={r}", "merge", MergeConfig(r=r)))
            if 2 * r <= patches // 2:  # "decreasing" merges 2 r in its first block
                out.append((f"merge r={r} decreasing", "merge", MergeConfig(r=r, schedule="decreasing")))
            first = blocks[0]
            if first + 1 < depth:
                k = max(1, round(0.75 * patches))
                after = min(r, k // 2)  # what merging can take of the k tokens ATS keeps
                out.append((f"ats k={k} @{first} + merge r={after}", "ats+merge", ComposedConfig((
                    ATSConfig(k=k, min_tokens=k, blocks=[first]),
                    MergeConfig(r=after, blocks=list(range(first + 1, depth)))))))
    unique: dict[str, tuple[str, str, MethodConfig]] = {}
    for candidate in out:  # on a small model several divisors give one r: each setting is scored once
        unique.setdefault(candidate[0], candidate)
    return list(unique.values())


@dataclass
class TuneResult:
    """Every candidate's ``rows`` (label, method, config, its cost ratios -- GFLOPs and tokens on a tower, visual
    tokens on a vision-LLM -- and its score on the most images it was scored on), the pick (``best``, its
    ``config``), the ``target``, and what the search cost: ``images_scored`` (images through the patched model,
    summed over candidates), ``seconds``. ``cost``: what ``target`` bounds
    (``"gflops"``, ``"tokens"`` or ``"latency"``; each row's ``<cost>_ratio``)."""

    rows: list[dict[str, Any]]
    best: dict[str, Any]
    config: MethodConfig
    target: float
    metric: str
    images: int
    images_scored: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    cost: str = "gflops"

    def scored_rows(self) -> list[dict[str, Any]]:
        """The rows that ran (a vision-LLM's candidate that cannot run on its model carries an ``error``)."""
        return [row for row in self.rows if "rung0_score" in row]

    def pareto(self) -> list[dict[str, Any]]:
        """The rows no other row beats on both cost ratio and score (each scored on the first rung)."""
        front = []
        key = f"{self.cost}_ratio"
        for row in sorted(self.scored_rows(), key=lambda r: (r[key], -r["rung0_score"])):
            if not front or row["rung0_score"] > front[-1]["rung0_score"]:
                front.append(row)
        return front

    def save(self, path: str | Path) -> Path:
        """JSON (or YAML for ``.yaml`` / ``.yml``): the pick first (its ``config`` a list of ``{"method": ...,
        options}``; :func:`config_from_saved` makes it the config ``vistok.patch`` takes), then every row."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"pick": _plain(self.best), "target": self.target, "cost": self.cost,
                f"target_{self.cost}_ratio": self.target, "metric": self.metric,
                "calibration_images": self.images, "images_scored": self.images_scored,
                "seconds": round(self.seconds, 3), "rows": [_plain(row) for row in self.rows]}
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(data, sort_keys=False))
        else:
            path.write_text(json.dumps(data, indent=2))
        return path

    def plot(self, path: str | Path) -> Path:
        """Score vs cost ratio, one colour per method, the target as a line and the pick circled."""
        from .viz import _pyplot, _save

        plt = _pyplot()
        figure, axis = plt.subplots(figsize=(6.5, 4.2))
        key = f"{self.cost}_ratio"
        rows = self.scored_rows()
        for method in dict.fromkeys(row["method"] for row in rows):
            points = [(r[key], r["rung0_score"]) for r in rows if r["method"] == method]
            axis.scatter(*zip(*points, strict=True), s=18, label=method)
        axis.axvline(self.target, color="grey", linestyle="--", linewidth=1, label=f"target {self.target:g}")
        axis.scatter([self.best[key]], [self.best["rung0_score"]], s=120, facecolors="none",
                     edgecolors="black", label=f"pick: {self.best['label']}")
        axis.set_xlabel(f"{COSTS[self.cost]} / unpatched")
        axis.set_ylabel(f"{self.metric} (%, first rung)")
        axis.legend(fontsize=7)
        return _save(plt, figure, path, dpi=120)


def tune(model: nn.Module, images: Tensor | list[dict[str, Any]], target: float = 0.5, labels: Tensor | None = None,
         rungs: int = 3, flops_images: int = 8, progress: bool = False, cost: str | None = None,
         latency_images: int = 32, latency_runs: int = 5,
         encode: Callable[[nn.Module, Tensor], Tensor] | None = None) -> TuneResult:
    """Search vistok's methods on ``model`` for the one that agrees best with the unpatched model (or is most
    accurate, given ``labels``) at no more than ``target`` times its cost.

    Args:
        model: a vision transformer vistok patches (unpatched; it is patched and restored for each candidate).
        images: the calibration batch ``[B, C, H, W]`` as the model takes it (a video ViT's: clips
            ``[B, C, T, H, W]``; a Hugging Face video classifier's: ``[B, T, C, H, W]`` ``pixel_values``).
        labels: optional ``[B]`` integer class ids in ``[0, classes)`` (``classes`` from the model's logits).
        target: the cost ratio in ``(0, 1]``.
        rungs: successive-halving rounds (each keeps the better half on twice the images).
        flops_images: images each candidate's GFLOPs and tokens are counted on.
        cost: what ``target`` bounds: ``"gflops"`` (the default on a tower), ``"tokens"`` (tokens per block,
            summed over the blocks) or ``"latency"`` (measured here: ``latency_images`` images, the median of
            ``latency_runs`` runs, the unpatched model timed in the same loop).
        encode: for a tower without a classifier (open_clip's or Hugging Face's CLIP / SigLIP image encoder), a
            function ``(model, images) -> [B, D]`` embeddings (``lambda m, x: m.encode_image(x)``); the score is
            then their mean cosine similarity with the unpatched model's (in %; ``labels`` do not apply). A model
            whose own forward gives embeddings (a timm model with ``num_classes=0``, an open_clip image tower) is
            scored that way without it.

    On a vision-LLM (one ``vistok.patch`` compresses at the boundary), ``images`` is a list of batches of the
    model's keyword inputs and ``target`` the share of visual tokens (:mod:`vistok.adapters.tuning`).

    Raises:
        InvalidConfigError: a bad target, or no candidate within it.
        InputShapeError: images or labels of the wrong type or shape, or labels out of range.
        UnsupportedModelError: a model vistok cannot patch (found before any work).
    """
    from .adapters.vlm import vision_llm_family
    from .patching import find_handle

    check_counts(rungs=rungs, flops_images=flops_images, latency_images=latency_images, latency_runs=latency_runs)
    if vision_llm_family(model) is not None:
        if encode is not None:
            raise InvalidConfigError("tune: encode= is for towers without a classifier; a vision-LLM is scored on "
                                     "its next token")
        if cost not in (None, "tokens"):
            raise InvalidConfigError(f"tune: on a vision-LLM the target is a share of the visual tokens "
                                     f"(cost='tokens'), got cost={cost!r}")
        from .adapters.tuning import tune_vision_llm

        return tune_vision_llm(model, images, target, labels, rungs, progress)
    cost = cost or "gflops"
    if cost not in COSTS:
        raise InvalidConfigError(f"tune: cost must be one of {sorted(COSTS)}, got {cost!r}")
    if not is_real(target) or not 0 < target <= 1:
        raise InvalidConfigError(f"tune: target must be a {COSTS[cost]} ratio in (0, 1], got {target!r}")
    if not isinstance(images, Tensor):
        raise InputShapeError(f"tune: expected calibration images as a tensor [B, C, H, W], got "
                              f"{type(images).__name__}")
    if images.dim() not in (4, 5) or images.shape[0] < 2 ** (rungs - 1):
        raise InputShapeError(f"tune: expected calibration images [B, C, H, W] (or clips [B, C, T, H, W] for a "
                              f"video ViT) with B >= {2 ** (rungs - 1)}, got {tuple(images.shape)}")
    if encode is not None and labels is not None:
        raise InvalidConfigError("tune: labels score a classifier's top-1; with encode= the score is the embeddings' "
                                 "cosine similarity")
    if labels is not None:
        check_labels(labels, images.shape[0], "B", "class ids")
    if find_handle(model) is not None:
        raise InvalidConfigError("tune: give the unpatched model (remove its patch first)")
    _check_patchable(model)
    if encode is None and _gives_embeddings(model):
        if labels is not None:
            raise InvalidConfigError(f"tune: {type(model).__name__} has no classifier (its forward gives embeddings), "
                                     "so labels cannot score it; leave them out: the score is then the embeddings' "
                                     "cosine similarity with the unpatched model's")
        encode = _forward
    started = time.perf_counter()
    with evaluating(model):
        best, rows, scored, metric = _search(model, images, target, labels, rungs, flops_images, progress, cost,
                                             latency_images, latency_runs, encode)
    return TuneResult(rows, best, best["config"], float(target), metric, images.shape[0], scored,
                      time.perf_counter() - started, cost=cost)


def check_counts(**counts: Any) -> None:
    """Raise :class:`InvalidConfigError` naming the first count that is not an ``int >= 1``."""
    for name, value in counts.items():
        if not is_int(value, 1):
            raise InvalidConfigError(f"tune: {name} must be an int >= 1, got {value!r}")


def check_labels(labels: object, count: int, name: str, what: str) -> None:
    """Refuse ``labels`` unless an integer tensor ``[count]`` (``name``: what ``count`` counts, ``what``: what a
    label is, for the message); :func:`check_label_range` checks the ids once the number of classes is known."""
    if not isinstance(labels, Tensor):
        raise InputShapeError(f"tune: expected labels as a tensor [{name}={count}] of {what}, got "
                              f"{type(labels).__name__}")
    if not is_integer_tensor(labels):
        raise InputShapeError(f"tune: labels must be integer {what}, got a {labels.dtype} tensor")
    if labels.shape != (count,):
        raise InputShapeError(f"tune: labels must be [{name}={count}] {what}, got {tuple(labels.shape)}")


def check_finite_reference(reference: Tensor, what: str) -> None:
    """Refuse unpatched outputs ``[B, C]`` with NaN or ``+inf`` (``-inf`` masks a class): every candidate would be
    compared with nothing."""
    from .measure.accuracy import broken_rows

    bad = broken_rows(reference).nonzero().flatten().tolist()
    if bad:
        raise InputShapeError(f"tune: the unpatched model's outputs are NaN or +inf for {what} {bad[:8]} (of "
                              f"{reference.shape[0]}); check those inputs")


def check_label_range(labels: Tensor, classes: int, what: str) -> None:
    """Refuse ``labels`` ``[B]`` with an id outside ``[0, classes)`` (every candidate would score 0 on it)."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise InputShapeError(f"tune: labels must be {what} in [0, {classes}) (the model's logits have {classes}), "
                              f"got ids from {int(labels.min())} to {int(labels.max())}")


def _check_patchable(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` where vistok cannot patch ``model`` (before any forward), naming a
    child it can patch where ``model`` wraps one (e.g. :class:`vistok.video.VideoClassifier`)."""
    try:
        resolve_backbone(model)
    except UnsupportedModelError as error:
        for name, child in model.named_children():
            try:
                resolve_backbone(child)
            except UnsupportedModelError:
                continue
            raise UnsupportedModelError(f"tune: vistok cannot patch {type(model).__name__} itself, only the "
                                        f"{type(child).__name__} it wraps: tune its .{name} on the inputs that "
                                        "takes") from error
        raise


def _gives_embeddings(model: nn.Module) -> bool:
    """Whether ``model(images)`` are pooled embeddings, not class logits: a timm model made without a classifier
    (``num_classes=0``, as timm makes DINOv2, SigLIP and EVA-02 by default) or an open_clip image tower."""
    if getattr(model, "num_classes", None) == 0:
        return True
    return type(model).__module__.startswith("open_clip.") and type(model).__name__ in ("VisionTransformer",
                                                                                          "TimmModel")


def _forward(model: nn.Module, images: Tensor) -> Tensor:
    """``encode`` for a model whose forward gives embeddings."""
    return model(images)


def _search(model: nn.Module, images: Tensor, target: float, labels: Tensor | None, rungs: int, flops_images: int,
            progress: bool, cost: str, latency_images: int, latency_runs: int,
            encode: Callable[[nn.Module, Tensor], Tensor] | None) -> tuple[dict, list[dict], int, str]:
    """Costs, then successive halving (see :func:`tune`): the best row, every row, images scored, the metric."""
    from tqdm.auto import tqdm

    from .measure import count_flops, tokens_per_block
    from .patching import patch

    with torch.no_grad():
        reference = _outputs(model, images, encode)
    check_finite_reference(reference, "images")
    if labels is not None:
        check_label_range(labels, reference.shape[1], "class ids")
    counted = images[:flops_images]
    base_flops = count_flops(model, counted, encode)
    base_counts = tokens_per_block(model, counted, encode)
    base_tokens = sum(base_counts)
    info = resolve_backbone(model).info
    patches = round(base_counts[0]) - info.num_prefix if info.other_sizes else None  # the images' own grid
    unpatched = copy.deepcopy(model) if cost == "latency" else None
    rows = []
    for label, method, config in tqdm(tune_candidates(model, patches), desc="measuring costs",
                                      disable=not progress):
        with patch(model, config):
            row = {"label": label, "method": method, "config": config,
                   "gflops_ratio": count_flops(model, counted, encode) / base_flops,
                   "tokens_ratio": sum(tokens_per_block(model, counted, encode)) / base_tokens}
            if unpatched is not None:
                row["latency_ratio"] = _latency_ratio(model, unpatched, images[:latency_images], latency_runs,
                                                      encode)
        rows.append(row)
    metric = "accuracy" if labels is not None else "embedding cosine" if encode is not None else "top-1 agreement"
    key = f"{cost}_ratio"
    alive = [row for row in rows if row[key] <= target]
    if not alive:
        raise InvalidConfigError(f"tune: no candidate reaches {target:g}x the {COSTS[cost]} (the cheapest is "
                                 f"{min(r[key] for r in rows):.2f}x)")
    scores = agreement_scores if encode is None else _cosine_scores

    def score(row: dict[str, Any], size: int, rung: int) -> int:
        with patch(model, row["config"]), torch.no_grad():
            logits = _outputs(model, images[:size], encode)
        row.update(scores(logits, reference[:size], None if labels is None else labels[:size], rung))
        return size

    best, scored = successive_halving(rows, alive, rungs, images.shape[0], score, progress, "images")
    return best, rows, scored, metric


def successive_halving(rows: list[dict[str, Any]], alive: list[dict[str, Any]], rungs: int, total: int,
                       score: Callable[[dict[str, Any], int, int], int | None], progress: bool, unit: str
                       ) -> tuple[dict[str, Any], int]:
    """The search both tuners run: on rung ``r`` of ``rungs``, ``score(row, count, r)`` scores a row on the first
    ``count = ceil(total / 2 ** (rungs - 1 - r))`` inputs (every row on the first rung, for the front; the rows
    still ``alive`` after) and returns the inputs it ran, or ``None`` when the row cannot run (it then carries an
    ``error``); after each rung the better half of ``alive`` (by ``score``, then lower ``kl``) goes on. Returns the
    best row and the inputs scored in all."""
    from tqdm.auto import tqdm

    scored = 0
    for rung in range(rungs):
        count = math.ceil(total / 2 ** (rungs - 1 - rung))
        for row in tqdm(rows if rung == 0 else alive, desc=f"rung {rung + 1}/{rungs} ({count} {unit})",
                        disable=not progress):
            used = score(row, count, rung)
            scored += used or 0
        alive = sorted((r for r in alive if "error" not in r), key=lambda r: (-r["score"], r["kl"]))
        if not alive:
            raise InvalidConfigError(f"tune: no candidate ran on this model: {rows[0].get('error')}")
        if rung < rungs - 1:
            alive = alive[: max(1, math.ceil(len(alive) / 2))]
    return alive[0], scored


def _outputs(model: nn.Module, images: Tensor, encode: Callable[[nn.Module, Tensor], Tensor] | None) -> Tensor:
    """``[B, C]`` logits (or, with ``encode``, ``[B, D]`` embeddings) as float; a forward that returns an output
    object with ``logits`` (a Hugging Face classifier's ``ModelOutput``) gives those."""
    if encode is not None:
        out = encode(model, images)
    else:
        try:
            out = model(images)
        except VistokError:
            raise
        except (TypeError, ValueError, AttributeError) as error:  # e.g. a CLIPModel, whose forward wants text
            raise InvalidConfigError(f"tune: {type(model).__name__}(images) failed ({type(error).__name__}: "
                                     f"{error}); for a model whose forward does not take images alone, pass "
                                     "encode=, a function (model, images) -> [B, D] embeddings") from error
        if not isinstance(out, Tensor) and isinstance(getattr(out, "logits", None), Tensor):
            out = out.logits
    if not isinstance(out, Tensor) or out.dim() != 2:
        what = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        if encode is not None and encode is not _forward:
            raise InvalidConfigError(f"tune: encode= gave {what}, not [B, D] embeddings")
        raise InvalidConfigError(f"tune: {type(model).__name__} gives {what}, not [B, C] logits; for a tower without "
                                 "a classifier pass encode=, a function (model, images) -> [B, D] embeddings")
    return out.float()


def _cosine_scores(embeddings: Tensor, reference: Tensor, labels: Tensor | None, rung: int) -> dict[str, float]:
    """A tower's ``score``: the mean cosine similarity (%) of its embeddings with the unpatched model's; ``kl``
    (the tie-break, lower is better) its complement."""
    cosine = float(F.cosine_similarity(embeddings, reference, dim=-1).mean())
    out = {"score": 100.0 * cosine, "kl": 1.0 - cosine, "images": embeddings.shape[0]}
    if rung == 0:
        out["rung0_score"] = out["score"]
    return out


def _latency_ratio(patched: nn.Module, unpatched: nn.Module, images: Tensor, runs: int,
                   encode: Callable[[nn.Module, Tensor], Tensor] | None = None) -> float:
    """The patched model's median forward (or ``encode``) time on ``images`` over the unpatched copy's, timed
    interleaved."""
    from .measure import time_models

    models = {"patched": patched, "unpatched": unpatched}
    if encode is not None:
        models = {label: partial(encode, model) for label, model in models.items()}
    timings = time_models(models, images, warmup=1, runs=runs)
    return timings["patched"].median_s / timings["unpatched"].median_s


def agreement_scores(logits: Tensor, reference: Tensor, labels: Tensor | None, rung: int) -> dict[str, float]:
    """A candidate's ``score`` (top-1 agreement of ``logits`` ``[B, C]`` with ``reference``'s, or accuracy against
    ``labels``, in %), ``kl`` (from the reference distribution) and the ``images`` scored; ``rung0_score`` on the
    first rung."""
    kl = F.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean")
    target = reference.argmax(-1) if labels is None else labels.to(logits.device)
    from .measure.accuracy import broken_rows

    finite = ~broken_rows(logits)  # a candidate's NaN or +inf row is a miss (argmax would pick it)
    score = 100.0 * float(((logits.argmax(-1) == target) & finite).float().mean())
    out = {"score": score, "kl": float(kl) if bool(finite.all()) else math.inf, "images": logits.shape[0]}
    if rung == 0:
        out["rung0_score"] = score
    return out


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """A row as JSON: the config as its method name(s) and options."""
    out = {key: value for key, value in row.items() if key != "config"}
    config = row["config"]
    parts = config.parts if isinstance(config, ComposedConfig) else (config,)
    out["config"] = [{"method": part.name, **{k: v for k, v in vars(part).items()}} for part in parts]
    return out


def config_from_saved(saved: str | Path | dict[str, Any] | list[dict[str, Any]]) -> MethodConfig:
    """The config a saved tuning result describes, for ``vistok.patch``: ``saved`` is the file
    :meth:`TuneResult.save` wrote (its path; JSON, or YAML for ``.yaml`` / ``.yml``), its loaded contents, its
    ``"pick"``, or the pick's ``"config"`` (a list of ``{"method": name, **options}``; several are composed).

    Raises:
        InvalidConfigError: ``saved`` describes no config.
    """
    if isinstance(saved, (str, Path)):
        path = Path(saved)
        if not path.is_file():
            raise InvalidConfigError(f"config_from_saved: no file {path}")
        import yaml

        try:
            saved = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(
                path.read_text())
        except (ValueError, yaml.YAMLError) as error:
            raise InvalidConfigError(f"config_from_saved: cannot read {path}: {error}") from None
    if isinstance(saved, dict) and isinstance(saved.get("pick"), dict):
        saved = saved["pick"]
    if isinstance(saved, dict) and "config" in saved:
        saved = saved["config"]
    if not isinstance(saved, list) or not saved or not all(isinstance(e, dict) and "method" in e for e in saved):
        raise InvalidConfigError("config_from_saved: expected what TuneResult.save wrote (or its pick, or the pick's "
                                 "config: a list of {'method': name, **options}), got "
                                 f"{type(saved).__name__}")
    parts = [create_config(entry["method"], **{k: v for k, v in entry.items() if k != "method"})
             for entry in saved]
    return parts[0] if len(parts) == 1 else ComposedConfig(tuple(parts))
