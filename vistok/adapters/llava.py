"""What vistok relies on in Hugging Face's LLaVA (``LlavaForConditionalGeneration``, transformers 5.x), all in one
place:

* ``model.model.get_image_features(pixel_values, vision_feature_layer, vision_feature_select_strategy, ...)``
  returns a ``BaseModelOutputWithPooling`` whose ``pooler_output`` is one ``[N, D]`` feature tensor per image and
  whose ``hidden_states`` are the tower's (only the feature layer's unless ``output_hidden_states=True``);
  ``forward`` and ``generate`` both call it through the instance (``generate`` via ``self.base_model``) and
  accept its output as ``mm_encoder_outputs={"image": ...}``.
* ``pixel_values`` is ``[I, 3, H, W]``, one row per image.
* The prompt holds ``config.image_token_id`` once per feature: ``N = (image_size / patch_size) ** 2`` per image
  with ``vision_feature_select_strategy="default"`` (the first token, CLIP's class token, dropped), one more with
  ``"full"``.
* ``forward`` takes ``position_ids`` ``[B, L]`` as given; without them its language model numbers the prompt from
  the cache's length on (``arange``), while ``generate`` counts them over ``attention_mask`` (0 on padding) and
  continues each row by one per new token from the last it was given (what ``positions="original"`` relies on).
* The vision tower is a ``CLIPVisionModel`` (a class token) or a ``SiglipVisionModel`` (none); its encoder layers
  have ``layer_norm1`` and ``self_attn.q_proj`` / ``k_proj`` with ``num_heads``. vistok's reference VLM uses its
  own ``ReferenceVisionTower`` (a timm ViT returning the same outputs, with a class token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InvalidConfigError, UnsupportedModelError
from ..ops.attention import class_token_attention, received_attention
from ..tokens import TokenLayout
from .family import VisionLLMFamily

__all__ = ["LlavaFamily", "class_attention"]


@dataclass(frozen=True)
class LlavaFamily(VisionLLMFamily):
    """``crop_tile``: one crop's token grid when the tower lays an image out as a grid of crops (vistok's
    ``ReferenceVisionTower`` with several crops says so); ``None`` for CLIP and SigLIP towers (one view)."""

    crop_tile: tuple[int, int] | None = None

    class_names = ("LlavaForConditionalGeneration",)
    position_modes = ("compact", "original")
    ranks_without_class_token = True

    @classmethod
    def inspect(cls, model: nn.Module) -> LlavaFamily:
        from transformers import CLIPVisionModel, SiglipVisionModel

        from ..models.reference_vlm import ReferenceVisionTower

        config = model.config
        tower = model.model.vision_tower
        if type(tower) not in (CLIPVisionModel, SiglipVisionModel, ReferenceVisionTower):
            raise UnsupportedModelError(f"{type(model).__name__} with a {type(tower).__name__} vision tower: vistok "
                                        "compresses LLaVA with a CLIPVisionModel or SiglipVisionModel tower (or "
                                        "vistok's ReferenceVisionTower)")
        strategy = config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise UnsupportedModelError(f"vision_feature_select_strategy={strategy!r} is not LLaVA's default or full")
        vision = config.vision_config
        side = vision.image_size // vision.patch_size  # the pixels past the last whole patch go unread (384 / 14)
        has_class_token = not isinstance(tower, SiglipVisionModel)
        if not has_class_token and strategy == "default":
            raise UnsupportedModelError(
                f"{type(model).__name__} drops the first feature of its {type(tower).__name__} tower "
                "(vision_feature_select_strategy='default') although that tower has no class token, so its features "
                "are not a patch grid; vistok compresses SigLIP towers with vision_feature_select_strategy='full'")
        pad_id = getattr(config.text_config, "pad_token_id", None)
        return cls(config.image_token_id, (side, side), int(strategy == "full" and has_class_token), has_class_token,
                   0 if pad_id is None else int(pad_id), getattr(tower, "crop_tile", None))

    @staticmethod
    def tower(model: nn.Module) -> nn.Module:
        return model.model.vision_tower

    def unit_tile(self, modality: str, grid: tuple[int, int]) -> tuple[int, int] | None:
        return self.crop_tile

    @property
    def has_crop_grids(self) -> bool:
        return self.crop_tile is not None

    def feature_layout(self, tower_handle: Any, context: Any) -> TokenLayout | None:
        if isinstance(context, (list, tuple)):
            raise InvalidConfigError("in-tower methods with several feature layers (vision_feature_layer as a list) "
                                     "would concatenate layers of different token counts")
        block = context % (tower_handle.info.num_blocks + 1) - 1  # hidden_states[f] comes out of layer f - 1
        return tower_handle.layouts.get(block)

    def prepare_call(self, base: nn.Module, kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        if kwargs.get("image_sizes") is not None:
            raise InvalidConfigError("image_sizes (images of several sizes) is not supported by vistok's LLaVA "
                                     "boundary: resize the images to the tower's size")
        strategy = kwargs.get("vision_feature_select_strategy")
        if strategy not in (None, base.config.vision_feature_select_strategy):
            raise InvalidConfigError(f"vision_feature_select_strategy={strategy!r} differs from the config's, which "
                                     "vistok's budget was set for")
        layer = kwargs.get("vision_feature_layer")
        return kwargs, base.config.vision_feature_layer if layer is None else layer

    def unit_features(self, out: Any) -> tuple[Tensor, Any]:
        return torch.stack(list(out.pooler_output)), None

    def put_features(self, out: Any, tokens: Tensor, grouping: Any) -> None:
        out.pooler_output = list(tokens)

    def count_units(self, pixel_values: Tensor) -> int:
        return pixel_values.shape[0]

    def class_attention(self, base: nn.Module, out: Any, context: Any) -> Tensor:
        tower = base.vision_tower
        if hasattr(tower, "class_attention"):  # vistok's ReferenceVisionTower computes its own
            return tower.class_attention(out.hidden_states, context)
        return class_attention(tower, out.hidden_states, context, self.has_class_token)


def producing_layer(feature_layer: int | list[int], num_states: int) -> int:
    """The encoder layer whose output is ``hidden_states[feature_layer]`` (of ``num_states``; with several feature
    layers, the last one's): ``hidden_states[i]`` is the input of layer ``i``.

    Raises:
        InvalidConfigError: the features are the embeddings (layer 0), which no layer attended to.
    """
    layer_index = feature_layer[-1] if isinstance(feature_layer, (list, tuple)) else feature_layer
    produced_by = layer_index % num_states - 1
    if produced_by < 0:
        raise InvalidConfigError("dominant: the features are the embeddings (vision_feature_layer=0); no layer "
                                 "attended to them")
    return produced_by


def class_attention(tower: nn.Module, hidden_states: tuple[Tensor, ...], feature_layer: int | list[int],
                    has_class_token: bool = True) -> Tensor:
    """``[B, N]``: the class token's attention over the patch tokens in the layer that produced the features
    (heads averaged, softmax over every token as the layer computes it); VisionZip's dominance score. Without a
    class token (SigLIP) the attention each token receives there, averaged over every query and head (vistok's
    choice: VisionZip's released code reads CLIP's class token only).

    ``hidden_states[i]`` is the input of encoder layer ``i``, so the features ``hidden_states[f]`` come out of
    layer ``f - 1``, which attended over ``hidden_states[f - 1]``. With several feature layers, the last one's.
    """
    produced_by = producing_layer(feature_layer, len(hidden_states))
    layer = tower.encoder.layers[produced_by]
    attention = layer.self_attn
    h = layer.layer_norm1(hidden_states[produced_by])
    batch, n, _ = h.shape
    heads = attention.num_heads
    keys = attention.k_proj(h).reshape(batch, n, heads, -1).transpose(1, 2)
    if not has_class_token:
        return received_attention(attention.q_proj(h).reshape(batch, n, heads, -1).transpose(1, 2), keys)
    query = attention.q_proj(h[:, :1]).reshape(batch, 1, heads, -1).transpose(1, 2)
    return class_token_attention(query, keys, prefix=1)
