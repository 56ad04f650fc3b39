"""Time and peak memory of `ddchallenge data prepare tinyimagenet` on a
Tiny-ImageNet-sized folder (200 classes x 500 train JPEGs, 10,000 val JPEGs,
64x64, written by this script), and the time to stream one class from the
HDF5 store.

    python bench/prepare_speed.py --workdir /tmp/tinybench [--per-class 500] [--repeats 5]

Prepare runs as a child process (the real CLI), so its peak RSS is its own.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_folder(base: Path, per_class: int, val: int, classes: int = 200) -> None:
    rng = np.random.default_rng(0)
    wnids = [f"n{k:08d}" for k in range(classes)]
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    # Smooth random images compress like photos, not like noise.
    def image():
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        return Image.fromarray(small).resize((64, 64), Image.BILINEAR)
    for w in wnids:
        folder = base / "train" / w / "images"
        folder.mkdir(parents=True)
        for i in range(per_class):
            image().save(folder / f"{w}_{i}.JPEG", quality=90)
    lines = []
    for i in range(val):
        image().save(base / "val" / "images" / f"val_{i}.JPEG", quality=90)
        lines.append(f"val_{i}.JPEG\t{wnids[i % classes]}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--per-class", type=int, default=500)
    ap.add_argument("--val", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    src, root = args.workdir / "src", args.workdir / "root"
    if not (src / "tiny-imagenet-200").exists():
        t = time.perf_counter()
        write_folder(src / "tiny-imagenet-200", args.per_class, args.val)
        print(f"wrote the folder in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ddchallenge", "data", "prepare", "tinyimagenet", "--root", str(root),
                    "--source", str(src)], check=True)
    seconds = time.perf_counter() - t
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    from ddchallenge.data.prepare import read_class
    from ddchallenge.protocol import get_dataset

    spec = get_dataset("tinyimagenet")
    times = []
    for k in range(args.repeats):
        t = time.perf_counter()
        images = read_class(spec, 17 + k, root)
        times.append(time.perf_counter() - t)
    n = 200 * args.per_class
    print(f"| prepare tinyimagenet ({n} train + {args.val} val JPEGs) | {seconds:.1f} s | {n / seconds:.0f} img/s | "
          f"peak RSS {peak_mib:.0f} MiB |")
    print(f"| stream one class ({images.shape[0]} images) from the HDF5 store | "
          f"{1000 * statistics.median(times):.1f} ms (median of {args.repeats}) | | |")


if __name__ == "__main__":
    main()
