"""Architectures vistok provides, registered in timm's registry on import (``timm.create_model(name)``)."""

from .reference import (
    REFERENCE_ARCH,
    REFERENCE_REG4_ARCH,
    CheckpointError,
    load_checkpoint,
    reference_checkpoint,
    vistok_vit_fmnist,
    vistok_vit_fmnist_reg4,
)
from .stvit import STViT, STViTBlock, SuperTokenAttention, stvit_base, stvit_small
from .video_vit import TubeletEmbed, inflate_to_video

__all__ = [
    "STViT",
    "STViTBlock",
    "SuperTokenAttention",
    "stvit_small",
    "stvit_base",
    "vistok_vit_fmnist",
    "vistok_vit_fmnist_reg4",
    "REFERENCE_ARCH",
    "REFERENCE_REG4_ARCH",
    "CheckpointError",
    "load_checkpoint",
    "reference_checkpoint",
    "TubeletEmbed",
    "inflate_to_video",
]
