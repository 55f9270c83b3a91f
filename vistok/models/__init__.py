"""Architectures vistok provides, registered in timm's registry on import (``timm.create_model(name)``)."""

from .stvit import STViT, STViTBlock, SuperTokenAttention, stvit_base, stvit_small

__all__ = ["STViT", "STViTBlock", "SuperTokenAttention", "stvit_small", "stvit_base"]
