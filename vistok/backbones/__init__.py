"""Model families vistok can patch, and :func:`resolve_backbone` to find the one a model belongs to.

A family is considered only if its library is already imported: a model built by a library implies the
library was imported, and vistok need not import transformers to patch a timm model.
"""

from __future__ import annotations

import importlib
import sys

from torch import nn

from ..errors import UnsupportedModelError
from .base import Backbone, BackboneInfo, BlockOps

__all__ = ["Backbone", "BackboneInfo", "BlockOps", "resolve_backbone", "families", "supported_model_classes"]

_FAMILY_MODULES = {
    "timm": ("timm", ["TimmViT", "TimmEva"]),
    "open_clip": ("open_clip", ["OpenClipViT"]),
    "hf": ("transformers", ["HFVisionTower"]),
    "hf_video": ("transformers", ["HFVideoTower"]),
}


def families() -> list[type[Backbone]]:
    """The backbone classes whose library has been imported."""
    found = []
    for module_name, (library, classes) in _FAMILY_MODULES.items():
        if library not in sys.modules:
            continue
        module = importlib.import_module(f"{__name__}.{module_name}")
        found.extend(getattr(module, name) for name in classes)
    return found


def supported_model_classes() -> list[str]:
    """Fully qualified names of the model classes vistok accepts (of the imported libraries)."""
    return [f"{cls.__module__}.{cls.__name__}" for family in families() for cls in family.model_classes]


def resolve_backbone(model: nn.Module) -> Backbone:
    """The backbone adapter for ``model`` (a vision transformer, or a CLIP-style model whose image tower is
    one), after checking every part vistok relies on.

    Raises:
        UnsupportedModelError: the model's class is not supported, or one of its parts is unknown.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"vistok patches torch.nn.Module models, got {type(model).__name__}")
    known = families()
    tower = model
    for _ in range(4):  # CLIP -> visual tower -> timm trunk, at most a few levels deep
        inner = next((found for family in known if (found := family.unwrap(tower)) is not None), None)
        if inner is None:
            break
        tower = inner
    for family in known:
        if type(tower) in family.model_classes:
            return family(tower)
    what = type(model).__name__ if tower is model else f"{type(model).__name__} (tower {type(tower).__name__})"
    raise UnsupportedModelError(
        f"vistok cannot patch {what}: it is not a supported vision transformer. Supported classes: "
        f"{', '.join(supported_model_classes())}")
