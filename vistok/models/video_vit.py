"""A video ViT made from a timm image ViT: the patch embedding inflated to tubelets, a temporal position
embedding added, every block, norm and head kept. The result is still a timm ``VisionTransformer`` (its patch
embedding a :class:`TubeletEmbed`), so timm's training code, vistok's patching and checkpoints work as for images
(but timm's ``forward_intermediates`` and ``get_intermediate_layers``, which read an image's height and width:
use ``forward_features`` for the tokens).

Inflation (as I3D and ViViT initialise from image weights): the per-frame stem convolutions are reused as they
are, and the patchifying ``p x p`` convolution becomes a ``t x p x p`` one whose every temporal slice is the image
kernel divided by ``t``; the position table becomes a joint space-time one, the image's spatial table repeated
for every tubelet slice (a temporal position embedding that starts at zero). A clip of identical frames then gives
the image model's output on that frame: exactly for a model without prefix tokens (every key is repeated alike),
nearly with a class token or registers (the repeated patch keys outweigh the prefix keys a little). Training
learns motion from there.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import PatchEmbed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from .._checks import is_int
from ..errors import InputShapeError, InvalidConfigError, UnsupportedModelError

__all__ = ["TubeletEmbed", "inflate_to_video", "resample_num_frames", "vistok_video_vit_fmnist",
           "vistok_video_vit_fmnist_merge", "VIDEO_REFERENCE_NAME", "VIDEO_MERGE_NAME"]

VIDEO_REFERENCE_NAME = "vistok_video_vit_fmnist"
VIDEO_MERGE_NAME = "vistok_video_vit_fmnist_merge"  # fine-tuned with merging on
TRAINED_FRAMES = 4  # the shipped video reference weights are for 4-frame clips
TRAINED_TUBELET_FRAMES = 2  # ... in tubelets 2 frames deep
TRAINED_CLASSES = 8  # ... and the 8 motion classes


class TubeletEmbed(nn.Module):
    """``[B, C, T, H, W]`` clips -> ``[B, T' * H' * W', D]`` tokens, time-major (all patches of the first tubelet
    slice, then the next).

    Args:
        frame_stem: 2-D layers applied to every frame before patchifying (an image model's conv stem), or ``None``.
        proj: the ``Conv3d`` with kernel = stride = ``(t, p, p)``.
        img_size: ``(T, H, W)`` of the input clip.
    """

    def __init__(self, frame_stem: nn.Module | None, proj: nn.Conv3d, img_size: tuple[int, int, int]) -> None:
        super().__init__()
        if tuple(proj.kernel_size) != tuple(proj.stride):
            raise InvalidConfigError(f"TubeletEmbed: the projection's kernel {proj.kernel_size} must equal its stride")
        self.frame_stem = frame_stem
        self.proj = proj
        self.img_size = tuple(img_size)
        self.patch_size = tuple(proj.kernel_size)
        for size, step in zip(self.img_size, self.patch_size, strict=True):
            if size % step:
                raise InvalidConfigError(f"TubeletEmbed: clip size {self.img_size} is not a multiple of the tubelet "
                                         f"{self.patch_size}")
        self.grid_size = tuple(size // step for size, step in zip(self.img_size, self.patch_size, strict=True))
        self.num_patches = self.grid_size[0] * self.grid_size[1] * self.grid_size[2]
        self.dynamic_img_pad = False
        self.strict_img_size = True

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5 or tuple(x.shape[2:]) != self.img_size:
            raise InputShapeError(f"expected clips [B, C, {', '.join(map(str, self.img_size))}] (batch, channels, "
                                  f"frames, height, width), got {tuple(x.shape)}")
        frames = x.shape[2]
        if self.frame_stem is not None:
            x = rearrange(self.frame_stem(rearrange(x, "b c t h w -> (b t) c h w")), "(b t) c h w -> b c t h w",
                          t=frames)
        return rearrange(self.proj(x), "b d t h w -> b (t h w) d")


def _split_patch_embed(patch_embed: nn.Module) -> tuple[nn.Module | None, nn.Conv2d]:
    """An image patch embedding's per-pixel stem (``None`` if there is none) and its patchifying convolution."""
    if not isinstance(patch_embed, PatchEmbed) or not isinstance(patch_embed.norm, nn.Identity):
        raise UnsupportedModelError(f"cannot inflate a {type(patch_embed).__name__} patch embedding (with a norm or "
                                    "of an unknown kind); vistok inflates timm's PatchEmbed and its conv-stem kin")
    proj = patch_embed.proj
    if isinstance(proj, nn.Conv2d):
        return None, proj
    if isinstance(proj, nn.Sequential) and isinstance(proj[-1], nn.Conv2d):
        return nn.Sequential(*list(proj)[:-1]), proj[-1]
    raise UnsupportedModelError(f"cannot inflate the patch embedding's projection {type(proj).__name__}")


@torch.no_grad()
def inflate_to_video(model: VisionTransformer, num_frames: int, tubelet_frames: int = 2) -> VisionTransformer:
    """A video copy of the image ViT ``model`` for clips of ``num_frames`` frames, tubelets ``tubelet_frames``
    deep (see the module docstring). ``model`` is left unchanged.

    Raises:
        UnsupportedModelError: not a timm ``VisionTransformer`` with a learned, fixed-size position embedding and
            a convolutional patch embedding.
        InvalidConfigError: ``num_frames`` is not a positive multiple of ``tubelet_frames``, or ``model`` is
            patched.
    """
    from ..patching import find_handle

    if type(model) is not VisionTransformer:
        raise UnsupportedModelError(f"inflate_to_video takes a timm VisionTransformer, got {type(model).__name__}")
    if find_handle(model) is not None:  # the copy's patch would describe the image's 2-D grid
        raise InvalidConfigError("inflate_to_video: give the unpatched image model (remove its patch first), then "
                                 "patch the video model")
    if model.pos_embed is None or getattr(model, "dynamic_img_size", False) or model.no_embed_class:
        raise UnsupportedModelError("inflate_to_video needs a learned position embedding over prefix and patch "
                                    "tokens at a fixed image size")
    for value, name in ((num_frames, "num_frames"), (tubelet_frames, "tubelet_frames")):
        if not is_int(value, 1):
            raise InvalidConfigError(f"inflate_to_video: {name} must be a positive int, got {value!r}")
    if num_frames % tubelet_frames:
        raise InvalidConfigError(f"inflate_to_video: num_frames={num_frames} is not a multiple of "
                                 f"tubelet_frames={tubelet_frames}")
    stem, conv = _split_patch_embed(model.patch_embed)
    video = copy.deepcopy(model)
    proj = nn.Conv3d(conv.in_channels, conv.out_channels, kernel_size=(tubelet_frames, *conv.kernel_size),
                     stride=(tubelet_frames, *conv.stride), bias=conv.bias is not None, device=conv.weight.device,
                     dtype=conv.weight.dtype)
    proj.weight.copy_(conv.weight[:, :, None].expand_as(proj.weight) / tubelet_frames)
    if conv.bias is not None:
        proj.bias.copy_(conv.bias)
    height, width = model.patch_embed.img_size
    video.patch_embed = TubeletEmbed(copy.deepcopy(stem), proj, (num_frames, height, width))
    prefix = model.num_prefix_tokens
    slices = num_frames // tubelet_frames
    spatial = model.pos_embed[:, prefix:]
    video.pos_embed = nn.Parameter(torch.cat([model.pos_embed[:, :prefix], spatial.repeat(1, slices, 1)], dim=1))
    in_chans = next(m for m in model.patch_embed.modules() if isinstance(m, nn.Conv2d)).in_channels
    video.pretrained_cfg = video.default_cfg = {**getattr(model, "pretrained_cfg", {}),
                                                "input_size": (in_chans, num_frames, height, width)}
    return video


@torch.no_grad()
def resample_num_frames(model: VisionTransformer, num_frames: int) -> VisionTransformer:
    """A copy of the video ViT ``model`` (a :class:`TubeletEmbed` patch embedding) for clips of ``num_frames``
    frames: the same tubelets and weights, the temporal slices of the position table linearly interpolated to
    the new count (as timm resamples image position tables; two slices become their mean at one). Fewer frames is
    the natural video baseline for token reduction: ``num_frames`` / the trained count of the patch tokens.

    Raises:
        UnsupportedModelError: ``model`` has no :class:`TubeletEmbed` (not made by :func:`inflate_to_video`).
        InvalidConfigError: ``num_frames`` is not a positive multiple of the tubelet depth, or ``model`` is
            patched.
    """
    from ..patching import find_handle

    embed = getattr(model, "patch_embed", None)
    if not isinstance(embed, TubeletEmbed):
        raise UnsupportedModelError(f"resample_num_frames takes a video ViT made by inflate_to_video, got a "
                                    f"{type(embed).__name__} patch embedding")
    if find_handle(model) is not None:  # the copy's patch would describe the old grid
        raise InvalidConfigError("resample_num_frames: give the unpatched video model (remove its patch first), "
                                 "then patch the copy")
    depth = embed.patch_size[0]
    if not is_int(num_frames, 1) or num_frames % depth:
        raise InvalidConfigError(f"resample_num_frames: num_frames must be a positive multiple of the tubelet depth "
                                 f"{depth}, got {num_frames!r}")
    slices, rows, cols = embed.grid_size
    prefix = model.num_prefix_tokens
    table = rearrange(model.pos_embed[:, prefix:], "1 (t s) d -> 1 (s d) t", t=slices)
    table = F.interpolate(table, size=num_frames // depth, mode="linear", align_corners=False)
    table = rearrange(table, "1 (s d) t -> 1 (t s) d", s=rows * cols)
    video = copy.deepcopy(model)
    video.patch_embed = TubeletEmbed(video.patch_embed.frame_stem, video.patch_embed.proj,
                                     (num_frames, *embed.img_size[1:]))
    video.pos_embed = nn.Parameter(torch.cat([model.pos_embed[:, :prefix], table], dim=1))
    channels = model.pretrained_cfg["input_size"][0]  # set by inflate_to_video
    video.pretrained_cfg = video.default_cfg = {**model.pretrained_cfg,
                                                "input_size": (channels, num_frames, *embed.img_size[1:])}
    return video


@register_model
def vistok_video_vit_fmnist(pretrained: bool = False, image_pretrained: bool = True, num_frames: int = 4,
                            tubelet_frames: int = 2, num_classes: int | None = None, **kwargs) -> VisionTransformer:
    """vistok's reference video ViT for the Fashion-MNIST clips (:mod:`vistok.video.fmnist_clips`): the register
    reference ViT (``vistok_vit_fmnist_reg4``) inflated to ``num_frames`` grey 28 x 28 frames in tubelets
    ``tubelet_frames`` deep (2 x 196 patch tokens + CLS + 4 registers at the defaults), with an 8-class head.

    ``pretrained=True`` loads the trained weights shipped in ``models/vistok_video_vit_fmnist`` (trained on 4
    frames; another ``num_frames`` gets them through :func:`resample_num_frames`), or the 4-frame weights of
    ``pretrained_cfg_overlay=dict(file=...)`` (or ``pretrained_cfg``; with ``num_classes`` there, the head that
    file has); otherwise, with ``image_pretrained`` (the default), the blocks start from the shipped image weights,
    as training does.
    """
    return _video_reference(VIDEO_REFERENCE_NAME, pretrained, image_pretrained, num_frames, tubelet_frames,
                            num_classes, **kwargs)


@register_model
def vistok_video_vit_fmnist_merge(pretrained: bool = False, image_pretrained: bool = True, num_frames: int = 4,
                                  tubelet_frames: int = 2, num_classes: int | None = None,
                                  **kwargs) -> VisionTransformer:
    """:func:`vistok_video_vit_fmnist` fine-tuned with token merging on (``r=33`` per block: 0.484x its GFLOPs),
    to be run as it was tuned: ``vistok.patch(model, "merge", r=33)``. ``pretrained=True`` loads the weights
    shipped in ``models/vistok_video_vit_fmnist_merge`` (its card has the recipe and the figures)."""
    return _video_reference(VIDEO_MERGE_NAME, pretrained, image_pretrained, num_frames, tubelet_frames,
                            num_classes, **kwargs)


def _video_reference(name: str, pretrained: bool, image_pretrained: bool, num_frames: int, tubelet_frames: int,
                     num_classes: int | None, **kwargs) -> VisionTransformer:
    from .reference import (
        fit_head,
        head_options,
        load_checkpoint,
        pretrained_source,
        reference_checkpoint,
        vistok_vit_fmnist_reg4,
    )

    weights, config = pretrained_source(name, kwargs)
    if pretrained and weights is None and tubelet_frames != TRAINED_TUBELET_FRAMES:
        raise InvalidConfigError(f"{name}: the shipped weights have tubelets {TRAINED_TUBELET_FRAMES} frames deep, "
                                 f"not tubelet_frames={tubelet_frames} (leave it at {TRAINED_TUBELET_FRAMES}, or "
                                 "pretrained=False to train another depth)")
    options = {**kwargs} if num_classes is None else {**kwargs, "num_classes": num_classes}
    head = head_options(name, pretrained, options)  # with pretrained, the head asked for comes after loading
    # the head built: the one asked for, else (and always with pretrained) the weights' own
    classes = options.pop("num_classes", config.get("num_classes", TRAINED_CLASSES))
    image = vistok_vit_fmnist_reg4(pretrained=image_pretrained and not pretrained, **options)
    trained_frames = TRAINED_FRAMES if pretrained else num_frames
    video = inflate_to_video(image, trained_frames, tubelet_frames)
    video.reset_classifier(classes)
    video.pretrained_cfg = video.default_cfg = {**video.pretrained_cfg, "architecture": name, **config,
                                                "num_classes": classes}
    if pretrained:
        load_checkpoint(video, weights or reference_checkpoint(name))
        fit_head(video, head)
    return video if num_frames == trained_frames else resample_num_frames(video, num_frames)
