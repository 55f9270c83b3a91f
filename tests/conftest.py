import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

# One entry per supported timm family: (model name, create_model kwargs). Random init, no downloads.
# DINOv2 is built at 224 px instead of 518 to keep the suite fast; the family (registers + LayerScale) is
# the same.
FAMILIES = {
    "vit": ("vit_small_patch16_224", {}),
    "deit_distilled": ("deit_small_distilled_patch16_224", {}),
    "deit3_layerscale": ("deit3_small_patch16_224", {}),
    "dinov2_registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 224}),
    "gap_registers": ("vit_base_patch16_reg4_gap_256", {}),
    "siglip_map": ("vit_base_patch16_siglip_224", {}),
    "qk_norm": ("vit_small_patch16_224", {"qk_norm": True}),
    "eva02_rope": ("eva02_tiny_patch14_224", {}),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", {}),
}


def make_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    name, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **{**kwargs, **overrides}).eval()


def make_images(model: torch.nn.Module, batch: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=generator)


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param
