"""The validation decision of session 18 (issue 20), as it was made, before
`prototypes --fit-steps` existed: the folder's k-means d4m table for IPC 10
moved by STEPS steps of distribution matching (evaluation/matching.py) against
the view's training images with matching seed 1234, written as the d4m-ipc10
table of one model copy per strength, each scored as a Track 2 folder on the
validation view. `prototypes --fit-steps` runs the same procedure with a seed
of its own stream (another draw of the table); this script reproduces the
rows in docs/benchmarks.md ("Prototypes fitted to the class").

    python bench/fit_probe.py --model /work/models/mnist5k-val --out /work/runs/fit   # ~25 min, then two scores

(The session ran the two scores side by side, one thread each; the
budget-bound matching in the run does more steps on an idle machine.)
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from ddchallenge.data import load_train
from ddchallenge.diffusion.codebook import model_folder, store
from ddchallenge.diffusion.model import load_generator
from ddchallenge.diffusion.prototypes import PURPOSE
from ddchallenge.evaluation.matching import match
from ddchallenge.protocol import get_dataset

DATASET, IPC, STEPS, SEED, STRENGTHS = "mnist5k-val", 10, 1000, 1234, ("0.5", "0.3")


def cli(*args) -> None:
    subprocess.run([sys.executable, "-m", "ddchallenge", *map(str, args)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    spec = get_dataset(DATASET)
    real, real_labels = load_train(spec)
    fitted = None
    for strength in STRENGTHS:
        folder = args.out / "folders" / f"fit-s{round(float(strength) * 100)}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(model_folder(str(args.model)), folder)
        cli("prototypes", folder, "--ipc", IPC, "--make-default", "--match-steps", 300, "--strength", strength)
        gen = load_generator(str(folder), spec)
        record = dict(gen.meta["codebooks"][f"d4m-ipc{IPC}"])
        if fitted is None:  # the same k-means centres in every copy: fitted once
            from safetensors.torch import load_file

            centres = load_file(folder / record["file"])["centres"]
            images = centres.flatten(0, 1).add(1).mul(127.5).round().clamp(0, 255).byte().numpy()
            out, _ = match(images, np.repeat(np.arange(spec.classes), IPC), real, real_labels, spec, STEPS, SEED,
                           torch.device("cpu"))
            fitted = torch.from_numpy(out).float().div(127.5).sub(1).reshape(centres.shape)
        kept = {k: record[k] for k in ("method", "ipc", "sample_shape", "space", "seed", "kmeans_iterations",
                                       "converged")}
        store(gen, f"d4m-ipc{IPC}", {"centres": fitted}, {**kept, "fit": {"steps": STEPS, "seed": SEED}}, PURPOSE)
        cli("score", folder, "--budget", 600, "--ipc", IPC, "--seed", 0, "--dataset", DATASET,
            "--json", args.out / f"{folder.name}.json", "--output", args.out / "records" / folder.name, "--quiet")


if __name__ == "__main__":
    main()
