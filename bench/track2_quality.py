"""Quality of the Track 2 methods on mnist5k against real images: random,
herding, diffusion, d4m (one run per --strength) and d3m, each without and
with selection (--oversample R) and with distribution matching
(--match-steps N), generated from one trained model and
scored with the evaluation recipe (official by default).

    python bench/track2_quality.py --model /work/mnist5k-model --out /tmp/t2q \
        --ipc 10 --strength 0.5 0.7 0.9 --oversample 3 --images docs/images

The model is a `ddchallenge train mnist5k` folder; the d4m codebook for IPC
and the d3m vectors (K = IPC) are made in it first unless present (a run
reads no other table: d4m matches against its own prototypes redrawn). Prints
one markdown row per set as it is scored (generation seconds included) and,
with --images, writes a sample grid per method.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ddchallenge.diffusion.codebook import model_folder
from ddchallenge.diffusion.invert import invert
from ddchallenge.diffusion.prototypes import make_prototypes
from ddchallenge.fileio import atomic_write_bytes
from ddchallenge.generators import GenerateConfig, generate
from ddchallenge.protocol import OFFICIAL
from ddchallenge.report import image_grid
from ddchallenge.score import score
from ddchallenge.submission import load_submission


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--strength", type=float, nargs="+", default=[0.7])
    ap.add_argument("--oversample", type=float, default=3.0, help="R of the selection runs (1: none)")
    ap.add_argument("--match-steps", type=int, nargs="+", default=[0],
                    help="distribution matching steps; one run per value (0: none)")
    ap.add_argument("--methods", nargs="+", default=["random", "herding", "diffusion", "d4m", "d3m"])
    ap.add_argument("--invert-steps", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=OFFICIAL.epochs)
    ap.add_argument("--rounds", type=int, default=OFFICIAL.rounds)
    ap.add_argument("--images", type=Path, help="write <method>.png sample grids here")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    folder = model_folder(args.model)
    meta = json.loads((folder / "ddchallenge.json").read_text())
    books = meta.get("codebooks") or {}
    wanted = [ipc for ipc in [args.ipc] if f"d4m-ipc{ipc}" not in books]
    if "d4m" in args.methods and wanted:
        for r in make_prototypes(str(folder), wanted, device=args.device):
            print(f"prototypes IPC {r.ipc}: {r.seconds:.1f} s, {r.iterations} k-means iterations", flush=True)
    if "d3m" in args.methods and f"d3m-k{args.ipc}" not in books:
        r = invert(str(folder), args.ipc, steps=args.invert_steps, device=args.device)
        print(f"invert K {r.per_class}: {r.steps} steps in {r.seconds:.0f} s, loss {r.first_loss:.4f} -> "
              f"{r.last_loss:.4f}", flush=True)
    recipe = OFFICIAL.with_overrides(epochs=args.epochs, rounds=args.rounds)
    runs = []
    for method in args.methods:
        variants = [{"strength": s} for s in args.strength] if method == "d4m" else [{}]
        for options in variants:
            if method not in ("random", "herding"):
                options = {"model": str(folder), **options}
            for r in sorted({1.0, args.oversample}):
                runs += [(method, options, r, m) for m in args.match_steps]
    print(f"| set | IPC | accuracy % (mean ± std, {recipe.rounds} rounds, {recipe.epochs} epochs) | per round | "
          "generation s |\n|---|---|---|---|---|", flush=True)
    for method, options, r, m in runs:
        name = (method + "".join(f"-s{v:g}" for k, v in options.items() if k == "strength")
                + (f"-R{r:g}" if r > 1 else "") + (f"-M{m}" if m else ""))
        out = args.out / f"{name}.h5"
        rep = generate(GenerateConfig("mnist5k", method, args.ipc, seed=0, device=args.device, options=options,
                                      oversample=r, match_steps=m), out, force=True)
        if args.images and r == 1:
            entry = load_submission(out, "mnist5k")[0]
            atomic_write_bytes(args.images / f"mnist5k-{name}-samples.png", image_grid(entry, 10, args.ipc))
        start = time.perf_counter()
        result = score(out, recipe=recipe, seed=0, device=args.device, progress=False, sandbox=False)
        d = result.datasets[0]
        print(f"| {name} | {args.ipc} | {100 * d.mean:.2f} ± {100 * d.std:.2f} | "
              f"{' '.join(f'{100 * a:.1f}' for a in d.accuracies)} | {rep.seconds:.1f} "
              f"(scored in {time.perf_counter() - start:.0f} s) |", flush=True)


if __name__ == "__main__":
    main()
