"""Which frames make a clip: the samplers video training and evaluation use, as pure functions of the frame count.

* dense clips, ``num_frames`` frames ``sampling_rate`` apart (VideoMAE's 16 x 4 on Kinetics): a random start for
  training, evenly spaced starts for test-time views;
* TSN segments: the video cut into ``num_segments`` equal parts, one frame from each (a random one for training,
  the middle one for testing);
* evenly spaced frames over the whole video (what ``read_video(num_frames=...)`` reads).

Indices past the last frame (a clip longer than the video) repeat the last frame, as mmaction2's
``out_of_bound_opt="repeat_last"`` does.
"""

from __future__ import annotations

import torch

from .._checks import is_int
from ..errors import InvalidConfigError
from . import _decoders

__all__ = ["dense_clip", "dense_clip_views", "segment_indices", "evenly_spaced", "multiview_clips"]


def _check_positive(**values: object) -> None:
    for name, value in values.items():
        if not is_int(value, 1):
            raise InvalidConfigError(f"{name} must be a positive int, got {value!r}")


def _clip(start: int, frame_count: int, num_frames: int, sampling_rate: int) -> list[int]:
    return [min(start + i * sampling_rate, frame_count - 1) for i in range(num_frames)]


def dense_clip(frame_count: int, num_frames: int, sampling_rate: int = 1,
               generator: torch.Generator | None = None) -> list[int]:
    """A training clip: ``num_frames`` indices ``sampling_rate`` apart from a uniformly random start (any start
    from which the clip fits; 0 if it cannot fit)."""
    _check_positive(frame_count=frame_count, num_frames=num_frames, sampling_rate=sampling_rate)
    room = max(0, frame_count - (num_frames - 1) * sampling_rate - 1)
    start = int(torch.randint(room + 1, (), generator=generator))
    return _clip(start, frame_count, num_frames, sampling_rate)


def dense_clip_views(frame_count: int, num_frames: int, sampling_rate: int = 1, num_clips: int = 1) -> list[list[int]]:
    """Test-time clips: ``num_clips`` clips of ``num_frames`` frames ``sampling_rate`` apart, their starts evenly
    spaced from the first possible to the last possible (one clip: the centred one)."""
    _check_positive(frame_count=frame_count, num_frames=num_frames, sampling_rate=sampling_rate, num_clips=num_clips)
    room = max(0, frame_count - (num_frames - 1) * sampling_rate - 1)
    if num_clips == 1:
        starts = [room // 2]
    else:
        starts = [round(i * room / (num_clips - 1)) for i in range(num_clips)]
    return [_clip(start, frame_count, num_frames, sampling_rate) for start in starts]


def segment_indices(frame_count: int, num_segments: int, random: bool = False,
                    generator: torch.Generator | None = None) -> list[int]:
    """TSN sampling: one frame from each of ``num_segments`` equal segments of the video, a random one when
    ``random`` (training) and the middle one otherwise. Segments shorter than a frame repeat frames."""
    _check_positive(frame_count=frame_count, num_segments=num_segments)
    length = frame_count / num_segments
    if random:
        offsets = torch.rand(num_segments, generator=generator, dtype=torch.float64).tolist()
    else:
        offsets = [0.5] * num_segments
    return [min(int((i + offset) * length), frame_count - 1) for i, offset in enumerate(offsets)]


def evenly_spaced(frame_count: int, num_frames: int) -> list[int]:
    """``num_frames`` indices from the first frame to the last, evenly spaced (``linspace``, rounded)."""
    _check_positive(frame_count=frame_count, num_frames=num_frames)
    return _decoders.evenly_spaced(frame_count, num_frames)


def multiview_clips(frame_count: int, num_frames: int, sampling_rate: int, num_clips: int,
               num_crops: int) -> list[tuple[list[int], int]]:
    """The ``num_clips x num_crops`` views of multi-view testing (VideoMAE on Kinetics: 5 x 3): each view is the
    frame indices of one clip (:func:`dense_clip_views`) and a crop position ``0 .. num_crops - 1`` along the
    frame's long side (see :func:`vistok.video.transforms.crop_views`)."""
    _check_positive(num_crops=num_crops)
    return [(clip, crop) for clip in dense_clip_views(frame_count, num_frames, sampling_rate, num_clips)
            for crop in range(num_crops)]
