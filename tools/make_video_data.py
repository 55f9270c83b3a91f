#!/usr/bin/env python
"""Make the Fashion-MNIST clips dataset (vistok.video.fmnist_clips): real Fashion-MNIST items sliding over a black
canvas, some swapped for another item midway, written as H.264 .mp4 files with Kinetics-style CSVs. Deterministic
for a seed.

    python tools/make_video_data.py                                  # data/fmnist_clips: 24,000 + 4,000 clips
    python tools/make_video_data.py --out data/fmnist_clips_sample --train 16 --test 8   # the committed sample
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import vistok
from vistok.cli import count, seed
from vistok.experiment import check_run_folder
from vistok.video.fmnist_clips import write_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/fmnist_clips")
    parser.add_argument("--train", type=count, default=24_000, help="training clips (at least one per class)")
    parser.add_argument("--test", type=count, default=4_000, help="test clips (at least one per class)")
    parser.add_argument("--seed", type=seed, default=0, help="an int in [0, 2**32)")
    parser.add_argument("--fmnist-root", default=None, help="where Fashion-MNIST is (default: where vistok finds it)")
    args = parser.parse_args(argv)
    started = time.time()
    try:
        check_run_folder("--out", Path(args.out))  # a file there failed after loading Fashion-MNIST
        root = write_dataset(args.out, args.train, args.test, args.seed, args.fmnist_root)
    except vistok.VistokError as error:
        print(f"make_video_data.py: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.train} + {args.test} clips to {root} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
