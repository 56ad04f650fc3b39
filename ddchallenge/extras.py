"""The measures beyond the challenge score, as results carry them.

The challenge score is one hard-label ConvNet-3 accuracy under `OFFICIAL`.
Anything else a result reports (another architecture, a random or herding
real-image baseline, soft labels) is an `ExtraScore`: its own row, its own
recipe (the evaluation recipe as run plus the measure's own settings) and
its own recipe hash, computed over the measure's name and that recipe, so
that it can never be mistaken for, or mixed into, the challenge score.

This module holds only the record's shape and the names it may use; it
imports nothing that trains. `records.py` checks rows read back.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

# The evaluation pool of DatasetCondensation (`get_eval_pool`, `get_network`), by our lowercase names;
# ddchallenge.evaluation.pool builds each. "pool" on the command line means all of them.
ARCHITECTURES = ("convnet", "convnetbn", "convnetd4", "mlp", "lenet", "alexnet", "vgg11", "resnet18")
BASELINES = ("random", "herding")
LABEL_MODES = ("soft", "teacher")  # stored soft labels (DD-Ranking's mode S) and teacher relabelling (mode M)

ARCH_PREFIX, BASELINE_PREFIX, LABELS_PREFIX = "arch:", "baseline:", "labels:"
# A label row's own settings: the mode, T and the loss; with a teacher, what identifies it (`teacher.Teacher.settings`)
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.1, 100.0  # T outside: targets collapse to argmax or to uniform
LOSS = "kl(target || softmax(logits / T)), batch mean, no T^2"  # recorded: another loss is another recipe
LABEL_SETTINGS = ("labels", "temperature", "loss")
TEACHER_SETTINGS = ("teacher_dataset", "teacher_recipe_hash", "teacher_epochs", "teacher_seed", "teacher_weights_sha256")
MEASURES = frozenset([ARCH_PREFIX + a for a in ARCHITECTURES] + [BASELINE_PREFIX + b for b in BASELINES]
                     + [LABELS_PREFIX + m for m in LABEL_MODES])
MAX_EXTRAS = 256  # rows in one record: 8 architectures + 2 baselines + 2 label modes, for 6 datasets, is 72
MAX_OWN_SETTINGS = 32  # a measure's own settings beside the evaluation recipe's


def is_baseline(measure: str) -> bool:
    return measure.startswith(BASELINE_PREFIX)


def measure_label(measure: str, recipe: dict) -> str:
    """The measure with the own settings that change its numbers, as tables
    and leaderboard columns name it, so that one name never stands for rows
    made under other settings: a label row's T (and, in mode M, the first 8
    hex digits of its teacher's weights' sha256), a baseline's subset seed
    when it is not the default 0. Architectures have no settings of their
    own. `recipe`: the row's recipe as recorded (checked)."""
    if measure.startswith(LABELS_PREFIX):
        t = float(recipe["temperature"])
        label = f"{measure} T={t:g}" if float(f"{t:g}") == t else f"{measure} T={t!r}"  # 4 and 4.0000001 apart
        if measure == LABELS_PREFIX + "teacher":
            label += f" teacher {recipe['teacher_weights_sha256'][:8]}"
        return label
    if is_baseline(measure) and recipe.get("baseline_seed", 0) != 0:
        return f"{measure} seed {recipe['baseline_seed']}"
    return measure


def recipe_hash(measure: str, recipe: dict) -> str:
    """A short stable id of an extra measure's recipe: sha256 over the
    measure's name and its recipe (the evaluation recipe's fields, less
    `eval_batch_size` which never changes a result, plus the measure's own
    settings). The blob is an object with a "measure" key, which the
    challenge recipe's blob (`EvalRecipe.hash`) never has."""
    body = {k: v for k, v in recipe.items() if k != "eval_batch_size"}
    blob = json.dumps({"measure": measure, "recipe": body}, sort_keys=True, allow_nan=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def standard_error(a: list[float], b: list[float]) -> float | None:
    """Standard error of mean(a) - mean(b) for independent rounds (Welch:
    sqrt(s_a^2/n_a + s_b^2/n_b), sample variances); None with fewer than two
    rounds on either side, where there is no variance to estimate."""
    if len(a) < 2 or len(b) < 2:
        return None

    def var(xs: list[float]) -> float:
        m = math.fsum(xs) / len(xs)
        return math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1)

    return math.sqrt(var(a) / len(a) + var(b) / len(b))


def paired_standard_error(a: list[float], b: list[float]) -> float | None:
    """Standard error of mean(a) - mean(b) when round i of both trained on
    the same seed (network init, batch order, DSA draws): the rounds are
    pairs, and the SE is that of the per-round differences,
    sd(a_i - b_i) / sqrt(n) (sample sd). A set against its own subset has
    every difference 0, so 0, where `standard_error` treats the rounds as
    independent and reports their spread. None with fewer than two rounds
    or unequal counts."""
    if len(a) < 2 or len(a) != len(b):
        return None
    d = [x - y for x, y in zip(a, b)]
    m = math.fsum(d) / len(d)
    return math.sqrt(math.fsum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))


@dataclass(frozen=True)
class ExtraScore:
    """One extra measure on one dataset of a result. Accuracies are
    fractions in [0, 1], one per round, on the challenge's seeds."""

    measure: str  # one of MEASURES: "arch:<name>", "baseline:random|herding", "labels:soft|teacher"
    dataset: str  # a dataset of the same result
    recipe: dict  # the EvalRecipe fields as run, plus the measure's own settings (flat; scalars)
    recipe_hash: str  # recipe_hash(measure, recipe); never the challenge recipe's
    seeds: list[int]  # one per round of `recipe`
    accuracies: list[float]  # of what this measure trained (the baseline's for a baseline row)
    mean: float
    std: float  # population std over rounds, as the challenge score's
    seconds: float  # wall time of this measure (0 for a baseline read from the cache)
    # Baselines only (None elsewhere): IOR = the set's mean - this baseline's mean (DD-Ranking), its standard
    # error with the rounds taken as independent (`standard_error`), and, where a full-data accuracy is cached for
    # the recipe, that accuracy and HLR = full - the set's mean. All fractions, like the accuracies.
    ior: float | None = None
    ior_se: float | None = None
    full: float | None = None
    hlr: float | None = None
    # IOR's standard error over the rounds as the pairs they are (same seeds: `paired_standard_error`); records
    # made before it existed have none (None), which read-back accepts.
    ior_se_paired: float | None = None

    @classmethod
    def make(cls, measure: str, dataset: str, recipe: dict, seeds: list[int], accuracies: list[float],
             seconds: float, **derived) -> "ExtraScore":
        mean = math.fsum(accuracies) / len(accuracies)
        std = math.sqrt(math.fsum((a - mean) ** 2 for a in accuracies) / len(accuracies))
        return cls(measure=measure, dataset=dataset, recipe=dict(recipe), recipe_hash=recipe_hash(measure, recipe),
                   seeds=list(seeds), accuracies=[float(a) for a in accuracies], mean=mean, std=std,
                   seconds=float(seconds), **derived)


@dataclass(frozen=True)
class ExtrasRequest:
    """Which extra measures a score run adds (empty: none, the default).
    Part of a batch's settings: a record made without them is not reused for
    a run that asks for them."""

    archs: tuple[str, ...] = ()  # names from ARCHITECTURES, in the order asked, each once
    baseline: str | None = None  # one of BASELINES
    baseline_seed: int = 0  # seed of the baseline's real subset (the generator's --seed)
    data_root: str | None = field(default=None, compare=False)  # where training stores and caches live
    labels: str | None = None  # one of LABEL_MODES: the set's stored soft labels (mode S) or a teacher's (mode M)
    temperature: float = 1.0  # T of the soft-label KL (ddchallenge.evaluation.soft)
    teacher: str | None = field(default=None, compare=False)  # mode M: the teacher folder (ddchallenge.teacher)
    teacher_sha256: str | None = None  # its weights' sha256, so that another teacher is another setting

    def __post_init__(self) -> None:
        """UsageError for a value no run can honour, or a setting a run would
        silently ignore: the library refuses what the CLI refuses, before any
        upload is read, so that a caller's mistake is never recorded."""
        from ddchallenge.errors import UsageError
        from ddchallenge.protocol import MAX_SEED

        if not isinstance(self.archs, tuple) or not all(isinstance(a, str) and a in ARCHITECTURES for a in self.archs):
            raise UsageError(f"archs must be a tuple of names from {', '.join(ARCHITECTURES)} "
                             f"(evaluation.pool.parse_archs makes one), got {self.archs!r}")
        if len(set(self.archs)) != len(self.archs):
            raise UsageError(f"archs names an architecture twice: {self.archs!r}")
        if self.baseline is not None and self.baseline not in BASELINES:
            raise UsageError(f"baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if isinstance(self.baseline_seed, bool) or not isinstance(self.baseline_seed, int) \
                or not 0 <= self.baseline_seed <= MAX_SEED:
            raise UsageError(f"baseline_seed must be a whole number from 0 to {MAX_SEED}, got {self.baseline_seed!r}")
        if self.baseline is None and self.baseline_seed != 0:
            raise UsageError("baseline_seed is the seed of the baseline subset: set baseline too")
        if self.labels is None:
            if self.temperature != 1.0 or self.teacher is not None or self.teacher_sha256 is not None:
                raise UsageError("temperature and teacher apply to labels 'soft' or 'teacher': set labels too")
            return
        if self.labels not in LABEL_MODES:
            raise UsageError(f"labels must be one of {', '.join(LABEL_MODES)}, got {self.labels!r}")
        from ddchallenge.evaluation.soft import check_temperature

        check_temperature(self.temperature)
        if self.labels == "soft" and (self.teacher is not None or self.teacher_sha256 is not None):
            raise UsageError("labels 'soft' trains on the set's own soft labels; a teacher is for labels 'teacher'")
        if self.labels == "teacher" and (self.teacher is None or not isinstance(self.teacher_sha256, str)
                                         or len(self.teacher_sha256) != 64):
            raise UsageError("labels 'teacher' needs teacher (a folder) and teacher_sha256 (its weights' sha256, "
                             "from teacher.load_teacher), so that another teacher is another setting")

    def __bool__(self) -> bool:
        return bool(self.archs or self.baseline or self.labels)

    def fingerprint(self) -> dict:
        """What a record's settings hold of this request (nothing when empty)."""
        out: dict = {}
        if self.archs:  # a set: asking for the same architectures in another order is the same setting
            out["archs"] = sorted(self.archs)
        if self.baseline:
            out.update(baseline=self.baseline, baseline_seed=self.baseline_seed)
        if self.labels:
            out.update(labels=self.labels, temperature=self.temperature)
            if self.labels == "teacher":
                out["teacher_sha256"] = self.teacher_sha256
        return out
