"""Video decoding with decord or PyAV, and the worker process that runs it.

This file imports neither torch nor vistok: it runs as ``python _decoders.py`` in a child process (see
:mod:`vistok.video.io`), which a hang in native code cannot take the caller down with, and which starts in a
fraction of a second. Requests and replies are pickled, length-prefixed, over the child's stdin and a copy of its
stdout (the real stdout is pointed at stderr, so nothing a native library prints can corrupt a reply).

Frames of more than ``FILE_THRESHOLD`` bytes travel as a raw file in a folder the caller gives (in ``/dev/shm``
where it exists), not through the pipe: a reply then carries ``("array-file", path, shape, dtype)`` in their place.

A decoder takes ``(path, indices, num_frames)`` and returns ``(frames, frame_count)``: ``uint8`` frames
``[T, H, W, 3]`` in RGB, and the frame count the container reports. ``indices`` picks frames (any order,
repeats allowed); ``num_frames`` picks that many evenly spaced over the whole video; neither reads every frame.
Problems are raised as :class:`DecodeError` with a message for the user.
"""

from __future__ import annotations

import functools
import os
import pickle
import shutil
import struct
import sys

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


def _open_decord(path: str):
    """decord's reader of ``path``, for the files it indexes right; the others are refused (so that ``"auto"``
    takes PyAV), since decord would give one index two frames, or the wrong one:

    * a first frame before time 0, or none at all (decord has no timestamps): an MP4 edit list hiding frames (a
      stream copy cut between key frames writes one), which decord shows when it decodes in order but not when it
      seeks; an AVI or MPEG program stream with B-frames, whose frames it indexes out of order;
    * an MPEG transport stream (``.ts``), where decord seeks to the wrong frames once B-frames reorder them.
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
    return reader


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
        raise DecodeError(f"decord failed while decoding frames (the container reports {frame_count}): "
                          f"{first_line(error)}") from None


def decode_pyav(path: str, indices: list[int] | None, num_frames: int | None) -> tuple[np.ndarray, int]:
    import av

    try:
        container = av.open(path)
    except Exception as error:  # av.error.* (InvalidDataError, FileNotFoundError, ...)
        raise DecodeError(f"PyAV cannot open it: {first_line(error)}") from None
    with container:
        if not container.streams.video:
            raise DecodeError("it has no video stream")
        stream = container.streams.video[0]
        frame_count = _counted_frames(path)
        wanted = _select(frame_count, indices, num_frames)
        needed = set(wanted)
        last = max(wanted, default=-1)
        found: dict[int, np.ndarray] = {}
        position = -1
        try:
            for position, frame in enumerate(container.decode(stream)):
                if position in needed:
                    found[position] = frame.to_ndarray(format="rgb24")
                if position >= last:
                    break
        except Exception as error:
            if len(found) < len(needed):
                raise DecodeError(f"PyAV failed after {position + 1} frames (the container reports {frame_count}): "
                                  f"{first_line(error)}") from None
    missing = sorted(needed - set(found))
    if missing:
        raise DecodeError(f"frame index {missing[0]} is past the real end: only {position + 1} frames decode, "
                          f"though the container reports {frame_count}")
    if not wanted:
        return np.zeros((0, stream.height, stream.width, 3), dtype=np.uint8), frame_count
    return np.stack([found[index] for index in wanted]), frame_count


def _counted_frames(path: str) -> int:
    """The frames of the first video stream that decode to a picture: its packets but empty ones (an AVI's drop
    frames) and those marked discard (hidden by an MP4 edit list). Demuxing reads the file without decoding it.
    The container's count, where it stores one, counts both kinds; containers that store none (mkv, webm, raw
    streams) would need the duration times the frame rate, as decord takes it, which counts an audio track that
    runs longer than the video. Remembered per file version, so that a dataset item's probe and decode demux it
    once."""
    status = os.stat(path)
    return _packet_count(path, status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _packet_count(path: str, size: int, mtime_ns: int) -> int:
    import av

    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size and not packet.is_discard)
    except Exception as error:  # av.error.* while demuxing a damaged file
        raise DecodeError(f"PyAV cannot count its frames: {first_line(error)}") from None


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


DECODERS = {"decord": decode_decord, "pyav": decode_pyav}


def decode(backend: str, path: str, indices: list[int] | None, num_frames: int | None) -> tuple[np.ndarray, int]:
    _check_path(path)
    return DECODERS[backend](path, indices, num_frames)


def probe(backend: str, path: str) -> dict[str, float]:
    """``frame_count`` (as the container reports it), ``fps``, ``height`` and ``width`` of the first video stream."""
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
            if not container.streams.video:
                raise DecodeError("it has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            return {"frame_count": _counted_frames(path),
                    "fps": float(rate) if rate else 0.0, "height": stream.height, "width": stream.width}
    except DecodeError:
        raise
    except Exception as error:
        raise DecodeError(f"PyAV cannot open it: {first_line(error)}") from None


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
