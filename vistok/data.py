"""Datasets for training and evaluating: Fashion-MNIST (found on this machine or downloaded) and
ImageNet-style class folders.

Fashion-MNIST is looked for, in order, in: the directory given, ``$VISTOK_DATA``, the vistok cache
(``~/.cache/vistok/fashion-mnist``), torchvision's layout (``<dir>/FashionMNIST/raw``), and the Debian
package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``). Where none has it,
``download=True`` fetches it with torchvision (needs internet).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from .errors import InputShapeError, InvalidConfigError, VistokError

__all__ = [
    "DatasetNotFoundError",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "GreyBatchTransform",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "fashion_mnist_dataset",
    "image_folder_dataset",
    "image_loader",
    "find_classes",
    "visible_folders",
    "in_hidden_folder",
    "image_folder",
    "read_image",
    "upright",
    "white_level",
]

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


class DatasetNotFoundError(VistokError, FileNotFoundError):
    """The dataset is in none of the places vistok looks, and downloading was not allowed."""


def _candidates(root: str | os.PathLike | None) -> list[Path]:
    """Where Fashion-MNIST is looked for: ``root`` alone when it is given (a copy the user named is never swapped
    for another one), else ``$VISTOK_DATA``, the cache and Debian's package."""
    if root:
        dirs = [Path(root)]
    else:
        dirs = [Path(os.environ["VISTOK_DATA"])] if os.environ.get("VISTOK_DATA") else []
        dirs.append(Path.home() / ".cache" / "vistok" / "fashion-mnist")
    expanded = []
    for directory in dirs:
        expanded += [directory, directory / "FashionMNIST" / "raw", directory / "fashion-mnist"]
    return expanded if root else expanded + [DEBIAN_DIR]


def _has_split(directory: Path, split: str) -> bool:
    return all((directory / name).exists() or (directory / f"{name}.gz").exists() for name in _FILES[split])


def find_fashion_mnist(root: str | os.PathLike | None = None, download: bool = False,
                       splits: Sequence[str] = ("train", "test")) -> Path:
    """The directory holding the Fashion-MNIST idx files (plain or ``.gz``) of ``splits``: in ``root`` when it is
    given, else in ``$VISTOK_DATA``, ``~/.cache/vistok/fashion-mnist`` or Debian's package.

    Raises:
        DatasetNotFoundError: with what to do, when it is not there and ``download`` is False.
    """
    for directory in _candidates(root):
        if all(_has_split(directory, split) for split in splits):
            return directory
    target = Path(root) if root else Path.home() / ".cache" / "vistok" / "fashion-mnist"
    if download:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(target), train=train, download=True)
        return target / "FashionMNIST" / "raw"
    if root:
        files = ", ".join(f"{name}(.gz)" for split in splits for name in _FILES[split])
        raise DatasetNotFoundError(f"Fashion-MNIST not found in {root} (data.root= / root= names the one folder read; "
                                   f"looked in {', '.join(str(p) for p in _candidates(root))}): it needs {files}, "
                                   "or data.download=true (download=True in Python) to download them there")
    raise DatasetNotFoundError(
        "Fashion-MNIST not found. Looked in: " + ", ".join(str(p) for p in _candidates(root)) + ". Either "
        "install the Debian package (apt-get install dataset-fashion-mnist), or allow a download (needs "
        "internet: data.download=true in the tools, download=True in Python), or point data.root= (root= in "
        "Python) or $VISTOK_DATA at a folder holding train-images-idx3-ubyte(.gz) and the three other idx files.")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise VistokError(f"{path} is not an unsigned-byte idx file")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if array.size != int(np.prod(shape)):
        raise VistokError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


def load_fashion_mnist(split: str, root: str | os.PathLike | None = None,
                       download: bool = False) -> tuple[Tensor, Tensor]:
    """``split`` ``"train"`` (60,000) or ``"test"`` (10,000) as ``uint8`` images ``[N, 28, 28]`` and
    ``int64`` labels ``[N]``.

    Raises:
        VistokError: a file is not an unsigned-byte idx file or is truncated, or the images and labels files hold
            different counts (files of two splits or two copies side by side).
    """
    if split not in _FILES:
        raise VistokError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}")
    directory = find_fashion_mnist(root, download, (split,) if root else tuple(_FILES))  # found: both from one copy
    paths = [directory / name if (directory / name).exists() else directory / f"{name}.gz" for name in _FILES[split]]
    images, labels = (_read_idx(path) for path in paths)
    if len(images) != len(labels):
        raise VistokError(f"Fashion-MNIST {split}: {paths[0]} holds {len(images)} images but {paths[1]} holds "
                          f"{len(labels)} labels; they must come from the same split of one copy")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def fashion_mnist_dataset(split: str, root: str | os.PathLike | None = None,
                          download: bool = False) -> TensorDataset:
    """A ``TensorDataset`` of ``uint8`` images ``[28, 28]`` and labels; turn batches into model input with
    :class:`GreyBatchTransform`."""
    return TensorDataset(*load_fashion_mnist(split, root, download))


class GreyBatchTransform:
    """``uint8`` ``[B, H, W]`` batches -> normalised ``float`` ``[B, 1, H, W]``, with optional augmentation
    (random shifts of up to ``pad`` pixels, background fill, and, with ``flip``, horizontal flips), vectorised per
    batch."""

    def __init__(self, mean: float = FASHION_MNIST_MEAN, std: float = FASHION_MNIST_STD, augment: bool = False,
                 pad: int = 2, seed: int = 0, flip: bool = True) -> None:
        self.mean, self.std, self.augment, self.pad, self.flip = mean, std, augment, pad, flip
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: Tensor) -> Tensor:
        x = images.float().div(255.0).sub(self.mean).div(self.std).unsqueeze(1)
        if not self.augment:
            return x
        return _shift_and_flip(x, self.generator, self.pad, -self.mean / self.std, self.flip)


def _shift_and_flip(images: Tensor, generator: torch.Generator, pad: int, fill: float, flip: bool = True) -> Tensor:
    """Translate each image by up to ``pad`` pixels (filling with ``fill``) and, with ``flip``, flip half of
    them."""
    batch, _, height, width = images.shape
    device = images.device
    padded = F.pad(images, (pad, pad, pad, pad), value=fill)
    dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator).to(device)
    dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator).to(device)
    rows = (dy[:, None] + torch.arange(height, device=device))[:, None, :, None].expand(-1, 1, -1, width + 2 * pad)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(width, device=device))[:, None, None, :].expand(-1, 1, height, -1)
    shifted = shifted.gather(3, cols)
    if not flip:
        return shifted
    flipped = (torch.rand(batch, generator=generator) < 0.5).to(device)
    return torch.where(flipped[:, None, None, None], shifted.flip(-1), shifted)


def image_folder_dataset(root: str | os.PathLike, split: str, input_size: int | tuple[int, int], train: bool,
                         mean: tuple[float, ...], std: tuple[float, ...], interpolation: str = "bilinear",
                         crop_pct: float = 0.875, channels: int = 3, flip: bool = True) -> Dataset:
    """An ImageNet-style ``root/<split>/<class>/<image>`` folder with timm's train (``train``; horizontal flips with
    ``flip``) or eval transforms, its images read with ``channels`` channels (1: grey, else RGB).

    Class ids are the sorted class folders of ``root/train`` whenever it exists, whatever ``split``: a ``val/``
    without some class keeps the training ids.

    Raises:
        DatasetNotFoundError: the split folder does not exist or holds no class folders, or it has a class
            folder ``root/train`` lacks.
    """
    from timm.data import create_transform

    loader = image_loader(channels)
    folder = Path(root) / split
    if not folder.is_dir() or not visible_folders(folder):
        raise DatasetNotFoundError(f"{folder} is not a folder of class sub-folders (expected {root}/{split}/<class>/"
                                   "<image files>, as for ImageNet)")
    size = input_size if isinstance(input_size, int) else (channels, *input_size)
    flips = {"hflip": 0.5 if flip else 0.0} if train else {}
    transform = create_transform(size, is_training=train, mean=mean, std=std, interpolation=interpolation,
                                 crop_pct=crop_pct, **flips)
    dataset = image_folder(folder, transform, loader)
    training = Path(root) / "train"
    if split == "train" or not training.is_dir():
        return dataset
    try:
        classes, ids = find_classes(training)
    except FileNotFoundError:  # a train/ without class folders has no class ids to keep
        classes, ids = [], {}
    unknown = sorted(set(dataset.classes) - set(classes))
    if unknown:
        raise DatasetNotFoundError(f"{folder} has class folders {unknown[:5]} that {training} lacks: their "
                                   "images would have no class id the model was trained with")
    if dataset.classes != classes:  # this split lacks some training classes: ids by the training list
        dataset.samples = dataset.imgs = [(path, ids[dataset.classes[target]]) for path, target in dataset.samples]
        dataset.targets = [target for _, target in dataset.samples]
        dataset.classes, dataset.class_to_idx = classes, ids
    return dataset


def visible_folders(directory: str | os.PathLike) -> list[str]:
    """The sorted sub-folders of ``directory``, hidden ones (``.ipynb_checkpoints``, ``.git``) left out: as class
    folders, one would become a class and shift every id after it."""
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not entry.name.startswith("."))


def in_hidden_folder(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether a folder between ``root`` and the file ``path`` under it is hidden (a class's ``.ipynb_checkpoints``
    holds copies of its files)."""
    return any(part.startswith(".") for part in Path(path).relative_to(root).parts[:-1])


def find_classes(directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
    """The sorted class folders of ``directory`` and their ids, as ``ImageFolder`` numbers them, but without hidden
    folders (``.ipynb_checkpoints``, ``.git``): one would become a class and shift every id after it.

    Raises:
        FileNotFoundError: ``directory`` has no class folders (as torchvision's ``find_classes``).
    """
    classes = visible_folders(directory)
    if not classes:
        raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
    return classes, {name: index for index, name in enumerate(classes)}


def image_folder(root: str | os.PathLike, transform: Callable | None, loader: Callable[[str], Any]) -> Dataset:
    """torchvision's ``ImageFolder`` numbered by :func:`find_classes`, hidden folders and the images in them left
    out, at any depth (a plain ``ImageFolder``, so that it pickles into data-loader workers).

    Raises:
        FileNotFoundError: no class folders, or one without images (as ``ImageFolder``).
    """
    from torchvision.datasets import ImageFolder

    classes, ids = find_classes(root)
    dataset = ImageFolder(str(root), transform=transform, loader=loader, allow_empty=True,  # hidden: no images
                          is_valid_file=partial(_visible_image, Path(root)))
    dataset.samples = dataset.imgs = [(path, ids[dataset.classes[target]]) for path, target in dataset.samples
                                      if dataset.classes[target] in ids]
    dataset.targets = [target for _, target in dataset.samples]
    dataset.classes, dataset.class_to_idx = classes, ids
    empty = sorted(set(classes) - {classes[target] for target in dataset.targets})
    if empty:
        raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)} in {root}")
    return dataset


def _visible_image(root: Path, path: str) -> bool:
    """An image file ``ImageFolder`` reads (its extensions) outside hidden folders."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    return has_file_allowed_extension(path, IMG_EXTENSIONS) and not in_hidden_folder(path, root)


def image_loader(channels: int) -> Callable[[str], Any]:
    """An ``ImageFolder`` loader giving PIL images of ``channels`` channels (1: grey, 3: RGB).

    Raises:
        InvalidConfigError: another channel count (a 4-channel model got RGB images and failed in the first batch).
    """
    if channels not in (1, 3):
        raise InvalidConfigError(f"image files are read as grey (1 channel) or RGB (3 channels), not {channels!r} "
                                 "channels: give the model 1 or 3 input channels (model_kwargs.in_chans) for folder "
                                 "data")
    return partial(read_image, mode="L" if channels == 1 else "RGB")


def read_image(path: str | os.PathLike, mode: str) -> Any:
    """The image at ``path`` as a Pillow image of ``mode`` (``"L"`` or ``"RGB"``). Greys of 16 bits or floats are
    scaled to 8 bits by their :func:`white_level` (Pillow's ``convert`` clips them, reading a 16-bit image as
    nearly all white).

    Raises:
        InputShapeError: a file Pillow cannot read, or wide greys outside their white level (the file named).
    """
    from PIL import Image

    try:
        with open(path, "rb") as handle, Image.open(handle) as opened:
            white = white_level(opened, Path(path))
            image = upright(opened, Path(path))
            if white is None:
                return image.convert(mode)
            values = np.asarray(image, dtype=np.float64)
            if values.size and not (values.min() >= 0 and values.max() <= white):
                raise InputShapeError(f"{path}: {image.mode} grey levels from {values.min():g} to {values.max():g} "
                                      f"are outside [0, {white:g}]; save the image with 8 or 16 bits")
            return Image.fromarray(np.rint(values * (255 / white)).astype(np.uint8)).convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # a bomb is no OSError
        if isinstance(error, VistokError):
            raise
        raise InputShapeError(f"cannot read the image {path}: {error}") from None


def upright(opened: Any, path: Path) -> Any:
    """An opened Pillow image as it is displayed: its EXIF orientation applied (a phone's portrait photo is stored
    sideways). Read what needs the file's tags (:func:`white_level`) from ``opened`` first: the turned copy has
    none.

    Raises:
        InputShapeError: a file Pillow misreads when turning it (an uncompressed TIFF turned a quarter: Pillow 13
            reports its size already swapped and scrambles its pixels).
    """
    from PIL import ImageOps

    orientation = opened.getexif().get(0x0112, 1)
    if orientation not in range(2, 9):
        return opened
    tags = getattr(opened, "tag_v2", {})  # a TIFF's stored ImageWidth / ImageLength, read before loading
    stored = (tags[256], tags[257]) if 256 in tags and 257 in tags else opened.size
    displayed = stored[::-1] if orientation >= 5 else stored
    image = ImageOps.exif_transpose(opened)
    if image.size != tuple(displayed):
        raise InputShapeError(f"{path.name}: read as {image.size[0]} x {image.size[1]} pixels, but it is "
                              f"{displayed[0]} x {displayed[1]} as displayed (its stored size turned by its EXIF "
                              "orientation): Pillow misreads this file (an uncompressed TIFF turned a quarter); save "
                              "it compressed or upright")
    return image


def white_level(image: Any, path: Path) -> float | None:
    """The level of white of a Pillow image of wide greys, from the bit depth its file states: ``F`` 1.0; a TIFF's
    BitsPerSample up to 16 (a 12-bit scan's white is 4095); else ``I;16`` 65535, and ``I`` as a PNG or a PGM 65535
    (PNG greys have at most 16 bits, Pillows before 10 open them as ``I``; a 16-bit PGM is scaled to 65535 by
    Pillow); ``None`` for 8-bit modes, which Pillow converts itself.

    Raises:
        InputShapeError: 32-bit integer greys whose bit depth the file does not state: 8-bit levels stored in 32
            bits and 16-bit ones differ only by their white level, so no rule would read both right.
    """
    if image.mode == "F":
        return 1.0
    if not image.mode.startswith("I"):
        return None
    bits = getattr(image, "tag_v2", {}).get(258)  # TIFF BitsPerSample: an int, or one per sample
    bits = bits[0] if isinstance(bits, tuple) and bits else bits
    if isinstance(bits, int) and 1 <= bits <= 16:  # a 12-bit scan is I;16 with white at 4095
        return float(2**bits - 1)
    if image.mode.startswith("I;16") or image.format in ("PNG", "PPM"):  # Pillow scales a PGM's maxval to 16 bits
        return 65535.0
    raise InputShapeError(f"{path.name}: 32-bit integer greys (Pillow mode I{f', {bits} bits' if bits else ''}) "
                          "have no stated white level: 8-bit levels (white 255) and 16-bit ones (white 65535) would "
                          "read differently; save the image with 8 or 16 bits")
