"""A/B fidelity of training a dataset's rounds together against the landed
scorer (rounds one at a time), on synthetic sets of the challenge's shapes.

The set: one smooth random pattern per class (4x4 noise, bilinear up to the
image size), each image its class pattern plus Gaussian noise; 10 training
images per class (CIFAR-100 shape: 1000 x 3x32x32, 100 classes; Tiny shape:
2000 x 3x64x64, 200 classes) and 20 test images per class, all from one
fixed seed. Learnable, so that accuracies spread over rounds the way real
ones do, and cheap, so that >= 10 rounds per arm fit a CPU at a reduced
epoch budget.

Arm A ("alone") is `train_round` per seed, which is the landed trainer bit
for bit (the refactor into `_Round` was checked to give identical weights);
arm B ("together") is `train_rounds` over the same seeds, in groups of
--group rounds. Both arms use the same seeds, so besides the unpaired
comparison (difference of means against the pooled standard error) the
per-round differences are printed too.

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
from ddchallenge.evaluation.train import accuracy, train_round, train_rounds
from ddchallenge.protocol import OFFICIAL, get_dataset


NOISE = {"mnist5k": 4.0, "cifar100": 6.0, "tinyimagenet": 4.0}  # ~45 % (4 passes) and ~55 % (1 pass) on this CPU


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
    ap.add_argument("--group", type=int, default=5, help="rounds per batched model in the 'together' arm")
    ap.add_argument("--noise", type=float, help="std of the per-image noise; class patterns have std 1 (default: "
                    "per shape, so that the reduced budget lands mid-range: " + str(NOISE) + ")")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    spec = get_dataset(args.shape)
    noise = args.noise if args.noise is not None else NOISE[args.shape]
    (x, y), (xt, yt) = synthetic_set(spec, noise=noise)
    recipe = OFFICIAL.with_overrides(epochs=args.epochs)
    seeds = list(range(args.rounds))

    t = time.perf_counter()
    alone = [accuracy(train_round(spec, x, y, recipe, s, device, progress=False), xt, yt) for s in seeds]
    t_alone = time.perf_counter() - t
    t = time.perf_counter()
    together = []
    for start in range(0, len(seeds), args.group):
        nets = train_rounds(spec, x, y, recipe, seeds[start : start + args.group], device, progress=False)
        together += [accuracy(net, xt, yt) for net in nets]
    t_together = time.perf_counter() - t

    a, b = np.array(alone) * 100, np.array(together) * 100
    n = len(seeds)
    se = math.sqrt(a.var(ddof=1) / n + b.var(ddof=1) / n)
    diff = b.mean() - a.mean()
    per_image = 100 / len(yt)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    print(f"{args.shape}: synthetic {tuple(x.shape)}, {len(yt)} test images, {args.epochs + 1} passes, "
          f"noise {noise:g}, {n} rounds per arm (seeds 0-{n - 1}), together in groups of {args.group}, {where}")
    print("| arm | accuracy % mean ± std (ddof 1) | per round % | seconds |")
    print("|---|---|---|---|")
    print(f"| alone (landed) | {a.mean():.2f} ± {a.std(ddof=1):.2f} | {' '.join(f'{v:.2f}' for v in a)} | {t_alone:.0f} |")
    print(f"| together | {b.mean():.2f} ± {b.std(ddof=1):.2f} | {' '.join(f'{v:.2f}' for v in b)} | {t_together:.0f} |")
    d = np.abs(b - a) / per_image
    print(f"difference of means {diff:+.3f} points, pooled standard error {se:.3f} "
          f"({'within' if abs(diff) <= se else 'OUTSIDE'}); per round: {int((d < 0.5).sum())} of {n} identical, "
          f"largest difference {d.max():.0f} test image(s)")


if __name__ == "__main__":
    main()
