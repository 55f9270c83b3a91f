#!/usr/bin/env python
"""Write Fashion-MNIST video questions (vistok.video.fmnist_qa) as H.264 .mp4 files (crf 0) with an MVBench-style
manifest (<split>.json: video, question, answer, candidates, kind, evidence). Deterministic for a seed.

    python tools/make_video_qa.py --out data/fmnist_video_qa_sample --split test --size 12   # the committed sample
    python tools/make_video_qa.py --out data/fmnist_video_qa --split test --size 1000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import vistok
from vistok.cli import count, seed
from vistok.experiment import check_run_folder
from vistok.video.fmnist_qa import write_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/fmnist_video_qa")
    parser.add_argument("--split", default="test", choices=["train", "test"])
    parser.add_argument("--size", type=count, default=1000)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--fmnist-root", default=None, help="where Fashion-MNIST is (default: where vistok finds it)")
    args = parser.parse_args(argv)
    started = time.time()
    try:
        check_run_folder("--out", Path(args.out))  # a file there failed after loading Fashion-MNIST
        manifest = write_dataset(args.out, args.split, args.size, args.seed, args.fmnist_root)
    except vistok.VistokError as error:
        print(f"make_video_qa.py: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.size} videos and {manifest} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
