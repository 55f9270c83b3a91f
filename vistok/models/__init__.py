"""Architectures vistok provides, registered in timm's registry on import (``timm.create_model(name)``)."""

from .clip import CLIP_NAME, create_clip
from .reference import (
    REFERENCE_ARCH,
    REFERENCE_REG4_ARCH,
    CheckpointError,
    load_checkpoint,
    reference_checkpoint,
    vistok_vit_fmnist,
    vistok_vit_fmnist_reg4,
)
from .reference_vlm import (
    FINE_PLAIN_VLM_NAME,
    FINE_VLM_NAME,
    PAGE_VLM_NAME,
    VIDEO_VLM_NAME,
    VLM_NAME,
    create_fine_plain_vlm,
    create_fine_vlm,
    create_page_vlm,
    create_reference_vlm,
    create_video_vlm,
    refuse_variant_flags,
)
from .stvit import STViT, STViTBlock, SuperTokenAttention, stvit_base, stvit_small
from .video_vit import TubeletEmbed, inflate_to_video, resample_num_frames

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
    "resample_num_frames",
    "create_vlm",
    "create_clip",
    "CLIP_NAME",
    "create_reference_vlm",
    "VLM_NAME",
    "VIDEO_VLM_NAME",
    "create_video_vlm",
    "PAGE_VLM_NAME",
    "create_page_vlm",
    "FINE_VLM_NAME",
    "create_fine_vlm",
    "FINE_PLAIN_VLM_NAME",
    "create_fine_plain_vlm",
]

_VLMS = {VLM_NAME: create_reference_vlm, VIDEO_VLM_NAME: create_video_vlm, PAGE_VLM_NAME: create_page_vlm,
         FINE_VLM_NAME: create_fine_vlm, FINE_PLAIN_VLM_NAME: create_fine_plain_vlm}


def create_vlm(name: str, pretrained: bool = False, **kwargs):
    """``(model, tokenizer)`` of a vision-LLM vistok ships, by name (``"vistok_vlm_fmnist"``), like
    ``timm.create_model`` for its ViTs.

    Raises:
        CheckpointError: ``name`` is not one of them (the message lists them).
        InvalidConfigError: a variant flag (``video``, ``page``, ``fine``) among ``kwargs``: the name picks the
            variant.
    """
    if name not in _VLMS:
        raise CheckpointError(f"unknown vision-LLM {name!r}; vistok ships {sorted(_VLMS)}")
    refuse_variant_flags(name, kwargs)
    return _VLMS[name](pretrained=pretrained, **kwargs)
