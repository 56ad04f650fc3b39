"""Batch scoring on a Ray cluster: every upload that needs scoring becomes one
Ray task, which scores it exactly as the plain batch does (same sandbox, same
seeds, same code path: `batch.attempt`), and the driver records each result
in the plain batch's layout as the tasks finish.

What travels where: uploads and reference data are read by the workers from
shared storage at the same absolute path on every node (an upload can be a
generator folder of gigabytes, which Ray's object store would copy to every
worker); only the small results travel back through Ray. Each task checks
that it sees the same upload bytes the driver hashed, the same --ref test
sets, and the same ddchallenge source and torch, before it scores.

Failures: a task returns the upload's own failure as data, so any exception
Ray raises (a worker or node lost, a task that could not run) and any
machine failure the task reports is the cluster's fault. Those attempts are
retried here, at most MAX_ATTEMPTS times per upload, then reported as an
environment error and never recorded, like the plain batch does. What the
upload provokes itself is its own failure, recorded and not retried, though
it looks like the machine's: host memory past its limit, GPU memory past its
share, a device-side assert (`isolation.provoked`), so that a generator
asking for too much does not cost MAX_ATTEMPTS attempts on every run.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from ddchallenge import __version__
from ddchallenge.batch import (
    Attempt,
    BatchOutcome,
    BatchSettings,
    BatchSummary,
    Pending,
    ResultsLock,
    attempt,
    check_batch,
    reference_digest,
    settle,
    triage_all,
)
from ddchallenge.data.reference import current_test_set_digest
from ddchallenge.errors import DDChallengeError, EnvironmentFailure, UsageError
from ddchallenge.fileio import source_digest
from ddchallenge.isolation import clean
from ddchallenge.progress import bar as progress_bar
from ddchallenge.upload import digest

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # per upload; a lost worker or node costs one
INSTALL_HINT = "--cluster needs Ray: pip install 'ddchallenge[cluster]' (or pip install 'ray>=2.9,<3')"


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return ray


@contextlib.contextmanager
def connected(cluster: str):
    """Ray, connected to `cluster`: "local" starts a Ray instance on this
    machine for the batch, "auto" joins the one this machine belongs to
    (`ray start`) or the Ray session this process already has, anything
    else is a cluster address (host:port or ray://host:port)."""
    ray = _import_ray()
    if cluster not in ("local", "auto"):
        _probe(cluster)
    if ray.is_initialized():
        if cluster != "auto":
            raise UsageError(f"this process is already connected to Ray; score on that session with cluster='auto', "
                             f"not {clean(cluster)!r}")
        yield ray  # the caller's session: used as it is and left running
        return
    # Ray's own warnings (token authentication, resources) are not this batch's output: errors only.
    options = {"log_to_driver": False, "logging_level": logging.ERROR}
    handlers = _signal_handlers()
    try:
        if cluster == "local":
            ray.init(include_dashboard=False, **options)
        else:
            ray.init(address=cluster, **options)
    except Exception as exc:  # noqa: BLE001  Ray raises ConnectionError, ValueError, RuntimeError...
        first = clean(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, 300)
        raise EnvironmentFailure(f"cannot reach the Ray cluster {clean(cluster)!r} ({first}); start one with "
                                 "`ray start --head`, or use --cluster local") from None
    _restore_signal_handlers(handlers)
    try:
        yield ray
    finally:
        ray.shutdown()


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _signal_handlers() -> dict:
    return {signum: signal.getsignal(signum) for signum in _STOP_SIGNALS}


def _restore_signal_handlers(handlers: dict) -> None:
    """`ray.init` replaces the driver's SIGTERM handler with its own, which
    prints a C++ stack dump and ends the process: the caller's handlers (the
    CLI's: one line, what the batch recorded, exit 143) are put back."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread sets handlers (and ray.init set none from another)
    for signum, handler in handlers.items():
        if handler is not None:  # None: set outside Python. Set again even when Python still names it: the
            signal.signal(signum, handler)  # C++ core worker installs its own below Python's view


def check_cluster(cluster: str) -> tuple[str, int] | None:
    """The head's host and port of an address; None for local and auto."""
    if cluster in ("local", "auto"):
        return None
    host, _, port = cluster.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in host):
        raise UsageError(f"--cluster must be local, auto or a head's HOST:PORT (or ray://HOST:PORT), got "
                         f"{clean(cluster)!r}")
    return host.strip("[]"), int(port)


def _probe(address: str, timeout: float = 10.0) -> None:
    """Refuse an address nothing listens on now: Ray itself keeps retrying
    an unreachable head for many minutes."""
    host, port = check_cluster(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise EnvironmentFailure(f"no Ray cluster answers at {clean(address)} ({clean(str(exc), 200)}); start one "
                                 "with `ray start --head`, or use --cluster local") from None


def check_device(device: str) -> None:
    """A --device a cluster can give: checked against the cluster when it is
    joined (`task_resources`), not against the driver's own hardware."""
    if device.startswith("cuda:"):
        raise UsageError(f"--device {device} names one GPU of this machine; on a cluster every task gets its own "
                         "GPU: use --device auto or cuda")
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; on a cluster use auto, cpu or cuda")


def task_resources(cluster_gpus: float, device: str) -> tuple[dict, str]:
    """What each task asks Ray for, and the device it scores on: one GPU
    when the cluster has GPUs (Ray then shows the task only its own), else
    one CPU, scored with one thread so tasks do not fight over cores."""
    check_device(device)
    if device == "cpu" or (device == "auto" and not cluster_gpus):
        return {"num_cpus": 1, "num_gpus": 0}, "cpu"
    if not cluster_gpus:
        raise UsageError(f"--device {device} asked for, but the Ray cluster has no GPUs; use --device auto or cpu")
    return {"num_cpus": 1, "num_gpus": 1}, "cuda"


def task_options(resources: dict) -> dict:
    """`ray.remote`'s options for a scoring task. A GPU task's worker process
    ends with it (max_calls=1): Ray reuses a worker otherwise, and a reused
    one keeps its CUDA context on the GPU of its first task while Ray shows
    it the next task's, so it would train on a GPU it does not hold. Ray
    sets that itself only for `num_gpus` given to `ray.remote`, not to
    `.options()`, so it is said here."""
    return {"max_retries": 0, "max_calls": 1 if resources["num_gpus"] else 0, **resources}


@functools.lru_cache(maxsize=1)
def installed_code() -> str:
    """What a node scores with: ddchallenge's source (every .py of the
    package: a version number no edit changes says nothing) and torch."""
    import torch

    source = source_digest(Path(__file__).resolve().parent, (".",))
    return f"ddchallenge {__version__} (source sha256 {source[:16]}), torch {torch.__version__}"


def score_on_node(todo: Pending, settings: BatchSettings, ref_dir: str | None, device: str, driver_code: str) -> Attempt:
    """A task's body: check that this node sees what the driver saw (its
    code, the upload's bytes, the --ref test sets), then score exactly as
    the plain batch does."""
    import torch

    node = socket.gethostname()
    if driver_code != installed_code():
        return Attempt(reason=f"node {node} runs {installed_code()}, the driver {driver_code}; install the same "
                       "ddchallenge and torch on every node", environment=True)
    if ref_dir is not None and settings.reference is not None:
        try:
            same_tests = reference_digest(ref_dir) == settings.reference
        except OSError as exc:
            return Attempt(reason=f"node {node} cannot read --ref {clean(ref_dir)}: {clean(str(exc), 200)}",
                           environment=True)
        if not same_tests:  # a record names the test sets it was scored on: the driver's
            return Attempt(reason=f"node {node} sees other test sets in --ref {clean(ref_dir)} than the driver (is "
                           "the shared storage in sync?)", environment=True)
    if device == "cpu":
        torch.set_num_threads(1)  # the CPU the task asked for; a plain batch with one thread gives the same bits
    try:
        same = digest(todo.path, settings.rules) == todo.upload_sha
    except Exception as exc:  # noqa: BLE001  the driver could hash it: this node sees something else
        return Attempt(reason=f"node {node} cannot read {clean(str(todo.path))}: {clean(str(exc), 200)}",
                       environment=True)
    if not same:
        return Attempt(reason=f"node {node} sees other bytes at {clean(str(todo.path))} than the driver (is the "
                       "shared storage in sync?)", environment=True)
    return attempt(todo.path, settings, ref_dir, device, progress=False, upload_sha=todo.upload_sha)


def score_batch_on_cluster(uploads: list[str | os.PathLike], output_dir: str | os.PathLike, cluster: str,
                           settings: BatchSettings = BatchSettings(), ref_dir: str | os.PathLike | None = None,
                           device: str = "auto", progress: bool = True) -> BatchSummary:
    """Score `uploads` as Ray tasks on `cluster` (see `connected`), recording
    each in `output_dir` as it finishes; a rerun skips what is recorded."""
    start = time.monotonic()
    _import_ray()  # the organiser's mistakes are refused before anything starts
    check_cluster(cluster)
    check_device(device)  # against the cluster once joined, not this machine's hardware
    paths, names = check_batch(uploads, output_dir, None, settings)  # the plain batch's refusals, before Ray starts
    out = Path(output_dir)
    with ResultsLock(out):  # one batch at a time writes `out`
        # Workers may start in another folder: they get absolute paths (links are not followed here either).
        paths = [Path(os.path.abspath(p)) for p in paths]
        ref = os.path.abspath(ref_dir) if ref_dir is not None else None
        outcomes: dict[int, BatchOutcome] = {}
        todo: dict[int, Pending] = {}
        tests: dict[str, str] = {}  # test-set digests, read once for the batch
        for i, found in enumerate(triage_all(paths, names, out, settings, ref, tests)):
            if isinstance(found, Pending):
                todo[i] = found
            else:
                outcomes[i] = found
        busy, retried, on_gpu = 0.0, 0, False
        if todo:
            with connected(cluster) as ray:
                busy, retried, on_gpu = _run(ray, todo, outcomes, names, out, settings, ref, device, progress,
                                             len(paths), tests)
    return BatchSummary([outcomes[i] for i in range(len(paths))], time.monotonic() - start, busy, on_gpu, retried)


def _run(ray, todo: dict[int, Pending], outcomes: dict[int, BatchOutcome], names: list[str], out: Path,
         settings: BatchSettings, ref: str | None, device: str, progress: bool, total: int,
         tests: dict[str, str]) -> tuple[float, int, bool]:
    """Submit every pending upload, retry what the cluster lost, record the
    rest as it finishes (filling `outcomes`); the seconds spent, the retries,
    and whether tasks held GPUs."""
    resources, task_device = task_resources(ray.cluster_resources().get("GPU", 0), device)
    remote = ray.remote(**task_options(resources))(score_on_node)
    log.info("scoring %d upload(s) on the cluster, each on one %s", len(todo), "GPU" if task_device == "cuda" else
             "CPU (one thread)")
    tries = {i: 0 for i in todo}
    in_flight = {}
    busy, retried = 0.0, 0
    code = installed_code()

    def submit(i: int) -> None:
        tries[i] += 1
        in_flight[_on_cluster(remote.remote, todo[i], settings, ref, task_device, code)] = i

    for i in todo:
        submit(i)
    bar = progress_bar(total=total, initial=len(outcomes), desc="uploads", unit="upload", show=progress)
    try:
        while in_flight:
            (ready,), _ = _on_cluster(ray.wait, list(in_flight), num_returns=1)
            i = in_flight.pop(ready)
            tried = driver_checked(_result(ray, ready), settings, ref, tests)
            busy += tried.seconds
            if tried.environment and tries[i] < MAX_ATTEMPTS:
                log.warning("%s: attempt %d of %d lost (%s); trying again", clean(names[i]), tries[i], MAX_ATTEMPTS,
                            tried.reason)
                retried += 1
                submit(i)
                continue
            outcomes[i] = settle(todo[i], out, settings, tried, alone=total == 1)
            bar.update()
    finally:
        bar.close()
        for left in in_flight:  # interrupted: leave nothing running for a driver that is gone
            with contextlib.suppress(Exception):  # a lost cluster: the first failure must not hide the rest
                ray.cancel(left, force=True)
    return busy, retried, task_device == "cuda"


def driver_checked(tried: Attempt, settings: BatchSettings, ref_dir: str | None, tests: dict[str, str]) -> Attempt:
    """A node's result, unless a dataset of it was scored on another test
    set than the one the driver reads (`test_sha256`): then the node's
    fault, retried elsewhere, never recorded, since a rerun would not trust
    it (each node reads its own data root where there is no --ref). A
    dataset whose test set the driver cannot read is left as the node
    scored it; a rerun scores it again and says why."""
    for d in tried.result.datasets if tried.result is not None else []:
        try:
            mine = current_test_set_digest(d.dataset, ref_dir, settings.extras.data_root, tests)
        except (DDChallengeError, OSError, ValueError):
            continue
        if d.test_sha256 != mine:
            return Attempt(reason=f"a node scored {d.dataset} on another test set ({str(d.test_sha256)[:12]}) than "
                           f"the driver reads ({mine[:12]}): give the driver and every node the same --ref folder or "
                           "data root", environment=True, seconds=tried.seconds)
    return tried


def _on_cluster(call, *args, **kwargs):
    """`call` to Ray from the driver; what Ray raises there (a lost `ray://`
    connection, RaySystemError, ...) is the cluster's failure, in one line."""
    try:
        return call(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001  ConnectionError, RuntimeError, RaySystemError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise EnvironmentFailure(f"lost the Ray cluster ({clean(f'{type(exc).__name__}: {first}', 200)}); what "
                                 "finished is recorded: run the same command again to go on") from None


def _result(ray, ready) -> Attempt:
    """A task's attempt; anything Ray raises instead is the cluster's fault."""
    try:
        return ray.get(ready)
    except Exception as exc:  # noqa: BLE001  WorkerCrashedError, NodeDiedError, RayTaskError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return Attempt(reason=clean(f"{type(exc).__name__}: {first}", 300), environment=True)
