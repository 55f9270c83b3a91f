"""Clip transforms on ``[C, T, H, W]`` float tensors (torchvision's video layout): the spatial side of video
training and multi-view testing. Every frame of a clip gets the same crop and flip."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .._checks import is_int
from ..errors import InputShapeError, InvalidConfigError

__all__ = ["to_float_clip", "resize_short_side", "crop_views", "random_crop_flip", "normalize", "ClipTransform"]

# ImageNet statistics, what VideoMAE and ViViT normalise Kinetics with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA frames


def _check_clip(clip: Tensor) -> None:
    if clip.dim() != 4:
        raise InputShapeError(f"expected a clip [C, T, H, W], got shape {tuple(clip.shape)}")


def to_float_clip(frames: Tensor) -> Tensor:
    """``uint8`` frames ``[T, H, W, C]`` (as :func:`~vistok.video.read_video` returns) -> ``float`` ``[C, T, H, W]``
    in ``[0, 1]``."""
    if frames.dim() != 4:
        raise InputShapeError(f"expected frames [T, H, W, C], got shape {tuple(frames.shape)}")
    if frames.shape[-1] not in _CHANNELS:  # [T, C, H, W] frames were read as H = C, W = H, C = W
        layout = " (channels first? read_video gives [T, H, W, C])" if frames.shape[1] in _CHANNELS else ""
        raise InputShapeError(f"expected frames [T, H, W, C] with C in {_CHANNELS}, got shape "
                              f"{tuple(frames.shape)}{layout}")
    if frames.dtype != torch.uint8:  # float frames already in [0, 1] became a black clip
        raise InputShapeError(f"expected uint8 frames (0-255, as read_video returns), got {frames.dtype}")
    return rearrange(frames, "t h w c -> c t h w").float().div(255.0)


def resize_short_side(clip: Tensor, size: int) -> Tensor:
    """Scale every frame (bilinear, antialiased) so its shorter side is ``size``, keeping the aspect ratio."""
    _check_clip(clip)
    if not is_int(size, 1):
        raise InvalidConfigError(f"resize_short_side: size must be an int >= 1, got {size!r}")
    height, width = clip.shape[-2:]
    scale = size / min(height, width)
    target = (max(size, round(height * scale)), max(size, round(width * scale)))
    if target == (height, width):
        return clip
    # antialiased resizing has no half-precision kernel on the CPU: resize those in float32
    work = torch.float32 if clip.device.type == "cpu" and clip.dtype in (torch.float16, torch.bfloat16) else None
    frames = F.interpolate(rearrange(clip if work is None else clip.to(work), "c t h w -> t c h w"), size=target,
                           mode="bilinear", antialias=True, align_corners=False)
    return rearrange(frames, "t c h w -> c t h w").to(clip.dtype)


def _check_crop(clip: Tensor, size: object) -> tuple[int, int]:
    """The clip's ``(height, width)``, once ``clip`` and a square crop of side ``size`` in it are checked."""
    _check_clip(clip)
    height, width = clip.shape[-2:]
    if not is_int(size, 1):
        raise InvalidConfigError(f"crop size must be a positive int, got {size!r}")
    if size > min(height, width):
        raise InvalidConfigError(f"crop size {size} is larger than the clip's {height}x{width} frames")
    return height, width


def crop_views(clip: Tensor, size: int, num_crops: int) -> list[Tensor]:
    """``num_crops`` square crops of side ``size``: one centred crop, or crops evenly spaced along the long side
    (3: left / centre / right of a landscape clip), centred on the short side."""
    height, width = _check_crop(clip, size)
    if not is_int(num_crops, 1):
        raise InvalidConfigError(f"num_crops must be a positive int, got {num_crops!r}")
    along_width = width >= height
    room = (width if along_width else height) - size
    centre = ((height if along_width else width) - size) // 2
    offsets = [room // 2] if num_crops == 1 else [round(i * room / (num_crops - 1)) for i in range(num_crops)]
    views = []
    for offset in offsets:
        top, left = (centre, offset) if along_width else (offset, centre)
        views.append(clip[..., top:top + size, left:left + size])
    return views


def random_crop_flip(clip: Tensor, size: int, flip: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """A random square crop of side ``size``, mirrored left-right with probability 1/2 when ``flip``."""
    height, width = _check_crop(clip, size)
    top = int(torch.randint(height - size + 1, (), generator=generator))
    left = int(torch.randint(width - size + 1, (), generator=generator))
    crop = clip[..., top:top + size, left:left + size]
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        crop = crop.flip(-1)
    return crop


def normalize(clip: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(clip - mean) / std`` per channel, for a float clip (:func:`to_float_clip`)."""
    _check_clip(clip)
    if not clip.is_floating_point():  # the statistics became integers: 0 / 0
        raise InputShapeError(f"normalize: expected a float clip (to_float_clip), got {clip.dtype}")
    mean, std = _statistics(mean, std, "normalize")
    if len(mean) == 1:  # one value for every channel, as for images (data.mean=0.5)
        mean, std = mean * clip.shape[0], std * clip.shape[0]
    if len(mean) != clip.shape[0]:
        raise InvalidConfigError(f"mean/std have {len(mean)}/{len(std)} values for a clip of {clip.shape[0]} channels")
    mean_t = torch.tensor(mean, dtype=clip.dtype, device=clip.device)[:, None, None, None]
    std_t = torch.tensor(std, dtype=clip.dtype, device=clip.device)[:, None, None, None]
    return (clip - mean_t) / std_t


def _as_number(value: object) -> float | None:
    """``value`` as a float if it is a real number (numpy's scalars and one-element tensors too), else ``None``."""
    if isinstance(value, Tensor) and value.numel() == 1 and not (value.is_complex() or value.dtype == torch.bool):
        return float(value)
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None


def _statistics(mean: Sequence[float], std: Sequence[float], where: str) -> tuple[tuple[float, ...], ...]:
    """``mean`` and ``std`` as tuples of floats, once checked: the same length, finite numbers, every standard
    deviation above 0 (an infinite channel otherwise).

    Raises:
        InvalidConfigError: as above.
    """
    values = [tuple(_as_number(value) for value in side) for side in (mean, std)]
    if len(values[0]) != len(values[1]) or not all(value is not None and math.isfinite(value)
                                                   for value in (*values[0], *values[1])) \
            or not all(value > 0 for value in values[1]):
        raise InvalidConfigError(f"{where}: mean and std need one finite number per channel each, std > 0, got "
                                 f"mean={tuple(mean)!r}, std={tuple(std)!r}")
    return values[0], values[1]


class ClipTransform:
    """``uint8`` frames ``[T, H, W, C]`` -> normalised ``[C, T, size, size]`` clips.

    Training (``train=True``): short side to ``short_side``, a random ``size`` crop, random flip (``flip=False``
    where left and right carry meaning). Evaluation: short side to ``short_side``, then ``num_crops`` crops
    (:func:`crop_views`); the result is ``[V, C, T, size, size]`` when ``num_crops > 1``. ``grey``: average the
    colour channels into one first (for grey models; ``mean`` and ``std`` then have one value).

    The random crop and flip come from the ``generator`` a call passes (a :class:`VideoClipDataset` passes its
    item's, a function of its seed, the epoch and the index, so DataLoader workers and epochs draw differently and
    a run repeats), else from the transform's own generator (``seed``), else from torch's global one. In a
    DataLoader worker the own generator starts from ``seed`` and the worker's seed (torch's, new each epoch), so
    workers and epochs do not repeat each other's draws.
    """

    def __init__(self, size: int, short_side: int | None = None, train: bool = False, num_crops: int = 1,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, flip: bool = True,
                 seed: int | None = None, grey: bool = False) -> None:
        short_side = short_side or size
        if not is_int(size, 1) or not is_int(short_side, 1) or short_side < size:
            raise InvalidConfigError(f"ClipTransform: size and short_side must be ints with short_side >= size (the "
                                     f"crop is taken from the resized frames), got size={size!r}, "
                                     f"short_side={short_side!r}")
        if not is_int(num_crops, 1) or (train and num_crops > 1):
            raise InvalidConfigError(f"ClipTransform: num_crops must be an int >= 1, and 1 with train=True (training "
                                     f"takes one random crop), got {num_crops!r}")
        self.size, self.short_side = size, short_side
        self.train, self.num_crops, self.flip, self.grey = train, num_crops, flip, grey
        self.mean, self.std = _statistics(mean, std, "ClipTransform")  # it failed at the first clip, or gave inf
        if grey and (len(self.mean) != 1 or len(self.std) != 1):  # it failed at the first clip
            raise InvalidConfigError(f"ClipTransform: grey=True makes one channel; give one mean and one std, got "
                                     f"{len(self.mean)} and {len(self.std)}")
        self.seed = seed
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self._worker_seed: int | None = None  # the DataLoader worker seed the generator was last started from

    def __call__(self, frames: Tensor, generator: torch.Generator | None = None) -> Tensor:
        clip = to_float_clip(frames)
        if self.grey:  # the colour channels' mean (an RGBA clip's alpha is no colour)
            clip = clip[:3].mean(dim=0, keepdim=True)
        clip = resize_short_side(clip, self.short_side)
        if self.train:
            crop = random_crop_flip(clip, self.size, self.flip, generator or self._own_generator())
            return normalize(crop, self.mean, self.std)
        views = [normalize(view, self.mean, self.std) for view in crop_views(clip, self.size, self.num_crops)]
        return views[0] if self.num_crops == 1 else torch.stack(views)

    def _own_generator(self) -> torch.Generator | None:
        worker = torch.utils.data.get_worker_info()
        if self.generator is not None and worker is not None and worker.seed != self._worker_seed:
            # each worker holds a copy of one generator state (again each epoch): start it from its own seed
            self._worker_seed = worker.seed
            self.generator.manual_seed((self.seed * 1_000_003 + worker.seed) % 2**63)
        return self.generator
