"""Video question answering under a visual token budget, end to end (B-VLLM's recipe on vistok's stages):

decode (:func:`vistok.video.read_video`) -> encode every frame with the vision-LLM's tower -> choose frames
(B-VLLM's trainable selector, CLIP image-text similarity, or the baselines) -> merge near-duplicate frames ->
fit the tokens to the budget -> the language model -> decode with :mod:`vistok.samplers` -> the answer.

>>> qa = VideoQA(*create_video_vlm(pretrained=True), VideoQAConfig(budget=256, selection="learned"))
>>> result = qa("clip.mp4", "Is there a bag?")
>>> result.answer, result.frames, result.visual_tokens, result.seconds

Selections (``VideoQAConfig.selection``):

* ``"learned"``: B-VLLM's selector (``model.frame_selector``): its learned queries (16) read the question and
  each picks a frame by Gumbel-softmax over their scores (straight-through one-hot; no noise at inference);
* ``"text"``: the ``frames`` frames most similar to the question by a CLIP-style model (training-free), or as
  many as the budget holds whole (``frames=None``);
* ``"uniform"``: ``frames`` evenly spaced frames, or as many as the budget holds whole (``frames=None``);
* ``"drop"``: frame dropping: whole frames chosen at random, as many as the budget holds;
* ``"all"``: every frame (spatially merged down to the budget when it does not fit; near-duplicates merged first
  with ``merge_on="summary"``).

Then selected frames that are similar past ``merge_threshold`` (strictly: 1.0 merges nothing) merge into the
earlier one. ``merge_on`` says similar in what: ``"selection"`` compares their selection rows, as B-VLLM
(threshold 0.75; one-hot rows merge only frames picked more than once), ``"summary"`` their summary tokens
(near-duplicate content: a held shot, a repeated frame; use a high threshold such as 0.98, since different frames'
summaries can be 0.95 similar; text selection then skips near-duplicates of frames it already chose, so the budget
goes to distinct frames). Then
:func:`~vistok.video.frames.fit_token_budget` brings the tokens to at most ``budget`` (exactly, where there are
more).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import is_int, is_real
from ..data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from ..errors import InputShapeError, InvalidConfigError
from ..ops.merging import size_dtype
from .frames import (
    apply_selection,
    fit_token_budget,
    merge_similar_frames,
    one_hot_selection,
    text_frame_scores,
    top_scoring_frames,
    uniform_frames,
)

__all__ = ["SELECTIONS", "MERGE_METRICS", "VideoQAConfig", "comparison_config", "EncodedVideo", "CompressedVideo",
           "VideoAnswer", "VideoQA", "encode_frames", "question_embeddings", "compress_video", "frames_to_input"]

SELECTIONS = ("learned", "text", "uniform", "drop", "all")
MERGE_METRICS = ("selection", "summary")


@dataclass
class VideoQAConfig:
    """How a video reaches the language model: ``budget`` visual tokens at most, the ``selection`` (see the
    module docstring), ``frames`` it keeps (``None`` for uniform: as many as the budget holds whole), the temporal
    merge ``merge_threshold`` (``None``: off), and ``seed`` (frame dropping's draw)."""

    budget: int = 256
    selection: str = "learned"
    frames: int | None = 16
    merge_threshold: float | None = 0.75
    merge_on: str = "selection"
    seed: int = 0

    def __post_init__(self) -> None:
        if not is_int(self.budget, 1):
            raise InvalidConfigError(f"VideoQAConfig: budget must be a positive int, got {self.budget!r}")
        if self.selection not in SELECTIONS:
            raise InvalidConfigError(f"VideoQAConfig: selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.frames is not None and not is_int(self.frames, 1):
            raise InvalidConfigError(f"VideoQAConfig: frames must be a positive int or None, got {self.frames!r}")
        if self.frames is None and self.selection == "learned":
            raise InvalidConfigError("VideoQAConfig: selection 'learned' needs a frame count (frames=: its queries)")
        if self.merge_on not in MERGE_METRICS:
            raise InvalidConfigError(f"VideoQAConfig: merge_on must be one of {MERGE_METRICS}, got {self.merge_on!r}")
        if not is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise InvalidConfigError(f"VideoQAConfig: seed must be an int in [0, 2**63), got {self.seed!r}")
        threshold = self.merge_threshold
        if threshold is not None and (not is_real(threshold) or not 0.5 <= threshold <= 1):
            raise InvalidConfigError(f"VideoQAConfig: merge_threshold must be in [0.5, 1] or None (two different "
                                     f"frames' one-hot selection rows have similarity 0.5), got {threshold!r}")


def comparison_config(selection: str, budget: int, merge_on: str = "summary", merge_threshold: float | None = 0.98
                      ) -> VideoQAConfig:
    """The config each selection runs with in vistok's video-QA training and evaluation: the text-conditioned
    selections merge near-duplicate frames (learned: its 16 queries; text: as many distinct frames as the budget
    holds); the baselines (uniform: as many frames as the budget holds, drop, all) keep what they pick."""
    conditioned = selection in ("learned", "text")
    return VideoQAConfig(budget=budget, selection=selection, frames=16 if selection == "learned" else None,
                         merge_threshold=merge_threshold if conditioned else None, merge_on=merge_on)


@dataclass(frozen=True)
class EncodedVideo:
    """Every frame through the tower: ``tokens`` ``[T, N, D]`` at the feature layer, ``summaries`` ``[T, D]`` (each
    frame's class token there)."""

    tokens: Tensor
    summaries: Tensor


@dataclass(frozen=True)
class CompressedVideo:
    """What the language model reads: ``tokens`` ``[T', D]`` (tower features, in time order), ``frames`` the
    video frames kept (a merged frame: its earliest), ``sizes`` ``[T']`` frame tokens per token."""

    tokens: Tensor
    frames: list[int]
    sizes: Tensor


@dataclass
class VideoAnswer:
    """The pipeline's result for one question: the answer, the frames kept, the visual tokens the language model
    read, and the seconds of each stage (decode, encode, select+compress, answer)."""

    answer: str
    frames: list[int]
    visual_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)


def frames_to_input(frames: Tensor, size: int = 28) -> Tensor:
    """``uint8`` frames ``[T, H, W]`` (grey) or ``[T, H, W, 3]`` (RGB, as decoded) -> the tower's input
    ``[T, 1, size, size]``, normalised like Fashion-MNIST."""
    if not isinstance(frames, Tensor) or frames.dtype != torch.uint8:
        raise InputShapeError(f"frames_to_input: expected uint8 frames (0 .. 255, as decoded), got "
                              f"{frames.dtype if isinstance(frames, Tensor) else type(frames).__name__}")
    if frames.dim() == 4 and frames.shape[-1] == 3:
        frames = frames.float().mean(dim=-1)
    if frames.dim() != 3:
        raise InputShapeError(f"frames_to_input: expected uint8 frames [T, H, W] or [T, H, W, 3], got "
                              f"{tuple(frames.shape)}")
    x = frames.float()[:, None] / 255
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD


@torch.no_grad()
def encode_frames(model: nn.Module, frames: Tensor, batch_size: int = 256, progress: bool = False
                  ) -> EncodedVideo:
    """Every frame ``[T, 1, 28, 28]`` through the vision-LLM's tower, at its feature layer
    (``config.vision_feature_layer``), in batches (with a progress bar for long videos)."""
    from tqdm.auto import tqdm

    if frames.shape[0] == 0:
        raise InputShapeError("encode_frames: the video has no frames")

    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    weight = next(tower.parameters())  # the frames go in on the tower's device, in its dtype
    states = []
    starts = range(0, frames.shape[0], batch_size)
    for start in tqdm(starts, desc="encoding frames", disable=not progress or len(starts) < 2):
        chunk = frames[start: start + batch_size].to(device=weight.device, dtype=weight.dtype)
        states.append(tower(chunk, output_hidden_states=True).hidden_states[layer])
    states = torch.cat(states)
    return EncodedVideo(states[:, 1:], states[:, 0])


def check_questions(questions: list[str]) -> None:
    """Raise :class:`InvalidConfigError` for no questions, or one that is not a string with words in it."""
    blank = [index for index, question in enumerate(questions) if not isinstance(question, str) or not question.strip()]
    if not questions or blank:
        raise InvalidConfigError(f"the questions must be non-empty strings (blank or not a string: {blank[:8]})"
                                 if blank else "no questions")


def question_embeddings(model: nn.Module, tokenizer: Any, questions: list[str]) -> tuple[Tensor, Tensor]:
    """The questions' token embeddings in the language model (``[B, L, D]``, right-padded) and their mask: what
    the learned selector reads.

    Raises:
        InvalidConfigError: no questions, or one that is not a string with words in it.
    """
    check_questions(questions)
    rows = [tokenizer(q, add_special_tokens=False).input_ids for q in questions]
    width = max(map(len, rows))
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    return embeddings(ids), mask


def compress_video(encoded: EncodedVideo, config: VideoQAConfig, selector: nn.Module | None = None,
                   question: tuple[Tensor, Tensor] | None = None, text_scores: Tensor | None = None,
                   generator: torch.Generator | None = None) -> CompressedVideo:
    """Choose frames, merge near-duplicates and fit the budget (the module docstring): one video.

    Args:
        encoded: the video's frames through the tower; ``selector`` and ``question`` (``[1, L, D]`` embeddings
            and mask) for ``"learned"``; ``text_scores`` ``[T]`` for ``"text"``; ``generator`` for the selector's
            Gumbel noise (training) and frame dropping.
    """
    tokens, summaries = encoded.tokens, encoded.summaries
    count, per_frame = tokens.shape[:2]
    if count == 0 or per_frame == 0:
        raise InputShapeError(f"compress_video: the video has no {'frames' if count == 0 else 'tokens per frame'} "
                              f"(tokens {tuple(tokens.shape)})")
    if text_scores is not None and tuple(text_scores.shape) != (count,):
        raise InputShapeError(f"compress_video: text_scores must be [T={count}] (one per frame), got "
                              f"{tuple(text_scores.shape)}")
    selection = _select(config, count, per_frame, summaries, selector, question, text_scores, generator)
    chosen = apply_selection(tokens, selection)
    kept_times = selection.argmax(dim=-1)  # the frame each chosen one is (or weighs most)
    times = kept_times.double()  # exact: bfloat16 would round frame 281 to 280
    frame_sizes = torch.ones(chosen.shape[0], dtype=size_dtype(chosen.dtype), device=chosen.device)
    if config.merge_threshold is not None and chosen.shape[0] > 1:
        # B-VLLM compares selection rows: rows that pick the same frames merge (one-hot rows: the same frame
        # chosen twice; two different frames' rows never do); "summary" compares what the frames show
        metric = selection.detach() if config.merge_on == "selection" else selection.detach() @ summaries
        merged = merge_similar_frames(chosen, metric, times, config.merge_threshold)
        chosen, frame_sizes = merged.frames, merged.sizes
        kept_times = merged.times.round().long()
    else:
        order = kept_times.argsort(stable=True)
        chosen, kept_times = chosen[order], kept_times[order]
    budget = min(config.budget, chosen.shape[0] * per_frame)
    fitted = fit_token_budget(chosen, budget, frame_sizes)
    return CompressedVideo(fitted.tokens, kept_times.tolist(), fitted.sizes)


def _select(config: VideoQAConfig, count: int, per_frame: int, summaries: Tensor, selector: nn.Module | None,
            question: tuple[Tensor, Tensor] | None, text_scores: Tensor | None,
            generator: torch.Generator | None) -> Tensor:
    """``[K, T]``: each chosen frame's weights over the video's frames."""
    kind = config.selection
    whole = max(1, min(count, config.budget // per_frame))  # whole frames the budget holds
    if kind == "learned":
        if selector is None or question is None:
            raise InvalidConfigError("selection 'learned' needs the model's frame_selector and the question")
        queries = getattr(getattr(selector, "config", None), "num_queries", config.frames)
        if config.frames != queries:
            raise InvalidConfigError(f"selection 'learned' keeps the selector's {queries} frames (its queries), not "
                                     f"frames={config.frames}")
        return selector(summaries[None], question[0], question[1], generator=generator)[0]
    if kind == "text":
        if text_scores is None:
            raise InvalidConfigError("selection 'text' needs image-text scores of the frames (a CLIP model)")
        distinct = config.merge_on == "summary" and config.merge_threshold is not None
        indices = top_scoring_frames(text_scores, min(config.frames or whole, count),
                                     summaries if distinct else None, config.merge_threshold if distinct else None)
    elif kind == "uniform":
        indices = uniform_frames(count, min(config.frames or whole, count))
    elif kind == "drop":
        indices = torch.randperm(count, generator=generator)[:whole].sort().values
    else:
        indices = torch.arange(count)
    return one_hot_selection(indices, count, summaries.dtype).to(summaries.device)


class VideoQA:
    """The pipeline as an object: ``qa(video, question)`` -> :class:`VideoAnswer`.

    Args:
        model, tokenizer: the video-LLM (:func:`vistok.models.create_video_vlm`).
        config: the budget and the selection.
        clip: ``(open_clip model, tokenizer)`` for ``selection="text"``
            (:func:`vistok.models.create_clip`).
        sampling: a :class:`vistok.samplers.SamplingConfig` (default greedy).
        progress: progress bars for long videos.
        timeout: seconds decoding a video may take (:func:`vistok.video.read_video`).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, config: VideoQAConfig | None = None,
                 clip: tuple[nn.Module, Any] | None = None, sampling: Any = None, progress: bool = False,
                 timeout: float | None = 60.0) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.config = config or VideoQAConfig()
        if self.config.selection == "text" and clip is None:
            raise InvalidConfigError("VideoQA: selection 'text' needs clip=(model, tokenizer), e.g. "
                                     "vistok.models.create_clip(pretrained=True)")
        if self.config.selection == "learned" and getattr(model, "frame_selector", None) is None:
            raise InvalidConfigError(f"VideoQA: selection 'learned' needs a model with a frame_selector "
                                     f"({type(model).__name__} has none; use vistok.models.create_video_vlm)")
        self.clip, self.sampling, self.progress, self.timeout = clip, sampling, progress, timeout

    def __call__(self, video: str | os.PathLike | Tensor, question: str, seed: int = 0) -> VideoAnswer:
        from ..models.reference_vlm import answer_questions
        from .io import read_video

        check_questions([question])  # every selection asks the language model, not only the learned one
        seconds: dict[str, float] = {}
        started = time.perf_counter()
        frames = video if isinstance(video, Tensor) else read_video(video, timeout=self.timeout)
        seconds["decode"] = time.perf_counter() - started
        started = time.perf_counter()
        pixels = frames_to_input(frames)
        encoded = encode_frames(self.model, pixels, progress=self.progress)
        seconds["encode"] = time.perf_counter() - started
        started = time.perf_counter()
        with torch.no_grad():
            compressed = self.compress(encoded, pixels, question, seed)
        seconds["select_and_compress"] = time.perf_counter() - started
        result = answer_questions(self.model, self.tokenizer, None, [question], sampling=self.sampling, seeds=seed,
                                  features=[compressed.tokens])
        seconds["answer"] = result.total_seconds
        return VideoAnswer(result.answers[0], compressed.frames, compressed.tokens.shape[0], seconds)

    def compress(self, encoded: EncodedVideo, pixels: Tensor, question: str, seed: int = 0) -> CompressedVideo:
        """Selection, temporal merge and budget for one encoded video (``pixels``: its frames as the tower took
        them, for CLIP scores)."""
        config = self.config
        check_questions([question])
        asked = scores = None
        if config.selection == "learned":
            asked = question_embeddings(self.model, self.tokenizer, [question])
        if config.selection == "text":
            clip_model, clip_tokenizer = self.clip
            size = clip_model.visual.image_size
            size = size[0] if isinstance(size, (tuple, list)) else size
            clip_pixels = pixels if pixels.shape[-1] == size else F.interpolate(pixels, size=(size, size))
            scores = text_frame_scores(clip_model, clip_tokenizer, clip_pixels.expand(-1, 3, -1, -1), question)
        selector = getattr(self.model, "frame_selector", None)
        generator = torch.Generator().manual_seed(seed + config.seed)
        return compress_video(encoded, config, selector, asked, scores, generator)

