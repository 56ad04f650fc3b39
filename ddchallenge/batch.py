"""Scoring many uploads: each in its own sandbox, each result recorded as it
finishes, and nothing one upload does stops the others.

Records live in one folder, keyed so that no two uploads can share one:
`<key>.json` (a score result) or `<key>.failed.json` (the upload's own
failure), where the key is the upload's name made safe for a file name plus
a hash of the exact name. A rerun reads a record as untrusted input
(`records.read_record`: every field checked, every number that can be is
recomputed, and with the organiser's key its MAC): one that fails is set
aside as `<file>.rejected-<n>` and the upload scored again. It trusts a valid
record only if it names the same upload and was made from the same bytes
under the same settings; anything else is scored again. One batch at a time
writes a folder (a lock on `.lock` in it); a second is refused.

An environment failure (out of disk or memory, a lost GPU, no sandbox) is
not the upload's fault: it is reported, nothing is recorded, and the next
run tries again.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ddchallenge.data.reference import current_test_set_digest
from ddchallenge.errors import (BudgetExceeded, DatasetError, DDChallengeError, OptionMismatch, RecordError,
                                ResultsBusyError, RuleMismatch, UploadChanged, UsageError)
from ddchallenge.evaluation.device import resolve_device
from ddchallenge.extras import ExtrasRequest
from ddchallenge.fileio import atomic_write_bytes, sha256_file
from ddchallenge.isolation import clean, is_environment_failure, provoked, raised_in_upload_code
from ddchallenge.measures import check_before_reading, current_full
from ddchallenge.protocol import DATASETS, OFFICIAL, EvalRecipe, UploadRules, check_seed, get_dataset
from ddchallenge.records import KEY_ID_FIELD, MAC_FIELD, key_id, read_record, record_key, sign
from ddchallenge.score import ScoreResult, score, upload_name
from ddchallenge.upload import digest, is_generator

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


@dataclass(frozen=True)
class BatchSettings:
    """Everything besides the upload's bytes that changes its result."""

    rules: UploadRules = UploadRules()
    recipe: EvalRecipe = OFFICIAL
    seed: int = 0
    budget: float | None = None  # Track 2 seconds per dataset (generator folders only); None: Track 1, images only
    sandbox: bool = True  # False: read uploads in this process (trusted files only)
    mixed: bool = False  # with a budget: uploads that are not generator folders are scored as Track 1 beside them
    extras: ExtrasRequest = ExtrasRequest()  # measures beyond the challenge score (ddchallenge.extras); none by default
    # `reference_digest` of a --ref folder: a record scored on other test sets is not this one's (None: the data
    # root's, which `data prepare` checks against its checksums).
    reference: str | None = None
    # The organiser's record key (records.load_key): records are signed with it and trusted only when signed.
    # Not a setting of the result: left out of the fingerprint, of repr and of what is sent to a cluster's workers.
    mac_key: bytes | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Checked once here, so that no per-upload error is the organiser's.
        check_seed(self.seed)
        if self.budget is not None and not self.budget > 0:
            raise UsageError(f"--budget must be positive seconds, got {self.budget}")
        if self.mixed and self.budget is None:
            raise UsageError("--mixed gives the generator folders of a batch a Track 2 budget: pass --budget SECONDS "
                             "too")

    def budget_for(self, path: Path) -> float | None:
        """The Track 2 budget `path` runs under: the batch's, except for an
        upload that is not a generator folder in a --mixed batch (Track 1)."""
        if self.mixed and not is_generator(path):
            return None
        return self.budget

    def __getstate__(self) -> dict:
        # Workers never sign (the driver records), so the key never leaves the organiser's process.
        return {k: v for k, v in self.__dict__.items() if k != "mac_key"}

    def fingerprint(self) -> dict:
        # Through JSON, so that it compares equal to what a record read back holds.
        mixed = {"mixed": True} if self.mixed else {}  # absent when off: earlier records stay valid
        extras = {"extras": self.extras.fingerprint()} if self.extras else {}  # the same
        reference = {"reference": self.reference} if self.reference else {}  # the same
        return json.loads(json.dumps({"rules": {"datasets": self.rules.datasets, "ipc": self.rules.ipc},
                                      "recipe_hash": self.recipe.hash(),
                                      "seed": self.seed, "budget": self.budget, "sandbox": self.sandbox, **mixed,
                                      **extras, **reference}))


def reference_digest(ref_dir: str | os.PathLike) -> str:
    """sha256 over the name and sha256 of every <dataset>_test.pt in a --ref
    folder: what a batch's records were scored against."""
    files = sorted(p for p in Path(ref_dir).glob("*_test.pt") if p.is_file())
    # a file name is bytes: one that is not UTF-8 is hashed as those bytes, never a reason to fail
    return hashlib.sha256("".join(f"{p.name}\0{sha256_file(p)}\n" for p in files)
                          .encode(errors="surrogateescape")).hexdigest()


@dataclass(frozen=True)
class BatchOutcome:
    name: str  # the upload's name (untrusted text: shown through `clean`)
    status: str  # "scored", "failed", "over budget" (recorded; scored again under another --budget), "done before",
    #              "environment error" (not recorded; retried next run), or "refused" (the command line contradicts
    #              the upload, errors.OptionMismatch: the user's mistake, not recorded)
    score: float | None
    reason: str | None  # why it failed
    record: Path | None  # its record, when there is one
    result: ScoreResult | None = None  # the result, when scored or trusted from a record


@dataclass(frozen=True)
class BatchSummary:
    outcomes: list[BatchOutcome]
    seconds: float  # wall time
    busy_seconds: float = 0.0  # time spent scoring, summed over attempts (parallel ones add up)
    on_gpu: bool = False  # whether the scoring held a GPU (busy_seconds are then GPU-seconds)
    retried: int = 0  # attempts made again after a lost worker or a machine failure (a cluster's)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    def line(self) -> str:
        env_errors = self.count("environment error")
        parts = [f"{self.count(s)} {s}" for s in ("scored", "done before", "failed")]
        if self.count("over budget"):
            parts.append(f"{self.count('over budget')} over budget")
        if self.count("refused"):
            parts.append(f"{self.count('refused')} refused by the command line")
        parts.append(f"{env_errors} environment error{'' if env_errors == 1 else 's'}")
        retry = "; environment errors are not recorded: run again to retry" if self.count("environment error") else ""
        if self.count("refused"):
            retry += "; refused: an option contradicts what the upload says it is, not recorded: fix the option"
        if self.count("over budget"):
            retry += ("; over budget: a generator too slow for this machine within --budget, recorded as such and "
                      "scored again when the batch runs with a larger --budget")
        busy = f"{self.busy_seconds:.0f} {'GPU' if self.on_gpu else 'CPU-task'}-seconds"
        return (f"{len(self.outcomes)} upload(s): {', '.join(parts)}; {self.retried} retried; "
                f"{self.seconds:.0f} s wall, {busy}{retry}")


@dataclass(frozen=True)
class Pending:
    """An upload that needs scoring: no record can be trusted for these bytes."""

    path: Path
    name: str
    upload_sha: str


@dataclass(frozen=True)
class Attempt:
    """What one try at scoring an upload gave, classified where it ran (a
    cluster task returns it to the driver, so it stays plain data)."""

    result: ScoreResult | None = None
    reason: str | None = None  # why it failed, escaped for display
    environment: bool = False  # the machine's fault, not the upload's: never recorded
    over_budget: bool = False  # a generator that did not finish inside the budget on this machine
    misused: bool = False  # the command line contradicts the upload (OptionMismatch): the user's, never recorded
    mismatched: bool = False  # well formed, but not what the rules ask (RuleMismatch): refused when scored alone
    seconds: float = 0.0


def not_an_upload(path: Path, settings: BatchSettings, alone: bool) -> str | None:
    """Why `path` is no upload of this batch at all, from names and types
    alone (None: it may be one). Passing it is the user's mistake, like a
    typo: refused with nothing recorded, where an upload that is broken
    inside is recorded as failed. `alone`: the batch is this one upload,
    and the wrong track for it (a generator folder without --budget, images
    with it) is the command line's mistake too; in a batch of several the
    track is the organiser's and such an upload has failed: recorded."""
    from ddchallenge.submission import FORMS
    from ddchallenge.upload import is_generator

    rules = settings.rules
    if path.is_symlink():
        return None  # links are never followed: refused as the upload's own failure
    try:
        generator = path.is_dir() and is_generator(path)
    except OSError:
        return None  # unreadable: the upload's failure, with the reason, when it is read
    if generator and settings.budget is None and alone:
        return (f"{clean(str(path))} is a generator folder: it is scored by running it, in a Track 2 run with "
                "--budget SECONDS (the challenge's: 600)")
    if generator and settings.budget is not None and alone:
        unfit = _datasets_it_cannot_make(path, rules)
        if unfit:
            return unfit
    if not generator and settings.budget is not None and not settings.mixed and alone:
        return (f"{clean(str(path))} is not a generator folder, and --budget scores generator folders only: drop "
                "--budget, or add --mixed to score images beside generators")
    if path.is_dir():
        try:
            if generator or (path / "res").is_dir() or any(
                    p.name.rpartition(".")[0].lower() in DATASETS and p.suffix.lower() in (".pt", ".h5")
                    for p in path.iterdir()):
                return None
        except OSError:
            return None  # unreadable: the upload's failure, with the reason, when it is read
        return (f"{clean(str(path))} is a folder but not an upload: it holds no res/ folder, no file named for a "
                f"dataset (<dataset>.pt or <dataset>.h5) and no generator (ddchallenge.json); pass {FORMS}")
    if path.suffix.lower() not in (".pt", ".h5", ".hdf5", ".zip"):
        return f"{clean(str(path))} is not an upload (a {path.suffix or 'suffix-less'} file); pass {FORMS}"
    named = DATASETS.get(path.stem.lower())
    if path.suffix.lower() != ".zip" and named is not None and not rules.allows(named):
        return (f"{clean(str(path))} is named for {named.name} but --dataset says {', '.join(rules.required())}; "
                "fix one")
    return None


def _datasets_it_cannot_make(path: Path, rules: UploadRules) -> str | None:
    """Why a generator folder cannot make the datasets `rules` score, from
    the dataset its ddchallenge.json names (bounded JSON, nothing run), or
    None (it may; anything unreadable is found when it is run)."""
    from ddchallenge.diffusion.model import generator_dataset

    try:
        trained = DATASETS.get(generator_dataset(path))
    except (DDChallengeError, OSError):
        return None
    if trained is None:
        return None
    unfit = [s.name for s in map(get_dataset, rules.required())
             if (s.classes, s.image_shape) != (trained.classes, trained.image_shape)]
    if not unfit:
        return None
    return (f"{clean(str(path))} is a generator trained for {trained.name} ({trained.classes} classes of "
            f"{'x'.join(map(str, trained.image_shape))}), which cannot make {', '.join(unfit)} (the datasets scored"
            f"{'' if rules.datasets else ' by default'}); pass --dataset {trained.name}")


def check_batch(uploads: list[str | os.PathLike], output_dir: str | os.PathLike, device: str | None,
                settings: BatchSettings | None = None) -> tuple[list[Path], list[str]]:
    """The organiser's mistakes, refused before anything is scored; the
    uploads' paths and names. With `settings`, a path that is no upload of
    this batch at all (`not_an_upload`) is one of them. `device`: this
    machine's, checked here (None: a cluster's, checked by the cluster)."""
    missing = [clean(str(u)) for u in uploads if not os.path.lexists(u)]
    if missing:  # a mistyped path is the organiser's mistake, not an upload's failure
        raise UsageError(f"upload not found: {', '.join(missing)}")
    if settings is not None:
        wrong = list(filter(None, (not_an_upload(Path(u), settings, len(uploads) == 1) for u in uploads)))
        if wrong:
            raise UsageError("; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else ""))
    records = Path(output_dir).resolve()
    inside = [clean(str(u)) for u in uploads if not Path(u).is_symlink() and Path(u).is_dir()
              and records.is_relative_to(Path(u).resolve())]
    if inside:  # records written into an upload would change the bytes it is scored and recorded by
        raise UsageError(f"--output {clean(str(output_dir))} is inside the upload {inside[0]}; write the records to "
                         "a folder outside every upload")
    names = [upload_name(Path(u)) for u in uploads]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"several uploads are named {', '.join(map(clean, repeated))}; results are stored by name")
    if device is not None:
        resolve_device(device)  # a bad --device is the organiser's mistake too
    out = Path(output_dir)
    if os.path.lexists(out) and not out.is_dir():
        raise UsageError(f"--output {out} is not a folder")
    if settings is not None:
        track2 = settings.budget is not None and not settings.mixed  # every upload is a generator
        if settings.rules.datasets is not None or track2:  # every upload holds these: a measure none can give stops
            check_before_reading(settings.rules.required(), settings.extras, track2)  # the batch once, before any
    return [Path(u) for u in uploads], names


def score_batch(uploads: list[str | os.PathLike], output_dir: str | os.PathLike, settings: BatchSettings = BatchSettings(),
                ref_dir: str | os.PathLike | None = None, device: str = "auto", progress: bool = True) -> BatchSummary:
    """Score `uploads` one after another, recording each in `output_dir`."""
    start = time.monotonic()
    paths, names = check_batch(uploads, output_dir, device, settings)
    out = Path(output_dir)
    outcomes, busy, tests = [], 0.0, {}
    with ResultsLock(out):
        for path, name, todo in zip(paths, names, triage_all(paths, names, out, settings, ref_dir, tests)):
            if isinstance(todo, Pending):
                if len(uploads) > 1:
                    log.info("scoring %s", clean(str(path)))
                tried = attempt(path, settings, ref_dir, device, progress, todo.upload_sha)
                busy += tried.seconds
                todo = settle(todo, out, settings, tried, alone=len(paths) == 1)
            outcomes.append(todo)
            if len(uploads) > 1:
                log.info("%s: %s%s", clean(name), todo.status, f" ({todo.reason})" if todo.reason else "")
    return BatchSummary(outcomes, time.monotonic() - start, busy, resolve_device(device).type == "cuda")


def check_signing(out: Path, key: bytes | None) -> list[str]:
    """The valid records in `out` that carry a MAC (file names); UsageError
    when a `key` is given and the records name only other keys
    (`records.key_id`): the organiser's mistake (another key file, a key made
    afresh), where going on would set every record aside and score the whole
    folder again. A record that names this key but fails its MAC was
    altered: set aside alone. The messages name the files: a MAC or key id
    is only a claim until a key verifies it, and a file planted to claim one
    is found and moved away by name."""
    signed, ids = [], {}
    for path in sorted(out.glob("*.json")):
        try:
            record = read_record(path)
        except RecordError:
            continue  # not a record: set aside when its upload is triaged
        if MAC_FIELD in record:
            signed.append(path.name)
            if record.get(KEY_ID_FIELD) is not None:  # none: signed before records named their key
                ids.setdefault(record[KEY_ID_FIELD], []).append(path.name)
    if key is not None and ids and key_id(key) not in ids:
        named = "; ".join(f"{_some(files)}: key id {kid}" for kid, files in sorted(ids.items()))
        raise UsageError(f"the {len(signed)} signed record(s) in {clean(str(out))} name another key than this "
                         f"--record-key ({named}): pass the key they were signed with (under this one every record "
                         "would be set aside and its upload scored again), move away any that are not the "
                         "organiser's, or give this batch a new --output")
    return signed


def _some(names: list[str], shown: int = 3) -> str:
    return ", ".join(clean(n, 120) for n in names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown
                                                              else "")


def check_unsigned(out: Path, signed: list[str], key: bytes | None, found: list) -> None:
    """UsageError when a batch without a key would score uploads into a
    folder of signed records: what it recorded would be unsigned, refused by
    `leaderboard --record-key` and scored again by the next keyed batch.
    Reusing records needs no key (nothing is written)."""
    pending = sum(isinstance(f, Pending) for f in found)
    if key is None and signed and pending:
        raise UsageError(f"{clean(str(out))} holds {len(signed)} record(s) signed with a record key ({_some(signed)}), "
                         f"and this batch has none: the {pending} upload(s) it would score would be recorded unsigned, "
                         "which `leaderboard --record-key` refuses; pass --record-key FILE (or set "
                         "$DDCHALLENGE_RECORD_KEY), or move away any that are not the organiser's")


def triage_all(paths: list[Path], names: list[str], out: Path, settings: BatchSettings,
               ref_dir: str | os.PathLike | None = None, tests: dict | None = None) -> list[BatchOutcome | Pending]:
    """`triage` of every upload of a batch, before any is scored, under the
    results lock. A key that verifies no signed record of the folder stops
    the batch before any record is set aside (`check_signing`); so does a
    batch without a key that would record anything beside signed records
    (`check_unsigned`): nothing is written then, not even the failure of an
    upload that cannot be hashed."""
    signed = check_signing(out, settings.mac_key)
    looked = [_look(path, name, out, settings, ref_dir, tests) for path, name in zip(paths, names)]
    found = [Pending(path, name, "") if isinstance(f, Attempt) else f for path, name, f in zip(paths, names, looked)]
    check_unsigned(out, signed, settings.mac_key, found)
    return [settle(todo, out, settings, f, alone=len(paths) == 1) if isinstance(f, Attempt) else todo
            for todo, f in zip(found, looked)]


def triage(path: Path, name: str, out: Path, settings: BatchSettings, ref_dir: str | os.PathLike | None = None,
           tests: dict | None = None) -> BatchOutcome | Pending:
    """The outcome already recorded for this upload, if one can be trusted;
    otherwise what scoring it needs. `ref_dir`: the batch's --ref, and
    `tests`: the digests of its test sets, filled once per batch (a reused
    baseline row's HLR is brought up to date against them)."""
    found = _look(path, name, out, settings, ref_dir, tests)
    return settle(Pending(path, name, ""), out, settings, found) if isinstance(found, Attempt) else found


def _look(path: Path, name: str, out: Path, settings: BatchSettings, ref_dir: str | os.PathLike | None,
          tests: dict | None) -> BatchOutcome | Pending | Attempt:
    """`triage` without writing: an upload that cannot even be hashed is
    the failed Attempt to record."""
    try:
        upload_sha = digest(path, settings.rules, track2=settings.budget_for(path) is not None)
    except Exception as exc:  # noqa: BLE001  anything the upload does is its own failure
        return classify(exc)
    key = record_key(name)
    return _trusted(out / f"{key}.json", out / f"{key}.failed.json", name, upload_sha, settings, ref_dir, tests) or \
        Pending(path, name, upload_sha)


def attempt(path: Path, settings: BatchSettings, ref_dir, device: str, progress: bool,
            upload_sha: str | None = None) -> Attempt:
    """Score one upload (the bytes whose digest is `upload_sha`, when given);
    whatever happens is classified, nothing is raised."""
    start = time.monotonic()
    try:
        result = score(path, settings.rules, ref_dir, settings.recipe, settings.seed, device, progress,
                       settings.sandbox, settings.budget_for(path), extras=settings.extras, sha256=upload_sha or None)
    except Exception as exc:  # noqa: BLE001  anything the upload does is its own failure
        return dataclasses.replace(classify(exc), seconds=time.monotonic() - start)
    return Attempt(result, seconds=time.monotonic() - start)


def classify(exc: Exception) -> Attempt:
    """Whose fault an exception is: the machine's or the reference data's
    (not recorded, retried), or the upload's (recorded as its failure).
    Running out of memory is the upload's where its own work ran out (in the
    sandbox, within its limits, or marked by `isolation.upload_code`), the
    machine's where the scorer's training did (the rules bound its inputs)."""
    if is_environment_failure(exc) or isinstance(exc, DatasetError):
        return Attempt(reason=clean(str(exc)), environment=True)
    if isinstance(exc, (OptionMismatch, UploadChanged)):  # e.g. --dataset mnist for a set whose header says mnist5k;
        # an upload rewritten while the batch ran: scored and recorded next time, as it is then
        return Attempt(reason=clean(str(exc)), misused=True)
    if isinstance(exc, RuleMismatch):
        return Attempt(reason=clean(str(exc)), mismatched=True)
    if isinstance(exc, BudgetExceeded):  # this machine's pace against this budget, not a broken upload
        return Attempt(reason=clean(str(exc)), over_budget=True)
    log.debug("failure", exc_info=exc)
    provoked_by_upload = provoked(exc) if raised_in_upload_code(exc) else None
    if provoked_by_upload is not None:
        return Attempt(reason=clean(f"the work on this upload {provoked_by_upload}"))
    return Attempt(reason=clean(str(exc) if getattr(exc, "__module__", "").startswith("ddchallenge")
                                else f"internal error on this upload: {type(exc).__name__}: {exc}"))


def settle(todo: Pending, out: Path, settings: BatchSettings, tried: Attempt, alone: bool = False) -> BatchOutcome:
    """Record what an attempt gave (atomically; a success replaces an earlier
    failure and the other way round) and say what happened. `alone`: the
    batch is this one upload, so an upload that is not what the rules ask
    (RuleMismatch) is the command line's mistake, refused, not recorded."""
    key = record_key(todo.name)
    done, failed = out / f"{key}.json", out / f"{key}.failed.json"
    if tried.environment:
        return BatchOutcome(todo.name, "environment error", None, tried.reason, None)
    if tried.misused or (tried.mismatched and alone):
        return BatchOutcome(todo.name, "refused", None, tried.reason, None)
    if tried.result is not None:
        result = tried.result
        if result.submission_sha256 is None and todo.upload_sha:  # a folder: its digest, never a null beside it
            result = dataclasses.replace(result, submission_sha256=todo.upload_sha)
        record = sign({**dataclasses.asdict(result), "key": key, "upload_sha256": todo.upload_sha,
                       "settings": settings.fingerprint()}, settings.mac_key)
        _supersede(done, failed)
        atomic_write_bytes(done, json.dumps(record, indent=2, sort_keys=True).encode())
        return BatchOutcome(todo.name, "scored", result.score, None, done, result)
    record = sign({"status": "failed", "name": todo.name, "key": key, "submission": str(todo.path),
                   "reason": tried.reason, "upload_sha256": todo.upload_sha or None, "settings": settings.fingerprint(),
                   "over_budget": tried.over_budget}, settings.mac_key)
    _supersede(done, failed)
    atomic_write_bytes(failed, json.dumps(record, indent=2, sort_keys=True).encode())
    return BatchOutcome(todo.name, "over budget" if tried.over_budget else "failed", None, tried.reason, failed)


def _trusted(done: Path, failed: Path, name: str, upload_sha: str, settings: BatchSettings,
             ref_dir: str | os.PathLike | None = None, tests: dict | None = None) -> BatchOutcome | None:
    """The outcome an earlier run recorded, if it can be trusted. A record
    that is not a valid (signed, with a key) record is set aside, kept. A
    reused result with a baseline gets the HLR of the full-data cache as it
    is now (`_current_hlr`)."""
    for path in (done, failed):
        if not os.path.lexists(path):
            continue
        try:
            record = read_record(path, settings.mac_key)
            if (path is done) == (record.get("status") == "failed"):
                raise RecordError(f"{clean(str(path))}: holds a {'failed' if path is done else 'score'} record under "
                                  "the other kind's file name")
            if record["name"] != name or record.get("key") != record_key(name):
                raise RecordError(f"{clean(str(path))}: names another upload ({clean(record['name'], 80)})")
        except RecordError as exc:
            log.warning("%s; set aside as %s, scoring %s again", exc, _set_aside(path), clean(name))
            continue
        if record.get("upload_sha256") != upload_sha or record.get("settings") != settings.fingerprint() \
                or (path is done and record["seed"] != settings.seed):
            return None  # scored again; a new record keeps this one as superseded (`_supersede` says so)
        if path is done and not _same_tests(record, settings, ref_dir, tests):
            log.info("%s does not say it was scored on this batch's test sets; scoring %s again", path.name,
                     clean(name))
            return None
        if path is failed:
            return BatchOutcome(name, "done before", None, clean(record["reason"]), path)
        try:
            result = ScoreResult.from_dict(record)
        except (KeyError, TypeError) as exc:  # valid, but fields this version does not know
            log.warning("%s cannot be read by this version (%s); set aside as %s, scoring %s again", path,
                        clean(str(exc), 120), _set_aside(path), clean(name))
            continue
        if settings.extras.baseline:
            result = _current_hlr(path, record, result, settings, ref_dir, tests)
        return BatchOutcome(name, "done before", result.score, None, path, result)
    return None


def _same_tests(record: dict, settings: BatchSettings, ref_dir, tests: dict | None) -> bool:
    """Whether every dataset of a score record was scored on the test set
    this batch scores it on now (`test_sha256`): a --ref folder or data root
    whose test sets changed since makes every record on the old ones stale,
    and a record older than the field does not say. False, with a warning,
    where a test set cannot be read: scoring again reports why."""
    tests = {} if tests is None else tests
    try:
        return all(d.get("test_sha256") == current_test_set_digest(d["dataset"], ref_dir, settings.extras.data_root,
                                                                   tests) for d in record["datasets"])
    except (DDChallengeError, OSError, ValueError) as exc:  # a planted dataset name too (OptionMismatch)
        log.warning("%s: its test set cannot be read now (%s)", clean(record["name"], 80), clean(str(exc), 160))
        return False


def _current_hlr(path: Path, record: dict, result: ScoreResult, settings: BatchSettings, ref_dir,
                 tests: dict | None) -> ScoreResult:
    """A reused result with the full-data accuracy and HLR the cache holds
    now (`measures.current_full`: what scoring it again would give, without
    training), its record rewritten when they moved, every other field kept.
    Kept as recorded when the record is signed and this batch has no key to
    sign it again (rewriting it would strip its MAC), or when the rewrite
    fails: the HLR is the one number that can go stale, never a reason to
    lose or re-score a record. (Its test sets were read by `_same_tests`.)"""
    try:
        rows = current_full(result.extras, {d.dataset: d.accuracies for d in result.datasets}, settings.recipe,
                            settings.seed, settings.extras, ref_dir, tests)
    except (DatasetError, OSError, ValueError) as exc:
        log.warning("%s: HLR not brought up to date (%s); kept as recorded", path, clean(str(exc), 160))
        return result
    if rows == result.extras:
        return result
    if MAC_FIELD in record and settings.mac_key is None:
        log.warning("%s: the full-data reference gives another HLR now, but the record is signed and this batch "
                    "has no --record-key to sign it again; kept as recorded", path)
        return result
    updated = {k: v for k, v in record.items() if k != MAC_FIELD}
    updated["extras"] = [dataclasses.asdict(r) for r in rows]
    try:
        atomic_write_bytes(path, json.dumps(sign(updated, settings.mac_key), indent=2, sort_keys=True).encode())
    except OSError as exc:
        log.warning("%s: HLR not brought up to date (%s); kept as recorded", path, clean(str(exc), 160))
        return result
    log.info("%s: HLR brought up to date with the full-data reference", path)
    return dataclasses.replace(result, extras=rows)


def _supersede(*paths: Path) -> None:
    """Keep the records a new one replaces (made from other bytes or under
    other settings: a trusted one is never scored again) as
    `<name>.superseded-<n>`, never read as records again: a rerun with a
    mistaken option loses no earlier score, which renaming it back restores."""
    for path in paths:
        if os.path.lexists(path):
            log.info("kept the earlier record %s (made from other bytes or settings) as %s", path.name,
                     _set_aside(path, "superseded"))


def _set_aside(path: Path, why: str = "rejected") -> str:
    """Rename a record to `<name>.<why>-<n>` (`rejected`: one that cannot be
    trusted, kept for whoever investigates); never read as a record again."""
    for n in range(1, 10_000):
        target = path.with_name(f"{path.name}.{why}-{n}")
        if not os.path.lexists(target):
            try:
                os.rename(path, target)  # under the results lock: no other batch takes the same name
            except OSError as exc:
                return f"nothing (it could not be renamed: {exc.strerror}; the new record replaces it)"
            return target.name
    return "nothing (too many set aside already; the new record replaces it)"


class ResultsLock:
    """One batch at a time writes a results folder: an exclusive, non-blocking
    flock on `<folder>/.lock`, removed again on release (a folder this lock
    created is removed too if nothing was recorded in it)."""

    def __init__(self, out: Path):
        self.out, self.path, self.fd = out, out / LOCK_FILE, None
        self.created = not os.path.lexists(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            while self.fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 200).decode(errors="replace").strip()
                    os.close(fd)
                    raise ResultsBusyError(
                        f"another batch ({clean(holder, 100) or 'unknown process'}) is writing {clean(str(out))} "
                        f"now; wait for it to finish, or give this one another --output") from None
                # A holder may have released and removed the file between our open and flock: lock a fresh one.
                try:
                    current = os.stat(self.path, follow_symlinks=False).st_ino
                except FileNotFoundError:
                    current = None
                if current == os.fstat(fd).st_ino:
                    self.fd = fd
                else:
                    os.close(fd)
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())
        except OSError as exc:
            raise ResultsBusyError(f"cannot lock the results folder {clean(str(out))} ({exc.strerror or exc}: "
                                   f"{clean(str(self.path))}); it must be a folder this user can write") from None

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still held, so that no one locks a file that is about to vanish
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        if self.created:
            try:
                self.out.rmdir()  # only if empty: nothing was recorded
            except OSError:
                pass

    def __enter__(self) -> "ResultsLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()
