"""One calling convention for video classifiers: ``[B, C, T, H, W]`` clips in, logits out, test views averaged.

timm-style video ViTs take ``[B, C, T, H, W]``; Hugging Face's VideoMAE and ViViT take ``pixel_values``
``[B, T, C, H, W]`` and return an output object. :class:`VideoClassifier` hides the difference so training and
evaluation code calls every video model alike, and it averages multi-view test predictions.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ..errors import InputShapeError, InvalidConfigError, UnsupportedModelError

__all__ = ["VideoClassifier"]

LAYOUTS = ("CTHW", "TCHW")


class VideoClassifier(nn.Module):
    """Wraps a video classifier ``model``.

    ``forward(clips)``: ``[B, C, T, H, W]`` -> logits ``[B, classes]``; ``[B, V, C, T, H, W]`` (``V`` test views of
    each clip, e.g. 5 clips x 3 crops) -> the log of the class probabilities averaged over the views.

    Args:
        layout: what ``model`` takes, ``"CTHW"`` (timm-style) or ``"TCHW"`` (Hugging Face ``pixel_values``);
            ``None``: ``"TCHW"`` for a Hugging Face model, else ``"CTHW"``.
    """

    def __init__(self, model: nn.Module, layout: str | None = None) -> None:
        super().__init__()
        if layout is None:
            layout = "TCHW" if hasattr(model, "config") and hasattr(model, "main_input_name") else "CTHW"
        if layout not in LAYOUTS:
            raise InvalidConfigError(f"VideoClassifier: layout must be one of {LAYOUTS}, got {layout!r}")
        self.model = model
        self.layout = layout

    def forward(self, clips: Tensor) -> Tensor:
        if clips.dim() not in (5, 6):
            raise InputShapeError(f"VideoClassifier expects clips [B, C, T, H, W] or views [B, V, C, T, H, W], got "
                                  f"{tuple(clips.shape)}")
        views = clips.shape[1] if clips.dim() == 6 else None
        x = clips.flatten(0, 1) if views else clips
        if self.layout == "TCHW":
            x = x.transpose(1, 2)
        output = self.model(x)
        logits = getattr(output, "logits", output)
        if not isinstance(logits, Tensor):
            raise UnsupportedModelError(f"VideoClassifier: {type(self.model).__name__} returned a "
                                        f"{type(output).__name__} without logits; wrap a classifier (e.g. "
                                        "VideoMAEForVideoClassification, not VideoMAEModel)")
        if views is None:
            return logits
        # log(mean_v softmax) as a logsumexp of log-probabilities in float32: finite where a view's probability
        # underflows (in float16 below about 6e-8, the log of the mean was -inf)
        per_view = logits.float().log_softmax(-1).unflatten(0, (clips.shape[0], views))
        return (per_view.logsumexp(1) - math.log(views)).to(logits.dtype)
