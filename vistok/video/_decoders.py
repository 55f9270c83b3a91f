"""Video decoding with decord or PyAV, and the worker process that runs it.

This file imports neither torch nor vistok: it runs as ``python _decoders.py`` in a child process (see
:mod:`vistok.video.io`), which a hang in native code cannot take the caller down with, and which starts in a
fraction of a second. Requests and replies are pickled, length-prefixed, over the child's stdin and a copy of its
stdout (the real stdout is pointed at stderr, so nothing a native library prints can corrupt a reply).

Frames of more than ``FILE_THRESHOLD`` bytes travel as a raw file in a folder the caller gives (in ``/dev/shm``
where it exists), not through the pipe: a reply then carries ``("array-file", path, shape, dtype)`` in their place.

A decoder takes ``(path, indices, num_frames)`` and returns ``(frames, frame_count)``: ``uint8`` frames
``[T, H, W, 3]`` in RGB, and the frame count: with PyAV the video packets that hold a picture, counted by
demuxing the file (see :func:`_counted_frames`); with decord, decord's own count (the container's, or its
duration times the frame rate). ``indices`` picks frames (any order, repeats allowed); ``num_frames`` picks that
many evenly spaced over the whole video; neither reads every frame. Problems are raised as :class:`DecodeError`
with a message for the user.
"""

from __future__ import annotations

import functools
import os
import pickle
import shutil
import struct
import sys
from typing import NamedTuple

import numpy as np

BACKENDS = ("decord", "pyav")
HEADER = struct.Struct("<Q")  # the byte length of the pickle that follows


class DecodeError(Exception):
    """The file could not be decoded as asked; the message says why."""


def evenly_spaced(frame_count: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread evenly from the first to the last frame (``linspace``, rounded)."""
    if frame_count < 1:
        raise DecodeError("the video has no frames")
    return np.linspace(0, frame_count - 1, num_frames).round().astype(int).tolist()


def _select(frame_count: int, indices: list[int] | None, num_frames: int | None) -> list[int]:
    if indices is None:
        return evenly_spaced(frame_count, num_frames) if num_frames is not None else list(range(frame_count))
    past = [index for index in indices if index >= frame_count]
    if past:
        raise DecodeError(f"frame index {max(past)} is past the end: the video has {frame_count} frames")
    return indices


ATTACHED_PICTURES = 0x0400 | 0x0800  # FFmpeg's AV_DISPOSITION_ATTACHED_PIC | AV_DISPOSITION_TIMED_THUMBNAILS


def _disposition(stream) -> int:
    """A stream's FFmpeg disposition flags as an int (PyAV 14.1 to 17 give a Flag, later ones an IntFlag)."""
    disposition = getattr(stream, "disposition", 0)
    return int(getattr(disposition, "value", disposition))


def _video_stream(container):
    """The container's one video stream (cover art and thumbnails attached as pictures left out).

    Raises:
        DecodeError: no video stream, or several: decord reads the one FFmpeg ranks best, PyAV the first, so the
            backends (and the checks that decide whether decord may read the file) would read different ones.
    """
    streams = [stream for stream in container.streams.video if not _disposition(stream) & ATTACHED_PICTURES]
    if not streams:
        raise DecodeError("it has no video stream")
    if len(streams) > 1:
        raise DecodeError(f"it holds {len(streams)} video streams: the backends would read different ones; keep one "
                          "(ffmpeg -i in.mp4 -map 0:v:0 -map 0:a? -c copy out.mp4)")
    return streams[0]


def _shown(frame) -> np.ndarray:
    """A decoded PyAV frame as ``uint8`` ``[H, W, 3]`` RGB, turned by its display rotation (a phone's portrait
    video is stored sideways), as decord shows it.

    Raises:
        DecodeError: a rotation that is not a multiple of 90 degrees.
    """
    rotation = float(getattr(frame, "rotation", 0) or 0)
    if rotation % 90:
        raise DecodeError(f"its display rotation is {rotation:g} degrees, not a multiple of 90")
    picture = frame.to_ndarray(format="rgb24")
    return np.ascontiguousarray(np.rot90(picture, k=round(rotation / 90) % 4)) if rotation else picture


def _open_decord(path: str):
    """decord's reader of ``path``, for the files it indexes right; the others are refused (so that ``"auto"``
    takes PyAV), since decord would give one index two frames, or the wrong one:

    * a first frame before time 0, or none at all (decord has no timestamps): an MP4 edit list hiding frames (a
      stream copy cut between key frames writes one), which decord shows when it decodes in order but not when it
      seeks; an AVI or MPEG program stream with B-frames, whose frames it indexes out of order;
    * an MPEG transport stream (``.ts``), where decord seeks to the wrong frames once B-frames reorder them;
    * leading pictures (an open GOP: x264's ``open-gop``, x265's default, MPEG-4 Part 2 and MPEG-2 with
      B-frames), where decord seeks to frames 1 to 3 positions late.

    A truncated file is refused as with PyAV (see :func:`_counted_frames`).
    """
    import decord

    if _is_transport_stream(path):
        raise DecodeError("decord is not used on MPEG transport streams: where B-frames reorder the frames, it seeks "
                          "to the wrong ones")
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=0)
        untimed = len(reader) > 0 and float(reader.get_frame_timestamp(0)[0]) < 0
    except Exception as error:  # decord raises RuntimeError or its own DECORDError
        raise DecodeError(f"decord cannot open it: {first_line(error)}") from None
    if untimed:
        raise DecodeError("decord gives its first frame no time or one before 0 (an MP4 edit list, or an AVI / "
                          "MPEG stream with B-frames): it would index the frames out of order")
    _check_decord_can_seek(path)
    return reader


def _check_decord_can_seek(path: str) -> None:
    """Refuse, for decord, a stream with leading pictures or a truncated one; the packets are PyAV's to read."""
    try:
        import av  # noqa: F401
    except ImportError:  # decord alone is installed: nothing can demux the file to check it
        return
    facts = _stream_facts(path)
    if facts.leading_pictures:
        raise DecodeError("decord is not used on streams with leading pictures (an open GOP: frames after a key "
                          "frame that are shown before it): it seeks to frames 1 to 3 positions late")
    _check_complete(facts)


def _is_transport_stream(path: str) -> bool:
    """Whether ``path`` starts as an MPEG transport stream does: a sync byte 0x47 every 188 bytes."""
    with open(path, "rb") as file:
        head = file.read(3 * 188)
    return len(head) == 3 * 188 and head[0] == head[188] == head[376] == 0x47


def decode_decord(path: str, indices: list[int] | None, num_frames: int | None) -> tuple[np.ndarray, int]:
    reader = _open_decord(path)
    frame_count = len(reader)
    wanted = _select(frame_count, indices, num_frames)
    if not wanted:
        return np.zeros((0, *reader[0].shape), dtype=np.uint8), frame_count
    try:
        return reader.get_batch(wanted).asnumpy(), frame_count
    except Exception as error:
        raise DecodeError(f"decord failed while decoding frames (it counts {frame_count}): "
                          f"{first_line(error)}") from None


def decode_pyav(path: str, indices: list[int] | None, num_frames: int | None) -> tuple[np.ndarray, int]:
    import av

    try:
        container = av.open(path)
    except Exception as error:  # av.error.* (InvalidDataError, FileNotFoundError, ...)
        raise DecodeError(f"PyAV cannot open it: {first_line(error)}") from None
    with container:
        stream = _video_stream(container)
        frame_count = _counted_frames(path)
        wanted = _select(frame_count, indices, num_frames)
        needed = set(wanted)
        last = max(wanted, default=-1)
        found: dict[int, np.ndarray] = {}
        position = -1
        try:
            for position, frame in enumerate(container.decode(stream)):
                if position in needed:
                    found[position] = _shown(frame)
                if position >= last:
                    break
        except Exception as error:
            if len(found) < len(needed):
                raise DecodeError(f"PyAV failed after {position + 1} frames (of {frame_count} counted): "
                                  f"{first_line(error)}") from None
    missing = sorted(needed - set(found))
    if missing:
        raise DecodeError(f"frame index {missing[0]} is past the real end: only {position + 1} frames decode, "
                          f"though {frame_count} packets hold pictures")
    if not wanted:
        return np.zeros((0, *_shown_size(path), 3), dtype=np.uint8), frame_count
    return np.stack([found[index] for index in wanted]), frame_count


def _counted_frames(path: str) -> int:
    """The frames of the first video stream that decode to a picture: its packets but empty ones (an AVI's drop
    frames) and those marked discard (hidden by an MP4 edit list). Demuxing reads the file without decoding it.
    The container's count, where it stores one, counts both kinds; containers that store none (mkv, webm, raw
    streams) would need the duration times the frame rate, as decord takes it, which counts an audio track that
    runs longer than the video. A file whose packets end clearly before the duration its video track states is
    refused as truncated (see :func:`_check_complete`)."""
    facts = _stream_facts(path)
    _check_complete(facts)
    return facts.frame_count


class StreamFacts(NamedTuple):
    """What demuxing the first video stream tells (:func:`_stream_facts`); times in seconds."""

    frame_count: int  # packets that hold a picture, but those an edit list hides
    leading_pictures: bool  # a packet after a key frame (in decode order) that is shown before it: an open GOP
    stated_duration: float | None  # the duration the video track states, if it states one
    packets_end: float  # where the last packet ends, counted from 0 or the first packet, whichever is earlier
    frame_interval: float  # the packets' mean spacing, or the frame period where that is longer
    tick: float  # the stream's time base: the resolution of its timestamps


def _stream_facts(path: str) -> StreamFacts:
    """:class:`StreamFacts` of ``path``, remembered per file version, so that a dataset item's probe and decode
    (and decord's checks) demux it once."""
    status = os.stat(path)
    return _demuxed(path, status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _demuxed(path: str, size: int, mtime_ns: int) -> StreamFacts:
    """Every packet of the first video stream, read without decoding; ``size`` and ``mtime_ns`` key the cache."""
    import av

    try:
        with av.open(path) as container:
            stream = _video_stream(container)
            packets = [(packet.pts, packet.duration, packet.size, packet.is_keyframe, packet.is_discard)
                       for packet in container.demux(stream)]
            stated = _stated_duration(container, stream)
            rate = stream.average_rate or stream.guessed_rate
            time_base = float(stream.time_base)
    except DecodeError:
        raise
    except Exception as error:  # av.error.* while demuxing a damaged file
        raise DecodeError(f"PyAV cannot count its frames: {first_line(error)}") from None
    timed = [(pts, duration or 0) for pts, duration, *_ in packets if pts is not None]
    first = min((pts for pts, _ in timed), default=0)
    end = max([first, *(pts + duration for pts, duration in timed)])
    interval = max((end - first) / max(len(timed), 1) * time_base, 1 / float(rate) if rate else 0.0)
    start = min(first, 0)  # an MP4 states its track's duration from its first packet, Matroska and AVI from 0
    return StreamFacts(frame_count=sum(1 for _, _, size, _, discard in packets if size and not discard),
                       leading_pictures=_has_leading_pictures(packets), stated_duration=stated,
                       packets_end=(end - start) * time_base, frame_interval=interval, tick=time_base)


def _has_leading_pictures(packets: list[tuple]) -> bool:
    """Whether a picture packet after a key frame, in decode order, has an earlier ``pts`` than that key frame."""
    key_pts = None
    for pts, _, size, key, _ in packets:
        if not size or pts is None:
            continue
        if key:
            key_pts = pts
        elif key_pts is not None and pts < key_pts:
            return True
    return False


HEADER_DURATIONS = {"mov", "mp4", "matroska", "webm", "avi"}  # formats whose header states the track's duration


def _stated_duration(container, stream) -> float | None:
    """The duration in seconds the video track's header states (an MP4's track, an AVI's frame count, a Matroska /
    WebM track's ``DURATION`` tag), or ``None``. Not the container's duration, which an audio track longer than the
    video sets, nor a duration FFmpeg estimates (from the bit rate of an MPEG stream, which can overshoot)."""
    if not HEADER_DURATIONS.intersection(container.format.name.split(",")):
        return None
    if stream.duration:
        return float(stream.duration * stream.time_base)
    tag = next((value for key, value in stream.metadata.items() if key.upper().startswith("DURATION")), None)
    try:
        hours, minutes, seconds = str(tag).split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None


TRUNCATION_FRAMES = 2  # frame intervals the packets may end short of the stated duration (a last packet without a
# duration, a shorter last frame), beyond the rounding of timestamps to ticks; a file missing more is refused


def _check_complete(facts: StreamFacts) -> None:
    """Refuse a truncated file: one whose packets end more than :data:`TRUNCATION_FRAMES` frame intervals before
    the duration its video track states (Matroska and faststart MP4s cut short still state the whole one), give or
    take a tick: a file exactly that much short reads, also where its timestamps are whole milliseconds (Matroska's)
    and a frame lasts a fraction of one (33.3 ms at 30 fps)."""
    stated = facts.stated_duration
    if stated is not None and stated - facts.packets_end > TRUNCATION_FRAMES * facts.frame_interval + facts.tick:
        raise DecodeError(f"it is truncated: its video track states {stated:.3f} s, but its {facts.frame_count} "
                          f"frames end at {facts.packets_end:.3f} s")


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


DECODERS = {"decord": decode_decord, "pyav": decode_pyav}


def decode(backend: str, path: str, indices: list[int] | None, num_frames: int | None) -> tuple[np.ndarray, int]:
    _check_path(path)
    return DECODERS[backend](path, indices, num_frames)


def probe(backend: str, path: str) -> dict[str, float]:
    """``frame_count``, ``fps``, ``height`` and ``width`` of the first video stream. ``frame_count`` is what
    the backend counts: with PyAV the packets that hold a picture (:func:`_counted_frames`), with decord its own
    count (the container's, or its duration times the frame rate)."""
    _check_path(path)
    if backend == "decord":
        reader = _open_decord(path)
        try:
            height, width = reader[0].shape[:2]
            return {"frame_count": len(reader), "fps": float(reader.get_avg_fps()), "height": height, "width": width}
        except Exception as error:
            raise DecodeError(f"decord cannot open it: {first_line(error)}") from None
    import av

    try:
        with av.open(path) as container:
            stream = _video_stream(container)
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
        frame_count = _counted_frames(path)
        height, width = _shown_size(path)
        return {"frame_count": frame_count, "fps": fps, "height": height, "width": width}
    except DecodeError:
        raise
    except Exception as error:
        raise DecodeError(f"PyAV cannot open it: {first_line(error)}") from None


@functools.lru_cache(maxsize=256)
def _shown_size_of(path: str, size: int, mtime_ns: int) -> tuple[int, int]:
    import av

    with av.open(path) as container:
        stream = _video_stream(container)
        first = next(container.decode(stream), None)
        if first is None:
            return stream.height, stream.width
        return _shown(first).shape[:2]


def _shown_size(path: str) -> tuple[int, int]:
    """``(height, width)`` of the frames as shown: the first frame decoded and turned by its display rotation
    (remembered per file version)."""
    status = os.stat(path)
    return _shown_size_of(path, status.st_size, status.st_mtime_ns)


def _check_path(path: str) -> None:
    if not os.path.exists(path):
        raise DecodeError("no such file")
    if os.path.isdir(path):
        raise DecodeError("it is a directory")


def run(request: tuple) -> object:
    """Carry out one request: ``("decode", backend, path, indices, num_frames)`` -> ``(frames, frame_count)``, or
    ``("probe", backend, path)`` -> the :func:`probe` dict."""
    operation, *arguments = request
    return decode(*arguments) if operation == "decode" else probe(*arguments)


# -- the worker process ---------------------------------------------------------------------------------------

def read_message(stream) -> object | None:
    """One length-prefixed pickle from a binary stream, or ``None`` at its end."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    return pickle.loads(stream.read(HEADER.unpack(header)[0]))


def write_message(stream, message: object) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(HEADER.pack(len(payload)))
    stream.write(payload)
    stream.flush()


FILE_THRESHOLD = 1 << 20


def _outgoing(result: object, folder: str, number: int) -> object:
    """``result`` with large frames written to a file in ``folder`` (see the module docstring)."""
    if not (isinstance(result, tuple) and isinstance(result[0], np.ndarray) and result[0].nbytes >= FILE_THRESHOLD):
        return result
    frames = np.ascontiguousarray(result[0])
    path = os.path.join(folder, f"frames-{number}.raw")
    try:
        frames.tofile(path)
    except OSError:  # no room (a small /dev/shm): send the frames through the pipe instead
        if os.path.exists(path):
            os.unlink(path)
        return result
    return (("array-file", path, frames.shape, frames.dtype.str), *result[1:])


def incoming(result: object) -> object:
    """The caller's side of :func:`_outgoing`: read the file back into an array and delete it at once (``/dev/shm``
    is small in many containers)."""
    if not (isinstance(result, tuple) and isinstance(result[0], tuple) and result[0][:1] == ("array-file",)):
        return result
    _, path, shape, dtype = result[0]
    try:
        frames = np.fromfile(path, dtype=np.dtype(dtype)).reshape(shape)
    finally:
        os.unlink(path)
    return (frames, *result[1:])


def main() -> None:
    folder = sys.argv[1]
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # native libraries may print; replies have their own pipe
    requests = sys.stdin.buffer
    number = 0
    while (request := read_message(requests)) is not None:
        number += 1
        try:
            write_message(replies, ("ok", _outgoing(run(request), folder, number)))
        except DecodeError as error:
            write_message(replies, ("error", str(error)))
        except Exception as error:  # noqa: BLE001 - reported to the caller, who raises VideoReadError
            write_message(replies, ("error", f"{type(error).__name__}: {first_line(error)}"))
    # the caller closed the pipe, or exited without stopping us (a DataLoader worker leaves by os._exit)
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
