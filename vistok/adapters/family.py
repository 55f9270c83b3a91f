"""What a vision-LLM family must tell vistok's boundary, as one small interface; each family's facts live in
its own module (:mod:`.llava`, :mod:`.idefics3`, :mod:`.qwen2_vl`, :mod:`.llava_onevision`). A *unit* is what one
budget applies to: an image for LLaVA and Qwen2-VL, a tile for Idefics3 / SmolVLM, a view (the base image or its
crop grid) or a video frame for LLaVA-OneVision. An *item* is what one run of placeholders in the prompt holds:
an image or a video, made of one or more units.

Families whose units differ in size (``encodes_up_front``) are encoded before the language model runs, so the
prompt can be shortened to what each item became: :meth:`VisionLLMFamily.split` cuts the encoder's output into
units, :meth:`VisionLLMFamily.join` puts the compressed units back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import InvalidConfigError
from ..tokens import TokenLayout

__all__ = ["VisionLLMFamily", "Units"]


@dataclass(frozen=True)
class Units:
    """One modality of one call as the budget sees it: ``features[u]`` ``[rows * cols, D]``, row-major over
    ``grids[u]``; ``items[i]`` the indices of the units that the ``i``-th placeholder run (in prompt order) holds."""

    features: list[Tensor]
    grids: list[tuple[int, int]]
    items: list[list[int]]


@dataclass(frozen=True)
class VisionLLMFamily(ABC):
    """The facts about one vision-LLM that the boundary needs: the placeholder token, the unit's patch ``grid``
    after the projector, the class-token features in front of each unit (``num_prefix``), whether the tower has
    a class token, and the text model's padding id."""

    placeholder_id: int
    grid: tuple[int, int]
    num_prefix: int
    has_class_token: bool
    pad_id: int

    class_names: ClassVar[tuple[str, ...]]
    unit: ClassVar[str] = "image"
    # units of different grids (one budget each): encoded before the forward, the prompt shortened to match
    encodes_up_front: ClassVar[bool] = False
    # the language model's positions follow each kept token (Qwen2-VL's 3-D rotary positions)
    positions_follow_tokens: ClassVar[bool] = False
    # without a class token, dominant and correlation_guided rank patches by the attention each receives
    ranks_without_class_token: ClassVar[bool] = False
    # the BoundaryConfig.positions the family supports, its default first
    position_modes: ClassVar[tuple[str, ...]] = ("compact",)
    # encodes_up_front: the modalities compressed, and for each the call's arguments its encoder
    # (``get_<modality>_features``) takes, pixels first, as the model's forward passes them
    compressed: ClassVar[dict[str, tuple[str, ...]]] = {}

    @property
    def ranks_patches(self) -> bool:
        """Whether ``dominant`` and ``correlation_guided`` can rank this model's patches: by the class token's
        attention, or, on a tower without one (``ranks_without_class_token``), by the attention each receives."""
        return self.has_class_token or self.ranks_without_class_token

    @classmethod
    @abstractmethod
    def inspect(cls, model: nn.Module) -> VisionLLMFamily:
        """Read ``model``'s facts, refusing (UnsupportedModelError) what the boundary cannot handle correctly."""

    @property
    def per_unit(self) -> int:
        """Placeholders (features) per unit as the model makes them."""
        return self.num_prefix + self.grid[0] * self.grid[1]

    @staticmethod
    def base(model: nn.Module) -> nn.Module:
        """The module whose ``get_image_features`` ``forward`` and ``generate`` encode through."""
        return model.model

    @staticmethod
    @abstractmethod
    def tower(model: nn.Module) -> nn.Module:
        """The vision tower, where in-tower methods (a composition) are patched."""

    def feature_layout(self, tower_handle: Any, context: Any) -> TokenLayout | None:
        """The tower's token layout at the features the language model reads (after an in-tower method), or
        ``None`` when nothing was reduced before them."""
        raise InvalidConfigError(f"in-tower methods are not supported on {self.class_names[0]}")

    # families of one grid (not encodes_up_front): the call, the units, and back

    def prepare_call(self, base: nn.Module, kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """The arguments for the model's own ``get_image_features`` (checked), and what :meth:`class_attention`
        will need to know about the call."""
        return kwargs, None

    def unit_features(self, out: Any) -> tuple[Tensor, Any]:
        """``[U, per_unit, D]`` features of every unit from the encoder output, and how they group into the
        output's ``pooler_output`` (for :meth:`put_features`)."""
        raise NotImplementedError

    def put_features(self, out: Any, tokens: Tensor, grouping: Any) -> None:
        """Write the compressed ``[U, T, D]`` into ``out.pooler_output``, grouped as the model expects."""
        raise NotImplementedError

    def count_units(self, pixel_values: Tensor) -> int:
        """How many units ``pixel_values`` holds (as the model will count them); families of one grid."""
        raise NotImplementedError(f"{type(self).__name__} cuts its units from the encoder's output (split)")

    # the inputs that go in encoded (``mm_encoder_outputs``) when the images do (``encodes_up_front``)
    encoded_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)

    def other_encodings(self, base: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's other modalities encoded by the model's own encoders, unchanged (``mm_encoder_outputs``
        entries), for a call whose images vistok encodes before the forward."""
        return {}

    def placeholder(self, modality: str) -> int:
        """The prompt's placeholder id for ``modality``'s features."""
        return self.placeholder_id

    def encode(self, base: nn.Module, modality: str, kwargs: dict[str, Any]) -> Any:
        """``modality``'s encoder output for the call, by the model's own ``get_<modality>_features`` with the
        arguments the forward gives it (``compressed``); the hidden states too when ``kwargs`` asks for them."""
        names = self.compressed[modality]
        arguments = {name: kwargs[name] for name in names if kwargs.get(name) is not None}
        if kwargs.get("output_hidden_states"):
            arguments["output_hidden_states"] = True
        encoder = getattr(type(base), f"get_{modality}_features")
        return encoder(base, **arguments, return_dict=True)

    def split(self, base: nn.Module, modality: str, out: Any, kwargs: dict[str, Any]) -> Units:
        """``out`` (from :meth:`encode`) cut into units (``encodes_up_front`` families)."""
        raise NotImplementedError

    def join(self, base: nn.Module, modality: str, out: Any, units: Units, compressed: list[Tensor]) -> None:
        """Write the compressed units (``[T_u, D]`` each, in patch order) into ``out.pooler_output`` as the model
        reads it; an item whose units all kept everything stays exactly as the model made it."""
        raise NotImplementedError

    def item_lengths(self, modality: str, out: Any) -> list[int]:
        """The placeholders each item of ``out`` fills, in prompt order."""
        return [part.shape[0] for part in out.pooler_output]

    def kept_placeholders(self, modality: str, units: Units, first_patches: list[Tensor]) -> list[Tensor]:
        """Per item, the indices among its placeholders, as the model lays the item out, where the compressed
        item's features sit: each kept token at the first patch it carries (``first_patches[u]`` ``[T_u]``, in
        patch order), so that positions follow the tokens. By default an item is its units one after another."""
        kept = []
        for item in units.items:
            offset, parts = 0, []
            for unit in item:
                parts.append(first_patches[unit] + offset)
                offset += units.features[unit].shape[0]
            kept.append(torch.cat(parts))
        return kept

    def unit_budgets(self, config: Any, modality: str, units: Units) -> list[int]:
        """The tokens each unit keeps under ``config`` (a :class:`~vistok.adapters.BoundaryConfig`): its budget
        of the unit's patches."""
        return [config.budget(rows * cols) for rows, cols in units.grids]

    def unit_tile(self, modality: str, grid: tuple[int, int]) -> tuple[int, int] | None:
        """One crop's patch grid when a unit of ``grid`` is a grid of crops (``BoundaryInputs.tile``), else
        ``None``."""
        return None

    @property
    def has_crop_grids(self) -> bool:
        """Whether a unit can be a grid of crops (:meth:`unit_tile`): only there do per-crop and per-page choices
        (``correlation_guided``'s ``allocation`` and ``redundancy``) differ."""
        return False

    def unit_class_attention(self, base: nn.Module, modality: str, out: Any, units: Units, kwargs: dict[str, Any]
                             ) -> list[Tensor]:
        """``[rows * cols]`` per unit: the class token's attention over the unit's patches, or the attention each
        receives (``ranks_without_class_token``) (``encodes_up_front`` families that :attr:`ranks_patches`)."""
        raise InvalidConfigError(f"ranking patches needs a class token; the {self.class_names[0]} tower has none "
                                 "(use merge_to_budget, region_merge, pool or random_select)")

    def prompt_positions(self, base: nn.Module, input_ids: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """The model's own positions of the full prompt (``positions_follow_tokens`` families)."""
        raise NotImplementedError(f"{type(self).__name__}'s positions do not follow the kept tokens")

    def class_attention(self, base: nn.Module, out: Any, context: Any) -> Tensor:
        """``[U, N]``: the class token's attention over each unit's patches at the feature layer, or the attention
        each receives (``ranks_without_class_token``)."""
        raise InvalidConfigError(f"ranking patches needs a class token; the {self.class_names[0]} tower has none "
                                 "(use merge_to_budget, region_merge, pool or random_select)")
