"""Running the extra measures of `score` (rows: ddchallenge.extras): other
architectures of the evaluation pool, and the improvement over a real-image
baseline (IOR, HLR).

Every measure trains with the challenge's loop (`round_accuracies`), the
same recipe and the same seeds as the challenge score; only the network (an
architecture) or the images (a baseline) change. A baseline's accuracies and
a full-data reference are cached under the data root, in
`<root>/extras/`, so that an organiser pays for them once: baselines keyed
by dataset, IPC, method and seed of the subset, recipe hash, seeds, the
test set's sha256 (`--ref` may name another test set), device, torch
version and whether rounds trained together; the full-data reference by
dataset, recipe hash, seeds and test set (the device that made it is
recorded). A cache file is untrusted on read-back: one that is not exactly
what this run would have written is recomputed and replaced, never
believed. A baseline cache that cannot be written (a read-only data root)
is a warning, never the upload's failure.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import stat
import tempfile
import time
from pathlib import Path

import torch

from ddchallenge.data import load_reference
from ddchallenge.data.reference import (class_sizes, current_test_set_digest, data_root, digest_test_set, load_train,
                                        normalise, train_store_path)
from ddchallenge.errors import DatasetError, EnvironmentFailure, OptionMismatch
from ddchallenge.evaluation.soft import label_row
from ddchallenge.evaluation.train import round_accuracies, together_by_default
from ddchallenge.extras import (ARCH_PREFIX, BASELINE_PREFIX, ExtraScore, ExtrasRequest, paired_standard_error,
                                recipe_hash, standard_error)
from ddchallenge.fileio import atomic_write_bytes, source_digest
from ddchallenge.isolation import clean
from ddchallenge.protocol import DATASETS, DatasetSpec, EvalRecipe, get_dataset
from ddchallenge.submission import DatasetEntry
from ddchallenge.teacher import check_labels_possible

log = logging.getLogger(__name__)

CACHE_FOLDER = "extras"
CACHE_KIND = "ddchallenge extras cache 1"
MAX_CACHE_BYTES = 64 << 10  # 100 rounds of accuracies and a key are a few KB
FULL_MEASURE = "reference:full"  # names the full-data recipe's hash; never a row of a result


def root_of(request: ExtrasRequest) -> Path:
    return Path(request.data_root) if request.data_root is not None else data_root()


def _fmean(xs: list[float]) -> float:
    return math.fsum(xs) / len(xs)


def check_possible(entries: list[DatasetEntry], request: ExtrasRequest) -> None:
    """Refuse, before any training, a baseline for a dataset without
    training images (DatasetError: the organiser's to fix, never recorded)
    or with fewer in a class than the upload's IPC, and a label measure the
    upload cannot give (ddchallenge.teacher); the last two are the command
    line's mistake for this upload (OptionMismatch: refused, not recorded)."""
    check_labels_possible(entries, request)
    if not request.baseline:
        return
    for entry in entries:
        need_store(entry.spec, root_of(request), f"--baseline {request.baseline}")
        smallest = int(class_sizes(entry.spec, root_of(request)).min())
        if entry.ipc > smallest:
            raise OptionMismatch(f"--baseline {request.baseline} draws {entry.ipc} real training images per class "
                                 f"(the upload's IPC for {entry.spec.name}) and the smallest class has {smallest}; "
                                 "score this upload without --baseline")


def check_before_reading(names: tuple[str, ...] | list[str], request: ExtrasRequest, track2: bool = False) -> None:
    """`check_possible` for datasets known by name before an upload is read:
    a Track 2 generator runs for minutes per dataset first, and a measure it
    can never give should stop the run before that. A missing training store
    for --baseline; a teacher of another dataset; and, for a generator
    (`track2`), --labels soft, since a Track 2 run's images carry no soft
    labels."""
    from ddchallenge.evaluation.soft import SoftLabelsMissing
    from ddchallenge.teacher import check_teacher_for, request_teacher

    if request.baseline:
        for name in names:
            need_store(get_dataset(name), root_of(request), f"--baseline {request.baseline}")
    if track2 and request.labels == "soft":
        raise SoftLabelsMissing("--labels soft trains on the soft labels a set carries, and a Track 2 generator's "
                                "images carry none; score it with --teacher DIR (mode M) instead")
    teacher = request_teacher(request)
    if teacher is not None:
        for name in names:
            check_teacher_for(teacher, get_dataset(name).name)


def need_store(spec: DatasetSpec, root: Path, what: str) -> None:
    """DatasetError naming the command that makes `spec`'s training store,
    when `what` needs it and it is not in `root`."""
    base = DATASETS[spec.validation_of] if spec.validation_of else spec
    if base.name == "mnist5k":  # embedded
        return
    path = train_store_path(base, root)
    if not path.is_file():
        raise DatasetError(f"{what} needs the training images of {base.name} and {clean(str(path))} does not "
                           f"exist; make it with `ddchallenge data prepare {base.name} --download`, or pass --root "
                           "DIR where it was prepared")


def run(entries: list[DatasetEntry], set_accuracies: list[list[float]], refs: dict, recipe: EvalRecipe, seed: int,
        device: torch.device, device_name: str, request: ExtrasRequest, progress: bool = True,
        together: bool | None = None, tests: dict[str, str] | None = None) -> list[ExtraScore]:
    """The rows `request` asks for, dataset by dataset: each architecture,
    then the baseline. `set_accuracies[i]`: the challenge accuracies of
    entries[i] (what IOR and HLR compare against). `tests`: the test sets'
    `digest_test_set` by dataset, as the challenge score recorded them
    (computed where missing)."""
    rows: list[ExtraScore] = []
    teacher = check_labels_possible(entries, request)
    tests = tests or {}
    for entry, accs in zip(entries, set_accuracies):
        ref = refs[entry.spec.name]
        for arch in request.archs:
            rows.append(arch_row(entry, ref, recipe, seed, device, arch, progress, together, accs))
        if request.baseline:
            rows.append(baseline_row(entry, accs, ref, recipe, seed, device, device_name, request, progress, together,
                                     tests.get(entry.spec.name)))
        if request.labels:
            rows.append(label_row(entry, ref, recipe, seed, device, request.labels, request.temperature,
                                  None if teacher is None else teacher.net,
                                  None if teacher is None else teacher.settings(), progress))
    return rows


def arch_row(entry: DatasetEntry, ref: dict, recipe: EvalRecipe, seed: int, device: torch.device, arch: str,
             progress: bool, together: bool | None, set_accs: list[float]) -> ExtraScore:
    """`arch` trained on the set with the challenge's recipe and seeds. The
    challenge's own network ("convnet") is not trained twice: its row is the
    challenge score's rounds (`set_accs`, the same network, recipe, seeds
    and batching of rounds), with 0 seconds of its own."""
    seeds = [seed + r for r in range(recipe.rounds)]
    if arch == "convnet":
        return ExtraScore.make(ARCH_PREFIX + arch, entry.spec.name, dataclasses.asdict(recipe), seeds, set_accs, 0.0)
    start = time.perf_counter()
    accs = round_accuracies(entry.spec, entry.images, entry.labels, ref["images_val"], ref["labels_val"], recipe,
                            seeds, device, progress, desc=f"{entry.spec.name} {arch}", arch=arch)
    return ExtraScore.make(ARCH_PREFIX + arch, entry.spec.name, dataclasses.asdict(recipe), seeds, accs,
                           time.perf_counter() - start)


def baseline_row(entry: DatasetEntry, set_accs: list[float], ref: dict, recipe: EvalRecipe, seed: int,
                 device: torch.device, device_name: str, request: ExtrasRequest, progress: bool = True,
                 together: bool | None = None, test: str | None = None) -> ExtraScore:
    """The seeded real subset of the set's IPC (the `random` or `herding`
    generator), scored like the set (cached), and the set's IOR against it;
    HLR where a full-data reference is cached for the recipe, seeds and
    test set. `test`: `digest_test_set(ref)` (computed when not given)."""
    spec, method = entry.spec, request.baseline
    measure = BASELINE_PREFIX + method
    seeds = [seed + r for r in range(recipe.rounds)]
    settings = {**dataclasses.asdict(recipe), "baseline_seed": request.baseline_seed, "ipc": entry.ipc}
    root, test = root_of(request), test or digest_test_set(ref)
    path, key = baseline_cache(spec, method, settings, seeds, test, device_name,
                               bool(together_by_default(device) if together is None else together), root,
                               threads=torch.get_num_threads() if device.type == "cpu" else None)
    accs = read_cache(path, key, recipe.rounds)
    seconds = 0.0
    if accs is None:
        start = time.perf_counter()
        images, labels = baseline_images(spec, method, entry.ipc, request.baseline_seed, device, root)
        accs = round_accuracies(spec, images, labels, ref["images_val"], ref["labels_val"], recipe, seeds, device,
                                progress, desc=f"{spec.name} baseline {method}", together=together)
        seconds = time.perf_counter() - start
        try:
            write_cache(path, key, accs, seconds)
        except OSError as exc:  # the cache saves time; failing to keep it is no failure of the upload
            log.warning("baseline not cached in %s (%s); it is computed again next time", clean(str(path)),
                        clean(str(exc), 160))
    full = read_full(spec, recipe, seed, root, test)
    own = _fmean(set_accs)
    return ExtraScore.make(measure, spec.name, settings, seeds, accs, seconds, ior=own - _fmean(accs),
                           ior_se=standard_error(set_accs, accs), full=full,
                           hlr=None if full is None else full - own,
                           ior_se_paired=paired_standard_error(set_accs, accs))


def current_full(rows: list[ExtraScore], set_accuracies: dict[str, list[float]], recipe: EvalRecipe, seed: int,
                 request: ExtrasRequest, ref_dir: str | os.PathLike | None = None,
                 tests: dict[str, str] | None = None) -> list[ExtraScore]:
    """`rows` (a recorded result's) with each baseline's full-data accuracy
    and HLR as the cache holds them for the same recipe, seeds and test set
    (`ref_dir`'s) now, so that a result reused on a rerun shows the HLR a
    new score would after `reference full` was run. Nothing trains. A row
    for which the cache holds nothing now (another data root, a removed or
    damaged entry) keeps what it recorded: never cleared. `tests`: test-set
    digests by dataset, filled as computed, so that a batch reads each test
    set once. Raises what reading a test set raises (DatasetError, OSError,
    ValueError)."""
    tests = {} if tests is None else tests
    out = []
    for row in rows:
        if not row.measure.startswith(BASELINE_PREFIX):
            out.append(row)
            continue
        spec = get_dataset(row.dataset)
        full = read_full(spec, recipe, seed, root_of(request),
                         current_test_set_digest(spec.name, ref_dir, request.data_root, tests))
        out.append(row if full is None else
                   dataclasses.replace(row, full=full, hlr=full - _fmean(set_accuracies[row.dataset])))
    return out


def baseline_cache(spec: DatasetSpec, method: str, settings: dict, seeds: list[int], test: str, device_name: str,
                   together: bool, root: Path, threads: int | None = None) -> tuple[Path, dict]:
    """The cache file and key of a baseline: everything that changes its
    numbers (`settings`: the recipe, the subset's seed and IPC, under the
    row's own recipe hash). The accuracies only compare (and a set's IOR
    against its own subset is 0 exactly) on the same test set, device (and
    the CPU's vector instructions and, on a CPU, its thread count: both
    change the order of float sums in the backward pass), torch and
    batching of rounds."""
    measure = BASELINE_PREFIX + method
    key = {"measure": measure, "dataset": spec.name, "ipc": settings["ipc"],
           "recipe_hash": recipe_hash(measure, settings), "seeds": list(seeds), "test_sha256": test,
           "device": device_name, "cpu": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
           "together": together, "threads": threads, "code": code_identity(), "store": store_identity(spec, root)}
    return root / CACHE_FOLDER / f"{spec.name}-ipc{settings['ipc']}-{method}-{_digest(key)}.json", key


# The modules whose code decides a baseline's accuracies: the subset (drawn or herded), how it is read back, and
# the whole training loop. Their source, not the package's version (which no edit changes), keys the cache.
BASELINE_CODE = ("evaluation", "generators/baselines.py", "kmeans.py", "labelled.py", "submission.py", "protocol.py")


@functools.lru_cache(maxsize=1)
def code_identity() -> str:
    """The digest of this installation's BASELINE_CODE: a change to any of
    them makes every baseline anew."""
    return source_digest(Path(__file__).resolve().parent, BASELINE_CODE)


def store_identity(spec: DatasetSpec, root: Path) -> str:
    """Which training store a baseline's subset was drawn from: its size and
    modification time (a store prepared again, from another source, is
    another baseline); mnist5k's is the package's own."""
    base = DATASETS[spec.validation_of] if spec.validation_of else spec
    if base.name == "mnist5k":
        return "embedded"
    try:
        st = train_store_path(base, root).stat()
    except FileNotFoundError:  # only a key is being made: reading the baseline asks for the store (need_store)
        return "absent"
    return f"{st.st_size} bytes, modified {st.st_mtime_ns}"


def baseline_images(spec: DatasetSpec, method: str, ipc: int, seed: int, device: torch.device,
                    root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline set as a user would make it (`generate --method METHOD
    --seed SEED`) and as `score` reads it back (a labelled set's pixels,
    normalised): a set made that way is this set, byte for byte."""
    from ddchallenge.generators import GenerateConfig, generate
    from ddchallenge.submission import load_submission

    with tempfile.TemporaryDirectory(prefix="ddchallenge-baseline-") as tmp:
        out = Path(tmp) / f"{spec.name}.h5"
        generate(GenerateConfig(spec.name, method, ipc, seed, device=str(device), root=str(root)), out)
        (made,) = load_submission(out, spec.name, rules=None)
    return made.images, made.labels


# ---------------------------------------------------------------- the full-data reference

def full_path(spec: DatasetSpec, recipe: EvalRecipe, seed: int, root: Path, test: str) -> tuple[Path, dict]:
    """The cache file and key of the full-data reference on the test set whose `digest_test_set` is `test`."""
    seeds = [seed + r for r in range(recipe.rounds)]
    key = {"measure": FULL_MEASURE, "dataset": spec.name,
           "recipe_hash": recipe_hash(FULL_MEASURE, dataclasses.asdict(recipe)), "seeds": seeds, "test_sha256": test}
    name = f"{spec.name}-full-{key['recipe_hash']}-seed{seed}x{recipe.rounds}-{_digest(key)}.json"
    return root / CACHE_FOLDER / name, key


def read_full(spec: DatasetSpec, recipe: EvalRecipe, seed: int, root: Path, test: str) -> float | None:
    """The cached full-data mean accuracy for this recipe, these seeds and this test set, if any (and valid)."""
    path, key = full_path(spec, recipe, seed, root, test)
    if not path.exists():
        return None
    accs = read_cache(path, key, recipe.rounds)
    return None if accs is None else _fmean(accs)


def full_reference(spec: DatasetSpec, recipe: EvalRecipe, seed: int, device: torch.device, device_name: str,
                   root: Path, progress: bool = True, ref_dir: str | os.PathLike | None = None,
                   ) -> tuple[Path, list[float], bool]:
    """Train the recipe's ConvNet on every training image of `spec`, one
    round per seed, and cache the test accuracies (the HLR reference); a
    valid cache entry is reused. Returns (cache file, accuracies, reused).
    The test set is `score`'s (`load_reference(spec, ref_dir)`): HLR uses
    it only for a score against the same test set."""
    need_store(spec, root, "a full-data reference")
    ref = load_reference(spec, ref_dir, root)
    path, key = full_path(spec, recipe, seed, root, digest_test_set(ref))
    accs = read_cache(path, key, recipe.rounds) if path.exists() else None
    if accs is not None:
        return path, accs, True
    x, y = load_train(spec, root)
    start = time.perf_counter()
    accs = round_accuracies(spec, normalise(x, spec), torch.from_numpy(y), ref["images_val"], ref["labels_val"],
                            recipe, key["seeds"], device, progress, desc=f"{spec.name} full data")
    try:
        write_cache(path, {**key}, accs, time.perf_counter() - start, made_on=device_name)
    except OSError as exc:  # the one thing this command is for
        raise EnvironmentFailure(f"could not write the full-data reference {clean(str(path))} "
                                 f"({clean(exc.strerror or str(exc), 160)}); make the data root's extras/ folder "
                                 "writable, or set $DDCHALLENGE_DATA") from None
    return path, accs, False


# ---------------------------------------------------------------- cache files (untrusted on read-back)

def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def write_cache(path: Path, key: dict, accs: list[float], seconds: float, made_on: str | None = None) -> None:
    body = {"kind": CACHE_KIND, "key": key, "accuracies": [float(a) for a in accs], "seconds": float(seconds)}
    if made_on is not None:
        body["device"] = made_on
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(body, indent=2, sort_keys=True, allow_nan=False).encode())


def read_cache(path: Path, key: dict, rounds: int) -> list[float] | None:
    """The accuracies a cache file holds if it is exactly a cache entry for
    `key` (a plain file, small, JSON, the same key, `rounds` finite
    accuracies in [0, 1]); else None, with the reason logged, and the caller
    recomputes and replaces it."""
    try:
        return _read_cache(path, key, rounds)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, RecursionError) as exc:
        log.warning("cache %s not used (%s); computing it again", clean(str(path)), clean(str(exc), 160))
        return None


def _read_cache(path: Path, key: dict, rounds: int) -> list[float]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise ValueError("not a plain file")
        raw = fh.read(MAX_CACHE_BYTES + 1)
    if len(raw) > MAX_CACHE_BYTES:
        raise ValueError(f"over {MAX_CACHE_BYTES} bytes")

    def no_constant(name):
        raise ValueError(f"{name} is not a number")

    data = json.loads(raw.decode("utf-8"), parse_constant=no_constant)
    if not isinstance(data, dict) or data.get("kind") != CACHE_KIND:
        raise ValueError("not a cache entry of this version")
    if set(data) - {"kind", "key", "accuracies", "seconds", "device"}:
        raise ValueError("unknown fields")
    if data.get("key") != json.loads(json.dumps(key)):
        raise ValueError("made for another dataset, IPC, recipe, seeds or device")
    if "device" in data and not (isinstance(data["device"], str) and len(data["device"]) <= 200):
        raise ValueError("device is not a short text")
    accs = data.get("accuracies")
    if not isinstance(accs, list) or len(accs) != rounds:
        raise ValueError(f"accuracies are not a list of {rounds}")
    for a in accs:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise ValueError(f"accuracy {clean(repr(a), 40)} is not a number from 0 to 1")
    seconds = data.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0.0 <= seconds < math.inf:
        raise ValueError("seconds is not a finite number of seconds")
    return [float(a) for a in accs]
