"""Where a GPU epoch of the challenge's training goes, and what each candidate
speed-up of issue 24 buys: milliseconds per epoch of the landed trainer and
of its variants, side by side in one run, plus the profile of a landed epoch
(top kernels by GPU time, kernel launches per epoch).

    python bench/gpu_profile.py --shape tinyimagenet --epochs 6
    python bench/gpu_profile.py --shape cifar100 --epochs 20

Variants: bench/trainer_variants.py (`alone` is the landed trainer; those
that train rounds together train 3, timed per round); each alternates with
the others, median of --repeats runs.
Compilation happens in an untimed warm-up run. A variant that fails prints
its error and the others go on. Synthetic data of the shape (noise), so the
numbers are speed only; fidelity is bench/fidelity.py's job.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch

import ddchallenge.evaluation.train as train_mod
from ddchallenge.evaluation.device import resolve_device
from ddchallenge.protocol import OFFICIAL, get_dataset

import trainer_variants  # bench/, beside this script
from evaluator_speed import _sync, seconds_per_epoch


def _run(variant: str, spec, x, y, recipe, device) -> None:
    trainer_variants.train(variant, spec, x, y, recipe, [0, 1, 2] if variant in trainer_variants.TOGETHER else [0], device)


def profile_epoch(spec, x, y, device, top: int) -> None:
    """One pass of the landed trainer under torch.profiler: kernel launches and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    recipe = OFFICIAL.with_overrides(epochs=0)  # one pass
    train_mod.train_round(spec, x, y, recipe, 0, device, progress=False)  # warm-up
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        train_mod.train_round(spec, x, y, recipe, 0, device, progress=False)
        _sync(device)
    gpu_time: Counter = Counter()
    launches = 0
    for ev in prof.events():
        # User annotations (the optimizer's step range) span kernels counted on their own.
        if ev.device_type == torch.autograd.DeviceType.CUDA and not getattr(ev, "is_user_annotation", False):
            launches += 1
            gpu_time[ev.name] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    total = sum(gpu_time.values())
    steps = -(-x.shape[0] // OFFICIAL.batch_size)
    print(f"\nprofile of one landed pass ({steps} steps): {launches} GPU kernels "
          f"({launches / steps:.0f} per step), {total / 1e3:.1f} ms of kernel time")
    print("| kernel | GPU ms | share |")
    print("|---|---|---|")
    for name, us in gpu_time.most_common(top):
        print(f"| {name[:90]} | {us / 1e3:.2f} | {100 * us / total:.0f} % |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["mnist5k", "cifar100", "tinyimagenet"], default="tinyimagenet")
    ap.add_argument("--epochs", type=int, default=5, help="recipe epochs per timed run (epochs + 1 passes)")
    ap.add_argument("--repeats", type=int, default=3)
    # nondet is left out: it measured no gain (docs/benchmarks.md, session 11)
    ap.add_argument("--variants", nargs="+", default=["alone", "compiled", "rounds-graph", "pool-reshape",
                                                      "channels-last", "bf16"],
                    choices=trainer_variants.VARIANTS)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--device", default="auto", help="a CPU run only checks that the script works")
    args = ap.parse_args()
    device = resolve_device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    spec = get_dataset(args.shape)
    n = spec.classes * 10
    # On the device from the start, as for the scorer's 1001 passes: a copy
    # per run would add the set's transfer (16 ms at the Tiny shape) to a pass.
    x, y = torch.randn(n, *spec.image_shape).to(device), (torch.arange(n) // 10).to(device)
    recipe = OFFICIAL.with_overrides(epochs=args.epochs)
    warm = OFFICIAL.with_overrides(epochs=1)  # two passes: the lr drop's new optimiser compiles too
    variants = []
    for v in args.variants:
        t = time.perf_counter()
        try:
            _run(v, spec, x, y, warm, device)
            variants.append(v)
            print(f"warm-up {v}: {time.perf_counter() - t:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - a failing variant is a result, the others go on
            print(f"| {v} | failed: {type(e).__name__}: {str(e).splitlines()[0][:160]} |", flush=True)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for v in variants:
            per = 3 if v in trainer_variants.TOGETHER else 1  # together variants train 3 rounds; times are per round
            times[v] += [t / per for t in seconds_per_epoch(lambda: _run(v, spec, x, y, recipe, device), args.epochs, 1,
                                                            device)]
        # as it goes: a run stopped at its time limit keeps the repeats it finished
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{v} {times[v][-1] * 1e3:.1f} ms" for v in variants),
              flush=True)
    base = statistics.median(times["alone"]) if "alone" in times else None
    print(f"\n{args.shape} {tuple(x.shape)}, {where}, torch {torch.__version__}, "
          f"{args.epochs + 1} passes x {args.repeats} runs")
    print("| variant | ms/epoch (median; together: per round) | against alone (landed) | runs (ms) |")
    print("|---|---|---|---|")
    for v, ts in times.items():
        m = statistics.median(ts)
        print(f"| {v} | {m * 1e3:.1f} | {base / m:.2f}x |" if base else f"| {v} | {m * 1e3:.1f} | - |",
              " ".join(f"{t * 1e3:.1f}" for t in ts), "|")
    profile_epoch(spec, x, y, device, args.top)


if __name__ == "__main__":
    main()
