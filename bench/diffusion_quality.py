"""Quality of the diffusion generator on mnist5k against the baselines:
train the `mnist5k` preset on this machine (timed), generate IPC 10 with the
default sampler at each guidance scale asked for, and score each set with the
official recipe (3 rounds), next to `random` and `herding` at IPC 10.

    python bench/diffusion_quality.py --out /tmp/dq --guidance 1 2 4

A rerun reuses a finished model in OUT (and resumes an interrupted one).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ddchallenge.diffusion.config import train_config
from ddchallenge.diffusion.model import checkpoints
from ddchallenge.diffusion.train import train
from ddchallenge.generators import GenerateConfig, generate
from ddchallenge.protocol import OFFICIAL
from ddchallenge.score import score


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--guidance", type=float, nargs="+", default=[2.0])
    ap.add_argument("--baselines", action="store_true", help="also score random and herding")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    model = args.out / "model"
    config = train_config("mnist5k")
    done = checkpoints(model) and checkpoints(model)[-1].name == f"step-{config.steps:07d}"
    if not done:
        start = time.perf_counter()
        report = train(config, model, device=args.device, resume=bool(checkpoints(model)))
        print(f"trained {config.steps} steps in {time.perf_counter() - start:.0f} s "
              f"({report.images_per_second:.1f} images/s, final loss {report.final_loss:.4f})", flush=True)
    runs = [("diffusion", {"model": str(model), "guidance": g}) for g in args.guidance]
    if args.baselines:
        runs += [("random", {}), ("herding", {})]
    for method, options in runs:
        name = method + (f"-g{options['guidance']:g}" if "guidance" in options else "")
        out = args.out / f"{name}.h5"
        r = generate(GenerateConfig("mnist5k", method, 10, seed=0, options=options), out, force=True)
        result = score(out, recipe=OFFICIAL, seed=0, device=args.device, progress=False, sandbox=False)
        d = result.datasets[0]
        print(f"{name}: generated in {r.seconds:.1f} s; official recipe {100 * d.mean:.2f} ± {100 * d.std:.2f} % "
              f"over {len(d.accuracies)} rounds ({', '.join(f'{100 * a:.2f}' for a in d.accuracies)})", flush=True)


if __name__ == "__main__":
    main()
