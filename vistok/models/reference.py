"""The reference ViT vistok trains on real data (Fashion-MNIST) and ships, because no pretrained ViT weights
can be downloaded on the machines vistok is built on.

``timm.create_model("vistok_vit_fmnist", pretrained=True)`` builds it and loads the shipped weights: a timm
``VisionTransformer`` with a class token whose 28x28 grey input, cut into 2x2 patches, is 196 patch tokens +
CLS, like ViT-S/16 at 224 px; its patch embedding is a small convolutional stem. The model card is
``models/vistok_vit_fmnist/README.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from timm.layers import PatchEmbed, build_sincos2d_pos_embed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import InvalidConfigError, VistokError

__all__ = ["REFERENCE_ARCH", "REFERENCE_REG4_ARCH", "CheckpointError", "reference_checkpoint", "load_checkpoint",
           "vistok_vit_fmnist", "vistok_vit_fmnist_reg4", "TRAINING_COMMANDS", "pretrained_source"]

REFERENCE_NAME = "vistok_vit_fmnist"
REFERENCE_ARCH = dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=12, num_heads=2,
                      mlp_ratio=4.0, class_token=True, global_pool="token")
# The same blocks and token grid with 4 register tokens (Darcet et al., "Vision Transformers Need Registers",
# 2024): the class token can park attention there instead of on background patches. SiLU MLPs (a third of
# GELU's CPU cost, fwd + bwd) and a two-conv stem.
REFERENCE_REG4_ARCH = dict(REFERENCE_ARCH, reg_tokens=4, act_layer=nn.SiLU)
STEM_CHANNELS = 32
REPOSITORY_MODELS = Path(__file__).resolve().parents[2] / "models"  # the shipped weights, in a repository checkout
# How each shipped model is trained: the start of the command in its model card (models/<name>/README.md), which has
# the whole command and its settings.
TRAINING_COMMANDS = {
    "vistok_vit_fmnist": "python tools/train.py --config configs/fmnist_vit.yaml",
    "vistok_vit_fmnist_reg4": "python tools/train.py --config configs/fmnist_vit_reg4.yaml",
    "vistok_video_vit_fmnist": "python tools/train.py --config configs/fmnist_video_vit.yaml",
    "vistok_video_vit_fmnist_merge": "python tools/train.py --config configs/fmnist_video_vit.yaml pretrained=true "
                                     "train.epochs=2 method=merge",
    "vistok_clip_fmnist": "python tools/train_clip.py",
    "vistok_vlm_fmnist": "python tools/train_vlm.py",
    "vistok_page_vlm_fmnist": "python tools/train_vlm.py --page",
    "vistok_vlm_fmnist_fine": "python tools/train_vlm.py --fine",
    "vistok_vlm_fmnist_fine_plain": "python tools/train_vlm.py --fine",
    "vistok_video_vlm_fmnist": "python tools/train_video_vlm.py",
}


class ConvStemPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` whose projection is a small convolutional stem (3x3 conv, GELU, then the
    ``patch_size`` strided conv): the same tokens on the same grid, but each sees a slightly wider window,
    which makes a ViT on tiny patches train far faster (Xiao et al., "Early Convolutions Help Transformers
    See Better", 2021)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True, stem_convs: int = 1,
                 **kwargs) -> None:
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         bias=bias, **kwargs)
        layers: list[nn.Module] = []
        for index in range(stem_convs):  # 3x3 convs at full resolution, then the patchifying conv
            layers += [nn.Conv2d(in_chans if index == 0 else STEM_CHANNELS, STEM_CHANNELS, kernel_size=3, padding=1),
                       nn.GELU()]
        layers.append(nn.Conv2d(STEM_CHANNELS, embed_dim, kernel_size=self.patch_size, stride=self.patch_size,
                                bias=bias))
        self.proj = nn.Sequential(*layers)


class TwoConvStemPatchEmbed(ConvStemPatchEmbed):
    """:class:`ConvStemPatchEmbed` with two 3x3 convs before the patchifying one."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, stem_convs=2, **kwargs)


class CheckpointError(VistokError, ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model."""


def reference_checkpoint(name: str = REFERENCE_NAME) -> Path:
    """Where the shipped weights of ``name`` are: ``$VISTOK_MODELS/<name>/model.safetensors``, else the
    repository's ``models/<name>/model.safetensors``.

    Raises:
        CheckpointError: they are in neither place (the message names the command that trains them).
    """
    roots = [Path(os.environ["VISTOK_MODELS"])] if os.environ.get("VISTOK_MODELS") else []
    roots.append(REPOSITORY_MODELS)
    for root in roots:
        path = root / name / "model.safetensors"
        if path.is_file():
            return path
    where = ' or '.join(str(r / name / 'model.safetensors') for r in roots)
    if name not in TRAINING_COMMANDS:
        raise CheckpointError(f"no weights of {name} at {where}: vistok ships weights for {sorted(TRAINING_COMMANDS)}")
    raise CheckpointError(
        f"the weights of {name} are not at {where}. They ship in the vistok repository (models/); from a package "
        f"install, point $VISTOK_MODELS at a copy of that folder, or train them with {TRAINING_COMMANDS[name]} ... "
        f"(models/{name}/README.md has the whole command).")


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a ``.safetensors`` or ``torch.save`` state dict into ``model``, every key and shape checked.

    Raises:
        CheckpointError: unreadable file, or missing / unexpected / mis-shaped tensors (all named).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("model", state) if isinstance(state, dict) else state
    except Exception as error:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                        for k, v in expected.items() if k in state and state[k].shape != v.shape)
    if missing or unexpected or mis_shaped:
        problems = [f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "",
                    f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}" if unexpected else "",
                    f"shape mismatch {mis_shaped[:5]}" if mis_shaped else ""]
        raise CheckpointError(f"checkpoint {path} does not fit {type(model).__name__}: "
                              + "; ".join(p for p in problems if p))
    model.load_state_dict(state)
    return model


@torch.no_grad()
def _init_sincos_positions(model: VisionTransformer) -> None:
    """Start the learned position embedding from 2D sin-cos values: with 2x2-pixel patches a token says
    almost nothing by itself, and a near-zero initial embedding leaves the model blind to layout at first."""
    if model.pos_embed is None:
        return
    grid = list(model.patch_embed.grid_size)
    table = build_sincos2d_pos_embed(grid, dim=model.embed_dim)  # [H * W, C]
    model.pos_embed[0, model.num_prefix_tokens if not model.no_embed_class else 0:] = table


def pretrained_source(name: str, kwargs: dict) -> tuple[str | None, dict]:
    """Take timm's ``pretrained_cfg`` (a dict, a ``PretrainedCfg``, or ``None``) and ``pretrained_cfg_overlay``
    out of ``kwargs`` (a factory's): the weights file they name (``None``: the shipped weights) and the keys they
    set in the pretrained config, the overlay's over ``pretrained_cfg``'s.

    Raises:
        InvalidConfigError: a pretrained tag (``"vistok_vit_fmnist.tag"``: vistok ships one set of weights per
            model), or weights from a URL or the Hugging Face Hub (vistok's models load a local ``file``).
    """
    from dataclasses import asdict

    from timm.models import PretrainedCfg

    given = kwargs.pop("pretrained_cfg", None)
    if isinstance(given, str):
        raise InvalidConfigError(f"{name} has no pretrained tag {given!r}: vistok ships one set of weights per model "
                                 "(another file: pretrained_cfg_overlay=dict(file=...))")
    if isinstance(given, PretrainedCfg):  # only what was set: its defaults describe an ImageNet model
        default = PretrainedCfg()
        given = {key: value for key, value in asdict(given).items() if value != getattr(default, key)}
    config = {**(given or {}), **(kwargs.pop("pretrained_cfg_overlay", None) or {})}
    remote = sorted(key for key in ("url", "hf_hub_id", "hf_hub_filename") if config.get(key))
    if remote:
        raise InvalidConfigError(f"{name}: pretrained weights from {', '.join(remote)} are not supported; give a "
                                 "local file (pretrained_cfg_overlay=dict(file=...))")
    weights = config.pop("file", None)
    return (None if weights in (None, "") else str(weights)), config


def _create_reference(name: str, arch: dict, embed_layer: type[PatchEmbed], pretrained: bool,
                      **kwargs) -> VisionTransformer:
    """As timm's factories: with ``pretrained``, ``num_classes`` (0: no head) and ``global_pool`` give a fresh
    head on the shipped weights rather than a checkpoint that does not fit; ``pretrained_cfg`` and
    ``pretrained_cfg_overlay`` update the pretrained config, their ``file`` is loaded instead of the shipped
    weights, and their ``num_classes`` is the head those weights have (the model's, without ``pretrained``, unless
    ``num_classes`` is given)."""
    weights, config = pretrained_source(name, kwargs)
    head = head_options(name, pretrained, kwargs)
    if "num_classes" in config:
        if pretrained:
            kwargs["num_classes"] = config["num_classes"]
        else:
            kwargs.setdefault("num_classes", config["num_classes"])
    model = VisionTransformer(**{**arch, "embed_layer": embed_layer, **kwargs})
    _init_sincos_positions(model)
    model.pretrained_cfg = model.default_cfg = {
        "architecture": name, "input_size": (1, 28, 28),
        "mean": (0.2860,), "std": (0.3530,), "first_conv": "patch_embed.proj.0", "classifier": "head",
        "crop_pct": 1.0, "interpolation": "bilinear",  # trained on whole 28 x 28 images: timm keeps them whole
        **config, "num_classes": model.num_classes,
    }
    if pretrained:
        load_checkpoint(model, weights or reference_checkpoint(name))
        fit_head(model, head)
    return model


def head_options(name: str, pretrained: bool, kwargs: dict) -> dict:
    """Take from ``kwargs`` (a timm factory's, after :func:`pretrained_source`) what vistok's factories do not pass
    on: timm's own settings, and with ``pretrained`` the head asked for (``num_classes``, ``global_pool``), which
    :func:`fit_head` gives after the weights load. Refuses what the reference models cannot be (``features_only``,
    attention pools)."""
    kwargs.pop("cache_dir", None)
    if kwargs.pop("features_only", False):
        raise InvalidConfigError(f"{name}: features_only is not supported (use forward_intermediates, or "
                                 "forward_features for the tokens)")
    head = {key: kwargs.pop(key) for key in ("num_classes", "global_pool") if pretrained and key in kwargs}
    if head.get("global_pool") in ("map", "prr"):
        raise InvalidConfigError(f"{name}: global_pool={head['global_pool']!r} needs an attention pool the "
                                 "pretrained weights do not have")
    return head


def fit_head(model: VisionTransformer, head: dict) -> None:
    """The head ``head`` asks for (``num_classes``, ``global_pool``) on a model with its shipped weights: a fresh
    classifier for another class count; the trained one where only the pooling changed."""
    if head.get("num_classes", model.num_classes) == model.num_classes and "global_pool" not in head:
        return  # the shipped head as it is (and no random draws for a head that would be thrown away)
    trained = model.head
    model.reset_classifier(head.get("num_classes", model.num_classes), head.get("global_pool"))
    if model.num_classes == trained.out_features:
        model.head = trained
    model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, "num_classes": model.num_classes}


@register_model
def vistok_vit_fmnist(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """vistok's reference ViT for Fashion-MNIST (196 patch tokens + CLS); ``pretrained=True`` loads the
    weights shipped in ``models/vistok_vit_fmnist``."""
    return _create_reference(REFERENCE_NAME, REFERENCE_ARCH, ConvStemPatchEmbed, pretrained, **kwargs)


@register_model
def vistok_vit_fmnist_reg4(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The reference ViT with 4 register tokens (196 patch tokens + CLS + 4 registers), SiLU MLPs and a two-conv
    stem; ``pretrained=True`` loads ``models/vistok_vit_fmnist_reg4``."""
    return _create_reference("vistok_vit_fmnist_reg4", REFERENCE_REG4_ARCH, TwoConvStemPatchEmbed, pretrained,
                             **kwargs)
