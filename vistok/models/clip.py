"""vistok's reference CLIP: a small open_clip model (open_clip's own ``CLIP`` class, config and tokenizer)
trained contrastively on Fashion-MNIST images with captions (``tools/train_clip.py``), so that image-text
similarity (training-free frame selection for video QA) runs on a real dual encoder with no download.

>>> model, tokenizer = vistok.models.create_clip("vistok_clip_fmnist", pretrained=True)
>>> model.encode_image(images), model.encode_text(tokenizer(["a photo of a bag"]))

``images`` are ``[B, 3, 28, 28]``: Fashion-MNIST's grey image repeated over three channels, normalised with its
mean and std (:func:`clip_images`); ``model.visual.preprocess_cfg`` says so, so open_clip's own transform
(``image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)`` from ``open_clip.transform``)
on a grey 28 x 28 PIL image gives the same input. (``open_clip.create_model_and_transforms`` by name alone would give
OpenAI's normalisation: open_clip reads normalisation from pretrained tags, and this model has none.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from .reference import CheckpointError, reference_checkpoint

__all__ = ["CLIP_NAME", "CLIP_CONFIG", "CAPTION_TEMPLATES", "create_clip", "clip_images", "captions_for"]

CLIP_NAME = "vistok_clip_fmnist"
# its open_clip model config, next to this module: a 6-block ViT on 28 x 28 images in 4 x 4 patches (49 tokens and
# a class token), a 3-block text transformer over open_clip's BPE vocabulary, a 64-d joint embedding
CLIP_CONFIG = Path(__file__).resolve().parent / f"{CLIP_NAME}.json"
CAPTION_TEMPLATES = ("a photo of a {}", "a {}", "a black and white photo of a {}", "a picture of a {}",
                     "a small {}", "a {} on a black background", "there is a {}", "an image of a {}")


def captions_for(name: str) -> list[str]:
    """Every caption template filled with ``name`` (training draws one; zero-shot averages them)."""
    return [template.format(name) for template in CAPTION_TEMPLATES]


def clip_images(images: Tensor) -> Tensor:
    """``uint8`` ``[B, 28, 28]`` -> the model's input ``[B, 3, 28, 28]`` (normalised, grey over three channels)."""
    x = (images.float() / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return x[:, None].expand(-1, 3, -1, -1)


def _register() -> None:
    import open_clip

    if CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(CLIP_CONFIG)


def create_clip(name: str = CLIP_NAME, pretrained: bool = False):
    """``(model, tokenizer)``: the open_clip ``CLIP`` model ``name`` (``open_clip.create_model``) and its tokenizer;
    with ``pretrained=True`` the shipped weights (``models/vistok_clip_fmnist/model.safetensors``).

    Raises:
        CheckpointError: an unknown name, or missing weights.
    """
    import open_clip

    if name != CLIP_NAME:
        raise CheckpointError(f"unknown CLIP model {name!r}; vistok ships {CLIP_NAME!r}")
    _register()
    weights = str(reference_checkpoint(name)) if pretrained else None
    # Trained on Fashion-MNIST's normalisation (clip_images), not OpenAI's, which open_clip would otherwise record.
    model = open_clip.create_model(name, pretrained=weights, force_preprocess_cfg={
        "mean": (FASHION_MNIST_MEAN,) * 3, "std": (FASHION_MNIST_STD,) * 3})
    return model.eval(), open_clip.get_tokenizer(name)


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, names: list[str]) -> Tensor:
    """``[C, E]`` unit text embeddings per class: the mean over :data:`CAPTION_TEMPLATES`, normalised."""
    rows = []
    for name in names:
        embedded = model.encode_text(tokenizer(captions_for(name)), normalize=True).mean(dim=0)
        rows.append(embedded / embedded.norm())
    return torch.stack(rows)
