"""Video classification datasets in the layouts Kinetics users have: the official Kinetics CSV, the ``path label``
list files of VideoMAE / mmaction2, and class folders.

A listed clip that is not on disk (Kinetics downloads always miss some) or that cannot be decoded is skipped with
a warning and counted, never dropped silently; ``on_error="raise"`` makes either fatal. With a DataLoader, use
:func:`collate_clips`: it drops the skipped items from the batch and reports them in ``batch["skipped"]``.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from .._checks import is_int
from ..data import DatasetNotFoundError, in_hidden_folder, visible_folders
from ..errors import InvalidConfigError
from .io import VideoReadError, probe_video, read_video
from .sampling import dense_clip, dense_clip_views, evenly_spaced, segment_indices
from .transforms import ClipTransform

__all__ = ["VideoSample", "VideoList", "ClipSampling", "kinetics_csv", "list_file", "class_folders",
           "kinetics_classes", "list_classes", "folder_classes", "VideoClipDataset", "collate_clips",
           "VIDEO_EXTENSIONS", "ON_ERROR"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
ON_ERROR = ("skip", "raise")


@dataclass(frozen=True)
class VideoSample:
    path: Path
    label: int


@dataclass
class VideoList:
    """The clips of a dataset split, their class names (``classes[label]``), and the listed clips that were not
    found on disk."""

    samples: list[VideoSample]
    classes: list[str]
    missing: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise InvalidConfigError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def _finish(samples: list[VideoSample], classes: list[str], missing: list[str], source: str,
            on_error: str) -> VideoList:
    if missing:
        message = (f"{len(missing)} of {len(samples) + len(missing)} clips listed in {source} are not on disk "
                   f"(first: {missing[0]})")
        if on_error == "raise":
            raise DatasetNotFoundError(message)
        warnings.warn(message + "; they are skipped", stacklevel=3)
    if not samples:
        raise DatasetNotFoundError(f"no clips found for {source}")
    return VideoList(samples, classes, missing)


def kinetics_csv(csv_path: str | os.PathLike, root: str | os.PathLike, split: str | None = None,
                 classes: Sequence[str] | None = None, on_error: str = "skip") -> VideoList:
    """Clips listed in an official Kinetics CSV (``label,youtube_id,time_start,time_end,split``), named
    ``{youtube_id}_{time_start:06d}_{time_end:06d}.mp4`` and found in ``root``, ``root/<split>``, ``root/<label>``
    or ``root/<split>/<label>`` (the label as in the CSV, or with its spaces as underscores).

    Args:
        split: keep only rows of this split (``None``: every row).
        classes: the class list to index labels by (e.g. the training split's); default: the labels of the rows
            kept, sorted (:func:`kinetics_classes`). A label outside it is an error.
    """
    _check_on_error(on_error)
    csv_path, root = Path(csv_path), Path(root)
    rows = _kinetics_rows(csv_path, split)
    classes = list(classes) if classes is not None else sorted({row["label"] for row in rows})
    index = {name: i for i, name in enumerate(classes)}
    samples, missing = [], []
    for row in rows:
        if row["label"] not in index:
            raise InvalidConfigError(f"{csv_path}: label {row['label']!r} is not among the {len(classes)} classes")
        name = f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}.mp4"
        labels = dict.fromkeys([row["label"], row["label"].replace(" ", "_")])  # downloaders name folders both ways
        folders = [root, *(root / label for label in labels)]
        if row.get("split"):
            folders += [root / row["split"], *(root / row["split"] / label for label in labels)]
        path = next((folder / name for folder in folders if (folder / name).is_file()), None)
        if path is None:
            missing.append(name)
        else:
            samples.append(VideoSample(path, index[row["label"]]))
    return _finish(samples, classes, missing, str(csv_path), on_error)


def kinetics_classes(csv_path: str | os.PathLike, split: str | None = None) -> list[str]:
    """The class list :func:`kinetics_csv` indexes labels by: the labels of the CSV's rows (of ``split``), sorted;
    no clip is looked for (an evaluation reads the training CSV for this alone)."""
    return sorted({row["label"] for row in _kinetics_rows(Path(csv_path), split)})


def _clip_list(path: Path) -> Path:
    """``path``, checked to be a file: a missing list is a :class:`DatasetNotFoundError`, not a traceback."""
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: no such clip list")
    return path


def _kinetics_rows(csv_path: Path, split: str | None) -> list[dict[str, str]]:
    with open(_clip_list(csv_path), newline="") as handle:
        rows = list(csv.DictReader(handle))
    required = {"label", "youtube_id", "time_start", "time_end"}
    if not rows or not required <= set(rows[0]):
        raise InvalidConfigError(f"{csv_path} is not a Kinetics CSV: it needs the columns {sorted(required)}")
    if split is None:
        return rows
    if "split" not in rows[0]:
        raise InvalidConfigError(f"{csv_path} has no 'split' column to take the rows of split {split!r} from "
                                 "(every row is one split's: give no split, e.g. data.train_split='')")
    kept = [row for row in rows if row["split"] == split]
    if not kept:
        raise InvalidConfigError(f"{csv_path} has no rows of split {split!r} (its splits: "
                                 f"{sorted({row['split'] for row in rows})})")
    return kept


def list_file(list_path: str | os.PathLike, root: str | os.PathLike | None = None,
              classes: Sequence[str] | None = None, on_error: str = "skip") -> VideoList:
    """Clips listed one per line as ``path label`` (VideoMAE / mmaction2; the label an int, separated by a space or
    a comma), paths relative to ``root`` (default: the list's folder). ``classes`` names the labels (default:
    ``"0" .. "max"`` of the labels listed, :func:`list_classes`)."""
    _check_on_error(on_error)
    list_path = Path(list_path)
    root = Path(root) if root is not None else list_path.parent
    listed = _listed_clips(list_path)
    numbered = _numbered_classes(listed)
    if classes is None:
        classes = numbered
    elif len(numbered) > len(classes):
        raise InvalidConfigError(f"{list_path}: label {len(numbered) - 1} but only {len(classes)} classes")
    samples, missing = [], []
    for name, label in listed:
        path = root / name
        if path.is_file():
            samples.append(VideoSample(path, label))
        else:
            missing.append(str(path))
    return _finish(samples, list(classes), missing, str(list_path), on_error)


def list_classes(list_path: str | os.PathLike) -> list[str]:
    """The class names :func:`list_file` gives by default, ``"0" .. "max"`` of the labels listed; no clip is
    looked for."""
    return _numbered_classes(_listed_clips(Path(list_path)))


def _numbered_classes(listed: list[tuple[str, int]]) -> list[str]:
    """``"0" .. "max"`` of the labels of :func:`_listed_clips`."""
    return [str(i) for i in range(max((label for _, label in listed), default=-1) + 1)]


def _listed_clips(list_path: Path) -> list[tuple[str, int]]:
    """``(path as written, label)`` of each line of a list file: the label is the line's last field, after a space
    or a comma; the path is everything before it, its own spaces and commas included."""
    import re

    listed = []
    for number, line in enumerate(_clip_list(list_path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        found = re.fullmatch(r"\s*(.*?\S)\s*[\s,]\s*(-?\d+)\s*", line)
        if found is None or int(found[2]) < 0:
            raise InvalidConfigError(f"{list_path}:{number}: expected 'path label' with an int label >= 0, got "
                                     f"{line!r}")
        listed.append((found[1], int(found[2])))
    return listed


def class_folders(root: str | os.PathLike, extensions: Sequence[str] = VIDEO_EXTENSIONS,
                  classes: Sequence[str] | None = None) -> VideoList:
    """``root/<class name>/<clip>``: one folder per class, classes sorted by name; a class folder's clips are every
    file under it, sub-folders included (as torchvision's ``DatasetFolder``) but not hidden ones, whose suffix is one of
    ``extensions`` in any case. ``classes``: the class list to index labels by (e.g. the training split's, whose
    folders a validation split may lack some of); a folder outside it is an error."""
    root = Path(root)
    found = folder_classes(root)
    classes = found if classes is None else list(classes)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise InvalidConfigError(f"{root}: class folders {unknown} are not among the {len(classes)} classes")
    wanted = {extension.lower() for extension in extensions}
    samples = [VideoSample(path, classes.index(name)) for name in found for path in _files_under(root / name)
               if path.suffix.lower() in wanted and not in_hidden_folder(path, root / name)]
    return _finish(samples, classes, [], str(root), "skip")


def _files_under(directory: Path) -> list[Path]:
    """Every file under ``directory``, sorted, through linked folders too (as torchvision's ``DatasetFolder`` walks;
    ``Path.rglob`` does not enter them), each folder once: a link back to a folder already walked (a loop, or a
    link to it or to a folder above it) is not entered, where it would repeat every clip under it, other classes'
    too."""
    top = os.path.realpath(directory)
    files, seen = [], set()
    for folder, folders, names in os.walk(directory, followlinks=True):
        seen.add(os.path.realpath(folder))
        folders[:] = [name for name in folders if not _walked_or_above(os.path.join(folder, name), top, seen)]
        files += [Path(folder) / name for name in names if (Path(folder) / name).is_file()]
    return sorted(files)


def _walked_or_above(folder: str, top: str, seen: set[str]) -> bool:
    """Whether ``folder`` is (through links) one already walked, or ``top`` or a folder above it."""
    real = os.path.realpath(folder)
    return real in seen or top == real or top.startswith(real.rstrip(os.sep) + os.sep)


def folder_classes(root: str | os.PathLike) -> list[str]:
    """The class names :func:`class_folders` gives: ``root``'s sub-folders, sorted, hidden ones left out (a
    ``.ipynb_checkpoints`` would shift every class id after it)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"{root} is not a directory")
    return visible_folders(root)


@dataclass(frozen=True)
class ClipSampling:
    """Which frames a dataset item reads.

    Attributes:
        mode: ``"dense"`` (``num_frames`` frames ``sampling_rate`` apart; VideoMAE's 16 x 4), ``"segments"``
            (TSN: one frame per equal segment) or ``"uniform"`` (evenly spaced over the whole video).
        num_clips: test-time clips per video (dense mode; ``1`` during training).
    """

    mode: str = "dense"
    num_frames: int = 16
    sampling_rate: int = 4
    num_clips: int = 1

    def __post_init__(self) -> None:
        if self.mode not in ("dense", "segments", "uniform"):
            raise InvalidConfigError(f"clip sampling mode must be 'dense', 'segments' or 'uniform', got {self.mode!r}")
        for name in ("num_frames", "sampling_rate", "num_clips"):
            value = getattr(self, name)
            if not is_int(value, 1):
                raise InvalidConfigError(f"clip sampling: {name} must be a positive int, got {value!r}")
        if self.num_clips > 1 and self.mode != "dense":
            raise InvalidConfigError(f"clip sampling: num_clips={self.num_clips} takes several clips in dense mode "
                                     f"only; {self.mode!r} reads one set of frames from the whole video")

    def clips(self, frame_count: int, train: bool, generator: torch.Generator | None = None) -> list[list[int]]:
        """The frame indices of each clip to read: one when training, ``num_clips`` (dense) otherwise."""
        if self.mode == "uniform":
            return [evenly_spaced(frame_count, self.num_frames)]
        if self.mode == "segments":
            return [segment_indices(frame_count, self.num_frames, random=train, generator=generator)]
        if train:
            return [dense_clip(frame_count, self.num_frames, self.sampling_rate, generator)]
        return dense_clip_views(frame_count, self.num_frames, self.sampling_rate, self.num_clips)


class VideoClipDataset(Dataset):
    """Items ``(clip, label)``: frames chosen by ``sampling``, decoded with :func:`~vistok.video.read_video`, passed
    through ``transform`` (e.g. :class:`~vistok.video.transforms.ClipTransform`).

    At test time (``train=False``) with several clips, the item stacks them: ``[num_clips, ...]`` (with a
    multi-crop transform, ``[num_clips * num_crops, ...]``). An unreadable clip is skipped: the item is ``None``
    (with a warning), which :func:`collate_clips` drops and counts; ``on_error="raise"`` raises
    :class:`~vistok.video.VideoReadError` instead.
    """

    def __init__(self, videos: VideoList, sampling: ClipSampling, transform: Callable[[Tensor], Tensor],
                 train: bool = False, on_error: str = "skip", backend: str = "auto", timeout: float | None = 10.0,
                 seed: int = 0) -> None:
        _check_on_error(on_error)
        self.videos, self.sampling, self.transform = videos, sampling, transform
        self.train, self.on_error, self.backend, self.timeout, self.seed = train, on_error, backend, timeout, seed
        self._epoch = 0

    def __len__(self) -> int:
        return len(self.videos.samples)

    def set_epoch(self, epoch: int) -> None:
        """Draw different training clips each epoch (the draw is a function of seed, epoch and index): call it as
        each epoch begins, or every epoch draws the same clips, crops and flips. DataLoader workers see it when they
        start, so not with ``persistent_workers=True``."""
        self._epoch = epoch

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        sample = self.videos.samples[index]
        # a tuple of ints hashes the same in every process and run (no hash randomisation for ints)
        generator = torch.Generator().manual_seed(hash((self.seed, self._epoch, index)) % 2**62)
        try:
            info = probe_video(sample.path, self.backend, self.timeout)
            if info.frame_count < 1:
                raise VideoReadError(f"cannot read video {str(sample.path)!r}: it has no frames")
            clips = self.sampling.clips(info.frame_count, self.train, generator)
            frames = read_video(sample.path, [i for clip in clips for i in clip], backend=self.backend,
                                timeout=self.timeout)
        except VideoReadError as error:
            if self.on_error == "raise":
                raise
            warnings.warn(f"skipping an unreadable clip: {error}", stacklevel=2)
            return None
        if isinstance(self.transform, ClipTransform):  # the item's generator draws its crop and flip too
            views = [self.transform(part, generator) for part in frames.split(len(clips[0]))]
        else:
            views = [self.transform(part) for part in frames.split(len(clips[0]))]
        clip = views[0] if len(views) == 1 else torch.cat([v if v.dim() == 5 else v[None] for v in views])
        return clip, sample.label


def collate_clips(batch: list[tuple[Tensor, int] | None]) -> dict[str, Tensor | int]:
    """DataLoader ``collate_fn`` for :class:`VideoClipDataset`: ``{"clips": [B, ...], "labels": [B], "skipped":
    n}``, the unreadable items dropped and counted in ``skipped``."""
    kept = [item for item in batch if item is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return {"clips": torch.empty(0), "labels": torch.empty(0, dtype=torch.long), "skipped": skipped}
    clips, labels = default_collate(kept)
    return {"clips": clips, "labels": labels, "skipped": skipped}
