"""What a vision-LLM family must tell vistok's boundary, as one small interface; each family's facts live in
its own module (:mod:`.llava`, :mod:`.idefics3`). A *unit* is what one budget applies to: an image for LLaVA,
a tile for Idefics3 / SmolVLM."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from ..errors import InvalidConfigError
from ..tokens import TokenLayout

__all__ = ["VisionLLMFamily"]


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
    # units of different grids (one budget each), and the language model's positions follow each kept token
    # (Qwen2-VL's 3-D rotary positions): the prompt is shortened after encoding, with the positions
    positions_follow_tokens: ClassVar[bool] = False

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

    @abstractmethod
    def prepare_call(self, base: nn.Module, kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """The arguments for the model's own ``get_image_features`` (checked), and what :meth:`class_attention`
        will need to know about the call."""

    @abstractmethod
    def unit_features(self, out: Any) -> tuple[Tensor, Any]:
        """``[U, per_unit, D]`` features of every unit from the encoder output, and how they group into the
        output's ``pooler_output`` (for :meth:`put_features`)."""

    @abstractmethod
    def put_features(self, out: Any, tokens: Tensor, grouping: Any) -> None:
        """Write the compressed ``[U, T, D]`` into ``out.pooler_output``, grouped as the model expects."""

    def count_units(self, pixel_values: Tensor) -> int:
        """How many units ``pixel_values`` holds (as the model will count them); families of one grid."""
        raise NotImplementedError(f"{type(self).__name__} reads its units' grids from the call (unit_grids)")

    def unit_grids(self, kwargs: dict[str, Any]) -> list[tuple[int, int]]:
        """The patch grid of each unit in a call with images (``kwargs["pixel_values"]``)."""
        return [self.grid] * self.count_units(kwargs["pixel_values"])

    # the inputs that go in encoded (``mm_encoder_outputs``) when the images do (``positions_follow_tokens``)
    encoded_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)

    def other_encodings(self, base: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's other modalities encoded by the model's own encoders, unchanged (``mm_encoder_outputs``
        entries), for a call whose images vistok encodes before the forward."""
        return {}

    def prompt_positions(self, base: nn.Module, input_ids: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """The model's own positions of the full prompt (``positions_follow_tokens`` families)."""
        raise NotImplementedError(f"{type(self).__name__}'s positions do not follow the kept tokens")

    def class_attention(self, base: nn.Module, out: Any, context: Any) -> Tensor:
        """``[U, N]``: the class token's attention over each unit's patches at the feature layer."""
        raise InvalidConfigError(f"dominant needs a class token; the {self.class_names[0]} tower has none (use "
                                 "merge_to_budget, pool or random_select)")
