"""What Ray costs and gives: N small mnist5k uploads scored as a plain batch
(one after another, torch on every core) and with `score --cluster local`
(one task per upload, one CPU and one thread each, as many at once as the
machine has cores), both through the real CLI into fresh result folders.
Also checks that both give the same accuracies (with one thread for the
plain batch, as a task uses).

    python bench/cluster_overhead.py --uploads 8 --epochs 30 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ddchallenge.data import mnist5k, normalise
from ddchallenge.protocol import get_dataset


def make_uploads(folder: Path, count: int) -> list[Path]:
    spec = get_dataset("mnist5k")
    x, y = mnist5k.load("train")
    paths = []
    for i in range(count):
        rng = np.random.default_rng(i)
        idx = np.concatenate([rng.choice(np.flatnonzero(y == k), 10, replace=False) for k in range(10)])
        paths.append(folder / f"team{i:03d}")
        paths[-1].mkdir()
        torch.save(normalise(x[idx], spec).clone(), paths[-1] / "mnist5k.pt")
    return paths


def run(uploads: list[Path], out: Path, epochs: int, extra: list[str], env: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ddchallenge", "score", *map(str, uploads), "--dataset", "mnist5k",
                    "--epochs", str(epochs), "--rounds", "1", "--output", str(out), "--quiet", *extra],
                   check=True, capture_output=True, env={**os.environ, **env})
    seconds = time.perf_counter() - start
    accs = {p.name.rsplit("-", 1)[0]: json.loads(p.read_text())["datasets"][0]["accuracies"] for p in out.iterdir()}
    return seconds, accs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uploads", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        uploads = make_uploads(Path(tmp), args.uploads)
        arms = {"plain batch": ([], {}), "plain batch, 1 thread": ([], {"OMP_NUM_THREADS": "1"}),
                "--cluster local": (["--cluster", "local"], {})}
        times = {arm: [] for arm in arms}
        accs = {}
        for r in range(args.repeats):  # interleaved, so that a change in the machine's load hits every arm
            for arm, (extra, env) in arms.items():
                seconds, accs[arm] = run(uploads, Path(tmp) / f"out-{r}-{list(arms).index(arm)}", args.epochs,
                                         extra, env)
                times[arm].append(seconds)
        print(f"{args.uploads} uploads, {args.epochs} epochs, 1 round, {os.cpu_count()} cores, "
              f"median of {args.repeats}")
        base = statistics.median(times["plain batch"])
        for arm, ts in times.items():
            m = statistics.median(ts)
            print(f"| {arm} | {m:.1f} s | {m / args.uploads:.2f} s/upload | x{base / m:.2f} |")
        same = accs["plain batch, 1 thread"] == accs["--cluster local"]
        print(f"cluster accuracies equal the one-thread plain batch's: {same}")


if __name__ == "__main__":
    main()
