"""Scoring a submission the way the challenge does: for each dataset, train
the reference ConvNet `rounds` times on the submitted images and report the
mean test accuracy; the challenge score is the mean over datasets."""
from __future__ import annotations

import dataclasses
import json
import os
import logging
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddchallenge import __version__
from ddchallenge.data import load_reference
from ddchallenge.diffusion.model import generator_dataset, is_generator
from ddchallenge.errors import DDChallengeError, UsageError
from ddchallenge.fileio import atomic_write_bytes, sha256_file
from ddchallenge.protocol import OFFICIAL, TRACK2_BUDGET_SECONDS, EvalRecipe, get_dataset
from ddchallenge.sandbox import describe as describe_sandbox
from ddchallenge.submission import DatasetEntry, load_submission
from ddchallenge.train import accuracy, resolve_device, train_round

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetScore:
    dataset: str
    ipc: int
    images: int
    kind: str  # "official" or "labelled"
    method: str | None  # generating method, when recorded
    source: str
    sha256: str  # of the scored file (or zip member)
    seeds: list[int]  # one per round: seed, seed + 1, ...
    accuracies: list[float]  # test accuracy of each round, fractions in [0, 1]
    mean: float
    std: float  # population std over rounds (numpy's default, ddof=0)
    seconds: float


@dataclass(frozen=True)
class ScoreResult:
    name: str  # the submission's file or folder name, used by the leaderboard
    method: str | None  # generating method when every dataset records the same one
    submission: str
    submission_sha256: str | None  # of the submitted file; None for a folder
    score: float  # mean over datasets of each dataset's mean accuracy
    datasets: list[DatasetScore]
    official_budget: bool
    recipe: dict
    recipe_hash: str
    seed: int
    device: str
    sandbox: str  # how the submission's bytes were isolated while being read
    seconds: float
    warnings: list[str]
    versions: dict

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def scores_txt(self) -> str:
        """The Codalab/Codabench scores file the official program writes."""
        return f"correct: {self.score}\n"

    def write(self, output_dir: str | os.PathLike) -> Path:
        out = Path(output_dir)
        atomic_write_bytes(out / "scores.txt", self.scores_txt().encode())
        atomic_write_bytes(out / "result.json", self.to_json().encode())
        return out


def versions() -> dict:
    return {"ddchallenge": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def score_entry(entry: DatasetEntry, ref: dict, recipe: EvalRecipe, seed: int, device: torch.device,
                progress: bool = True) -> DatasetScore:
    start = time.perf_counter()
    seeds = [seed + r for r in range(recipe.rounds)]
    accs = []
    for r, s in enumerate(seeds):
        net = train_round(entry.spec, entry.images, entry.labels, recipe, s, device, progress,
                          desc=f"{entry.spec.name} round {r + 1}/{recipe.rounds}")
        accs.append(accuracy(net, ref["images_val"], ref["labels_val"], recipe.eval_batch_size))
    return DatasetScore(
        dataset=entry.spec.name, ipc=entry.ipc, images=int(entry.images.shape[0]), kind=entry.kind, method=entry.method,
        source=entry.source, sha256=entry.sha256, seeds=seeds, accuracies=accs,
        mean=float(np.mean(accs)), std=float(np.std(accs)), seconds=time.perf_counter() - start,
    )


def score(
    submission: str | os.PathLike,
    dataset: str | None = None,
    ref_dir: str | os.PathLike | None = None,
    recipe: EvalRecipe = OFFICIAL,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    sandbox: bool = True,
    ipc: int | str = "auto",
    budget: float = TRACK2_BUDGET_SECONDS,
) -> ScoreResult:
    """Validate everything first (submission and reference sets), then train.
    A Track 2 generator folder is first run (in the sandbox) for `ipc` images
    per class ("auto": the most that fit) within `budget` seconds."""
    start = time.perf_counter()
    dev = resolve_device(device)
    if dataset is not None:
        get_dataset(dataset)  # a usage error, reported before any untrusted work starts
    if is_generator(submission):
        entries = _generated(Path(submission), dataset, ipc, budget, seed, device, sandbox)
    elif sandbox:
        from ddchallenge.sandbox import load_isolated

        entries = load_isolated(submission, dataset)
    else:
        entries = load_submission(submission, dataset)
    refs = {e.spec.name: load_reference(e.spec, ref_dir) for e in entries}
    notes = [w for e in entries for w in e.warnings]
    for w in notes:
        log.warning(w)
    scores = [score_entry(e, refs[e.spec.name], recipe, seed, dev, progress) for e in entries]
    methods = {e.method for e in entries}
    path = Path(submission)
    return ScoreResult(
        name=path.name if path.name != "res" else path.resolve().parent.name,
        method=methods.pop() if len(methods) == 1 else None,
        submission=str(submission), submission_sha256=sha256_file(path) if path.is_file() else None,
        score=float(np.mean([s.mean for s in scores])), datasets=scores,
        official_budget=recipe.is_official, recipe=dataclasses.asdict(recipe), recipe_hash=recipe.hash(),
        seed=seed, device=str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        sandbox=describe_sandbox() if sandbox else "none (--no-sandbox)",
        seconds=time.perf_counter() - start, warnings=notes, versions=versions(),
    )


def _generated(model: Path, dataset: str | None, ipc: int | str, budget: float, seed: int, device: str,
               sandbox: bool) -> list[DatasetEntry]:
    """Track 2: the images a generator folder makes within the budget."""
    dataset = dataset or generator_dataset(model)
    log.info("running generator %s for %s (IPC %s, budget %g s)", model, dataset, ipc, budget)
    if sandbox:
        from ddchallenge.sandbox import generate_isolated

        return generate_isolated(model, dataset, ipc, budget, seed, device)
    from ddchallenge.generators.track2 import run_track2

    with tempfile.TemporaryDirectory(prefix="ddchallenge-track2-") as tmp:
        return run_track2(str(model), dataset, ipc, seed, budget, device, Path(tmp))


@dataclass(frozen=True)
class BatchOutcome:
    name: str  # the submission's file or folder name; its result is <output>/<name>.json
    status: str  # "scored", "failed", or "done before" (resumed batch)
    score: float | None
    reason: str | None  # why it failed


def score_batch(submissions: list[str | os.PathLike], output_dir: str | os.PathLike, **options) -> list[BatchOutcome]:
    """Score many submissions one after another, each in its own sandbox.
    A failure is recorded (<name>.failed.json) and the batch goes on; every
    result is written when it finishes, and a rerun skips what is there, so
    an interrupted batch resumes where it stopped."""
    names = [Path(s).name for s in submissions]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"several submissions are named {', '.join(repeated)}; results are stored by name")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for path, name in zip(map(Path, submissions), names):
        done, failed = out / f"{name}.json", out / f"{name}.failed.json"
        if done.exists() or failed.exists():
            record = json.loads((done if done.exists() else failed).read_text())
            outcomes.append(BatchOutcome(name, "done before", record.get("score"), record.get("reason")))
            continue
        log.info("scoring %s", path)
        try:
            result = score(path, **options)
        except UsageError:
            raise
        except DDChallengeError as exc:
            atomic_write_bytes(failed, json.dumps({"submission": str(path), "reason": str(exc)}, indent=2).encode())
            outcomes.append(BatchOutcome(name, "failed", None, str(exc)))
            continue
        atomic_write_bytes(done, result.to_json().encode())
        outcomes.append(BatchOutcome(name, "scored", result.score, None))
    return outcomes
