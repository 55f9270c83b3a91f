"""Video: reading frames (decord, PyAV) without ever hanging, clip sampling and multi-view testing as video users
know them, and Kinetics-style datasets.

>>> from vistok.video import read_video
>>> frames = read_video("clip.mp4", num_frames=16)      # uint8 [16, H, W, 3]
"""

from . import sampling, transforms
from .classifier import VideoClassifier
from .datasets import (
    ClipSampling,
    VideoClipDataset,
    VideoList,
    VideoSample,
    class_folders,
    collate_clips,
    kinetics_csv,
    list_file,
)
from .io import VideoInfo, VideoReadError, available_backends, probe_video, read_video
from .transforms import ClipTransform

__all__ = [
    "read_video",
    "probe_video",
    "VideoInfo",
    "VideoReadError",
    "available_backends",
    "ClipSampling",
    "ClipTransform",
    "VideoClassifier",
    "VideoClipDataset",
    "VideoList",
    "VideoSample",
    "kinetics_csv",
    "list_file",
    "class_folders",
    "collate_clips",
    "sampling",
    "transforms",
]
