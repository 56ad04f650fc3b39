"""Scoring a submission the way the challenge does: for each dataset, train
the reference ConvNet `rounds` times on the submitted images and report the
mean test accuracy; the challenge score is the mean over datasets."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddchallenge import __version__
from ddchallenge.data import load_reference
from ddchallenge.data.reference import digest_test_set
from ddchallenge.errors import UsageError
from ddchallenge.evaluation.device import resolve_device
from ddchallenge import measures
from ddchallenge.extras import ExtraScore, ExtrasRequest
from ddchallenge.evaluation.train import round_accuracies
from ddchallenge.fileio import atomic_write_bytes, sha256_file
from ddchallenge.isolation import clean
from ddchallenge.protocol import OFFICIAL, TABLE_RULE, EvalRecipe, UploadRules, check_seed
from ddchallenge.submission import DatasetEntry
from ddchallenge.upload import (
    GENERATOR, describe as describe_upload_isolation, generate_upload, read_upload, upload_kind,
)

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
    provenance: dict | None = None  # what the upload says made it (submission.bounded_provenance); untrusted
    # `data.reference.digest_test_set` of the test set it was scored on (--ref's, the data root's or the built-in one):
    # a record on another test set is not trusted on a rerun, nor ranked beside this one. Older records have none.
    test_sha256: str | None = None


@dataclass(frozen=True)
class ScoreResult:
    name: str  # the submission's file or folder name, used by the leaderboard
    method: str | None  # generating method when every dataset records the same one
    submission: str
    submission_sha256: str | None  # of the submitted file; a folder's: None here, its upload digest once recorded
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
    rules: dict = dataclasses.field(default_factory=dict)  # the organiser's rules it was scored under (`rules_record`)
    # Measures beyond the challenge score (ddchallenge.extras), each with its own recipe and hash; older records
    # have none
    extras: list[ExtraScore] = dataclasses.field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "ScoreResult":
        """The inverse of `to_json` (raises KeyError or TypeError on anything else)."""
        fields = {f.name for f in dataclasses.fields(cls)} - ({"rules", "extras"} - set(data))  # older records
        return cls(**{**{k: data[k] for k in fields}, "datasets": [DatasetScore(**d) for d in data["datasets"]],
                      "extras": [ExtraScore(**e) for e in data.get("extras", [])]})

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
                progress: bool = True, together: bool | None = None) -> DatasetScore:
    """Train and test the dataset's rounds (seeds seed, seed + 1, ...);
    `together`: see `round_accuracies` (None: the device's default)."""
    start = time.perf_counter()
    seeds = [seed + r for r in range(recipe.rounds)]
    accs = round_accuracies(entry.spec, entry.images, entry.labels, ref["images_val"], ref["labels_val"], recipe,
                            seeds, device, progress, desc=entry.spec.name, together=together)
    return DatasetScore(
        dataset=entry.spec.name, ipc=entry.ipc, images=int(entry.images.shape[0]), kind=entry.kind, method=entry.method,
        source=entry.source, sha256=entry.sha256, seeds=seeds, accuracies=accs,
        mean=float(np.mean(accs)), std=float(np.std(accs)), seconds=time.perf_counter() - start,
        provenance=entry.provenance, test_sha256=digest_test_set(ref),
    )


def upload_name(path: Path) -> str:
    """The name a result is listed under: the file or folder name (`.` and
    `..` resolved, links not followed), the parent's for a res/ folder."""
    absolute = Path(os.path.abspath(path))
    name = absolute.name or str(path)
    return absolute.parent.name if name == "res" else name


def score(
    submission: str | os.PathLike,
    rules: UploadRules = UploadRules(),
    ref_dir: str | os.PathLike | None = None,
    recipe: EvalRecipe = OFFICIAL,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    sandbox: bool = True,
    budget: float | None = None,
    together: bool | None = None,
    extras: ExtrasRequest = ExtrasRequest(),
    sha256: str | None = None,
) -> ScoreResult:
    """Validate everything first (the upload under `rules`, the reference
    sets), then train. The track is the organiser's: with a `budget`
    (Track 2) the upload must be a generator folder, which is first run (in
    the sandbox) for each dataset the rules score, within `budget` seconds
    each (the challenge's is 600); without one (Track 1) it must be images,
    and an upload that is or holds a generator is refused (`upload_kind`).
    `together`: train each dataset's rounds as one batched model (True), one
    at a time (False), or as the device's default (None; see
    `ddchallenge.evaluation.train.together_by_default`). `extras`: the
    measures beyond the challenge score to add (ddchallenge.measures), each
    its own row in `ScoreResult.extras`; the challenge score is unchanged.
    `sha256`: the upload's `upload.digest`, taken before (a batch's): the
    sandbox stages and scores only those bytes (UploadChanged otherwise), and
    the result records it."""
    start = time.perf_counter()
    check_seed(seed)
    if budget is not None and not budget > 0:
        raise UsageError(f"--budget must be positive seconds, got {budget}")
    dev = resolve_device(device)
    path = Path(submission)
    if upload_kind(path, track2=budget is not None) == GENERATOR:
        measures.check_before_reading(rules.required(), extras, track2=True)  # before the generator runs, not after
        log.info("running generator %s for %s (IPC %s, budget %g s each)", clean(str(path)),
                 ", ".join(rules.required()), rules.ipc or "auto", budget)
        entries = generate_upload(path, rules, budget, seed, device, sandbox, sha256=sha256)
    else:
        entries = read_upload(path, rules, sandbox, sha256=sha256)
    refs = {e.spec.name: load_reference(e.spec, ref_dir, extras.data_root) for e in entries}
    measures.check_possible(entries, extras)
    notes = [w for e in entries for w in e.warnings]
    for w in notes:
        log.warning(w)
    scores = [score_entry(e, refs[e.spec.name], recipe, seed, dev, progress, together) for e in entries]
    device_name = str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})"
    rows = measures.run(entries, [s.accuracies for s in scores], refs, recipe, seed, dev, device_name, extras,
                        progress, together, {s.dataset: s.test_sha256 for s in scores}) if extras else []
    methods = {e.method for e in entries}
    return ScoreResult(
        name=upload_name(path),
        method=methods.pop() if len(methods) == 1 else None,
        submission=str(submission), submission_sha256=sha256 or (sha256_file(path) if path.is_file() else None),
        score=float(np.mean([s.mean for s in scores])), datasets=scores,
        official_budget=recipe.is_official, recipe=dataclasses.asdict(recipe), recipe_hash=recipe.hash(),
        seed=seed, device=device_name,
        sandbox=describe_upload_isolation(sandbox, dev), seconds=time.perf_counter() - start, warnings=notes,
        versions=versions(), rules=rules_record(rules, budget, None if is_upload_bundle(path) else entries),
        extras=rows,
    )


def is_upload_bundle(path: Path) -> bool:
    """A zip or res/ folder (held to the challenge's datasets unless the
    rules name others), or a generator folder; not a single dataset file."""
    return path.is_dir() or path.suffix.lower() == ".zip"


def rules_record(rules: UploadRules, budget: float | None, single: list | None = None) -> dict:
    """What a result records of the rules it was scored under. `single`:
    the entries of a single dataset file, scored on its own dataset when the
    rules name none (the challenge's two are then not its rules)."""
    datasets = rules.required() if single is None or rules.datasets is not None else [e.spec.name for e in single]
    record = {"track": 2 if budget is not None else 1, "datasets": list(datasets), "ipc": rules.ipc}
    if budget is not None:
        record.update(budget_seconds=budget, table_rule=TABLE_RULE)
    return record
