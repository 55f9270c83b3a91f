"""Model families vistok can patch, and :func:`resolve_backbone` to find the one a model belongs to."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import Backbone, BackboneInfo, BlockOps
from .timm import TimmEva, TimmViT

__all__ = ["Backbone", "BackboneInfo", "BlockOps", "resolve_backbone", "supported_model_classes"]

_FAMILIES: list[type] = [TimmViT, TimmEva]


def supported_model_classes() -> list[str]:
    """Fully qualified names of the model classes vistok accepts."""
    return [f"{cls.__module__}.{cls.__name__}" for family in _FAMILIES for cls in family.model_classes]


def resolve_backbone(model: nn.Module) -> Backbone:
    """The backbone adapter for ``model``, after checking every part vistok relies on.

    Raises:
        UnsupportedModelError: the model's class is not supported, or one of its parts is unknown.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"vistok patches torch.nn.Module models, got {type(model).__name__}")
    for family in _FAMILIES:
        if type(model) in family.model_classes:
            return family(model)
    raise UnsupportedModelError(
        f"vistok cannot patch {type(model).__module__}.{type(model).__name__}: it is not a supported vision "
        f"transformer. Supported classes: {', '.join(supported_model_classes())}")
