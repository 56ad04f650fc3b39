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
pool, matching and writing included, counts against the budget, and a
`BudgetClock` says where it went (loading, measuring, making, selecting,
pool, matching, writing) in every budget message.

Track 2's table rule (protocol.TABLE_RULE): every stored table a method
reads goes through codebook.load_table, which notes its rows per class in
the request's ledger; the runner refuses a run that read more rows per class
than it made.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ddchallenge.errors import BudgetExceeded, DDChallengeError, OutputExistsError, UsageError
from ddchallenge.fileio import atomic_path, check_writable
from ddchallenge.labelled import HDF5_SIGNATURE, write_labelled_set, written_here
from ddchallenge.protocol import (
    TRACK1_DATASETS, TRACK1_IPC, TRACK2_BUDGET_SECONDS, DatasetSpec, check_match_steps, check_seed,
    check_tables_read, get_dataset,
)

log = logging.getLogger(__name__)


class BudgetClock:
    """Where a run's time went, phase by phase. Phases nest: time spent in an
    inner phase (`loading` inside the method's `making`) is charged to it
    alone, so the parts add up to the whole."""

    def __init__(self, budget: float | None, started: float | None = None):
        """`started`: when the budget began (time.monotonic()), if before now;
        the time until now is charged to "starting" (a sandboxed child's
        start-up counts against a Track 2 budget)."""
        now = time.monotonic()
        self.budget = budget
        self.start = self._mark = now if started is None else min(started, now)
        self.spent: dict[str, float] = {"starting": now - self.start} if now > self.start else {}
        self._stack: list[str] = []

    def _charge(self) -> None:
        now = time.monotonic()
        if self._stack:
            self.spent[self._stack[-1]] = self.spent.get(self._stack[-1], 0.0) + now - self._mark
        self._mark = now

    @contextlib.contextmanager
    def phase(self, name: str):
        self._charge()
        self._stack.append(name)
        try:
            yield
        finally:
            self._charge()
            self._stack.pop()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def account(self) -> str:
        """One line: where the 60 s budget went: loading 2.0 s, measuring 1.1 s, ..."""
        self._charge()
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.spent.items() if seconds >= 0.05)
        whole = f"the {self.budget:g} s budget" if self.budget is not None else "the run"
        return f"where {whole} went: {parts or 'nothing measurable'} ({self.elapsed():.1f} s in all)"


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
    scoring_seed: int | None = None  # Track 2: the scoring seed that `seed` was derived from (protocol.generation_seed)


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
    tables: dict = field(default_factory=dict, compare=False)  # stored table name -> rows per class read
    clock: BudgetClock = field(default_factory=lambda: BudgetClock(None), compare=False, repr=False)

    def once(self, key: tuple, load: Callable[[], object]):
        """`load()` the first time `key` is asked for in this run; afterwards the same object."""
        if key not in self.loaded:
            self.loaded[key] = load()
        return self.loaded[key]

    def check_deadline(self) -> None:
        """Methods call this between units of work, so an over-budget run
        stops early instead of finishing uselessly."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise BudgetExceeded("the budget ran out before the method finished")


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
    if config.budget is not None and not 0 < config.budget < math.inf:  # nan fails this too
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
    phases: dict  # phase -> seconds (BudgetClock)


def generate(config: GenerateConfig, output: str | os.PathLike, force: bool = False,
             started: float | None = None) -> GenerationReport:
    """Run a method and write its labelled set atomically: on any failure
    (including an exceeded budget) nothing is written. `started`: when the
    budget began (time.monotonic(); default now)."""
    spec = get_dataset(config.dataset)
    method = _method(config.method)
    budget = check_track(config, spec)
    unknown = sorted(set(config.options) - set(method.options))
    if unknown:
        raise UsageError(f"--{unknown[0].replace('_', '-')} does not apply to --method {config.method}")
    if config.ipc == "auto" and not method.auto_ipc:
        auto = ", ".join(sorted(n for n, m in GENERATORS.items() if m.auto_ipc))
        raise UsageError(f"--method {config.method} cannot pick its IPC; --ipc auto works with: {auto}")
    from ddchallenge.generators.selection import check_oversample

    check_oversample(config.oversample)
    check_match_steps(config.match_steps)
    selecting, matching = config.oversample > 1, config.match_steps > 0
    output = Path(output)
    check_writable(output, "-o", replaceable=HDF5_SIGNATURE)  # --force replaces a labelled set, no other file
    if os.path.lexists(output) and not written_here(output):
        raise OutputExistsError(f"{output} is an HDF5 file but no labelled set this tool wrote; name a new file, or "
                                "move that one away")
    if output.exists() and not force:
        raise OutputExistsError(f"{output} already exists; pass --force to overwrite it")
    clock = BudgetClock(budget, started)
    try:
        return _run(config, method, spec, budget, clock, output, selecting, matching)
    except BudgetExceeded as exc:
        raise BudgetExceeded(f"{exc}; {clock.account()}; nothing was written") from None


def _run(config: GenerateConfig, method: Method, spec: DatasetSpec, budget: float | None, clock: BudgetClock,
         output: Path, selecting: bool, matching: bool) -> GenerationReport:
    from ddchallenge.evaluation.device import resolve_device
    from ddchallenge.evaluation.matching import match
    from ddchallenge.generators.matching import MATCHING_RESERVE, POOL_SHARE
    from ddchallenge.generators.selection import SELECTION_RESERVE, candidates, select

    start = clock.start
    end = None if budget is None else start + budget
    # With selection or matching, the method must stop early enough to leave time for them.
    reserve = SELECTION_RESERVE * selecting + MATCHING_RESERVE * matching
    method_deadline = None if budget is None else start + budget * (1 - reserve)
    made_ipc = None if config.ipc == "auto" else candidates(config.ipc, config.oversample)
    request = GenerationRequest(spec, made_ipc, config.seed, config.device, config.root, dict(config.options),
                                method_deadline, config.oversample, None if config.ipc == "auto" else config.ipc,
                                clock=clock)
    with clock.phase("making"):
        images, labels, provenance = method.run(request)
    if selecting:
        made = len(labels) // spec.classes
        # --ipc auto keeps fewer rather than fail: one candidate per class still gives IPC 1.
        keep = config.ipc if config.ipc != "auto" else max(1, math.floor(made / config.oversample + 1e-9))
        _check_output(images, labels, spec, made, config.method)
        with clock.phase("selecting"):
            images, labels, provenance["selection"] = select(images, labels, spec, keep, config.seed,
                                                             resolve_device(config.device))
    if matching:
        keep = len(labels) // spec.classes
        # The pool gets at most POOL_SHARE of the time left; matching the rest, up to WRITE_RESERVE before the end.
        pool_deadline = None if end is None else time.monotonic() + POOL_SHARE * (end - time.monotonic())
        request = dataclasses.replace(request, deadline=pool_deadline, keep=keep)
        with clock.phase("pool"):
            pool, pool_labels, pool_record = method.pool(request)
        with clock.phase("matching"):
            if len(pool_labels) == 0:
                provenance["matching"] = {"steps": config.match_steps, "steps_done": 0, "stopped_by_deadline": True,
                                          "pool": pool_record}
                log.warning("no pool image fitted in the budget; the set is kept unmatched")
            else:
                deadline = None if end is None else end - WRITE_RESERVE * budget
                images, provenance["matching"] = match(images, labels, pool, pool_labels, spec, config.match_steps,
                                                       config.seed, resolve_device(config.device), deadline)
                provenance["matching"]["pool"] = pool_record
    ipc = config.ipc if config.ipc != "auto" else len(labels) // spec.classes
    _check_output(images, labels, spec, ipc, config.method)
    check_tables_read(request.tables, ipc, f"--method {config.method}")
    provenance["tables_read"] = dict(sorted(request.tables.items()))
    with clock.phase("writing"), atomic_path(output) as tmp:
        # The run time is reported, not recorded: same seed, same bytes.
        write_labelled_set(tmp, images, labels, dataset=spec.name, ipc=ipc, method=config.method, seed=config.seed,
                           config={**dataclasses.asdict(config), "provenance": provenance})
        if budget is not None and clock.elapsed() > budget:
            raise BudgetExceeded(f"generation took {clock.elapsed():.1f} s, over the {budget:g} s budget")
    seconds = clock.elapsed()
    if budget is not None:
        log.info("%s", clock.account())
    return GenerationReport(output, spec.name, config.method, ipc, len(labels), seconds,
                            len(labels) / max(seconds, 1e-9), dict(clock.spent))


WRITE_RESERVE = 0.02  # share of a budget matching leaves for writing the set


def _check_output(images: np.ndarray, labels: np.ndarray, spec: DatasetSpec, ipc: int, method: str) -> None:
    """A method's bug must not become a silently wrong submission."""
    n = spec.classes * ipc
    if images.dtype != np.uint8 or images.shape != (n, *spec.image_shape):
        raise DDChallengeError(f"method {method} returned {images.dtype} {images.shape}; expected uint8 "
                               f"{(n, *spec.image_shape)}")
    if not np.array_equal(labels, np.repeat(np.arange(spec.classes), ipc)):
        raise DDChallengeError(f"method {method} did not return exactly {ipc} images per class in class order")
