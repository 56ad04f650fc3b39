"""Scoring many uploads: each in its own sandbox, each result recorded as it
finishes, and nothing one upload does stops the others.

Records live in one folder, keyed so that no two uploads can share one:
`<key>.json` (a score result) or `<key>.failed.json` (the upload's own
failure), where the key is the upload's name made safe for a file name plus
a hash of the exact name. A rerun trusts a record only if it reads back
whole, names the same upload, and was made from the same bytes under the
same settings; anything else is scored again. An environment failure (out of
disk or memory, a lost GPU, no sandbox) is not the upload's fault: it is
reported, nothing is recorded, and the next run tries again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ddchallenge.errors import DatasetError, UsageError
from ddchallenge.fileio import atomic_write_bytes
from ddchallenge.isolation import clean, is_environment_failure
from ddchallenge.protocol import OFFICIAL, EvalRecipe, UploadRules, check_seed
from ddchallenge.score import ScoreResult, score, upload_name
from ddchallenge.evaluation.device import resolve_device
from ddchallenge.upload import digest

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 16 << 20


def record_key(name: str) -> str:
    """A file-name-safe key, unique per exact name: readable part + hash."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:60] or "upload"
    return f"{readable}-{hashlib.sha256(name.encode(errors='surrogateescape')).hexdigest()[:12]}"


@dataclass(frozen=True)
class BatchSettings:
    """Everything besides the upload's bytes that changes its result."""

    rules: UploadRules = UploadRules()
    recipe: EvalRecipe = OFFICIAL
    seed: int = 0
    budget: float | None = None  # Track 2 seconds per dataset; None: 600 for generator folders
    sandbox: bool = True  # False: read uploads in this process (trusted files only)

    def __post_init__(self) -> None:
        # Checked once here, so that no per-upload error is the organiser's.
        check_seed(self.seed)
        if self.budget is not None and not self.budget > 0:
            raise UsageError(f"--budget must be positive seconds, got {self.budget}")

    def fingerprint(self) -> dict:
        # Through JSON, so that it compares equal to what a record read back holds.
        return json.loads(json.dumps({"rules": dataclasses.asdict(self.rules), "recipe_hash": self.recipe.hash(),
                                      "seed": self.seed, "budget": self.budget, "sandbox": self.sandbox}))


@dataclass(frozen=True)
class BatchOutcome:
    name: str  # the upload's name (untrusted text: shown through `clean`)
    status: str  # "scored", "failed", "done before", or "environment error" (not recorded; retried next run)
    score: float | None
    reason: str | None  # why it failed
    record: Path | None  # its record, when there is one
    result: ScoreResult | None = None  # the result, when scored or trusted from a record


@dataclass(frozen=True)
class BatchSummary:
    outcomes: list[BatchOutcome]
    seconds: float

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    def line(self) -> str:
        parts = [f"{self.count(s)} {s}" for s in ("scored", "done before", "failed", "environment error")]
        retry = "; environment errors are not recorded: run again to retry" if self.count("environment error") else ""
        return f"{len(self.outcomes)} upload(s): {', '.join(parts)}; {self.seconds:.0f} s{retry}"


def score_batch(uploads: list[str | os.PathLike], output_dir: str | os.PathLike, settings: BatchSettings = BatchSettings(),
                ref_dir: str | os.PathLike | None = None, device: str = "auto", progress: bool = True) -> BatchSummary:
    """Score `uploads` one after another, recording each in `output_dir`."""
    start = time.monotonic()
    missing = [clean(str(u)) for u in uploads if not os.path.lexists(u)]
    if missing:  # a mistyped path is the organiser's mistake, not an upload's failure
        raise UsageError(f"upload not found: {', '.join(missing)}")
    names = [upload_name(Path(u)) for u in uploads]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"several uploads are named {', '.join(map(clean, repeated))}; results are stored by name")
    resolve_device(device)  # a bad --device is the organiser's mistake too
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} is not a folder")
    outcomes = []
    for path, name in zip(map(Path, uploads), names):
        outcomes.append(_one(path, name, out, settings, ref_dir, device, progress, len(uploads) > 1))
        o = outcomes[-1]
        if len(uploads) > 1:
            log.info("%s: %s%s", clean(name), o.status, f" ({o.reason})" if o.reason else "")
    return BatchSummary(outcomes, time.monotonic() - start)


def _one(path: Path, name: str, out: Path, settings: BatchSettings, ref_dir, device: str, progress: bool,
         announce: bool) -> BatchOutcome:
    key = record_key(name)
    done, failed = out / f"{key}.json", out / f"{key}.failed.json"
    try:
        upload_sha = digest(path, settings.rules)
    except Exception as exc:  # noqa: BLE001  anything the upload does is its own failure
        return _failure(path, name, failed, done, None, settings, exc)
    trusted = _trusted(done, failed, name, upload_sha, settings)
    if trusted is not None:
        return trusted
    if announce:
        log.info("scoring %s", clean(str(path)))
    try:
        result = score(path, settings.rules, ref_dir, settings.recipe, settings.seed, device, progress,
                       settings.sandbox, settings.budget)
    except Exception as exc:  # noqa: BLE001  anything the upload does is its own failure
        return _failure(path, name, failed, done, upload_sha, settings, exc)
    record = {**dataclasses.asdict(result), "key": key, "upload_sha256": upload_sha,
              "settings": settings.fingerprint()}
    atomic_write_bytes(done, json.dumps(record, indent=2, sort_keys=True).encode())
    _remove(failed)
    return BatchOutcome(name, "scored", result.score, None, done, result)


def _failure(path: Path, name: str, failed: Path, done: Path, upload_sha: str | None, settings: BatchSettings,
             exc: Exception) -> BatchOutcome:
    if is_environment_failure(exc) or isinstance(exc, DatasetError):  # the machine's or the reference data's fault
        return BatchOutcome(name, "environment error", None, clean(str(exc)), None)
    reason = clean(str(exc) if getattr(exc, "__module__", "").startswith("ddchallenge")
                   else f"internal error on this upload: {type(exc).__name__}: {exc}")
    log.debug("failure of %s", name, exc_info=exc)
    record = {"status": "failed", "name": name, "key": failed.name[: -len(".failed.json")], "submission": str(path),
              "reason": reason, "upload_sha256": upload_sha, "settings": settings.fingerprint()}
    atomic_write_bytes(failed, json.dumps(record, indent=2, sort_keys=True).encode())
    _remove(done)
    return BatchOutcome(name, "failed", None, reason, failed)


def _trusted(done: Path, failed: Path, name: str, upload_sha: str, settings: BatchSettings) -> BatchOutcome | None:
    """The outcome an earlier run recorded, if it can be trusted."""
    for path in (done, failed):
        if not path.exists():
            continue
        try:
            if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_RECORD_BYTES:
                raise ValueError("not a plain file of a sensible size")
            record = json.loads(path.read_text())
            if not isinstance(record, dict):
                raise ValueError("not an object")
            if record.get("upload_sha256") != upload_sha or record.get("settings") != settings.fingerprint():
                log.info("%s was made from other bytes or settings; scoring %s again", path, clean(name))
                return None
            if path is done:
                result = ScoreResult.from_dict(record)
                if result.name != name:
                    raise ValueError("names another upload")
                return BatchOutcome(name, "done before", result.score, None, path, result)
            if record.get("name") != name or not isinstance(record.get("reason"), str):
                raise ValueError("names another upload")
            return BatchOutcome(name, "done before", None, clean(record["reason"]), path)
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            log.warning("%s is not a record this run can trust (%s); scoring %s again", path, exc, clean(name))
    return None


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
