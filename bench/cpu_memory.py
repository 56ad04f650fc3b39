"""CPU system time and page faults of training, with and without keeping
freed memory (`ddchallenge.evaluation.device.keep_freed_memory`).

Each measurement is a fresh child process that trains one round of the given
shape on random images (the allocator's state must not carry over between
runs); the two modes alternate, and the table gives medians over the runs of
training time (wall), user and system CPU seconds, minor page faults and
peak resident memory of the child, all from getrusage.

    python bench/cpu_memory.py --shape cifar100 --epochs 1 --repeats 3
    python bench/cpu_memory.py --shape tinyimagenet --epochs 0 --repeats 3

"off" replaces keep_freed_memory with a no-op, which is the landed trainer
before this change.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import statistics
import subprocess
import sys
import time


def child(shape: str, epochs: int, mode: str) -> None:
    import torch

    from ddchallenge.evaluation import device as device_module
    from ddchallenge.evaluation.train import train_round
    from ddchallenge.protocol import OFFICIAL, get_dataset

    if mode == "off":
        device_module.keep_freed_memory = contextlib.nullcontext
    spec = get_dataset(shape)
    n = spec.classes * 10
    x, y = torch.randn(n, *spec.image_shape), torch.arange(n) // 10
    before = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    train_round(spec, x, y, OFFICIAL.with_overrides(epochs=epochs), 0, torch.device("cpu"), progress=False)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall": wall, "user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime,
                      "minflt": after.ru_minflt - before.ru_minflt, "maxrss_mib": after.ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["mnist5k", "cifar100", "tinyimagenet"], default="cifar100")
    ap.add_argument("--epochs", type=int, default=1, help="recipe epochs (runs epochs + 1 passes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.shape, args.epochs, args.child)
        return
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(args.repeats):
        for mode in ("off", "on"):
            out = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--epochs", str(args.epochs),
                                  "--child", mode], check=True, capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {platform.python_version()}; "
          f"{args.shape}, {args.epochs + 1} pass(es) of one round, median of {args.repeats} fresh processes")
    print("| keep freed memory | training s | user s | sys s | minor faults | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for mode in ("off", "on"):
        med = {k: statistics.median(r[k] for r in runs[mode]) for k in runs[mode][0]}
        print(f"| {mode} | {med['wall']:.2f} | {med['user']:.2f} | {med['sys']:.2f} | {med['minflt']:,.0f} | "
              f"{med['maxrss_mib']:,.0f} |")


if __name__ == "__main__":
    main()
