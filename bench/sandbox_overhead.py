"""Overhead of reading a submission in the sandbox (child process start-up,
copy in, safetensors back, validation again) against reading it in-process
(`--no-sandbox`), on CIFAR-100-shaped and Tiny-ImageNet-shaped official files.

    python bench/sandbox_overhead.py --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ddchallenge.protocol import UploadRules, get_dataset
from ddchallenge.upload import read_upload


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("cifar100", "tinyimagenet"):
            spec = get_dataset(name)
            path = Path(tmp) / spec.submission_file
            torch.save(torch.randn(spec.classes * 10, *spec.image_shape), path)
            rules = UploadRules()
            plain = median_seconds(lambda: read_upload(path, rules, sandbox=False), args.repeats)
            boxed = median_seconds(lambda: read_upload(path, rules), args.repeats)
            mib = path.stat().st_size / 2**20
            print(f"| {name} official file ({mib:.0f} MiB) | {plain:.3f} s | {boxed:.3f} s | +{boxed - plain:.2f} s |")


if __name__ == "__main__":
    main()
