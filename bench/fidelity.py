"""A/B fidelity of candidate trainer settings (bench/trainer_variants.py:
rounds together, CUDA graphs, a compiled network, ...) against the landed
scorer (rounds one at a time), on synthetic sets of the challenge's shapes.

The set: one smooth random pattern per class (4x4 noise, bilinear up to the
image size), each image its class pattern plus Gaussian noise; 10 training
images per class (CIFAR-100 shape: 1000 x 3x32x32, 100 classes; Tiny shape:
2000 x 3x64x64, 200 classes) and 20 test images per class, all from one
fixed seed. Learnable, so that accuracies spread over rounds the way real
ones do, and cheap, so that >= 10 rounds per arm fit a CPU at a reduced
epoch budget. --noise sets how hard it is: a budget that lands near 100 %
cannot show a shift, so pick the noise for the budget (NOISE's comment).

Arm A ("alone") is `train_round` per seed, the landed trainer; each --arms
entry is an arm B over the same seeds (the together ones in groups of
--group rounds), so besides the unpaired comparison (difference of means
against the pooled standard error) the per-round differences are printed too.

    python bench/fidelity.py --shape cifar100 --epochs 3 --rounds 10 --group 5
    python bench/fidelity.py --shape tinyimagenet --epochs 0 --rounds 10 --group 2
"""
from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from ddchallenge.evaluation.device import resolve_device
from ddchallenge.evaluation.train import accuracy
from ddchallenge.protocol import OFFICIAL, get_dataset

import trainer_variants  # bench/, beside this script


# Off both ends at the CPU's reduced budgets: 25 % (CIFAR-100 shape, 4 passes), 47 % (Tiny, 1 pass), as measured
# in docs/benchmarks.md. At a GPU's budgets they saturate (session 11, H100: 99.2 % at 21 passes, 100 % at 7), so
# bench/gpu_check.sh passes its own.
NOISE = {"mnist5k": 4.0, "cifar100": 6.0, "tinyimagenet": 4.0}


def synthetic_set(spec, train_ipc: int = 10, test_ipc: int = 20, noise: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c, h, w = spec.image_shape
    patterns = F.interpolate(torch.randn(spec.classes, c, 4, 4, generator=g), size=(h, w), mode="bilinear",
                             align_corners=False)
    patterns = patterns / patterns.std()

    def draw(ipc):
        y = torch.arange(spec.classes).repeat_interleave(ipc)
        return patterns[y] + noise * torch.randn(len(y), c, h, w, generator=g), y

    return draw(train_ipc), draw(test_ipc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["mnist5k", "cifar100", "tinyimagenet"], default="cifar100")
    ap.add_argument("--epochs", type=int, default=5, help="recipe epochs (runs epochs + 1 passes)")
    ap.add_argument("--rounds", type=int, default=10, help="rounds per arm (seeds 0..rounds-1)")
    ap.add_argument("--group", type=int, default=5, help="rounds per batched model in the together arms")
    ap.add_argument("--arms", nargs="+", default=["together"], choices=trainer_variants.VARIANTS[1:],
                    help="the B arms, each against alone (the landed trainer)")
    ap.add_argument("--noise", type=float, help="std of the per-image noise; class patterns have std 1 (default: "
                    "per shape, for the CPU's reduced budgets: " + str(NOISE) + ")")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    spec = get_dataset(args.shape)
    noise = args.noise if args.noise is not None else NOISE[args.shape]
    (x, y), (xt, yt) = synthetic_set(spec, noise=noise)
    recipe = OFFICIAL.with_overrides(epochs=args.epochs)
    seeds = list(range(args.rounds))
    n = len(seeds)
    per_image = 100 / len(yt)

    def arm(variant: str) -> tuple[np.ndarray, float]:
        group = args.group if variant in trainer_variants.TOGETHER else n
        t = time.perf_counter()
        accs = [accuracy(net, xt, yt) for start in range(0, n, group)
                for net in trainer_variants.train(variant, spec, x, y, recipe, seeds[start : start + group], device)]
        return np.array(accs) * 100, time.perf_counter() - t

    a, t_alone = arm("alone")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    print(f"{args.shape}: synthetic {tuple(x.shape)}, {len(yt)} test images, {args.epochs + 1} passes, "
          f"noise {noise:g}, {n} rounds per arm (seeds 0-{n - 1}), together in groups of {args.group}, {where}")
    print("| arm | accuracy % mean ± std (ddof 1) | per round % | seconds (compilation included) | "
          "difference of means | pooled SE | rounds identical | largest difference (test images) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| alone (landed) | {a.mean():.2f} ± {a.std(ddof=1):.2f} | {' '.join(f'{v:.2f}' for v in a)} | "
          f"{t_alone:.0f} | | | | |", flush=True)
    for variant in args.arms:
        b, seconds = arm(variant)
        se = math.sqrt(a.var(ddof=1) / n + b.var(ddof=1) / n)
        diff = b.mean() - a.mean()
        d = np.abs(b - a) / per_image
        print(f"| {variant} | {b.mean():.2f} ± {b.std(ddof=1):.2f} | {' '.join(f'{v:.2f}' for v in b)} | "
              f"{seconds:.0f} | {diff:+.3f} ({'within' if abs(diff) <= se else 'OUTSIDE'} SE) | {se:.3f} | "
              f"{int((d < 0.5).sum())} of {n} | {d.max():.0f} |", flush=True)


if __name__ == "__main__":
    main()
