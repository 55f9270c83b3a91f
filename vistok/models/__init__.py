"""Architectures vistok provides, registered in timm's registry on import (``timm.create_model(name)``)."""

from .reference import REFERENCE_ARCH, CheckpointError, load_checkpoint, reference_checkpoint, vistok_vit_fmnist
from .stvit import STViT, STViTBlock, SuperTokenAttention, stvit_base, stvit_small

__all__ = [
    "STViT",
    "STViTBlock",
    "SuperTokenAttention",
    "stvit_small",
    "stvit_base",
    "vistok_vit_fmnist",
    "REFERENCE_ARCH",
    "CheckpointError",
    "load_checkpoint",
    "reference_checkpoint",
]
