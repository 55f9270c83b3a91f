"""``read_video``: frames of a video file as a tensor, decord first and PyAV as the fallback, never hanging.

decord can spin forever inside ``get_batch`` in native code with the GIL held (dmlc/decord #269, #373, #375:
containers that over-report their frame count), and a broken file can crash a native decoder. So by default the
decoding runs in a child process that is killed when ``timeout`` passes: a bad file costs at most ``timeout``
seconds and a :class:`VideoReadError`, never a hung or crashed caller. Each process (each DataLoader worker
included) keeps one decoding child, started on first use; threads take turns with it.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import math
import os
import pickle
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .._checks import is_int, is_real
from ..errors import InvalidConfigError, VistokError
from . import _decoders
from ._decoders import BACKENDS, HEADER, DecodeError, write_message

__all__ = ["VideoReadError", "VideoInfo", "read_video", "probe_video", "available_backends"]


class VideoReadError(VistokError, OSError):
    """A video could not be read: missing, unreadable, truncated, an index past its end, or a decoder that did
    not finish in time. The message names the file and the problem."""


def available_backends() -> list[str]:
    """The installed decoders, in the order ``backend="auto"`` tries them."""
    return [name for name, module in (("decord", "decord"), ("pyav", "av")) if importlib.util.find_spec(module)]


def read_video(
    path: str | os.PathLike,
    indices: Sequence[int] | Tensor | None = None,
    num_frames: int | None = None,
    backend: str = "auto",
    timeout: float | None = 10.0,
) -> Tensor:
    """Decode frames of a video file.

    Args:
        path: the video file.
        indices: frame indices to return, in this order (repeats allowed); each must be below the frame count.
        num_frames: instead of ``indices``, that many frames evenly spaced from the first to the last
            (``linspace``, rounded). Neither: every frame.
        backend: ``"decord"``, ``"pyav"`` or ``"auto"`` (decord, then PyAV if decord fails, refuses the file as
            one it would index wrong, or is not installed).
        timeout: seconds the whole call may take; decoding runs in a child process that is killed when they run
            out. ``None`` decodes in this process with no time limit (only for files you trust).

    Returns:
        ``uint8`` ``[T, H, W, 3]`` RGB frames.

    Raises:
        VideoReadError: the file is missing, unreadable or truncated (its packets end clearly before the
            duration its video track states), an index is past its real end, or decoding took longer than
            ``timeout``; the message names the file and each backend's problem.
        InvalidConfigError: bad ``indices``, ``num_frames``, ``backend`` or ``timeout``.
    """
    path = os.fspath(path)
    wanted = _check_indices(indices, num_frames)
    backends = _backends(backend)
    timeout = _check_timeout(timeout)
    frames, _ = _run_with_fallback(("decode", path, wanted, num_frames), backends, timeout)
    return torch.from_numpy(np.ascontiguousarray(frames))


def probe_video(path: str | os.PathLike, backend: str = "auto", timeout: float | None = 10.0) -> VideoInfo:
    """Frame count, frame rate and size of a video, without decoding it (see :func:`read_video` for ``backend``
    and ``timeout``). ``frame_count`` is what the backend counts: with PyAV the video packets that hold a
    picture (the file is demuxed, not decoded), with decord its own count (the container's, or its duration times
    the frame rate). It may exceed the frames that decode: a packet may hold no picture (parameter sets alone) or
    a damaged one."""
    info = _run_with_fallback(("probe", os.fspath(path)), _backends(backend), _check_timeout(timeout))
    return VideoInfo(int(info["frame_count"]), info["fps"], int(info["height"]), int(info["width"]))


@dataclass(frozen=True)
class VideoInfo:
    frame_count: int
    fps: float
    height: int
    width: int


def _run_with_fallback(request: tuple, backends: list[str], timeout: float | None) -> object:
    """``request`` (without its backend) with each backend in turn, until one succeeds or the time is spent."""
    operation, path, *arguments = request
    problems = []
    # threads share the decoding child, one call at a time: a call's time counts from its turn, over its backends
    with contextlib.nullcontext() if timeout is None else _worker().turn:
        deadline = None if timeout is None else time.monotonic() + timeout
        for name in backends:
            try:
                return _run((operation, name, path, *arguments), deadline)
            except _Timeout:
                problems.append(f"{name}: no result within {timeout:g} s (decoder killed)")
                break  # the time is spent: no fallback
            except DecodeError as error:
                problems.append(f"{name}: {error}")
    raise VideoReadError(f"cannot read video {path!r}: " + "; ".join(problems))


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is not None and (not is_real(timeout) or math.isnan(timeout) or timeout <= 0):
        raise InvalidConfigError(f"timeout must be a positive number of seconds (inf: decode in the child process "
                                 f"with no limit) or None, got {timeout!r}")
    return timeout


class _Timeout(Exception):
    pass


def _check_indices(indices: Sequence[int] | Tensor | None, num_frames: int | None) -> list[int] | None:
    if indices is not None and num_frames is not None:
        raise InvalidConfigError("read_video: give indices or num_frames, not both")
    if num_frames is not None and not is_int(num_frames, 1):
        raise InvalidConfigError(f"read_video: num_frames must be a positive int, got {num_frames!r}")
    if indices is None:
        return None
    if isinstance(indices, Tensor):
        if indices.dim() != 1 or indices.is_floating_point() or indices.dtype == torch.bool:
            raise InvalidConfigError(f"read_video: indices must be a 1-D integer tensor, got {indices.dtype} "
                                     f"{tuple(indices.shape)}")
        indices = indices.tolist()
    wanted = list(indices)
    if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0 for i in wanted):
        raise InvalidConfigError(f"read_video: indices must be ints >= 0, got {wanted[:8]}")
    return [int(i) for i in wanted]


def _backends(backend: str) -> list[str]:
    installed = available_backends()
    if backend == "auto":
        if not installed:
            raise InvalidConfigError("read_video needs decord or PyAV: pip install 'vistok[video]'")
        return installed
    if backend not in BACKENDS:
        raise InvalidConfigError(f"read_video: backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")
    if backend not in installed:
        raise InvalidConfigError(f"read_video: backend {backend!r} is not installed: pip install 'vistok[video]'")
    return [backend]


def _run(request: tuple, deadline: float | None) -> object:
    if deadline is None:  # in this process: whatever a decoder raises is the backend's failure, as in the child
        try:
            return _decoders.run(request)
        except DecodeError:
            raise
        except Exception as error:  # noqa: BLE001 - reported as the backend's failure (VideoReadError)
            raise DecodeError(f"{type(error).__name__}: {_decoders.first_line(error)}") from error
    return _worker().run(request, deadline)


class _Worker:
    """This process's decoding child (``python _decoders.py``), restarted after a timeout or a crash."""

    def __init__(self) -> None:
        self.turn = threading.Lock()  # held by a call for all its requests (see _run_with_fallback)
        self._process: subprocess.Popen | None = None
        self._folder: str | None = None  # where the child leaves large frame arrays

    def run(self, request: tuple, deadline: float) -> object:
        """One request's reply; the caller holds :attr:`turn`."""
        process = self._running()
        try:
            write_message(process.stdin, request)
            reply = _read_until(process.stdout, deadline)
        except (OSError, EOFError):
            reply = None
        except BaseException:  # a timeout or an interrupt: its reply would be read as the next request's
            self.stop()
            raise
        if reply is None:  # the child died (a native crash) or closed its pipe
            code = self.stop()
            raise DecodeError(f"the decoder process died (exit code {code})")
        status, payload = reply
        if status != "ok":
            raise DecodeError(payload)
        return _decoders.incoming(payload)

    def _running(self) -> subprocess.Popen:
        if self._process is None or self._process.poll() is not None:
            self.stop()
            shared = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self._folder = tempfile.mkdtemp(prefix=_FOLDER_PREFIX, dir=shared)
            self._process = subprocess.Popen(
                [sys.executable, "-u", str(Path(_decoders.__file__)), self._folder], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
        return self._process

    def stop(self) -> int | None:
        process, self._process = self._process, None
        folder, self._folder = self._folder, None
        code = None
        if process is not None:
            process.kill()
            code = process.wait()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        return code


def _read_until(stream, deadline: float) -> object | None:
    """One reply from the child, waiting at most until ``deadline``; ``None`` if the child closed its pipe."""
    header = _read_exactly(stream.fileno(), HEADER.size, deadline)
    if header is None:
        return None
    payload = _read_exactly(stream.fileno(), HEADER.unpack(header)[0], deadline)
    return None if payload is None else pickle.loads(payload)


def _read_exactly(fd: int, size: int, deadline: float) -> bytes | None:
    chunks = []
    ready = select.poll()  # not select.select, which refuses descriptors numbered 1024 and above
    ready.register(fd, select.POLLIN)
    while size:
        left = deadline - time.monotonic()
        wait = -1 if math.isinf(left) else min(math.ceil(left * 1000), 2**31 - 1)  # poll takes an int of ms
        if left <= 0 or not ready.poll(wait):
            raise _Timeout
        chunk = os.read(fd, min(size, 1 << 22))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


_FOLDER_PREFIX = "vistok-video-"  # of the folder each decoding child leaves large frame arrays in
_WORKERS: dict[int, _Worker] = {}
_WORKERS_LOCK = threading.Lock()


def _worker() -> _Worker:
    """The decoding child of this process (a forked DataLoader worker gets its own)."""
    pid = os.getpid()
    with _WORKERS_LOCK:
        if pid not in _WORKERS:
            _WORKERS.clear()  # entries inherited from a parent process belong to the parent
            _WORKERS[pid] = _Worker()
        return _WORKERS[pid]


@atexit.register
def _stop_workers() -> None:
    worker = _WORKERS.get(os.getpid())
    if worker is not None:
        worker.stop()
