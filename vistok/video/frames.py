"""Which frames a video-LLM reads, and how many tokens each keeps: B-VLLM's stages (Lu et al.) as small pure
functions over encoded frames, plus the baselines. A pipeline runs them in this order:

1. choose frames: :func:`uniform_frames` (the baseline), :func:`top_scoring_frames` (training-free, e.g. by
   image-text similarity from a CLIP model), or :class:`TemporalQuerySelector` (trainable, B-VLLM's: learned
   temporal queries that see the question, scored against each frame's summary, Gumbel-softmax);
2. :func:`merge_similar_frames`: selected frames whose similarity passes a threshold (B-VLLM: 0.75) merge into an
   earlier one, order kept, sizes and times recorded;
3. :func:`fit_token_budget`: each frame sampled to its share, then all frames' tokens merged (size-weighted) to an
   exact total budget.

Shapes: ``frames`` ``[T, N, D]`` (``T`` frames of ``N`` tokens); a selection ``[K, T]`` (row ``k``: the weights
of selected frame ``k`` over the video's frames; one-hot for hard selection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import is_int, is_real
from ..adapters.budget import merge_to_budget
from ..errors import InputShapeError, InvalidConfigError
from ..ops.merging import size_dtype

__all__ = ["frame_summaries", "uniform_frames", "top_scoring_frames", "text_frame_scores", "one_hot_selection",
           "apply_selection", "gumbel_selection", "SelectorConfig", "TemporalQuerySelector", "MergedFrames",
           "merge_similar_frames", "BudgetedVideo", "fit_token_budget"]


def _check_frames(frames: Tensor, name: str) -> None:
    if frames.dim() != 3:
        raise InputShapeError(f"{name}: expected frames [T, N, D], got {tuple(frames.shape)}")


def _check_count(value: object, name: str, at_most: int | None = None) -> None:
    if at_most == 0:
        raise InputShapeError(f"{name}: there is nothing to choose from (no frames or tokens)")
    if not is_int(value, 1) or (at_most is not None and value > at_most):
        bound = "" if at_most is None else f" <= {at_most}"
        raise InvalidConfigError(f"{name} must be a positive int{bound}, got {value!r}")


def _check_sizes(sizes: Tensor, name: str, where: str) -> None:
    """Refuse sizes that are not all positive numbers: a frame standing for no frames (NaN or infinite averages),
    or bool sizes (their sums saturate at True: merged frames came out as sums, not means)."""
    if sizes.dtype == torch.bool or sizes.is_complex():
        raise InputShapeError(f"{where}: {name} must be real numbers (how many frames each stands for), got "
                              f"{sizes.dtype}")
    if not bool((sizes > 0).all()):
        raise InputShapeError(f"{where}: {name} must be > 0 (how many frames each stands for), got {sizes.tolist()}")


def frame_summaries(frames: Tensor, num_prefix: int = 0) -> Tensor:
    """``[..., T, N, D]`` -> ``[..., T, D]``: each frame's class token where it has one (``num_prefix >= 1``: token
    0), else the mean of its tokens (B-VLLM's frame summary)."""
    return frames[..., 0, :] if num_prefix else frames.mean(dim=-2)


def uniform_frames(num_frames: int, count: int) -> Tensor:
    """``[count]`` long: evenly spaced frames, the middle of each of ``count`` equal segments (the baseline)."""
    _check_count(num_frames, "num_frames")
    _check_count(count, "count", num_frames)
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * num_frames / count).long()


def top_scoring_frames(scores: Tensor, count: int, summaries: Tensor | None = None,
                       threshold: float | None = None) -> Tensor:
    """``[<= count]`` long: the frames with the highest ``scores`` ``[T]`` (ties to the earlier), in time order.

    With ``summaries`` ``[T, D]`` and ``threshold`` (given together), a frame whose summary is similar past
    ``threshold`` to one already chosen (cosine mapped to ``[0, 1]``, as :func:`merge_similar_frames`) is skipped:
    near-duplicates do not take the budget twice, and fewer than ``count`` come back when the video has fewer
    distinct frames. NaN scores are refused.
    """
    if scores.dim() != 1:
        raise InputShapeError(f"top_scoring_frames: expected scores [T], got {tuple(scores.shape)}")
    _check_count(count, "count", scores.shape[0])
    if threshold is not None and (not is_real(threshold) or not 0 <= threshold <= 1):
        raise InvalidConfigError(f"top_scoring_frames: threshold must be in [0, 1] or None, got {threshold!r}")
    if (summaries is None) != (threshold is None):  # one without the other was ignored
        raise InvalidConfigError("top_scoring_frames: give summaries and threshold together (or neither)")
    if bool(torch.isnan(scores).any()):  # argsort ranks NaN first: a broken score would be chosen
        raise InputShapeError(f"top_scoring_frames: {int(torch.isnan(scores).sum())} of the {scores.shape[0]} "
                              "scores are NaN")
    ranked = scores.float().argsort(descending=True, stable=True)
    if summaries is None or threshold is None:
        return ranked[:count].sort().values
    if summaries.dim() != 2 or summaries.shape[0] != scores.shape[0]:
        raise InputShapeError(f"top_scoring_frames: summaries must be [T={scores.shape[0]}, D], got "
                              f"{tuple(summaries.shape)}")
    unit = F.normalize(summaries.float(), dim=-1)
    chosen: list[int] = []
    for index in ranked.tolist():
        # clamped as merge_similar_frames does: a rounded cosine of 1.0000002 passed threshold 1.0
        if chosen and float(((unit[chosen] @ unit[index]).clamp(max=1) + 1).max()) / 2 > threshold:
            continue
        chosen.append(index)
        if len(chosen) == count:
            break
    return torch.tensor(sorted(chosen), dtype=torch.long, device=scores.device)


@torch.no_grad()
def text_frame_scores(model: nn.Module, tokenizer, frames: Tensor, text: str, batch_size: int = 256) -> Tensor:
    """``[T]``: the cosine similarity of each frame's image embedding to ``text``'s, by a CLIP-style dual encoder
    (an open_clip model's ``encode_image`` / ``encode_text`` and its tokenizer): training-free, text-conditioned
    frame scores for :func:`top_scoring_frames`. ``frames`` ``[T, 3, H, W]`` as the model takes them."""
    if frames.dim() != 4:
        raise InputShapeError(f"text_frame_scores: expected frames [T, C, H, W], got {tuple(frames.shape)}")
    query = F.normalize(model.encode_text(tokenizer([text])).float(), dim=-1)[0]
    images = torch.cat([model.encode_image(frames[start: start + batch_size]).float()
                        for start in range(0, frames.shape[0], batch_size)])
    return F.normalize(images, dim=-1) @ query


def one_hot_selection(indices: Tensor, num_frames: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[K, T]``: the hard selection of frames ``indices`` ``[K]``."""
    return F.one_hot(indices.long(), num_frames).to(dtype)


def apply_selection(frames: Tensor, selection: Tensor) -> Tensor:
    """``[K, N, D]``: each selected frame as its selection weights' mix of the video's ``frames`` ``[T, N, D]``
    (a copy of one frame for a one-hot row)."""
    _check_frames(frames, "apply_selection")
    if selection.dim() != 2 or selection.shape[1] != frames.shape[0]:
        raise InputShapeError(f"apply_selection: selection {tuple(selection.shape)} must be [K, T] with T = "
                              f"{frames.shape[0]} frames")
    return torch.einsum("kt,tnd->knd", selection.to(frames.dtype), frames)


def gumbel_selection(logits: Tensor, tau: float = 0.5, generator: torch.Generator | None = None,
                     noise: bool = True, hard: bool = False) -> Tensor:
    """Selection weights over frames (the last axis): ``softmax((logits + g) / tau)`` with Gumbel noise ``g``
    (B-VLLM's ``gumbel_softmax(..., tau=0.5)``, differentiable); ``noise=False`` drops the noise. With ``hard``,
    the forward value is the one-hot argmax and the gradient the soft weights' (straight-through): the frame is
    one real frame, and selection still trains."""
    if not tau > 0:
        raise InvalidConfigError(f"gumbel_selection: tau must be > 0, got {tau!r}")
    dtype = logits.dtype
    if noise:  # in float32: bfloat16 rounds 1 - 1e-7 to 1, whose noise is infinite
        uniform = torch.rand(logits.shape, generator=generator, device="cpu" if generator is None
                             else generator.device).to(logits.device)
        logits = logits.float() - torch.log(-torch.log(uniform.clamp(1e-10, 1 - 1e-7)))
    soft = torch.softmax(logits.float() / tau, dim=-1).to(dtype)
    if not hard:
        return soft
    one_hot = F.one_hot(soft.argmax(dim=-1), soft.shape[-1]).to(soft.dtype)
    return one_hot - soft.detach() + soft


@dataclass(frozen=True)
class SelectorConfig:
    """:class:`TemporalQuerySelector`'s shape: ``frame_dim`` (the frame summaries'), ``text_dim`` (the question's
    token embeddings'), ``num_queries`` selected frames (B-VLLM: 16), ``tau`` (0.5), ``hard`` (straight-through
    one-hot selection; B-VLLM's code mixes frames softly), the width and heads of its one query-text attention
    block."""

    frame_dim: int
    text_dim: int
    num_queries: int = 16
    tau: float = 0.5
    hard: bool = True
    width: int = 128
    heads: int = 4

    def __post_init__(self) -> None:
        for name in ("frame_dim", "text_dim", "num_queries", "width", "heads"):
            _check_count(getattr(self, name), f"SelectorConfig.{name}")
        if self.width % self.heads:
            raise InvalidConfigError(f"SelectorConfig: width {self.width} is not a multiple of heads {self.heads}")
        if not is_real(self.tau) or not self.tau > 0:
            raise InvalidConfigError(f"SelectorConfig.tau must be > 0, got {self.tau!r}")


class TemporalQuerySelector(nn.Module):
    """B-VLLM's text-conditioned frame selection, small: ``num_queries`` learned queries attend to themselves and
    to the question's tokens (one pre-norm attention block and an MLP, as a one-layer Q-Former), are projected to
    the frame space and scored against every frame's summary (dot product over ``sqrt(frame_dim)``); each query
    then selects a frame by Gumbel-softmax over the scores (``tau``), so selection trains end to end. In eval mode
    the noise is dropped (deterministic).

    ``forward(summaries [B, T, frame_dim], text [B, L, text_dim], text_mask [B, L] or None)`` -> selection
    ``[B, K, T]`` (rows sum to 1).
    """

    def __init__(self, config: SelectorConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.queries = nn.Parameter(torch.randn(config.num_queries, width) * width ** -0.5)
        self.text_in = nn.Linear(config.text_dim, width)
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, config.heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.to_frames = nn.Linear(width, config.frame_dim)

    def scores(self, summaries: Tensor, text: Tensor, text_mask: Tensor | None = None) -> Tensor:
        """``[B, K, T]`` logits of each query for each frame."""
        if summaries.dim() != 3 or summaries.shape[-1] != self.config.frame_dim:
            raise InputShapeError(f"TemporalQuerySelector: summaries must be [B, T, {self.config.frame_dim}], got "
                                  f"{tuple(summaries.shape)}")
        if text.dim() != 3 or text.shape[0] != summaries.shape[0] or text.shape[-1] != self.config.text_dim:
            raise InputShapeError(f"TemporalQuerySelector: text must be [B={summaries.shape[0]}, L, "
                                  f"{self.config.text_dim}], got {tuple(text.shape)}")
        batch, queries = summaries.shape[0], self.config.num_queries
        q = self.queries.expand(batch, -1, -1)
        context = torch.cat([q, self.text_in(text)], dim=1)
        padding = None
        if text_mask is not None:
            padding = torch.cat([text_mask.new_zeros(batch, queries, dtype=torch.bool), ~text_mask.bool()], dim=1)
        h = self.norm(context)
        attended, _ = self.attention(h[:, :queries], h, h, key_padding_mask=padding, need_weights=False)
        q = q + attended
        q = q + self.mlp(self.mlp_norm(q))
        return self.to_frames(q) @ summaries.transpose(1, 2) / math.sqrt(self.config.frame_dim)

    def forward(self, summaries: Tensor, text: Tensor, text_mask: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        return gumbel_selection(self.scores(summaries, text, text_mask), self.config.tau, generator,
                                noise=self.training, hard=self.config.hard)


@dataclass(frozen=True)
class MergedFrames:
    """The frames after temporal merging: ``frames`` ``[K', N, D]`` in time order; ``sizes`` ``[K']`` how many
    selected frames each stands for; ``times`` ``[K']`` each one's time (its earliest member's, in video frames);
    ``owner`` ``[K]`` long: which output frame each selected frame went to."""

    frames: Tensor
    sizes: Tensor
    times: Tensor
    owner: Tensor


def merge_similar_frames(frames: Tensor, metric: Tensor, times: Tensor, threshold: float = 0.75,
                         sizes: Tensor | None = None) -> MergedFrames:
    """B-VLLM's temporal merge: a selected frame whose best similarity to an earlier one passes ``threshold``
    merges into it.

    Similarity is the cosine of ``metric`` rows (B-VLLM: the selection weights) mapped to ``[0, 1]``, against
    earlier frames only. Chains resolve to their earliest frame (B-VLLM's code keeps only frames that merged into
    nothing, so a frame that had merged into one that merged on is lost; here it joins the chain's root). Members
    average weighted by ``sizes`` (default 1 each); the output is in time order.

    Args:
        frames: ``[K, N, D]`` selected frames, ``metric`` ``[K, C]``, ``times`` ``[K]`` each one's time
            (e.g. the argmax of its selection row), ``threshold`` in ``[0, 1]``.
    """
    _check_frames(frames, "merge_similar_frames")
    count = frames.shape[0]
    if metric.dim() != 2 or metric.shape[0] != count or times.shape != (count,):
        raise InputShapeError(f"merge_similar_frames: metric must be [K={count}, C] and times [K], got "
                              f"{tuple(metric.shape)} and {tuple(times.shape)}")
    if not is_real(threshold) or not 0 <= threshold <= 1:
        raise InvalidConfigError(f"merge_similar_frames: threshold must be in [0, 1], got {threshold!r}")
    if sizes is not None and (not isinstance(sizes, Tensor) or sizes.shape != (count,)):
        raise InputShapeError(f"merge_similar_frames: sizes must be [K={count}], got "
                              f"{tuple(sizes.shape) if isinstance(sizes, Tensor) else type(sizes).__name__}")
    order = times.argsort(stable=True)  # earlier means earlier in the video
    frames, metric, times = frames[order], metric[order], times[order]
    if sizes is not None:
        _check_sizes(sizes, "sizes", "merge_similar_frames")
    weights = torch.ones(count, dtype=size_dtype(frames.dtype), device=frames.device) if sizes is None \
        else sizes[order]
    unit = F.normalize(metric.float(), dim=-1)
    similarity = ((unit @ unit.T).clamp(max=1) + 1) / 2  # rounding puts a cosine of 1 a little above
    earlier = torch.ones(count, count, dtype=torch.bool, device=frames.device).tril(-1)
    best, target = similarity.masked_fill(~earlier, -1).max(dim=1)
    root = torch.arange(count, device=frames.device)
    for index in range(1, count):  # in time order, so a target's root is already final
        if best[index] > threshold:
            root[index] = root[target[index]]
    roots, group = torch.unique(root, return_inverse=True)  # sorted: the output keeps time order
    totals = torch.zeros(len(roots), dtype=weights.dtype, device=frames.device).index_add_(0, group, weights)
    work = size_dtype(frames.dtype)  # summed in at least float32, as token merging is
    summed = torch.zeros(len(roots), *frames.shape[1:], dtype=work, device=frames.device).index_add_(
        0, group, frames.to(work) * weights.to(work)[:, None, None])
    owner = torch.empty_like(group)
    owner[order] = group
    means = (summed / totals.to(work)[:, None, None]).to(frames.dtype)
    return MergedFrames(means, totals, times[roots], owner)


@dataclass(frozen=True)
class BudgetedVideo:
    """A video's visual tokens at an exact budget: ``tokens`` ``[budget, D]`` in (frame, patch) order; ``sizes``
    ``[budget]`` how many frame tokens each stands for; ``frame`` ``[budget]`` long the (first) frame each comes
    from, an index into the frames given."""

    tokens: Tensor
    sizes: Tensor
    frame: Tensor


def fit_token_budget(frames: Tensor, budget: int, frame_sizes: Tensor | None = None,
                     per_frame: int | None = None) -> BudgetedVideo:
    """B-VLLM's spatial stage: each frame's tokens merged down to ``per_frame`` (default ``ceil(budget / K)``,
    at most ``N``), then all frames' tokens together merged (size-weighted, bipartite, :func:`merge_to_budget`)
    to exactly ``budget``, in (frame, patch) order.

    Args:
        frames: ``[K, N, D]``; ``frame_sizes`` ``[K]`` how many frames each already stands for (after
            :func:`merge_similar_frames`), which weights its tokens; ``1 <= budget <= K * N``.
    """
    _check_frames(frames, "fit_token_budget")
    count, n, dim = frames.shape
    _check_count(budget, "budget", count * n)
    per_frame = min(n, math.ceil(budget / count)) if per_frame is None else per_frame
    _check_count(per_frame, "per_frame", n)
    if count * per_frame < budget:
        raise InvalidConfigError(f"fit_token_budget: per_frame={per_frame} x {count} frames is fewer tokens than the "
                                 f"budget {budget}")
    if frame_sizes is not None and (not isinstance(frame_sizes, Tensor) or frame_sizes.shape != (count,)):
        raise InputShapeError(f"fit_token_budget: frame_sizes must be [K={count}], got "
                              f"{tuple(frame_sizes.shape) if isinstance(frame_sizes, Tensor) else frame_sizes!r}")
    if frame_sizes is not None:
        _check_sizes(frame_sizes, "frame_sizes", "fit_token_budget")
    weights = torch.ones(count, dtype=frames.dtype, device=frames.device) if frame_sizes is None else frame_sizes
    sampled = merge_to_budget(frames, per_frame)  # [K, per_frame, D], sizes in patches
    sizes = sampled.sizes * weights.to(sampled.sizes.dtype)[:, None]
    tokens, sizes = sampled.tokens.reshape(1, -1, dim), sizes.reshape(1, -1)
    frame = torch.arange(count, device=frames.device).repeat_interleave(per_frame)
    if tokens.shape[1] == budget:
        return BudgetedVideo(tokens[0], sizes[0], frame)
    merged = merge_to_budget(tokens, budget, sizes=sizes)
    first = merged.positions()[0]  # each kept token's first (frame, patch) slot
    return BudgetedVideo(merged.tokens[0], merged.sizes[0], frame[first])
