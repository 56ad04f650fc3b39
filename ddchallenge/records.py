"""Score records read back as untrusted input.

A record is the JSON `score` writes (`--json`, or a batch's `<key>.json`
and `<key>.failed.json`). Whoever can write a results folder can edit or
plant one, so nothing in it is believed on its face: every field is checked
for type and range, and every number that can be recomputed is (each
dataset's mean and std from its accuracies, the score from the means, the
recipe hash and the official-budget flag from the recipe settings). A record
that fails raises `RecordError` naming the file and the field.

That catches a forged or broken record, not a careful one: a record whose
numbers agree with each other passes. For a folder other people can write,
the organiser signs records with a key kept outside it (`--record-key`):
each record then carries an HMAC-SHA256 over its canonical JSON, and a
record without a valid one is refused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import os
import re
from pathlib import Path

from ddchallenge.errors import RecordError, UsageError
from ddchallenge.extras import (
    LABEL_SETTINGS, LABELS_PREFIX, LOSS, MAX_EXTRAS, MAX_OWN_SETTINGS, MAX_TEMPERATURE, MEASURES,
    MIN_TEMPERATURE, TEACHER_SETTINGS, ExtraScore, is_baseline, paired_standard_error, standard_error,
)
from ddchallenge.extras import recipe_hash as extra_recipe_hash
from ddchallenge.fileio import read_json_bounded
from ddchallenge.isolation import clean
from ddchallenge.protocol import DATASETS, MAX_EPOCHS, MAX_ROUNDS, MAX_RULE_IPC, MAX_SEED, EvalRecipe

MAX_RECORD_BYTES = 16 << 20  # a record of 6 datasets x 100 rounds is a few KB; this only bounds the read
MAX_RECORD_DEPTH = 16  # nesting of objects and lists; the deepest a record holds is 6 (extras, provenance)
MAX_TEXT = 4096  # characters of any one text field (names, paths, reasons, warnings)
MAX_ITEMS = 1000  # entries of any list or table in a record (warnings, versions)
MAX_METHOD = 64  # as submission.MAX_METHOD: what an upload's manifest may name
MAX_PROVENANCE_KEYS = 64  # submission.bounded_provenance keeps 32
TOLERANCE = 1e-9  # recomputed means, stds and scores agree with the recorded ones to this
MAC_FIELD = "mac"
KEY_ID_FIELD = "key_id"  # records.key_id of the key that signed it (records signed before it have none)
KEY_ENV = "DDCHALLENGE_RECORD_KEY"  # names the key FILE, as --record-key does
MIN_KEY_BYTES, MAX_KEY_BYTES = 16, 4096
MAX_BUDGET_SECONDS = 7 * 86_400  # as `score --budget` allows

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_STATUS_FAILED = "failed"


def _show(value) -> str:
    return clean(repr(value), 60)


class _Fields:
    """Typed access to one JSON object of a record; each failure names the
    file and the field's path (`datasets[1].mean`)."""

    def __init__(self, data, where: str, prefix: str = ""):
        self.where, self.prefix = where, prefix
        if not isinstance(data, dict):
            raise self.error(prefix.rstrip(".") or "the record", "must be a JSON object", data)
        self.data = data

    def error(self, field: str, expected: str, value) -> RecordError:
        return RecordError(f"{self.where}: {self.prefix}{field} {expected}, got {_show(value)}")

    def get(self, field: str):
        if field not in self.data:
            raise RecordError(f"{self.where}: {self.prefix}{field} is missing")
        return self.data[field]

    def text(self, field: str, limit: int = MAX_TEXT, optional: bool = False, empty: bool = True) -> str | None:
        value = self.get(field)
        if value is None and optional:
            return None
        if not isinstance(value, str) or len(value) > limit or (not empty and not value):
            kind = "a text" if empty else "a non-empty text"
            raise self.error(field, f"must be {kind} of at most {limit} characters" + (" or null" if optional else ""),
                             value)
        return value

    def whole(self, field: str, low: int, high: int) -> int:
        value = self.get(field)
        # bool is an int in Python, never in a record
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.error(field, f"must be a whole number from {low} to {high}", value)
        return value

    def number(self, field: str, low: float = 0.0, high: float = math.inf) -> float:
        return _number(self.get(field), low, high, lambda what, v: self.error(field, what, v))

    def flag(self, field: str) -> bool:
        value = self.get(field)
        if not isinstance(value, bool):
            raise self.error(field, "must be true or false (a JSON boolean)", value)
        return value

    def items(self, field: str, low: int = 0, high: int = MAX_ITEMS) -> list:
        value = self.get(field)
        if not isinstance(value, list) or not low <= len(value) <= high:
            raise self.error(field, f"must be a list of {low} to {high} items", value)
        return value

    def sha256(self, field: str, optional: bool = False) -> str | None:
        value = self.get(field)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            raise self.error(field, "must be a sha256 (64 lowercase hex digits)" + (" or null" if optional else ""),
                             value)
        return value


def _number(value, low: float, high: float, error) -> float:
    # A JSON integer has no size limit: 1e400 written as digits is an int that no float holds (math.isfinite
    # would raise OverflowError), so the range is compared exactly, as ints, before anything becomes a float.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
            or (isinstance(value, float) and not math.isfinite(value)) or abs(value) > _FLOAT_MAX:
        raise error(f"must be a finite number from {low:g} to {high:g}", value)
    return float(value)


_FLOAT_MAX = 1.7976931348623157e308  # sys.float_info.max


def _fmean(xs: list[float]) -> float:
    return math.fsum(xs) / len(xs)


_RECIPE_FIELDS = {f.name: f for f in dataclasses.fields(EvalRecipe)}
_RECIPE_BOUNDS = {"epochs": (0, MAX_EPOCHS), "rounds": (1, MAX_ROUNDS)}
_RECIPE_INT_MAX = 1 << 20  # width, depth, batch sizes: far past any recipe


def check_recipe(record: _Fields) -> EvalRecipe:
    """The recorded recipe settings, rebuilt; its hash and budget flag are
    recomputed from them, never read."""
    fields = _Fields(record.get("recipe"), record.where, "recipe.")
    unknown = sorted(set(fields.data) - set(_RECIPE_FIELDS))
    if unknown:
        raise RecordError(f"{record.where}: recipe has unknown setting(s) {clean(', '.join(map(str, unknown)), 200)}")
    return _recipe_settings(fields)


def _recipe_settings(fields: _Fields) -> EvalRecipe:
    """The EvalRecipe fields of `fields`, each checked (other keys are the caller's)."""
    values = {}
    for name, f in _RECIPE_FIELDS.items():
        if f.type in ("int", int):
            values[name] = fields.whole(name, *_RECIPE_BOUNDS.get(name, (1, _RECIPE_INT_MAX)))
        elif f.type in ("float", float):
            value = fields.get(name)
            _number(value, 0.0, 1e6, lambda what, v, n=name: fields.error(n, what, v))
            values[name] = value  # as recorded: int or float, so that the hash is recomputed from the same JSON
        else:
            values[name] = fields.text(name, 200)
    return EvalRecipe(**values)


def check_score_record(data, where: str) -> dict:
    """`data` if it is a whole, self-consistent score result; else RecordError."""
    record = _Fields(data, where)
    record.text("name", empty=False)
    record.text("method", MAX_METHOD, optional=True)
    record.text("submission")
    record.sha256("submission_sha256", optional=True)
    seed = record.whole("seed", 0, MAX_SEED)
    recipe = check_recipe(record)
    recipe_hash = record.get("recipe_hash")
    if recipe_hash != recipe.hash():
        raise record.error("recipe_hash", f"must be {recipe.hash()}, the hash of the recorded recipe settings",
                           recipe_hash)
    if record.flag("official_budget") != recipe.is_official:
        raise record.error("official_budget", f"must be {str(recipe.is_official).lower()} for the recorded recipe "
                           f"settings", record.data["official_budget"])
    means = [_check_dataset(_Fields(d, where, f"datasets[{i}]."), recipe, seed)
             for i, d in enumerate(record.items("datasets", 1, len(DATASETS)))]
    names = [d["dataset"] for d in record.data["datasets"]]
    if len(set(names)) != len(names):
        raise record.error("datasets", "must name each dataset once", names)
    score = record.number("score", 0.0, 1.0)
    if abs(score - _fmean(means)) > TOLERANCE:
        raise record.error("score", f"must be the mean of the dataset means ({_fmean(means)!r})", score)
    _check_extras(record, {d["dataset"]: d["accuracies"] for d in record.data["datasets"]}, seed, recipe,
                  {d["dataset"]: d["ipc"] for d in record.data["datasets"]})
    rules = _Fields(record.data.get("rules", {}), where, "rules.")  # older records have none, or no track
    if "track" in rules.data and rules.whole("track", 1, 2) == 2:  # the leaderboard ranks tracks and budgets apart
        rules.number("budget_seconds", 0.0, MAX_BUDGET_SECONDS)
    record.text("device", 200)
    record.text("sandbox")
    record.number("seconds")
    for i, w in enumerate(record.items("warnings")):
        if not isinstance(w, str) or len(w) > MAX_TEXT:
            raise record.error(f"warnings[{i}]", f"must be a text of at most {MAX_TEXT} characters", w)
    versions = _Fields(record.get("versions"), where, "versions.")
    if len(versions.data) > MAX_ITEMS:
        raise record.error("versions", f"must hold at most {MAX_ITEMS} entries", len(versions.data))
    for name in versions.data:
        versions.text(name, 200)
    _check_batch_fields(record)
    return data


def _check_rounds(f: _Fields, recipe: EvalRecipe, seed: int) -> tuple[list[float], float]:
    """The per-round fields a dataset row and an extra row share: seeds from
    `seed`, one accuracy per round, and the mean and population std that
    follow from them. Returns (accuracies, mean)."""
    seeds = f.items("seeds", recipe.rounds, recipe.rounds)
    if seeds != [seed + r for r in range(recipe.rounds)] or any(isinstance(s, bool) for s in seeds):
        raise f.error("seeds", f"must be seed, seed + 1, ... ({recipe.rounds} rounds from seed {seed})", seeds)
    accs = [_number(a, 0.0, 1.0, lambda what, v, i=i: f.error(f"accuracies[{i}]", what, v))
            for i, a in enumerate(f.items("accuracies", recipe.rounds, recipe.rounds))]
    mean = f.number("mean", 0.0, 1.0)
    if abs(mean - _fmean(accs)) > TOLERANCE:
        raise f.error("mean", f"must be the mean of the accuracies ({_fmean(accs)!r})", mean)
    std = f.number("std", 0.0, 0.5)
    expected = math.sqrt(_fmean([(a - mean) ** 2 for a in accs]))
    if abs(std - expected) > TOLERANCE:
        raise f.error("std", f"must be the population std of the accuracies ({expected!r})", std)
    return accs, mean


def _check_dataset(d: _Fields, recipe: EvalRecipe, seed: int) -> float:
    name = d.text("dataset", 64)
    if name not in DATASETS:
        raise d.error("dataset", f"must be a known dataset ({', '.join(DATASETS)})", name)
    spec = DATASETS[name]
    ipc = d.whole("ipc", 1, MAX_RULE_IPC)
    if d.whole("images", 1, spec.classes * MAX_RULE_IPC) != spec.classes * ipc:
        raise d.error("images", f"must be {spec.classes * ipc} ({spec.classes} classes at IPC {ipc})",
                      d.data["images"])
    if d.get("kind") not in ("official", "labelled"):
        raise d.error("kind", "must be 'official' or 'labelled'", d.data["kind"])
    d.text("method", MAX_METHOD, optional=True)
    d.text("source")
    d.sha256("sha256")
    if "test_sha256" in d.data:  # older records have none
        d.sha256("test_sha256", optional=True)
    _, mean = _check_rounds(d, recipe, seed)
    d.number("seconds")
    if d.data.get("provenance") is not None:  # what the upload says made it (optional): a flat object of scalars
        provenance = _Fields(d.data["provenance"], d.where, f"{d.prefix}provenance.")
        if len(provenance.data) > MAX_PROVENANCE_KEYS:
            raise d.error("provenance", f"must hold at most {MAX_PROVENANCE_KEYS} entries", len(provenance.data))
        for key, value in provenance.data.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                _number(value, -math.inf, math.inf, lambda what, v, k=key: provenance.error(k, what, v))
            elif not (value is None or isinstance(value, bool) or (isinstance(value, str) and len(value) <= MAX_TEXT)):
                raise provenance.error(clean(key, 64), f"must be a text of at most {MAX_TEXT} characters, a number, "
                                       "a boolean or null", value)
    return mean


_EXTRA_FIELDS = {f.name for f in dataclasses.fields(ExtraScore)}
_DERIVED = ("ior", "ior_se", "full", "hlr", "ior_se_paired")


def _check_extras(record: _Fields, sets: dict[str, list[float]], seed: int, challenge: EvalRecipe,
                  ipcs: dict[str, int]) -> None:
    """The extra measures (optional: older records have none), each row
    rechecked like a dataset's: its recipe (the challenge's as run, plus the
    measure's own settings: none for an architecture, the subset's seed and
    the dataset's IPC for a baseline), its own hash (never the challenge's),
    its seeds, its statistics and, for a baseline, IOR and HLR recomputed
    from the set's accuracies; one row per measure and dataset."""
    if "extras" not in record.data:
        return
    seen: set[tuple[str, str]] = set()
    for i, row in enumerate(record.items("extras", 0, MAX_EXTRAS)):
        e = _Fields(row, record.where, f"extras[{i}].")
        unknown = sorted(set(e.data) - _EXTRA_FIELDS, key=str)
        if unknown:
            raise RecordError(f"{e.where}: {e.prefix.rstrip('.')} has unknown field(s) "
                              f"{clean(', '.join(map(str, unknown)), 200)}")
        measure = e.text("measure", 64)
        if measure not in MEASURES:
            raise e.error("measure", f"must be one of {', '.join(sorted(MEASURES))}", measure)
        name = e.text("dataset", 64)
        if name not in sets:
            raise e.error("dataset", "must be a dataset of this record", name)
        settings = _Fields(e.get("recipe"), e.where, f"{e.prefix}recipe.")
        own = [k for k in settings.data if k not in _RECIPE_FIELDS]
        if len(own) > MAX_OWN_SETTINGS:
            raise RecordError(f"{e.where}: {settings.prefix.rstrip('.')} must hold at most {MAX_OWN_SETTINGS} "
                              f"settings of its own, got {len(own)}")
        for key in own:
            value = settings.data[key]
            if not isinstance(key, str) or len(key) > 64:
                raise settings.error(clean(str(key), 64), "must be a name of at most 64 characters", key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                _number(value, -1e9, 1e9, lambda what, v, k=key: settings.error(k, what, v))
            elif not (value is None or isinstance(value, bool) or (isinstance(value, str) and len(value) <= 200)):
                raise settings.error(key, "must be a text of at most 200 characters, a number, a boolean or null",
                                     value)
        recipe = _recipe_settings(settings)
        # Every measure trains with the recipe the challenge score was made with (its own settings aside): a row
        # claiming other epochs or rounds beside it would be another experiment passed off as this one's.
        if recipe != challenge:
            raise RecordError(f"{e.where}: {settings.prefix.rstrip('.')} must be the record's recipe (its epochs, "
                              "rounds and every other setting) plus the measure's own settings")
        if (measure, name) in seen:
            raise e.error("measure", f"must appear once per dataset ({name} has two {measure} rows)", measure)
        seen.add((measure, name))
        _check_own_settings(measure, settings, own, name, ipcs[name])
        expected = extra_recipe_hash(measure, settings.data)
        if e.get("recipe_hash") != expected:
            raise e.error("recipe_hash", f"must be {expected}, the hash of the measure and its recorded recipe",
                          e.data["recipe_hash"])
        if expected == record.data.get("recipe_hash"):  # would need a sha256 collision; never mix the two
            raise e.error("recipe_hash", "must differ from the challenge recipe's hash", expected)
        accs, mean = _check_rounds(e, recipe, seed)
        e.number("seconds")
        derived = {k: e.data.get(k) for k in _DERIVED}
        if not is_baseline(measure):
            for k, v in derived.items():
                if v is not None:
                    raise e.error(k, f"must be null for {measure} (baselines only)", v)
            continue
        own_accs = sets[name]
        want = {"ior": _fmean(own_accs) - mean, "ior_se": standard_error(own_accs, accs)}
        if derived["ior_se_paired"] is not None:  # absent or null in records made before it existed
            want["ior_se_paired"] = paired_standard_error(own_accs, accs)
        full = None if derived["full"] is None else e.number("full", 0.0, 1.0)
        want["full"] = full
        want["hlr"] = None if full is None else full - _fmean(own_accs)
        for k, w in want.items():
            v = derived[k]
            if w is None:
                if v is not None:
                    raise e.error(k, "must be null (nothing to compute it from)", v)
                continue
            _number(v, -1.0, 1.0, lambda what, got, k=k: e.error(k, what, got))
            if abs(v - w) > TOLERANCE:
                raise e.error(k, f"must be {w!r}, recomputed from the set's and the baseline's accuracies", v)


def _check_own_settings(measure: str, settings: _Fields, own: list[str], dataset: str, ipc: int) -> None:
    """Exactly the settings each kind of row is written with: none for an
    architecture; the seed of its real subset and the IPC, which is its
    dataset's (a baseline of another size compares nothing), for a
    baseline; the mode, T and the loss for a label row, and, with a teacher,
    what identifies it: a teacher of the row's own dataset."""
    required: tuple[str, ...] = ()
    teacher = measure == LABELS_PREFIX + "teacher"
    if is_baseline(measure):
        required = ("baseline_seed", "ipc")
    elif measure.startswith(LABELS_PREFIX):
        required = LABEL_SETTINGS + (TEACHER_SETTINGS if teacher else ())
    if set(own) != set(required):
        raise RecordError(f"{settings.where}: {settings.prefix.rstrip('.')} of {measure} must hold the recipe's "
                          f"settings{' and ' + ', '.join(sorted(required)) if required else ''} only, got "
                          f"{clean(', '.join(sorted(map(str, own))) or 'none of its own', 200)}")
    if is_baseline(measure):
        settings.whole("baseline_seed", 0, MAX_SEED)
        if settings.whole("ipc", 1, MAX_RULE_IPC) != ipc:
            raise settings.error("ipc", f"must be {ipc}, the IPC of its dataset", settings.data["ipc"])
    elif measure.startswith(LABELS_PREFIX):
        exact = {"labels": measure[len(LABELS_PREFIX):], "loss": LOSS}
        if teacher:
            exact["teacher_dataset"] = dataset
        for key, want in exact.items():
            if settings.data[key] != want:
                raise settings.error(key, f"must be {want!r}", settings.data[key])
        settings.number("temperature", MIN_TEMPERATURE, MAX_TEMPERATURE)
        if teacher:
            settings.whole("teacher_epochs", 0, MAX_EPOCHS)
            settings.whole("teacher_seed", 0, MAX_SEED)
            settings.sha256("teacher_weights_sha256")
            if not _HEX16.fullmatch(settings.text("teacher_recipe_hash", 16)):
                raise settings.error("teacher_recipe_hash", "must be a recipe hash (16 lowercase hex digits)",
                                     settings.data["teacher_recipe_hash"])


def _check_batch_fields(record: _Fields) -> None:
    """What a batch adds to a record: its file key, the upload's sha256 and
    the settings it was scored under (optional: `score --json` has none)."""
    if "key" in record.data:
        record.text("key", 200)
    if "upload_sha256" in record.data:
        record.sha256("upload_sha256", optional=record.data.get("status") == _STATUS_FAILED)
    if "settings" in record.data:
        settings = _check_settings(record)
        if "recipe_hash" in record.data and settings.get("recipe_hash") != record.data["recipe_hash"]:
            raise settings.error("recipe_hash", "must be the record's recipe_hash", settings.data["recipe_hash"])
    _check_signature_fields(record)


def _check_settings(record: _Fields) -> _Fields:
    """The batch settings a record was scored under, checked where they are
    read back as numbers or flags (the leaderboard tells a record's track by
    its budget and `mixed`); the rest is compared, never read."""
    settings = _Fields(record.get("settings"), record.where, "settings.")
    if settings.data.get("budget") is not None:
        settings.number("budget", 0.0, MAX_BUDGET_SECONDS)
    if "mixed" in settings.data:
        settings.flag("mixed")
    return settings


def _check_signature_fields(record: _Fields) -> None:
    if MAC_FIELD in record.data:
        record.text(MAC_FIELD, 64)
    if KEY_ID_FIELD in record.data and not _HEX16.fullmatch(record.text(KEY_ID_FIELD, 16)):
        raise record.error(KEY_ID_FIELD, "must be a key id (16 lowercase hex digits)", record.data[KEY_ID_FIELD])


def check_failed_record(data, where: str) -> dict:
    """`data` if it is a whole failed-upload record (a batch's `.failed.json`)."""
    record = _Fields(data, where)
    if record.get("status") != _STATUS_FAILED:
        raise record.error("status", "must be 'failed'", record.data["status"])
    record.text("name", empty=False)
    record.text("submission")
    record.text("reason")
    record.text("key", 200)
    record.sha256("upload_sha256", optional=True)
    if not isinstance(record.data.get("over_budget", False), bool):
        raise record.error("over_budget", "must be true or false", record.data["over_budget"])
    _check_settings(record)
    _check_signature_fields(record)
    return data


def is_failed(data) -> bool:
    return isinstance(data, dict) and data.get("status") == _STATUS_FAILED


def canonical(record: dict) -> bytes:
    """The bytes a MAC covers: the record without its MAC, keys sorted, no
    spaces, ASCII only; NaN and infinities cannot be written."""
    body = {k: v for k, v in record.items() if k != MAC_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def mac(record: dict, key: bytes) -> str:
    return hmac.new(key, canonical(record), hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    """Which key signed a record, without revealing it: an HMAC of a fixed
    text. A rerun tells a folder signed under another key (the organiser's
    mistake) from records altered after signing (set aside one by one)."""
    return hmac.new(key, b"ddchallenge record key id", hashlib.sha256).hexdigest()[:16]


def sign(record: dict, key: bytes | None) -> dict:
    """`record` with its key's id and its MAC under `key` (unchanged without
    a key; the MAC covers the id). The record goes through JSON first, so
    that what is signed is what is read back."""
    if key is None:
        return record
    record = json.loads(json.dumps(record, allow_nan=False))
    record[KEY_ID_FIELD] = key_id(key)
    record[MAC_FIELD] = mac(record, key)
    return record


def check_mac(record: dict, key: bytes | None, where: str) -> None:
    if key is None:
        return
    given = record.get(MAC_FIELD)
    if not isinstance(given, str):
        raise RecordError(f"{where}: not signed with the organiser's record key (no {MAC_FIELD} field); "
                          "records made without --record-key, or planted")
    try:
        expected = mac(record, key)
    except (ValueError, TypeError, RecursionError):  # NaN or infinity in a field no check reads, or too deep
        raise RecordError(f"{where}: holds a value a signed record cannot (NaN, infinity, or nesting too deep)") \
            from None
    if not hmac.compare_digest(given, expected):
        raise RecordError(f"{where}: its {MAC_FIELD} does not match the organiser's record key: the record was "
                          "changed after it was signed, or signed with another key")


def record_key(name: str) -> str:
    """A file-name-safe key, unique per exact name: readable part + hash."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:60] or "upload"
    return f"{readable}-{hashlib.sha256(name.encode(errors='surrogateescape')).hexdigest()[:12]}"


def record_file_name(record: dict) -> str:
    """The file a batch keeps a checked record in: `<key>.json`, or
    `<key>.failed.json` for a failure."""
    return f"{record['key']}.failed.json" if is_failed(record) else f"{record['key']}.json"


def read_record(path: str | os.PathLike, key: bytes | None = None) -> dict:
    """A score or failed record read from `path` as untrusted input: a plain
    file (no link) of a sane size, JSON, checked field by field, and signed
    under `key` when one is given. A record a batch wrote (it names its
    `key`) is read only from the file that batch kept it in: a copy under
    another name, or a record set aside (`.superseded-1`) renamed, is not
    the upload's current record, signed or not. RecordError on anything else."""
    path = Path(path)
    where = clean(str(path), 300)
    # sorting and signing re-encode a record recursively: its depth is bounded (a record holds at most 6)
    data = read_json_bounded(path, MAX_RECORD_BYTES, MAX_RECORD_DEPTH, lambda why: RecordError(f"{where}: {why}"))
    check_record(data, where)
    check_mac(data, key, where)
    if "key" in data and (data["key"] != record_key(data["name"]) or path.name != record_file_name(data)):
        raise RecordError(f"{where}: a record of {clean(data['name'], 80)!r} is kept in "
                          f"{clean(record_file_name(data), 120)} with the key of its name, and this file is not that "
                          "(a copy, or a record set aside and renamed); not read")
    return data


def check_record(data, where: str) -> dict:
    """`data` if it is a valid score or failed record (its MAC aside)."""
    if is_failed(data):
        check_failed_record(data, where)
    else:
        check_score_record(data, where)
    check_values(data, where)
    return data


def check_values(data, where: str) -> None:
    """RecordError naming the first NaN, infinity or lone surrogate anywhere in
    `data`. Python's JSON reader accepts NaN, Infinity and -Infinity, which
    JSON has not and `score` never writes; the field checks refuse them where
    they read a number, and this refuses them everywhere else (a batch's
    settings, a field no check reads), so that no record holding one is ever
    compared against or shown. The same for text: JSON's escapes can spell a
    lone surrogate (\\ud800), which no file name decodes to (an undecodable
    byte becomes U+DC80..U+DCFF, which encodes back) and no page, CSV or hash
    can encode. Iterative: a record is nested only as deep as the JSON reader
    allowed."""
    todo = [(data, "")]
    while todo:
        value, path = todo.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise RecordError(f"{where}: {path or 'the record'} is {value!r}; a record holds no NaN or infinity "
                              "(JSON has none, and `score` never writes one): the record was written by hand or "
                              "planted")
        for text in ([value] if isinstance(value, str) else list(value) if isinstance(value, dict) else []):
            try:
                text.encode(errors="surrogateescape")
            except UnicodeEncodeError:
                raise RecordError(f"{where}: {path or 'the record'} holds a lone surrogate ({_show(text)}), which "
                                  "`score` never writes: the record was written by hand or planted") from None
        if isinstance(value, dict):
            todo.extend((v, f"{path}.{clean(str(k), 64)}" if path else clean(str(k), 64)) for k, v in value.items())
        elif isinstance(value, list):
            todo.extend((v, f"{path}[{i}]") for i, v in enumerate(value))


def load_key(path: str | os.PathLike, outside: list[str | os.PathLike] = ()) -> bytes:
    """The organiser's record key from a file (its bytes, surrounding
    whitespace removed); refused when it lies inside one of `outside` (a
    results folder), since whoever can write records could then read it."""
    path = Path(path)
    try:
        data = path.read_bytes() if path.is_file() and path.stat().st_size <= MAX_KEY_BYTES * 2 else None
    except OSError as exc:
        raise UsageError(f"--record-key {clean(str(path))}: cannot be read ({exc.strerror})") from None
    if data is None:
        raise UsageError(f"--record-key {clean(str(path))}: must be a file of {MIN_KEY_BYTES} to {MAX_KEY_BYTES} "
                         "bytes (e.g. `head -c 32 /dev/urandom | base64 > KEYFILE`)")
    key = data.strip()
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise UsageError(f"--record-key {clean(str(path))}: holds {len(key)} bytes; a key is {MIN_KEY_BYTES} to "
                         f"{MAX_KEY_BYTES} bytes (e.g. `head -c 32 /dev/urandom | base64 > KEYFILE`)")
    real = path.resolve()
    for folder in outside:
        if real.is_relative_to(Path(folder).resolve()):
            raise UsageError(f"--record-key {clean(str(path))} lies inside the results folder {clean(str(folder))}; "
                             "keep it where those who can write records cannot read it")
    return key
