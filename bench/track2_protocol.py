"""Track 2 quality on mnist5k under the honest protocol (issue 20), through the
real CLI: decisions read on the validation view, reported numbers read once
on the test split with evaluation seeds that tuning never used.

    ddchallenge train mnist5k-val -o /work/models/mnist5k-val      # the generator, trained without the
                                                                    # validation images (~25 min on 2 cores)
    python bench/track2_protocol.py --model /work/models/mnist5k-val --out /work/runs/t2p \\
        --dataset mnist5k-val --seeds 0 --runs d4m d4m-m300         # decide, on the validation view
    python bench/track2_protocol.py --model /work/models/mnist5k-val --out /work/runs/t2p \\
        --dataset mnist5k --seeds 10 20 --runs d4m herding herding-m300 random   # report, on the test split

A run is either a Track 2 folder, scored with `ddchallenge score FOLDER
--budget 600 --ipc K --seed S` (the generation seed is derived from S, so
each scoring seed is a generation seed), or a real-image baseline made with
`ddchallenge generate --method M --seed S` and scored with `--seed S`.
Each folder is a copy of the model's newest checkpoint whose tables and
generate section are written by `ddchallenge prototypes`/`invert` with
--make-default (diffusion's by `ddchallenge settings`). Every result JSON is kept under --out, a run whose JSON
exists is not run again, and one markdown row per run is printed (and
appended to --out/rows.md). Copies of the script may share --out (one
per core): a run another copy is doing is skipped. A table run
(TABLES) scores another run's stored d4m table as the set itself. The official recipe (1001 passes, 3 rounds);
--epochs/--rounds exist for trying the script, never for reported rows.

--extras adds issue 23's measures to every score of the run, beside the
challenge score (which they never change): IOR against random real images
of the same seed (`--baseline random --baseline-seed S`), the cheaper
architectures of the evaluation pool (EXTRA_ARCHS) and soft labels from a
teacher (mode M: `--teacher`, made once by `ddchallenge teacher DATASET`).
A real-image baseline's set also stores the teacher's soft labels
(`generate --soft-labels teacher`) and is scored once more with them (mode
S: `--labels soft`, its own JSON <...>-extras-S.json); a Track 2 run's
images carry none, so it has no mode S row. Such a run keeps its JSON as
<...>-extras.json and prints one more row per measure (to --out/extras.md):

    python bench/track2_protocol.py --model /work/models/mnist5k-val --out /work/runs/t2p \\
        --dataset mnist5k --seeds 10 --runs random herding d4m-m300 --extras

--arch NAME (repeatable) trains the pool's costlier networks too (ConvNet-D4,
AlexNet, VGG-11, ResNet-18: one to seven challenge scores each on a CPU), in
a score of their own beside the challenge score (<...>-arch-NAME....json),
so that a run with --extras is never redone to add them:

    python bench/track2_protocol.py --model /work/models/mnist5k-val --out /work/runs/t2p \\
        --dataset mnist5k --seeds 10 --runs herding --arch convnetd4 --arch vgg11
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ddchallenge.diffusion.codebook import model_folder

BUDGET = 600
# Probes, not Track 2 entries: a run given a longer budget shows what a machine that many times faster would
# make inside Track 2's 600 s (does matching gain from more steps than this CPU affords?). Its rows say so.
PROBE_BUDGETS = {"d4m-m1500": 3000}
# name -> how the Track 2 folder is made from a copy of the model (commands after the folder argument)
FOLDERS = {
    "diffusion": [["settings", "--match-steps", "0"]],  # plain runs say so: folders match by default (session 13)
    "diffusion-m300": [["settings", "--match-steps", "300"]],
    # no classifier-free guidance (issue 20, session 22): at IPC 50 the guided sampler's typical digits cover a
    # class's spread less than random real images do; guidance 1 samples the model's own distribution, in half
    # the UNet passes
    "diffusion-m300-g1": [["settings", "--match-steps", "300", "--guidance", "1"]],
    # guidance 1 without matching (session 24's method review): at guidance 1 the unguided pool is a second draw of
    # the set's own distribution, so matching may only fit that draw; this frees its ~470 s of the budget
    "diffusion-g1": [["settings", "--match-steps", "0", "--guidance", "1"]],
    "d4m": [["prototypes", "--ipc", "{ipc}", "--make-default", "--match-steps", "0"]],
    "d4m-m300": [["prototypes", "--ipc", "{ipc}", "--make-default", "--match-steps", "300"]],
    "d4m-m1500": [["prototypes", "--ipc", "{ipc}", "--make-default", "--match-steps", "1500"]],
    # the pool spread wider around the same prototypes (issue 20, session 17): redrawn from further noise
    "d4m-m300-p70": [["prototypes", "--ipc", "{ipc}", "--make-default", "--match-steps", "300"],
                     ["settings", "--pool-strength", "0.7"]],
    "d4m-m300-p90": [["prototypes", "--ipc", "{ipc}", "--make-default", "--match-steps", "300"],
                     ["settings", "--pool-strength", "0.9"]],
    # the table fitted to the class before any run (issue 20, session 18): k-means centres moved by 1,000 steps of
    # distribution matching against the training images (`prototypes --fit-steps`), redrawn at the set's strength
    "d4m-fit1000-m300": [["prototypes", "--ipc", "{ipc}", "--fit-steps", "1000", "--make-default", "--match-steps",
                          "300"]],
    "d4m-fit1000-m300-s30": [["prototypes", "--ipc", "{ipc}", "--fit-steps", "1000", "--make-default", "--match-steps",
                              "300", "--strength", "0.3"]],
    "d3m": [["invert", "--per-class", "{ipc}", "--make-default", "--match-steps", "0"]],
    "d3m-m300": [["invert", "--per-class", "{ipc}", "--make-default", "--match-steps", "300"]],
    # d3m with diffusion's IPC-50 choice (guidance 1), to be decided on the validation view as diffusion's was
    "d3m-m300-g1": [["invert", "--per-class", "{ipc}", "--make-default", "--match-steps", "300"],
                    ["settings", "--guidance", "1"]],
}
# name -> `generate` options of a real-image baseline
# --extras: the pool's architectures cheap enough for a 2-core CPU (ConvNet-D4, AlexNet, VGG-11 and ResNet-18
# cost 1x to 7x the challenge's ConvNet per round there: bench/gpu_check.sh runs the whole pool)
EXTRA_ARCHS = ("convnetbn", "mlp", "lenet")
BASELINES = {
    "random": ["--method", "random"],
    "herding": ["--method", "herding"],
    "herding-m300": ["--method", "herding", "--match-steps", "300"],
}

# name -> the run whose folder's d4m table is scored as the set itself (no generator): a fitted table is
# k-means centres of real images moved toward real images, a distilled real-image set in its own right, so
# it is the baseline a generator built on it must beat (issue 20, session 18)
TABLES = {"d4m-fit1000-table": "d4m-fit1000-m300-s30"}


def cli(*args: str) -> None:
    command = [sys.executable, "-m", "ddchallenge", *map(str, args)]
    print("$ ddchallenge " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    subprocess.run(command, check=True)


def folder_for(name: str, model: Path, out: Path, ipc: int) -> Path:
    """The Track 2 folder of run `name`, made once (a copy of the model's
    newest checkpoint). It is made under a name of its own and renamed when
    whole, so that a copy of the script starting meanwhile never scores a
    folder whose tables are still being written."""
    folder = out / "folders" / f"{name}-ipc{ipc}"
    if not folder.is_dir():
        making = folder.with_name(f"{folder.name}.making-{os.getpid()}")
        shutil.rmtree(making, ignore_errors=True)
        shutil.copytree(model_folder(str(model)), making)
        for step in FOLDERS[name]:
            cli(step[0], making, *[a.format(ipc=ipc) for a in step[1:]])
        try:
            making.rename(folder)
        except OSError:  # another copy finished it first: same commands, same bytes
            shutil.rmtree(making)
    return folder


def teacher_for(args) -> Path:
    """The mode-M teacher of --extras, made once (`ddchallenge teacher`, its default recipe; --epochs, when
    trying the script, shortens it too)."""
    folder = args.out / f"teacher-{args.dataset}"
    if not (folder / "teacher.json").is_file():
        cli("teacher", args.dataset, "-o", folder, "--quiet", *(["--epochs", args.epochs] if args.epochs is not None else []))
    return folder


def claim(result: Path) -> bool:
    """Whether this copy of the script runs `result` (two copies may share
    --out, e.g. one per core): a <result>.running file names the copy that
    does, and one left by a copy no longer alive is taken over."""
    lock = result.with_suffix(".running")
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(lock.read_text() or 0), 0)
                return False
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True


def run(name: str, args, seed: int) -> dict | None:
    """The result of one run (None: another copy of the script is running it)."""
    tail = ("-extras" if args.extras else "") + "".join(f"-arch-{a}" for a in args.arch)
    result = args.out / "results" / f"{args.dataset}-{name}-ipc{args.ipc}-seed{seed}{tail}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    if not result.is_file():
        if not claim(result):
            print(f"({name}, seed {seed}: run by another copy of this script)", file=sys.stderr, flush=True)
            return None
        try:
            make(name, args, seed, result)
        finally:
            result.with_suffix(".running").unlink(missing_ok=True)
    loaded = json.loads(result.read_text())
    soft = mode_s_result(result)
    if soft.is_file():  # mode S: a score of its own (one label setting per score), shown beside the others
        loaded["extras"] = loaded.get("extras", []) + json.loads(soft.read_text()).get("extras", [])
    return loaded


def mode_s_result(result: Path) -> Path:
    return result.with_name(result.stem + "-S.json")


def make(name: str, args, seed: int, result: Path) -> None:
    budget = [a for k, v in (("--epochs", args.epochs), ("--rounds", args.rounds)) if v is not None
              for a in (k, v)]
    recipe = list(budget)
    if args.extras:
        recipe += ["--baseline", "random", "--baseline-seed", seed, "--teacher", teacher_for(args),
                   *[a for arch in EXTRA_ARCHS for a in ("--arch", arch)]]
    recipe += [a for arch in args.arch for a in ("--arch", arch)]
    records = args.out / "records" / result.stem  # a results folder is one batch's at a time: one per run
    common = ["--dataset", args.dataset, "--seed", seed, "--output", records, "--quiet", *recipe]
    started = time.perf_counter()
    if name in FOLDERS:
        folder = folder_for(name, args.model, args.out, args.ipc)
        cli("score", folder, "--budget", PROBE_BUDGETS.get(name, BUDGET), "--ipc", args.ipc, "--json", result, *common)
    elif name in TABLES:
        images = table_set(TABLES[name], args)
        cli("score", images, "--json", result, *common)
    else:
        images = args.out / "sets" / f"{args.dataset}-{name}-ipc{args.ipc}-seed{seed}.h5"
        images.parent.mkdir(parents=True, exist_ok=True)
        soft = ["--soft-labels", "teacher", "--teacher", teacher_for(args)] if args.extras else []
        cli("generate", "--dataset", args.dataset, *BASELINES[name], "--ipc", args.ipc, "--seed", seed,
            "-o", images, "--force", "--quiet", *soft)
        if args.extras:  # first, so that a finished result always has its mode S beside it
            cli("score", images, "--json", mode_s_result(result), "--dataset", args.dataset, "--seed", seed,
                "--output", records.with_name(records.name + "-S"), "--quiet", "--labels", "soft", *budget)
        cli("score", images, "--json", result, *common)
    print(f"({name}, seed {seed}: {time.perf_counter() - started:.0f} s wall)", file=sys.stderr, flush=True)


def table_set(source: str, args) -> Path:
    """Run `source`'s folder's d4m table of IPC --ipc as a labelled set: each
    row (pixels in [-1, 1]) an image of its class, as stored."""
    from safetensors.torch import load_file

    from ddchallenge.fileio import sha256_file
    from ddchallenge.labelled import write_labelled_set

    folder = folder_for(source, args.model, args.out, args.ipc)
    table = folder / "codebooks" / f"d4m-ipc{args.ipc}.safetensors"
    centres = load_file(table)["centres"]  # (classes, IPC, C, H, W)
    images = centres.flatten(0, 1).add(1).mul(127.5).round().clamp(0, 255).byte().numpy()
    labels = [k for k in range(centres.shape[0]) for _ in range(centres.shape[1])]
    out = args.out / "sets" / f"{source}-table-ipc{args.ipc}.h5"
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_labelled_set(out, images, np.array(labels), dataset=args.dataset, ipc=args.ipc, method="d4m table",
                              seed=0, config={"table": str(table), "sha256": sha256_file(table)})


def row(name: str, seed: int, result: dict) -> str:
    d = result["datasets"][0]
    made = re.search(r"generated IPC (\d+) in ([\d.]+) s", d["source"])
    config = json.loads((d.get("provenance") or {}).get("config") or "{}")  # the labelled set's own record
    matching = (config.get("provenance") or {}).get("matching") or {}
    steps = f"{matching.get('steps_done')}/{matching.get('steps')}" if matching else ""
    budget = (result.get("rules") or {}).get("budget_seconds")
    if budget not in (None, BUDGET):
        steps += f" (budget {budget:.0f} s: a probe, not Track 2)"
    return (f"| {d['dataset']} | {name} | {seed} | {d['ipc']} | {100 * d['mean']:.2f} ± {100 * d['std']:.2f} | "
            f"{' '.join(f'{100 * a:.1f}' for a in d['accuracies'])} | {made.group(2) if made else ''} | {steps} | "
            f"{'official' if result['official_budget'] else 'NOT official'} |")


def extra_rows(name: str, seed: int, result: dict) -> list[str]:
    """One row per extra measure: its accuracy, IOR (± its standard error) for
    the baseline, and the seconds it took (0: read from the cache, or the
    challenge score's own rounds)."""
    out = []
    for e in result.get("extras", []):
        ior = "" if e.get("ior") is None else f"{100 * e['ior']:+.2f}" + \
            ("" if e.get("ior_se") is None else f" ± {100 * e['ior_se']:.2f}")
        out.append(f"| {e['dataset']} | {name} | {seed} | {e['measure']} | {100 * e['mean']:.2f} ± {100 * e['std']:.2f} "
                   f"| {' '.join(f'{100 * a:.1f}' for a in e['accuracies'])} | {ior} | {e['seconds']:.0f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a `ddchallenge train` folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dataset", required=True, help="mnist5k-val to decide, mnist5k to report")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", required=True, help="scoring (and so generation) seeds")
    ap.add_argument("--runs", nargs="+", required=True, choices=[*FOLDERS, *BASELINES, *TABLES])
    ap.add_argument("--epochs", type=int, help="not for reported rows")
    ap.add_argument("--rounds", type=int, help="not for reported rows")
    ap.add_argument("--extras", action="store_true", help="also issue 23's measures (see above)")
    ap.add_argument("--arch", action="append", default=[], choices=("convnetd4", "alexnet", "vgg11", "resnet18"),
                    help="also this costlier architecture of the pool, in a score of its own (see above)")
    args = ap.parse_args()
    print("| split | run | seed | IPC | accuracy % (mean ± std, rounds) | per round % | generation s | "
          "matching steps | recipe |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in args.runs:
        for seed in args.seeds:
            result = run(name, args, seed)
            if result is None:
                continue
            line = row(name, seed, result)
            print(line, flush=True)
            with open(args.out / "rows.md", "a") as rows:
                rows.write(line + "\n")
            with open(args.out / "extras.md", "a") as rows:
                for extra in extra_rows(name, seed, result):
                    print(extra, flush=True)
                    rows.write(extra + "\n")


if __name__ == "__main__":
    main()
