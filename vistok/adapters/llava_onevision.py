"""What vistok relies on in Hugging Face's LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``,
transformers 5.x), all in one place:

* Images: ``pixel_values`` ``[I, P, 3, S, S]`` (each image's base view and AnyRes crops, padded), ``image_sizes``
  ``[I, 2]`` and, in prompts with several images, ``batch_num_images`` (those images get the base view only).
  ``model.model.get_image_features(pixel_values, image_sizes, vision_feature_layer, vision_feature_select_strategy,
  batch_num_images)`` returns a ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds one ``[L_i, D]`` per
  image: the base view's ``side ** 2`` features (row-major), then, for an image with crops, the crops' grid
  (unpadded to the image's aspect ratio, bilinearly shrunk past ``anyres_max_9``) as ``H`` rows of ``W`` features,
  each row followed by ``model.model.image_newline``; an image without crops ends with one ``image_newline``.
* Videos: ``pixel_values_videos`` ``[B, F, 3, S, S]``; ``get_video_features(pixel_values_videos,
  vision_feature_layer, vision_feature_select_strategy)``'s ``pooler_output`` is ``[B, F * p ** 2 + 1, D]``: each
  frame's features pooled (bilinear, ``model.model.apply_pooling``) to ``p = ceil(side / 2)`` on a side, then one
  ``image_newline``.
* The prompt holds ``config.image_token_id`` once per image feature (one run per image) and
  ``config.video_token_id`` once per video feature (one run per video); ``forward`` and ``generate`` accept the
  encoders' outputs as ``mm_encoder_outputs``; positions are 1-D and numbered as on LLaVA (:mod:`.llava`), which
  ``positions="original"`` relies on.
* For ``dominant`` (a CLIP tower, ``vision_feature_select_strategy="default"``): the tower runs once per view and
  crop; ``image_size_to_num_patches`` (of the model's module) gives each image's count, as ``get_image_features``
  computes it, and ``model.model.pack_image_features`` (with no newline) lays their class-attention scores out as
  it lays out the features.

vistok's units are each image's base view and its crop grid (the newlines are not tokens of the image: a
compressed image keeps one, at its end, as an image without crops has), and each video frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputShapeError, InvalidConfigError, UnsupportedModelError
from .family import Units, VisionLLMFamily
from .llava import class_attention

__all__ = ["LlavaOnevisionFamily"]


@dataclass(frozen=True)
class LlavaOnevisionFamily(VisionLLMFamily):
    class_names = ("LlavaOnevisionForConditionalGeneration",)
    ranks_without_class_token = True
    encodes_up_front = True
    position_modes = ("compact", "original")
    has_crop_grids = True  # an image's AnyRes crop grid is one unit
    compressed = {
        "image": ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy",
                  "batch_num_images"),
        "video": ("pixel_values_videos", "vision_feature_layer", "vision_feature_select_strategy"),
    }
    encoded_inputs = ("pixel_values", "pixel_values_videos")

    video_placeholder_id: int = -1

    @classmethod
    def inspect(cls, model: nn.Module) -> LlavaOnevisionFamily:
        from transformers import CLIPVisionModel, SiglipVisionModel

        config = model.config
        tower = model.model.vision_tower
        if type(tower) not in (CLIPVisionModel, SiglipVisionModel):
            raise UnsupportedModelError(f"{type(model).__name__} with a {type(tower).__name__} vision tower: vistok "
                                        "compresses LLaVA-OneVision with a CLIPVisionModel or SiglipVisionModel tower")
        has_class_token = type(tower) is CLIPVisionModel
        strategy = config.vision_feature_select_strategy
        if strategy != ("default" if has_class_token else "full"):
            raise UnsupportedModelError(
                f"{type(model).__name__} with a {type(tower).__name__} tower and vision_feature_select_strategy="
                f"{strategy!r}: its features are not a patch grid (vistok takes 'default' with a CLIP tower, which "
                "drops the class token, and 'full' with SigLIP, which has none)")
        vision = config.vision_config
        side = vision.image_size // vision.patch_size  # the pixels past the last whole patch go unread (384 / 14)
        pad_id = getattr(config.text_config, "pad_token_id", None)
        return cls(config.image_token_id, (side, side), 0, has_class_token, 0 if pad_id is None else int(pad_id),
                   config.video_token_id)

    @staticmethod
    def tower(model: nn.Module) -> nn.Module:
        return model.model.vision_tower

    def placeholder(self, modality: str) -> int:
        return self.video_placeholder_id if modality == "video" else self.placeholder_id

    def item_lengths(self, modality: str, out: Any) -> list[int]:
        if modality == "video":
            return [out.pooler_output.shape[1]] * out.pooler_output.shape[0]
        return super().item_lengths(modality, out)

    def split(self, base: nn.Module, modality: str, out: Any, kwargs: dict[str, Any]) -> Units:
        if modality == "video":
            return self._split_videos(out.pooler_output, kwargs["pixel_values_videos"].shape[1])
        features: list[Tensor] = []
        grids: list[tuple[int, int]] = []
        items: list[list[int]] = []
        view = self.grid[0] * self.grid[1]
        for index, image in enumerate(out.pooler_output):
            is_newline = (image[view:] == base.image_newline.to(image)).all(dim=-1)
            crops = _crop_grid(is_newline)
            if image.shape[0] <= view or crops is None:
                raise InputShapeError(f"image {index} has {image.shape[0]} features: not the {view} of a "
                                      f"{self.grid[0]} x {self.grid[1]} base view followed by image_newline-ended "
                                      "rows (is vision_feature_select_strategy the config's?)")
            items.append(list(range(len(features), len(features) + 1 + (crops[0] > 0))))
            features.append(image[:view])
            grids.append(self.grid)
            if crops[0]:
                rows, cols = crops
                features.append(image[view:].reshape(rows, cols + 1, -1)[:, :cols].reshape(rows * cols, -1))
                grids.append(crops)
        return Units(features, grids, items)

    def _split_videos(self, pooled: Tensor, frames: int) -> Units:
        per_frame, extra = divmod(pooled.shape[1] - 1, frames)
        side = math.isqrt(per_frame)
        if extra or side * side != per_frame:
            raise InputShapeError(f"videos of {frames} frames gave {pooled.shape[1]} features each: not a square "
                                  "grid per frame and one image_newline")
        features = [frame for video in pooled for frame in video[:-1].split(per_frame)]
        items = [list(range(video * frames, (video + 1) * frames)) for video in range(pooled.shape[0])]
        return Units(features, [(side, side)] * len(features), items)

    def join(self, base: nn.Module, modality: str, out: Any, units: Units, compressed: list[Tensor]) -> None:
        joined = []
        for original, item in zip(out.pooler_output, units.items, strict=True):
            if all(compressed[u].shape[0] == units.features[u].shape[0] for u in item):
                joined.append(original)  # everything kept: the model's own layout, newlines and all
            else:  # the units' tokens, then the item's closing image_newline
                joined.append(torch.cat([*(compressed[u] for u in item), original[-1:]]))
        out.pooler_output = torch.stack(joined) if modality == "video" else joined

    def unit_budgets(self, config: Any, modality: str, units: Units) -> list[int]:
        share = getattr(config, "global_share", None)  # correlation_guided's share of the base (global) view
        if modality == "video" or (config.tokens is None and share is None):  # per frame, or a fraction per view
            return super().unit_budgets(config, modality, units)
        budgets = [0] * len(units.features)
        for item in units.items:
            sizes = [units.features[u].shape[0] for u in item]
            total = config.budget(sum(sizes))  # tokens per image, split across its views by their patches
            if total < len(item):
                raise InvalidConfigError(f"{config.name}: tokens={config.tokens} cannot cover an image's "
                                         f"{len(item)} views (its base view and its crops): give at least {len(item)}")
            base_share = sizes[0] / sum(sizes) if share is None else share
            first = min(max(round(total * base_share), 1), total - len(item) + 1, sizes[0])
            first = max(first, total - sum(sizes[1:]))  # the crop grid cannot take more than it has
            shares = [first] + ([total - first] if len(item) > 1 else [])
            for unit, unit_budget in zip(item, shares, strict=True):
                budgets[unit] = unit_budget
        return budgets

    def kept_placeholders(self, modality: str, units: Units, first_patches: list[Tensor]) -> list[Tensor]:
        # an item's placeholders: its base view's, then its crop grid's rows each followed by a newline (without
        # crops: one newline), or its frames' one after another and one newline; a compressed item keeps the last
        kept = []
        for item in units.items:
            sizes = [units.features[unit].shape[0] for unit in item]
            crops = item[1] if modality == "image" and len(item) > 1 else None
            length = sum(sizes) + (units.grids[crops][0] if crops is not None else 1)
            device = first_patches[item[0]].device
            if all(first_patches[unit].shape[0] == size for unit, size in zip(item, sizes, strict=True)):
                kept.append(torch.arange(length, device=device))  # everything kept: the model's own layout
                continue
            offset, parts = 0, []
            for unit, size in zip(item, sizes, strict=True):
                first = first_patches[unit]
                if unit == crops:  # skip the newline after each row before it
                    first = first + first // units.grids[unit][1]
                parts.append(first + offset)
                offset += size
            parts.append(torch.tensor([length - 1], device=device))  # the closing newline
            kept.append(torch.cat(parts))
        return kept

    def unit_tile(self, modality: str, grid: tuple[int, int]) -> tuple[int, int] | None:
        # tiles of one view's size from the top-left of the crop grid: the model removes the padding of the crops
        # on both sides (and shrinks grids past anyres_max_9), so tile borders can sit off the crops' borders
        return self.grid if modality == "image" and grid != self.grid else None

    def unit_class_attention(self, base: nn.Module, modality: str, out: Any, units: Units, kwargs: dict[str, Any]
                             ) -> list[Tensor]:
        layer = kwargs.get("vision_feature_layer")
        scores = class_attention(base.vision_tower, out.hidden_states,
                                 base.config.vision_feature_layer if layer is None else layer,
                                 self.has_class_token)  # [passes, side ** 2]
        if modality == "video":
            return list(base.apply_pooling(scores[..., None])[..., 0])
        from transformers.models.llava_onevision import modeling_llava_onevision as upstream

        sizes = kwargs["image_sizes"]
        counts = kwargs.get("batch_num_images")
        with_crops = [True] * len(sizes) if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
        passes = [upstream.image_size_to_num_patches(size, base.config.image_grid_pinpoints,
                                                     base.config.vision_config.image_size) if crops else 1
                  for size, crops in zip(sizes, with_crops, strict=True)]
        packed, _ = base.pack_image_features(list(scores[..., None].split(passes)), sizes, image_newline=None,
                                             vision_aspect_ratio=base.config.vision_aspect_ratio)
        view = self.grid[0] * self.grid[1]
        attention: list[Tensor] = [None] * len(units.features)
        for image, item in zip(packed, units.items, strict=True):
            parts = (image[:view, 0], image[view:, 0])
            for unit, part in zip(item, parts, strict=False):
                if part.shape[0] != units.features[unit].shape[0]:
                    raise InputShapeError(f"class attention over {part.shape[0]} patches for a view of "
                                          f"{units.features[unit].shape[0]} features")
                attention[unit] = part
        return attention


def _crop_grid(is_newline: Tensor) -> tuple[int, int] | None:
    """``(rows, cols)`` of the crop grid from which positions after the base view are image_newline: ``(0, 0)``
    for a single closing newline (no crops), ``None`` if the layout is neither."""
    length, rows = is_newline.shape[0], int(is_newline.sum())
    if rows == 0 or length % rows:
        return None
    width = length // rows
    if width == 1 and length > 1:
        return None
    expected = torch.zeros_like(is_newline)
    expected[width - 1:: width] = True
    if not torch.equal(is_newline, expected):
        return None
    return (0, 0) if length == 1 else (rows, width - 1)
