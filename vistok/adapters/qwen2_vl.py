"""What vistok relies on in Hugging Face's Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``, transformers 5.x), all in one place:

* ``pixel_values`` is the processor's flat patch list ``[P, C * t * p * p]`` and ``image_grid_thw`` ``[I, 3]``
  each image's (t, h, w) patch grid; ``model.model.get_image_features(pixel_values, image_grid_thw)`` returns a
  ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds one ``[t * h * w / m ** 2, D]`` tensor per image
  (``m = vision_config.spatial_merge_size``), row-major over the merged ``(h / m, w / m)`` grid; images have
  ``t = 1``. Images of one batch may differ in size, so each image gets its own budget.
* The prompt holds ``config.image_token_id`` once per feature, one run per image, marked 1 in
  ``mm_token_type_ids``.
* Positions are 3-D (temporal, height, width) rotary positions from ``model.model.get_rope_index(input_ids,
  mm_token_type_ids, image_grid_thw, video_grid_thw, [second_per_grid_ts,] attention_mask)`` -> ``([3, B, L],
  rope_deltas [B, 1])``; ``forward`` takes ``position_ids`` ``[3, B, L]`` as given, ``generate`` too, and
  continues each row by one per new token; with a cache and no ``position_ids``, ``forward`` continues from
  ``model.model.rope_deltas``.
* The vision tower has no class token: ``dominant`` is refused. Videos (``pixel_values_videos``) pass through
  uncompressed.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..errors import InputShapeError, InvalidConfigError, UnsupportedModelError
from .family import Units, VisionLLMFamily

__all__ = ["Qwen2VLFamily"]


@dataclass(frozen=True)
class Qwen2VLFamily(VisionLLMFamily):
    class_names = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    encodes_up_front = True
    positions_follow_tokens = True
    position_modes = ("original",)
    compressed = {"image": ("pixel_values", "image_grid_thw")}

    merge: int = 2

    @classmethod
    def inspect(cls, model: nn.Module) -> Qwen2VLFamily:
        config = model.config
        merge = config.vision_config.spatial_merge_size
        if not hasattr(model.model, "get_rope_index"):
            raise UnsupportedModelError(f"{type(model).__name__} has no get_rope_index: not the Qwen2-VL vistok knows")
        pad_id = getattr(config.text_config, "pad_token_id", None)
        # grid (0, 0): no grid for every image; each image's comes from the call (split)
        return cls(config.image_token_id, (0, 0), 0, False, 0 if pad_id is None else int(pad_id), merge)

    @staticmethod
    def tower(model: nn.Module) -> nn.Module:
        return model.model.visual

    def _grids(self, kwargs: dict[str, Any]) -> list[tuple[int, int]]:
        """Each image's token grid after the spatial merge, from ``image_grid_thw``."""
        grid_thw = kwargs.get("image_grid_thw")
        if grid_thw is None:
            raise InputShapeError("Qwen2-VL images need image_grid_thw (the processor returns it with pixel_values)")
        grids = []
        for t, h, w in grid_thw.tolist():
            if t != 1 or h % self.merge or w % self.merge:
                raise InputShapeError(f"image_grid_thw row {(t, h, w)}: vistok expects images (t = 1) whose patch "
                                      f"grid is a multiple of the spatial merge size {self.merge}")
            grids.append((h // self.merge, w // self.merge))
        return grids

    encoded_inputs = ("pixel_values", "pixel_values_videos")

    def other_encodings(self, base: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        if kwargs.get("pixel_values_videos") is None:
            return {}
        videos = type(base).get_video_features(base, kwargs["pixel_values_videos"], kwargs.get("video_grid_thw"),
                                               return_dict=True)
        return {"video": videos}

    def prompt_positions(self, base: nn.Module, input_ids: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """``[3, B, L]``: ``get_rope_index`` on the full prompt, with the call's grids, token types and mask."""
        if kwargs.get("mm_token_type_ids") is None:
            raise InvalidConfigError("Qwen2-VL numbers its positions from mm_token_type_ids (the processor returns "
                                     "it with input_ids); pass it with the images")
        accepted = inspect.signature(type(base).get_rope_index).parameters
        args = {name: kwargs[name] for name in accepted
                if name not in ("self", "input_ids", "kwargs") and kwargs.get(name) is not None}
        positions, _ = type(base).get_rope_index(base, input_ids, **args)
        return positions

    def encode(self, base: nn.Module, modality: str, kwargs: dict[str, Any]) -> Any:
        self._grids(kwargs)  # checked before the tower runs
        return super().encode(base, modality, kwargs)

    def split(self, base: nn.Module, modality: str, out: Any, kwargs: dict[str, Any]) -> Units:
        features = list(out.pooler_output)
        grids = self._grids(kwargs)
        for feature, (rows, cols) in zip(features, grids, strict=True):
            if feature.shape[0] != rows * cols:
                raise InputShapeError(f"the vision tower gave {feature.shape[0]} features for an image of a "
                                      f"{rows} x {cols} token grid")
        return Units(features, grids, [[index] for index in range(len(features))])

    def join(self, base: nn.Module, modality: str, out: Any, units: Units, compressed: list[Tensor]) -> None:
        out.pooler_output = tuple(compressed)
