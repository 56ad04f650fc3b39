"""The `generate` stage: a registry of methods, each a function that returns
exactly IPC labelled images per class, and the runner that enforces the track
rules, times the run and writes the labelled set.

A method joins by adding one module that decorates a function with
`@register("name", pool=..., options=..., auto_ipc=...)`; the function takes a
`GenerationRequest` and returns (images uint8 (K*IPC, C, H, W), labels int64
(K*IPC,), provenance dict), class-major. The provenance (which model, which
settings) is recorded in the labelled set.

Selection (`--oversample R`, generators/selection.py) works with every
method: the method is asked for ceil(R x IPC) images per class and the
runner keeps IPC of them. Distribution matching (`--match-steps N`,
generators/matching.py) then refines the kept images toward a pool of the
class that the method supplies (`register(..., pool=...)`). The whole run,
pool and matching included, counts against the budget.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ddchallenge.errors import DDChallengeError, OutputExistsError, UsageError
from ddchallenge.labelled import write_labelled_set
from ddchallenge.protocol import (
    TRACK1_DATASETS, TRACK1_IPC, TRACK2_BUDGET_SECONDS, DatasetSpec, check_match_steps, check_seed, get_dataset,
)

log = logging.getLogger(__name__)


class BudgetExceeded(DDChallengeError):
    """A Track 2 run that did not finish inside its time budget."""


@dataclass(frozen=True)
class GenerateConfig:
    dataset: str  # dataset name (see `ddchallenge.protocol.DATASETS`)
    method: str  # registered method name
    ipc: int | str  # images per class, or "auto": the largest that fits the budget (methods that can measure it)
    seed: int = 0  # the only source of randomness
    track: int | None = None  # 1: IPC 10 on a Track 1 dataset; 2: time budget enforced; None: no rules
    budget: float | None = None  # seconds; Track 2 default 600
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    root: str | None = None  # data root holding training stores (default: the per-user cache)
    options: dict = field(default_factory=dict)  # method-specific settings, recorded with the set
    oversample: float = 1.0  # selection: make ceil(R x IPC) candidates per class, keep IPC by herding (1: none)
    match_steps: int = 0  # distribution matching steps on the kept images against the method's pool (0: none)


@dataclass(frozen=True)
class GenerationRequest:
    spec: DatasetSpec
    ipc: int | None  # None: the method picks the largest IPC that fits before the deadline
    seed: int
    device: str
    root: str | None
    options: dict
    deadline: float | None  # time.monotonic() value; None: no budget
    oversample: float = 1.0  # candidates per kept image; `ipc` above already counts the candidates
    keep: int | None = None  # images per class kept after selection (None: --ipc auto, decided from what is made)
    # What the run has loaded (a model, the training images), shared by the method and its matching pool, so
    # that matching does not read and hash the same folder again inside the budget.
    loaded: dict = field(default_factory=dict, compare=False, repr=False)

    def once(self, key: tuple, load: Callable[[], object]):
        """`load()` the first time `key` is asked for in this run; afterwards the same object."""
        if key not in self.loaded:
            self.loaded[key] = load()
        return self.loaded[key]

    def check_deadline(self) -> None:
        """Methods call this between units of work, so an over-budget run
        stops early instead of finishing uselessly."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise BudgetExceeded("the generation budget ran out before the method finished; nothing was written")


@dataclass(frozen=True)
class Method:
    run: Callable[[GenerationRequest], tuple[np.ndarray, np.ndarray, dict]]
    options: tuple[str, ...]  # the method-specific options it accepts
    auto_ipc: bool  # can pick the IPC that fits a budget
    # The images of each class that matching pulls toward, and a record of what they are.
    pool: Callable[[GenerationRequest], tuple[np.ndarray, np.ndarray, dict]]


GENERATORS: dict[str, Method] = {}


def register(name: str, *, pool: Callable[[GenerationRequest], tuple[np.ndarray, np.ndarray, dict]],
             options: tuple[str, ...] = (), auto_ipc: bool = False):
    def add(fn):
        GENERATORS[name] = Method(fn, options, auto_ipc, pool)
        return fn
    return add


def _method(name: str) -> Method:
    from ddchallenge.generators import baselines, d3m, d4m, diffusion  # noqa: F401  (register their methods)

    try:
        return GENERATORS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}; methods: {', '.join(sorted(GENERATORS))}") from None


def check_track(config: GenerateConfig, spec: DatasetSpec) -> float | None:
    """Validate the track rules; return the budget in seconds (None: untimed)."""
    check_seed(config.seed)
    if config.ipc == "auto":
        if config.track == 1:
            raise UsageError(f"Track 1 fixes IPC at {TRACK1_IPC}; --ipc auto is for a time budget")
        if config.track != 2 and config.budget is None:
            raise UsageError("--ipc auto needs a budget: pass --budget SECONDS or --track 2")
    elif not isinstance(config.ipc, int) or config.ipc < 1:
        raise UsageError(f"--ipc must be a whole number of at least 1 or 'auto', got {config.ipc}")
    if config.track not in (None, 1, 2):
        raise UsageError(f"--track must be 1 or 2, got {config.track}")
    if config.track == 1:
        if not spec.track1:
            track1 = ", ".join(sorted(TRACK1_DATASETS))
            raise UsageError(f"Track 1 is scored on {track1}, not {spec.name}; drop --track 1")
        if config.ipc != TRACK1_IPC:
            raise UsageError(f"Track 1 fixes IPC at {TRACK1_IPC}, got --ipc {config.ipc}")
    if config.budget is not None and config.budget <= 0:
        raise UsageError(f"--budget must be positive seconds, got {config.budget}")
    if config.track == 2:
        return config.budget if config.budget is not None else TRACK2_BUDGET_SECONDS
    return config.budget


@dataclass(frozen=True)
class GenerationReport:
    path: Path
    dataset: str
    method: str
    ipc: int
    images: int
    seconds: float
    images_per_second: float


def generate(config: GenerateConfig, output: str | os.PathLike, force: bool = False) -> GenerationReport:
    """Run a method and write its labelled set atomically: on any failure
    (including an exceeded budget) nothing is written."""
    spec = get_dataset(config.dataset)
    method = _method(config.method)
    budget = check_track(config, spec)
    unknown = sorted(set(config.options) - set(method.options))
    if unknown:
        raise UsageError(f"--{unknown[0].replace('_', '-')} does not apply to --method {config.method}")
    if config.ipc == "auto" and not method.auto_ipc:
        auto = ", ".join(sorted(n for n, m in GENERATORS.items() if m.auto_ipc))
        raise UsageError(f"--method {config.method} cannot pick its IPC; --ipc auto works with: {auto}")
    from ddchallenge.evaluation.device import resolve_device
    from ddchallenge.generators.matching import MATCHING_RESERVE, match
    from ddchallenge.generators.selection import SELECTION_RESERVE, candidates, check_oversample, select

    check_oversample(config.oversample)
    check_match_steps(config.match_steps)
    selecting, matching = config.oversample > 1, config.match_steps > 0
    output = Path(output)
    if output.exists() and not force:
        raise OutputExistsError(f"{output} already exists; pass --force to overwrite it")
    start = time.monotonic()
    # With selection or matching, the method must stop early enough to leave time for them.
    reserve = SELECTION_RESERVE * selecting + MATCHING_RESERVE * matching
    method_deadline = None if budget is None else start + budget * (1 - reserve)
    made_ipc = None if config.ipc == "auto" else candidates(config.ipc, config.oversample)
    request = GenerationRequest(spec, made_ipc, config.seed, config.device, config.root, dict(config.options),
                                method_deadline, config.oversample, None if config.ipc == "auto" else config.ipc)
    images, labels, provenance = method.run(request)
    if selecting:
        made = len(labels) // spec.classes
        keep = config.ipc if config.ipc != "auto" else math.floor(made / config.oversample + 1e-9)
        if keep < 1:
            raise BudgetExceeded(f"the budget left {made} candidates per class, fewer than --oversample "
                                 f"{config.oversample:g} needs for one kept image; nothing was written")
        _check_output(images, labels, spec, made, config.method)
        images, labels, provenance["selection"] = select(images, labels, spec, keep, config.seed,
                                                         resolve_device(config.device))
    if matching:
        deadline = None if budget is None else start + budget
        request = dataclasses.replace(request, deadline=deadline, keep=len(labels) // spec.classes)
        pool, pool_labels, pool_record = method.pool(request)
        images, provenance["matching"] = match(images, labels, pool, pool_labels, spec, config.match_steps,
                                               config.seed, resolve_device(config.device), request.check_deadline)
        provenance["matching"]["pool"] = pool_record
    seconds = time.monotonic() - start
    if budget is not None and seconds > budget:
        raise BudgetExceeded(f"generation took {seconds:.1f} s, over the {budget:.0f} s budget; nothing was written")
    ipc = config.ipc if config.ipc != "auto" else len(labels) // spec.classes
    _check_output(images, labels, spec, ipc, config.method)
    # The run time is reported, not recorded: same seed, same bytes.
    write_labelled_set(output, images, labels, dataset=spec.name, ipc=ipc, method=config.method,
                       seed=config.seed, config={**dataclasses.asdict(config), "provenance": provenance})
    return GenerationReport(output, spec.name, config.method, ipc, len(labels), seconds,
                            len(labels) / max(seconds, 1e-9))


def _check_output(images: np.ndarray, labels: np.ndarray, spec: DatasetSpec, ipc: int, method: str) -> None:
    """A method's bug must not become a silently wrong submission."""
    n = spec.classes * ipc
    if images.dtype != np.uint8 or images.shape != (n, *spec.image_shape):
        raise DDChallengeError(f"method {method} returned {images.dtype} {images.shape}; expected uint8 "
                               f"{(n, *spec.image_shape)}")
    if not np.array_equal(labels, np.repeat(np.arange(spec.classes), ipc)):
        raise DDChallengeError(f"method {method} did not return exactly {ipc} images per class in class order")
