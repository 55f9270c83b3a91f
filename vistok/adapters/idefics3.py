"""What vistok relies on in Hugging Face's Idefics3 (``Idefics3ForConditionalGeneration``; SmolVLM is the same
architecture), transformers 5.x, all in one place:

* The processor cuts each image into tiles (plus a global view); ``pixel_values`` is ``[B, I, 3, S, S]`` with
  all-zero tiles as padding, which ``model.model.get_image_features(pixel_values, pixel_attention_mask)`` drops.
* Each real tile gives ``(S / patch_size / scale_factor) ** 2`` features after the connector's pixel shuffle,
  laid out row-major on that grid; ``pooler_output`` holds one ``[tiles_of_row * N, D]`` tensor per batch row.
* The prompt holds ``config.image_token_id`` once per feature, in one run per tile (between
  ``<fake_token_around_image>`` and the tile's row/col markers), so the budget applies per tile.
* ``forward`` and ``generate`` encode through the instance's ``get_image_features`` and accept its output as
  ``mm_encoder_outputs={"image": ...}``.
* Positions are 1-D and numbered as on LLaVA (:mod:`.llava`): ``forward`` takes ``position_ids`` as given, else
  ``arange`` from the cache's length; ``generate`` counts them over ``attention_mask`` and continues from the last
  given (what ``positions="original"`` relies on).
* The SigLIP-style tower has no class token: ``dominant`` is refused.
* SmolVLM (``SmolVLMForConditionalGeneration``) is the same, except that a batch of blank tiles still encodes its
  first tile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputShapeError, UnsupportedModelError
from .family import VisionLLMFamily

__all__ = ["Idefics3Family", "SmolVLMFamily"]


@dataclass(frozen=True)
class Idefics3Family(VisionLLMFamily):
    class_names = ("Idefics3ForConditionalGeneration",)
    unit = "tile"
    position_modes = ("compact", "original")

    @classmethod
    def inspect(cls, model: nn.Module) -> Idefics3Family:
        config = model.config
        vision = config.vision_config
        patches = vision.image_size // vision.patch_size  # the pixels past the last whole patch go unread (384 / 14)
        if patches % config.scale_factor:
            raise UnsupportedModelError(f"{type(model).__name__}: a tile's {patches} x {patches} patches (tile size "
                                        f"{vision.image_size}, patch_size {vision.patch_size}) do not divide by "
                                        f"scale_factor {config.scale_factor}, which its pixel shuffle needs")
        side = patches // config.scale_factor
        pad_id = getattr(config.text_config, "pad_token_id", None)
        return cls(config.image_token_id, (side, side), 0, False, 0 if pad_id is None else int(pad_id))

    @staticmethod
    def tower(model: nn.Module) -> nn.Module:
        return model.model.vision_model

    def prepare_call(self, base: nn.Module, kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        pixel_values, size = kwargs.get("pixel_values"), base.config.vision_config.image_size
        if isinstance(pixel_values, Tensor) and tuple(pixel_values.shape[-2:]) != (size, size):
            raise InputShapeError(f"{type(base).__name__}: tiles must be {size} x {size} pixels (the tower's "
                                  "image_size, as the processor cuts them), got "
                                  f"{pixel_values.shape[-2]} x {pixel_values.shape[-1]}: the tower would give "
                                  f"another number of features than the {self.per_unit} per tile vistok splits by")
        return kwargs, None

    def unit_features(self, out: Any) -> tuple[Tensor, Any]:
        rows = list(out.pooler_output)
        width = self.per_unit
        for index, row in enumerate(rows):
            if row.shape[0] % width:
                raise InputShapeError(f"row {index} has {row.shape[0]} image features, not whole tiles of {width}")
        tiles = [row.shape[0] // width for row in rows]
        return torch.cat(rows).reshape(sum(tiles), width, -1), tiles

    def put_features(self, out: Any, tokens: Tensor, grouping: Any) -> None:
        out.pooler_output = [part.reshape(-1, tokens.shape[-1]) for part in tokens.split(grouping)]

    def count_units(self, pixel_values: Tensor) -> int:
        if pixel_values.dim() != 5:
            raise InputShapeError(f"Idefics3 pixel_values must be [B, I, 3, H, W], got {tuple(pixel_values.shape)}")
        tiles = pixel_values.flatten(0, 1).flatten(1)
        return int((tiles != 0).any(dim=1).sum())  # all-zero tiles are padding, as the model counts them


@dataclass(frozen=True)
class SmolVLMFamily(Idefics3Family):
    """SmolVLM: Idefics3's architecture; when every tile of a batch is blank it still encodes the first one."""

    class_names = ("SmolVLMForConditionalGeneration",)

    def count_units(self, pixel_values: Tensor) -> int:
        return max(super().count_units(pixel_values), 1) if pixel_values.numel() else 0
