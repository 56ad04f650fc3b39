"""Running untrusted work in a child process: no network (a new network
namespace through `unshare`), resource limits (address space, file size,
CPU time, processes), a clean environment, a private working folder holding a
read-only copy of the submission, and a wall-clock timeout that kills the
whole process group. Results come back as safetensors files plus JSON,
formats that cannot carry code, and the parent validates them again.

Run as root (an organiser's scoring machine or container), the child also
drops to the unprivileged user `nobody`: it cannot read or write the
organiser's files, and the process limit means something (root ignores it).

Two kinds of work: reading a submission file (`load_isolated`) and, for
Track 2, running a submitted generator folder under the time budget
(`generate_isolated`). Submitted generators are diffusers-style folders read
through safetensors and JSON only; submitted Python code is not accepted, so
a generator can be slow or huge but cannot run code of its own.

`score` does both this way unless told `--no-sandbox`.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ddchallenge.errors import DDChallengeError, SubmissionError
from ddchallenge.protocol import get_dataset

ERROR_EXIT = 3  # the worker's "I refused this submission" exit code


class SandboxUnavailable(DDChallengeError):
    """This machine cannot isolate untrusted work."""


@dataclass(frozen=True)
class SandboxLimits:
    memory_bytes: int | None = 16 << 30  # address space of the child (torch alone maps ~2 GiB); None: unlimited,
    #                                      which CUDA needs (it maps far more address space than it uses)
    file_bytes: int = 8 << 30  # largest file the child may write
    cpu_seconds: int = 900  # CPU time of the child
    processes: int = 512  # processes and threads of the sandbox user (enforced when the child runs as `nobody`)
    wall_seconds: float = 900.0  # then the whole process group is killed


@dataclass(frozen=True)
class Isolation:
    prefix: tuple[str, ...]  # command prefix that starts the child in its own network namespace
    uid: int | None  # the unprivileged user the child runs as, when this process is root


NOBODY = 65534


@functools.lru_cache(maxsize=1)
def isolation() -> Isolation | None:
    """How this machine can isolate a child, or None. Probed once per
    process: a batch of submissions needs it for every one."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    candidates = [([unshare, "--net"], None), ([unshare, "--net", "--map-root-user"], None)]
    if os.geteuid() == 0:
        candidates.insert(0, ([unshare, "--net", "--setuid", str(NOBODY), "--setgid", str(NOBODY)], NOBODY))
    for prefix, uid in candidates:
        try:
            # The probe imports this package, so `nobody` must be able to read the installation.
            probe = [*prefix, sys.executable, "-c", "import ddchallenge"]
            if subprocess.run(probe, capture_output=True, timeout=30, cwd="/").returncode == 0:
                return Isolation(tuple(prefix), uid)
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


def describe() -> str:
    """What the isolation is, in words, for score results."""
    iso = isolation()
    if iso is None:
        return "none"
    parts = ["no network (unshare)"]
    if iso.uid is not None:
        parts.append("user nobody")
    if _pids_root() is not None:
        parts.append("process limit (pids cgroup)")
    elif iso.uid is not None:
        parts.append("process limit (rlimit)")
    return ", ".join(parts + ["rlimits", "read-only copy"])


@contextlib.contextmanager
def workdir():
    """A private temporary folder the sandboxed child may use (handed to the
    sandbox user when there is one); removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="ddchallenge-sandbox-") as tmp:
        yield Path(tmp)


def _hand_over(folder: Path, uid: int) -> None:
    """Give the sandbox user the writable folders; read-only copies stay the
    parent's (readable, not writable, by the child)."""
    for p in [folder, *folder.rglob("*")]:
        if p.is_dir() and not p.is_symlink() and p.stat().st_mode & 0o200:
            os.chown(p, uid, uid)


def _limit(limits: SandboxLimits, uid: int | None, group: Path | None):
    def apply() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))
        if limits.memory_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if uid is not None:  # counted per user: only meaningful for a user of its own
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
    return apply


def run_isolated(argv: list[str], workdir: Path, limits: SandboxLimits = SandboxLimits()) -> subprocess.CompletedProcess:
    """Run argv with no network, the limits, a clean environment and workdir
    (from `workdir()`) as its home and working folder; at the wall limit kill
    its process group, and with a pids cgroup every process it started.

    Output goes to files, not pipes, and the parent waits for the child, not
    for end-of-file: a grandchild that keeps the pipe open cannot hang it."""
    iso = isolation()
    if iso is None:
        raise SandboxUnavailable(
            "cannot isolate untrusted work here: `unshare --net` is missing or not permitted, so the submission "
            "would have network access; pass --no-sandbox only for files you trust"
        )
    if iso.uid is not None:
        _hand_over(workdir, iso.uid)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1"}
    with _pids_cgroup(limits.processes) as group, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([*iso.prefix, *argv], cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err, start_new_session=True, preexec_fn=_limit(limits, iso.uid, group))
        try:
            proc.wait(timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise SubmissionError(f"the sandboxed work ran past its {limits.wall_seconds:g} s limit and was killed") from None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # what it left running in its group
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, proc.returncode, out.read().decode(errors="replace"),
                                           err.read().decode(errors="replace"))


PIDS_HIERARCHIES = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"))  # cgroup v1, v2


@functools.lru_cache(maxsize=1)
def _pids_root() -> Path | None:
    """A cgroup hierarchy with the pids controller that this process may
    create groups in, or None."""
    for root in PIDS_HIERARCHIES:
        probe = root / f"ddchallenge-probe-{os.getpid()}"
        try:
            probe.mkdir()
        except OSError:
            continue
        usable = (probe / "pids.max").exists()
        probe.rmdir()
        if usable:
            return root
    return None


@contextlib.contextmanager
def _pids_cgroup(limit: int):
    """A pids cgroup for one child: caps its processes and threads, and on
    exit every process still in it is killed, including ones that left the
    process group (setsid). Yields None where no such cgroup can be made."""
    root = _pids_root()
    if root is None:
        yield None
        return
    group = Path(tempfile.mkdtemp(prefix="ddchallenge-", dir=root))
    (group / "pids.max").write_text(str(limit))
    try:
        yield group
    finally:
        for _ in range(100):
            pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        with contextlib.suppress(OSError):
            group.rmdir()


def _read_only_copy(path: Path, inbox: Path, skip: tuple[str, ...] = ()) -> Path:
    """Copy a submission into the sandbox folder, read-only. The copy keeps
    names (they name the datasets) and a manifest beside a res/ folder or zip."""
    inbox.mkdir()
    if path.is_dir():
        shutil.copytree(path, inbox / path.name, symlinks=True, ignore=shutil.ignore_patterns(*skip))
    else:
        shutil.copy2(path, inbox / path.name)
        if (path.parent / "manifest.json").is_file():
            shutil.copy2(path.parent / "manifest.json", inbox / "manifest.json")
    for p in inbox.rglob("*"):
        if not p.is_symlink():
            p.chmod(0o555 if p.is_dir() else 0o444)
    inbox.chmod(0o555)
    return inbox / path.name


def _collect(done: subprocess.CompletedProcess, outbox: Path, user_paths) -> list:
    """The entries a worker returned, validated again here."""
    from ddchallenge.submission import DatasetEntry, check_images, check_labels

    if done.returncode == ERROR_EXIT:
        raise SubmissionError(user_paths((outbox / "error.txt").read_text().strip()))
    if done.returncode != 0:
        why = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit code {done.returncode}"
        last = done.stderr.strip().splitlines()[-1:] or [""]
        raise SubmissionError(f"the sandboxed work failed ({why}; memory, CPU or process limit?) {last[0][:200]}")
    entries = []
    for meta in json.loads((outbox / "entries.json").read_text()):
        tensors = load_file(outbox / meta.pop("tensors"))
        spec = get_dataset(meta.pop("dataset"))
        meta["source"] = user_paths(meta["source"])
        images = check_images(tensors["images"], spec, meta["source"])
        labels, ipc = check_labels(tensors["labels"], images.shape[0], spec, meta["source"])
        if tensors["images"].dtype != torch.float32 or ipc != meta["ipc"]:
            raise SubmissionError(f"the sandbox returned inconsistent data for {meta['source']}; refused")
        entries.append(DatasetEntry(spec=spec, images=images, labels=labels, warnings=tuple(meta.pop("warnings")),
                                    **meta))
    return entries


def load_isolated(path: str | os.PathLike, dataset: str | None = None, limits: SandboxLimits = SandboxLimits()):
    """`load_submission` in the sandbox; the entries come back through
    safetensors and are validated again here."""
    path = Path(path)
    if not path.exists():
        raise SubmissionError(f"submission not found: {path}")
    with workdir() as work:
        inbox = work / "in"
        copy = _read_only_copy(path, inbox)
        outbox = work / "out"
        outbox.mkdir()
        argv = [sys.executable, "-m", "ddchallenge.sandbox", "load", str(copy), dataset or "", str(outbox)]
        done = run_isolated(argv, work, limits)
        return _collect(done, outbox, lambda text: text.replace(str(copy), str(path)).replace(str(inbox), str(path.parent)))


def generate_isolated(model: str | os.PathLike, dataset: str, ipc: int | str, budget: float, seed: int = 0,
                      device: str = "auto", limits: SandboxLimits = SandboxLimits(), grace: float = 30.0):
    """Track 2: run a submitted generator folder in the sandbox and return
    its images as entries. The budget starts now, so the child's start-up
    counts against it; generation stops at the deadline (nothing kept), and
    the process group is killed `grace` seconds after it whatever it does."""
    model = Path(model)
    deadline = time.monotonic() + budget  # CLOCK_MONOTONIC: the same clock in the child
    _check_generator_folder(model)
    cuda = device != "cpu" and torch.cuda.is_available()
    limits = replace(limits, wall_seconds=budget + grace, cpu_seconds=max(limits.cpu_seconds, int(budget + grace) * 64),
                     memory_bytes=None if cuda else limits.memory_bytes)
    with workdir() as work:
        copy = _read_only_copy(model, work / "in", skip=("training_state", "*.bin", "*.pt", "*.ckpt", "*.pkl"))
        outbox = work / "out"
        outbox.mkdir()
        argv = [sys.executable, "-m", "ddchallenge.sandbox", "generate", str(copy), dataset, str(ipc), repr(deadline),
                str(seed), device, str(outbox)]
        try:
            done = run_isolated(argv, work, limits)
        except SubmissionError as exc:
            raise SubmissionError(f"the generator {model} did not finish within its {budget:g} s budget and was "
                                  f"killed ({exc})") from None
        return _collect(done, outbox, lambda text: text.replace(str(copy), str(model)))


MAX_GENERATOR_BYTES = 8 << 30  # a Stable Diffusion VAE is 0.3 GiB, the largest preset UNet 0.1 GiB


def _check_generator_folder(model: Path) -> None:
    """Refuse what the copy into the sandbox must not follow or hold."""
    total = 0
    for p in [model, *model.rglob("*")]:
        if p.is_symlink():
            raise SubmissionError(f"the generator folder holds a symbolic link ({p}); copy the real files in")
        if p.is_file():
            total += p.stat().st_size
    if total > MAX_GENERATOR_BYTES:
        raise SubmissionError(f"the generator folder {model} holds {total / 2**30:.1f} GiB; the limit is "
                              f"{MAX_GENERATOR_BYTES / 2**30:.0f} GiB")


def _write_entries(entries, out: Path) -> None:
    metas = []
    for i, e in enumerate(entries):
        save_file({"images": e.images.contiguous(), "labels": e.labels.contiguous()}, out / f"{i}.safetensors")
        meta = {f.name: getattr(e, f.name) for f in fields(e) if f.name not in ("spec", "images", "labels")}
        meta.update(dataset=e.spec.name, tensors=f"{i}.safetensors", warnings=list(e.warnings))
        metas.append(meta)
    (out / "entries.json").write_text(json.dumps(metas))


def _worker(task: str, *args: str) -> int:
    from ddchallenge.submission import load_submission

    out = Path(args[-1])
    try:
        if task == "load":
            path, dataset = args[:2]
            entries = load_submission(path, dataset or None)
        else:
            from ddchallenge.generators.track2 import run_track2

            model, dataset, ipc, deadline, seed, device = args[:6]
            entries = run_track2(model, dataset, ipc if ipc == "auto" else int(ipc), int(seed),
                                    max(1e-3, float(deadline) - time.monotonic()), device, out)
    except DDChallengeError as exc:
        (out / "error.txt").write_text(str(exc))
        return ERROR_EXIT
    _write_entries(entries, out)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(*sys.argv[1:]))
