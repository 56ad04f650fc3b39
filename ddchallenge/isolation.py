"""Run one function of this package in an isolated child process.

The child has no network (a new network namespace through `unshare`; the
Codabench program alone may do without one: `share_network`), a
clean environment, resource limits, its own cgroups where the machine allows
them (a process cap that also finds escaped processes, and a memory cap that
holds with CUDA), the user `nobody` when the parent is root and `nobody` can
run this Python, and a private folder holding a read-only copy of its input.
A wall-clock limit kills its whole process group.

Whose fault a failure is: what the work inside the child can provoke is its
input's (running out of host memory within its limit, out of GPU memory
within its share, a device-side assert); only what it cannot cause is the
machine's (no sandbox, CUDA failing to start before the work runs, a full
disk, a lost GPU). A CUDA child gets a GPU memory share before any of the
work runs; where no memory cgroup can be made, its host memory is held by a
watchdog in the parent (RLIMIT_AS cannot be used: CUDA maps far more
address space than it uses).

What goes in: a frozen dataclass (as JSON) and staged input paths. What
comes back: the function's JSON value and the files it wrote to its outbox,
both untrusted: read with bounds by the caller. This module knows nothing of
datasets or submissions; `upload.py` uses it to read uploads.

Staging checks every entry with lstat before a byte is read: only regular
files and folders are copied, never a link, FIFO, socket or device; the
total apparent size (what a copy costs) and the file count are bounded;
sparse files are refused; each file is opened without following links and
checked again on the open descriptor, so a file swapped after the check is
not copied either.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fnmatch
import functools
import hashlib
import importlib
import json
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ddchallenge.errors import BudgetExceeded, DDChallengeError, EnvironmentFailure, OptionMismatch, RuleMismatch

NOBODY = 65534
REFUSED_EXIT, ENVIRONMENT_EXIT, CRASHED_EXIT, OVER_BUDGET_EXIT = 3, 4, 5, 6
OPTION_MISMATCH_EXIT = 7  # the work found the command line contradicting the input (errors.OptionMismatch)
RULE_MISMATCH_EXIT = 8  # the work found the input well formed but not what the rules ask (errors.RuleMismatch)
MAX_MESSAGE = 500  # characters of a child's message kept; it is untrusted text
MAX_VALUE_BYTES = 1 << 20  # the function's JSON value
MAX_DEPTH = 32  # folder nesting staged into the child


class Refused(DDChallengeError):
    """The input, or the isolated work on it, failed: the input's fault."""


class OverLimit(Refused):
    """The input holds more bytes than its limits allow (`inspect`)."""


class TimedOut(Refused):
    """The isolated work ran past its wall limit and was killed."""


class OverBudget(Refused):
    """The isolated work stopped itself because its time budget ran out (it
    raised BudgetExceeded)."""


class Changed(Refused):
    """The input's bytes, as staged, are not those its caller hashed before
    (`Input.sha256`): it changed in between, and what would be scored is not
    what would be recorded."""


class MemoryExceeded(Refused):
    """The isolated work used more host memory than its limit and was killed."""


class SandboxUnavailable(EnvironmentFailure):
    """This machine cannot isolate untrusted work."""


MEMORY_ENV = "DDCHALLENGE_MEMORY_LIMIT"  # the child's host memory limit in bytes, in its environment


@dataclass(frozen=True)
class Limits:
    memory_bytes: int = 16 << 30  # host memory of the child: a memory cgroup where one can be made, else
    # address space (RLIMIT_AS), or for a CUDA child a watchdog on its resident memory
    gpu_memory_bytes: int = 16 << 30  # GPU memory share of a CUDA child (PyTorch's allocator), per visible GPU
    file_bytes: int = 8 << 30  # largest file the child may write
    cpu_seconds: int = 900  # CPU time of the child
    processes: int = 512  # processes and threads (pids cgroup; RLIMIT_NPROC as `nobody`)
    wall_seconds: float = 900.0  # then the whole process group is killed
    input_bytes: int = 8 << 30  # total apparent size of the staged input
    input_files: int = 10_000  # files and folders in the staged input


@dataclass(frozen=True)
class Isolation:
    prefix: tuple[str, ...]  # command prefix that starts the child isolated (its own network namespace, unless
    # own_network is False; as `uid` where set; with the parent-death keeper where it works)
    uid: int | None  # the unprivileged user the child runs as, when this process is root
    own_network: bool = True  # False: the child shares this process's network (`share_network`)


_network_may_be_shared = False


def share_network() -> None:
    """Where no network namespace can be made, run the child in this
    process's network, as `nobody` where this process is root and may switch
    user, with the other limits this machine allows, and say so in
    `describe`. For the Codabench program only (evaluate.py --container-network):
    Codabench starts scoring programs in a Docker container without
    CAP_SYS_ADMIN, under the default seccomp profile, where `unshare --net`
    is refused; that container is the boundary the platform gives, and a
    Track 1 upload is tensors read with weights_only. Elsewhere a machine
    that cannot make the namespace still refuses to score."""
    global _network_may_be_shared
    _network_may_be_shared = True
    isolation.cache_clear()


@functools.lru_cache(maxsize=1)
def isolation() -> Isolation | None:
    """How this machine can isolate a child, or None. Probed once per
    process: a batch needs it for every upload."""
    unshare = shutil.which("unshare")
    candidates = []
    if unshare is not None:
        if os.geteuid() == 0:
            candidates.append(([unshare, "--net", "--setuid", str(NOBODY), "--setgid", str(NOBODY)], NOBODY, True))
        candidates += [([unshare, "--net"], None, True), ([unshare, "--net", "--map-root-user"], None, True)]
    if _network_may_be_shared:  # the last resort, only where allowed: as nobody where the user can be switched
        setpriv = shutil.which("setpriv")  # (a plain `docker run` keeps that right while refusing the namespace)
        if setpriv is not None and os.geteuid() == 0:
            candidates.append(([setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"], NOBODY,
                               False))
        candidates.append(([], None, False))
    keeper = _death_with_parent()
    for prefix, uid, own_network in candidates:
        for tail in ([keeper] if keeper else []) + [[]]:  # with the keeper where it works, else without
            try:
                # The probe imports this package, so `nobody` must be able to read the installation.
                probe = [*prefix, *tail, sys.executable, "-c", "import ddchallenge"]
                if subprocess.run(probe, capture_output=True, timeout=30, cwd="/").returncode == 0:
                    return Isolation(tuple(prefix + tail), uid, own_network)
            except (OSError, subprocess.TimeoutExpired):
                continue
    return None


def _death_with_parent() -> list[str]:
    """`setpriv --pdeathsig KILL --`, placed after `unshare`: the kernel kills
    the child when the thread that started it ends, also when the parent is
    killed by SIGKILL or the OOM killer, where no handler of the parent runs.
    It must come after `unshare --setuid` (a change of user clears the
    setting, so a prctl before the exec would not hold). [] where setpriv is
    missing or too old (util-linux < 2.33): the child then outlives a
    SIGKILLed parent until its wall limit."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return []
    try:
        usage = subprocess.run([setpriv, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [setpriv, "--pdeathsig", "KILL", "--"] if "--pdeathsig" in usage else []


# cgroup controllers: (v1 hierarchy, v2 hierarchy) and the file that sets the limit in each.
CGROUP_ROOTS = {
    "pids": ((Path("/sys/fs/cgroup/pids"), "pids.max"), (Path("/sys/fs/cgroup"), "pids.max")),
    "memory": ((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"), (Path("/sys/fs/cgroup"), "memory.max")),
}


@functools.lru_cache(maxsize=None)
def _cgroup_root(controller: str) -> tuple[Path, str] | None:
    """A hierarchy with this controller that this process may create groups
    in, and the name of its limit file; None where there is none."""
    for root, limit_file in CGROUP_ROOTS[controller]:
        probe = root / f"ddchallenge-probe-{os.getpid()}"
        try:
            probe.mkdir()
        except OSError:
            continue
        usable = (probe / limit_file).exists()
        probe.rmdir()
        if usable:
            return root, limit_file
    return None


def size(n: int) -> str:
    """Bytes in words: GiB from 1 GiB up, else MiB."""
    return f"{n / 2**30:g} GiB" if n >= 1 << 30 else f"{n / 2**20:g} MiB"


def describe(limits: Limits = Limits(), cuda: bool = False) -> str:
    """What `run` enforces on this machine, in words, for records."""
    iso = isolation()
    if iso is None:
        return "none"
    parts = ["no network (unshare)" if iso.own_network else "network shared with the scoring container (no namespace "
             "could be made)"]
    if iso.uid is not None:
        parts.append("user nobody")
    elif not iso.own_network:
        parts.append("the scorer's own user (no user switch could be made)")
    memory = size(limits.memory_bytes)
    if _cgroup_root("memory"):
        parts.append(f"memory {memory} (cgroup)")
    elif cuda:  # CUDA maps far more address space than it uses: RLIMIT_AS cannot be used
        parts.append(f"memory {memory} (watchdog on resident memory)")
    else:
        parts.append(f"address space {memory} (rlimit)")
    if cuda:
        parts.append(f"GPU memory {size(limits.gpu_memory_bytes)} (allocator share)")
    if _cgroup_root("pids"):
        parts.append(f"{limits.processes} processes (pids cgroup)")
    elif iso.uid is not None:
        parts.append(f"{limits.processes} processes (rlimit)")
    parts.append(f"CPU {limits.cpu_seconds} s, files {limits.file_bytes / 2**30:g} GiB (rlimits)")
    return ", ".join(parts + [f"wall {limits.wall_seconds:g} s", "read-only copy"])


@contextlib.contextmanager
def _cgroups(limits: Limits):
    """One group per available controller for one child; on exit every
    process still in them is killed, including ones that left the process
    group (setsid). Yields {controller: group} for those made (possibly none)."""
    groups = {}
    try:
        for controller, value in (("pids", limits.processes), ("memory", limits.memory_bytes)):
            found = _cgroup_root(controller)
            if found is None:
                continue
            root, limit_file = found
            for orphan in _orphans(root, CGROUP_PREFIX):  # a SIGKILLed parent's: what still runs in it too
                _empty_and_remove(orphan)
            group = Path(tempfile.mkdtemp(prefix=_owned_prefix(CGROUP_PREFIX), dir=root))
            groups[controller] = group
            (group / limit_file).write_text(str(value))
            if controller == "memory":  # no escape into swap
                for swap in ("memory.memsw.limit_in_bytes", "memory.swap.max"):
                    with contextlib.suppress(OSError):
                        (group / swap).write_text(str(value) if swap.endswith("bytes") else "0")
        yield groups
    finally:
        for group in groups.values():
            _empty_and_remove(group)


def _empty_and_remove(group: Path) -> None:
    """Kill every process in a cgroup, then remove it."""
    for _ in range(100):
        with contextlib.suppress(OSError):
            pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        group.rmdir()


def _rlimits(limits: Limits, uid: int | None, groups: dict[str, Path], cuda: bool) -> list[tuple[int, int, str]]:
    """(resource, value, what `ulimit` calls it) of each limit the child is given."""
    wanted = [(resource.RLIMIT_FSIZE, limits.file_bytes, "file size (ulimit -f)"),
              (resource.RLIMIT_CPU, limits.cpu_seconds, "CPU time (ulimit -t)"),
              (resource.RLIMIT_CORE, 0, "core file size (ulimit -c)")]
    if "memory" not in groups and not cuda:  # CUDA maps far more address space than it uses
        wanted.append((resource.RLIMIT_AS, limits.memory_bytes, "address space (ulimit -v)"))
    if uid is not None:  # counted per user: only meaningful for a user of its own
        wanted.append((resource.RLIMIT_NPROC, limits.processes, "processes (ulimit -u)"))
    return wanted


def _check_inherited(wanted: list[tuple[int, int, str]]) -> None:
    """EnvironmentFailure where this process's hard limit is below one the
    child is given: the child could not be given it (and were it started
    under the lower one, its work would fail for the machine's limit, counted
    against the upload)."""
    for res, value, what in wanted:
        hard = resource.getrlimit(res)[1]
        if hard != resource.RLIM_INFINITY and hard < value:
            raise EnvironmentFailure(f"this machine's hard limit on {what} is {hard}, below the {value} the sandbox "
                                     "gives untrusted work; raise it, or score where it is unlimited")


def _limit(limits: Limits, uid: int | None, groups: dict[str, Path], cuda: bool):
    wanted = _rlimits(limits, uid, groups, cuda)
    _check_inherited(wanted)

    def apply() -> None:
        for group in groups.values():
            (group / "cgroup.procs").write_text(str(os.getpid()))
        for res, value, _ in wanted:
            resource.setrlimit(res, (value, value))
    return apply


# ---------------------------------------------------------------- staging

_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
SPARSE_SLACK = 1 << 20  # apparent bytes a file may have beyond its allocated blocks (tails, metadata)


@dataclass(frozen=True)
class Inventory:
    files: tuple[tuple[str, int], ...]  # (path relative to the top, size) of every regular file, sorted
    folders: tuple[str, ...]  # relative paths of the folders, sorted, "" for the top when it is one
    bytes: int  # total apparent size


def inspect(path: str | os.PathLike, limits: Limits = Limits(), skip: tuple[str, ...] = ()) -> Inventory:
    """Walk `path` with lstat only (nothing is opened or followed) and refuse
    what must not be copied or read. Names matching `skip` are left out."""
    top = Path(path)
    files, folders, total = [], [], 0

    def refuse_kind(p: Path, st: os.stat_result) -> None:
        for test, kind in _KINDS:
            if test(st.st_mode):
                raise Refused(f"{p} is {kind}; an upload holds only regular files and folders")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise Refused(f"{p} is not a regular file or folder; refused")

    def visit(p: Path, rel: str, depth: int) -> None:
        nonlocal total
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            raise Refused(f"{p} not found") from None
        except OSError as exc:
            raise Refused(f"{p} cannot be read ({exc.strerror})") from None
        refuse_kind(p, st)
        if len(files) + len(folders) >= limits.input_files:
            raise Refused(f"{top} holds more than {limits.input_files} files and folders; refused")
        if stat.S_ISDIR(st.st_mode):
            if depth > MAX_DEPTH:
                raise Refused(f"{top} nests folders more than {MAX_DEPTH} deep; refused")
            folders.append(rel)
            try:
                names = sorted(os.listdir(p))
            except OSError as exc:
                raise Refused(f"{p} cannot be listed ({exc.strerror})") from None
            for name in names:
                if not any(fnmatch.fnmatch(name, pattern) for pattern in skip):
                    visit(p / name, f"{rel}/{name}" if rel else name, depth + 1)
            return
        if st.st_size > st.st_blocks * 512 + SPARSE_SLACK:
            raise Refused(f"{p} is a sparse file ({st.st_size} bytes apparent, {st.st_blocks * 512} stored); "
                          "upload plain files")
        total += st.st_size
        if total > limits.input_bytes:
            raise OverLimit(f"{top} holds more than {limits.input_bytes} bytes, the limit for this upload; refused")
        files.append((rel, st.st_size))

    visit(top, "", 0)
    return Inventory(tuple(files), tuple(folders), total)


def _read_checked(src: Path, size: int, sink: Callable[[bytes], Any]) -> None:
    """Pass exactly the checked file's bytes to `sink`: opened without
    following links or blocking, checked again on the descriptor, never more
    than `size` bytes."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise Refused(f"{src} cannot be opened ({exc.strerror}); refused") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise Refused(f"{src} changed while it was being read; refused")
        left = size
        while left:
            chunk = fh.read(min(left, 1 << 20))
            if not chunk:
                raise Refused(f"{src} changed while it was being read; refused")
            sink(chunk)
            left -= len(chunk)


def digest(path: str | os.PathLike, inventory: Inventory, copy_to: Path | None = None) -> str:
    """sha256 of an input as `inspect` found it: a file's bytes, or over a
    folder's relative names, sizes and bytes in inventory order. Each file is
    read once, through `_read_checked`; with `copy_to`, the bytes hashed are
    the bytes copied there (staging), so what is hashed is what is run."""
    path, h = Path(path), hashlib.sha256()
    for rel, size in inventory.files:
        if inventory.folders:
            h.update(f"{rel}\0{size}\0".encode(errors="surrogateescape"))
        if copy_to is None:
            _read_checked(path / rel if rel else path, size, h.update)
            continue
        with open(copy_to / rel if rel else copy_to, "xb") as out:
            _read_checked(path / rel if rel else path, size, lambda chunk: (h.update(chunk), out.write(chunk)))
    return h.hexdigest()


@dataclass(frozen=True)
class Input:
    path: Path  # a file or folder to stage read-only
    skip: tuple[str, ...] = ()  # names (glob patterns) inside a folder that are left out
    sha256: str | None = None  # its `digest` when the caller hashed it first: the staged copy must have it


def stage(given: Input, inbox: Path, limits: Limits = Limits()) -> Path:
    """A read-only copy of `given.path` inside `inbox`, after `inspect`; the
    copy keeps the name (it can carry meaning, like a dataset's)."""
    path = Path(given.path)
    inventory = inspect(path, limits, given.skip)
    free = shutil.disk_usage(inbox).free
    if free < inventory.bytes + (64 << 20):
        raise EnvironmentFailure(f"{inbox} has {free} bytes free, too few to stage {inventory.bytes} bytes of input; "
                                 "free disk space or point TMPDIR elsewhere")
    name = Path(os.path.abspath(path)).name or "upload"  # `.` and `..` resolved; `/` has no name
    target = inbox / name
    for rel in inventory.folders:
        (target / rel).mkdir()
    staged = digest(path, inventory, copy_to=target)
    if given.sha256 is not None and staged != given.sha256:
        raise Changed(f"{path} changed after it was hashed (sha256 {given.sha256[:12]}... then, {staged[:12]}... "
                      "when staged for scoring); refused: score it again to score it as it is now")
    for rel, _ in inventory.files:
        (target / rel if rel else target).chmod(0o444)
    for rel in sorted(inventory.folders, reverse=True):
        (target / rel).chmod(0o555)
    return target


# ---------------------------------------------------------------- running

def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        cls = type(value)
        fields = {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", **fields}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "__dataclass__" in value:
        cls = _resolve(value.pop("__dataclass__"))
        return cls(**{k: _decode(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)  # frozen dataclasses hold tuples
    return value


def _resolve(name: str) -> Any:
    module, _, attr = name.partition(":")
    return functools.reduce(getattr, attr.split("."), importlib.import_module(module))


@dataclass(frozen=True)
class Outcome:
    value: Any  # the function's return value (JSON), untrusted
    outbox: Path  # files the function wrote; valid inside the `run` block only, untrusted
    staged: dict  # {staged path: the caller's path}, to name the caller's paths in messages

    def unstage(self, text: str) -> str:
        return _unstage(text, self.staged)

    def read(self, name: str, limit: int) -> bytes:
        """A file the function wrote, at most `limit` bytes, never through a link."""
        return _read_bounded(self.outbox / name, limit)


def clean(text: str, limit: int | None = MAX_MESSAGE) -> str:
    """Untrusted text made safe for one line of a terminal, log or record:
    control characters (newlines, ANSI escapes) escaped, length bounded."""
    text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return text if limit is None or len(text) <= limit else text[:limit] + "..."


def _required() -> Isolation:
    iso = isolation()
    if iso is None:
        raise SandboxUnavailable(
            "cannot isolate untrusted work here: `unshare --net` is missing or not permitted, so the upload would "
            "have network access; pass --no-sandbox only for files you trust"
        )
    return iso


WORKDIR_PREFIX = "ddchallenge-sandbox-"
CGROUP_PREFIX = "ddchallenge-"


@contextlib.contextmanager
def workdir():
    """A private temporary folder for one child, removed afterwards. It stays
    the parent's (the child cannot swap what the parent reads back); the
    child writes only its `home/` and the folders handed to it. Its name
    says which process made it, so that the folders of a parent killed
    before it could remove them (SIGKILL, the OOM killer: up to a whole
    upload each) are removed by the next one."""
    for orphan in _orphans(Path(tempfile.gettempdir()), WORKDIR_PREFIX):
        shutil.rmtree(orphan, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=_owned_prefix(WORKDIR_PREFIX)) as tmp:
        os.chmod(tmp, 0o711)
        yield Path(tmp)


@functools.lru_cache(maxsize=1)
def _pid_namespace() -> str:
    """This machine's boot and this process's PID namespace: a pid means a
    process only within them, so folders made by another container or host
    sharing the temporary folder are never taken for orphans."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12]
        return f"{boot}.{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return "unknown"


def _owned_prefix(prefix: str) -> str:
    """The start of the name of a folder (or cgroup) this process makes: who made it."""
    return f"{prefix}{_pid_namespace()}-{os.getpid()}-"


def _orphans(parent: Path, prefix: str) -> list[Path]:
    """The folders in `parent` named by `_owned_prefix(prefix)` of processes
    of this boot and PID namespace that are gone."""
    start = f"{prefix}{_pid_namespace()}-"
    found = []
    for path in parent.glob(f"{start}*-*"):
        pid = path.name[len(start):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # alive (or a process it is not ours to judge): kept
        except ProcessLookupError:
            found.append(path)
        except (PermissionError, OverflowError):
            pass
    return found


def hand_over(folder: Path) -> Path:
    """Make `folder` writable by the child (owned by the sandbox user, if any)."""
    folder.mkdir(exist_ok=True)
    iso = isolation()
    if iso is not None and iso.uid is not None:
        os.chown(folder, iso.uid, iso.uid)
    return folder


def spawn(argv: list[str], work: Path, limits: Limits = Limits(), cuda: bool = False) -> subprocess.CompletedProcess:
    """Run argv isolated, with `work/home` (in a folder from `workdir()`) as its
    home and working folder; at the wall limit kill its process group, and with a pids
    cgroup every process it started. A CUDA child without a memory cgroup is
    watched: past its host memory limit it is killed (`MemoryExceeded`).
    Output goes to files, not pipes, and the parent waits for the child, not
    for end-of-file: a grandchild holding a pipe cannot hang it. The last
    64 KiB of stdout and stderr come back."""
    iso = _required()
    home = hand_over(work / "home")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(home), "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1",
           MEMORY_ENV: str(limits.memory_bytes)}  # so that the work knows it is limited (keep_freed_memory)
    # The GPUs this process may use are the child's too: a scheduler (Ray, Slurm) or the organiser
    # narrows them with these, and "cuda" must then mean the same card in both.
    env.update({k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER") if k in os.environ})
    if cuda:
        _release_gpu_cache()
    with _cgroups(limits) as groups, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen([*iso.prefix, *argv], cwd=home, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=True,
                                    preexec_fn=_limit(limits, iso.uid, groups, cuda))
        except subprocess.SubprocessError as exc:  # the limits or cgroups could not be applied: the machine's
            raise EnvironmentFailure(f"the sandbox could not start its child ({exc}); check the machine's limits "
                                     "(ulimit -a) and cgroups") from None
        watch = cuda and "memory" not in groups
        watchdog = _Watchdog(proc.pid, limits.memory_bytes, groups.get("pids")) if watch else None
        try:
            with watchdog or contextlib.nullcontext():
                proc.wait(timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimedOut(f"the sandboxed work ran past its {limits.wall_seconds:g} s limit and was killed") from None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # what it left running in its group
            proc.kill()  # the child itself, should it have left its group
            proc.wait()  # reaped, also when the parent is interrupted (Ctrl-C, SIGTERM) while it waits
        if watchdog is not None and watchdog.exceeded:
            raise MemoryExceeded(f"the sandboxed work used more than {size(limits.memory_bytes)} of host memory "
                                 "and was killed")
        tails = []
        for fh in (out, err):
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - (64 << 10)))
            tails.append(fh.read().decode(errors="replace"))
    return subprocess.CompletedProcess(argv, proc.returncode, *tails)


def _release_gpu_cache() -> None:
    """Hand the GPU memory this process's allocator keeps cached (a previous
    upload's training) back to the card before a CUDA child starts: the
    child's share must be there for it to take."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- the host memory watchdog

WATCH_SECONDS = 0.1  # between two readings of the child's resident memory
SCAN_SHARE = 0.05  # at most this share of one core spent finding the child's processes in /proc


def _proc_stat(pid: int) -> tuple[int, int, int, int] | None:
    """(parent, process group, session, start time) of a process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    try:
        fields = data[data.rindex(b")") + 2:].split()  # the name, in parentheses, may hold anything
        return int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19])
    except (ValueError, IndexError):
        return None


def _resident(pid: int) -> int:
    """Bytes of anonymous and shared memory a process holds in RAM: what it
    allocated, not the libraries it maps (file pages the kernel can drop)."""
    total = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith((b"RssAnon:", b"RssShmem:")):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return total


class _Watchdog:
    """Polls the resident memory of a child and of every process it started
    (found by parent link, process group, session and, where there is one,
    its pids cgroup) and kills them all once together they hold more than
    `limit` bytes. A memory cgroup does this in the kernel; this is for CUDA
    children where none can be made. Between two readings (0.1 s) a child
    can overshoot by what it allocates in that time."""

    def __init__(self, root: int, limit: int, group: Path | None):
        self.root, self.limit, self.group = root, limit, group
        self.exceeded = False
        self.members: dict[int, int] = {}  # pid -> start time (a pid is reused only with another start time)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ddchallenge-memory-watchdog", daemon=True)

    def __enter__(self) -> "_Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _scan(self) -> None:
        """Add the child's processes started since the last scan."""
        table = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (st := _proc_stat(int(entry))) is not None:
                table[int(entry)] = st
        self.members = {pid: start for pid, start in self.members.items() if table.get(pid, (0, 0, 0, -1))[3] == start}
        found = {self.root} | {pid for pid, st in table.items() if self.root in (st[1], st[2])}
        if self.group is not None:
            with contextlib.suppress(OSError, ValueError):
                found |= {int(p) for p in (self.group / "cgroup.procs").read_text().split()}
        children: dict[int, list[int]] = {}
        for pid, st in table.items():
            children.setdefault(st[0], []).append(pid)
        todo = [pid for pid in found | set(self.members) if pid in table]
        while todo:
            pid = todo.pop()
            if pid not in self.members:
                self.members[pid] = table[pid][3]
            todo.extend(c for c in children.get(pid, ()) if c not in self.members)

    def _watch(self) -> None:
        next_scan = 0.0
        while True:
            now = time.monotonic()
            if now >= next_scan:
                self._scan()
                took = time.monotonic() - now
                next_scan = now + max(WATCH_SECONDS, took / SCAN_SHARE)
            if sum(_resident(pid) for pid in self.members) > self.limit:
                self.exceeded = True
                self._kill()
                return
            if self._stop.wait(WATCH_SECONDS):
                return

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.root, signal.SIGKILL)
        for pid, start in self.members.items():
            st = _proc_stat(pid)
            if st is not None and st[3] == start:  # the same process, not a later one given its pid
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def run(function: Callable, request: Any, inputs: dict[str, Input] | None = None, limits: Limits = Limits(),
        cuda: bool = False):
    """Call `function(request, staged_inputs, outbox)` in an isolated child and
    yield its `Outcome`. `function` is a module-level function of this
    package, `request` a frozen dataclass of JSON values; `inputs` maps a
    name to an `Input`, staged read-only first (the function gets
    {name: staged path}).

    With `cuda`, the child takes its GPU memory share (`limits.gpu_memory_bytes`)
    before `function` runs.

    Raises `Refused` (the child refused its input, crashed on it, ran out of
    memory within its limits, or was killed at a limit), `EnvironmentFailure`
    (this machine failed, or cannot isolate)."""
    _required()  # before anything is staged
    with workdir() as work:
        (work / "in").mkdir()
        staged, originals = {}, {}
        for name, given in (inputs or {}).items():
            (work / "in" / name).mkdir()
            staged[name] = str(stage(given, work / "in" / name, limits))
            originals[staged[name]] = str(given.path)
            originals[str(work / "in" / name)] = str(Path(given.path).parent)
        for folder in (work / "in", *(work / "in").iterdir()):
            folder.chmod(0o555)
        outbox = hand_over(work / "out")
        call = {"function": f"{function.__module__}:{function.__qualname__}", "request": _encode(request),
                "inputs": staged, "outbox": str(outbox), "gpu_memory_bytes": limits.gpu_memory_bytes if cuda else None}
        (work / "call.json").write_text(json.dumps(call))
        done = spawn([sys.executable, "-m", "ddchallenge.isolation", str(work / "call.json")], work, limits, cuda)
        try:
            value = _outcome(done.returncode, outbox, done.stderr, limits)
        except DDChallengeError as exc:
            raise type(exc)(_unstage(str(exc), originals)) from None
        yield Outcome(value, outbox, originals)


def _unstage(text: str, originals: dict) -> str:
    for staged in sorted(originals, key=len, reverse=True):  # the longest first: folders hold their files
        text = text.replace(staged, originals[staged])
    return text


def _read_bounded(path: Path, limit: int) -> bytes:
    """The child wrote `path`: it may be a link, a FIFO or huge; read only a
    regular file, never through a link, and refuse more than `limit` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise Refused(f"the sandboxed work did not return {path.name} ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise Refused(f"the sandboxed work returned {path.name} as something other than a file; refused")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise Refused(f"the sandboxed work returned {path.name} larger than {limit} bytes; refused")
    return data


def _outcome(code: int, outbox: Path, stderr: str, limits: Limits) -> Any:
    if code in (REFUSED_EXIT, ENVIRONMENT_EXIT, CRASHED_EXIT, OVER_BUDGET_EXIT, OPTION_MISMATCH_EXIT, RULE_MISMATCH_EXIT):
        try:
            message = clean(_read_bounded(outbox / "_message.txt", 4 * MAX_MESSAGE).decode(errors="replace").strip())
        except Refused:
            message = "(no message)"
        if code == ENVIRONMENT_EXIT:
            raise EnvironmentFailure(f"the machine failed while isolated work ran: {message}")
        if code == OVER_BUDGET_EXIT:
            raise OverBudget(message)
        if code == OPTION_MISMATCH_EXIT:
            raise OptionMismatch(message)
        if code == RULE_MISMATCH_EXIT:
            raise RuleMismatch(message)
        raise Refused(message if code == REFUSED_EXIT else f"reading the upload failed: {message}")
    if code != 0:
        why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        if code == -signal.SIGKILL and _cgroup_root("memory"):
            why += f"; over its {limits.memory_bytes / 2**30:g} GiB memory limit?"
        last = clean((stderr.strip().splitlines() or [""])[-1])
        raise Refused(f"the sandboxed work failed ({why}; memory, CPU or process limit?) {last}".strip())
    try:
        return json.loads(_read_bounded(outbox / "_value.json", MAX_VALUE_BYTES))
    except (ValueError, RecursionError) as exc:
        raise Refused(f"the sandboxed work returned an unreadable value ({clean(str(exc))}); refused") from None


ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM, errno.EMFILE, errno.ENFILE}
# What a CUDA error says when the work asked for more GPU memory than it may have (the caching allocator's
# OutOfMemoryError, or a library's own allocation failing), or fed a kernel an index out of range.
_CUDA_OUT_OF_MEMORY = ("out of memory", "ALLOC_FAILED")
_CUDA_ASSERT = "device-side assert"
_CPU_OUT_OF_MEMORY = "can't allocate memory"  # PyTorch's CPU allocator raises a RuntimeError, not MemoryError


def _host_out_of_memory(exc: BaseException) -> bool:
    return (isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM)
            or (isinstance(exc, RuntimeError) and _CPU_OUT_OF_MEMORY in str(exc)))


def _is_cuda_error(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name in ("OutOfMemoryError", "AcceleratorError") or (isinstance(exc, RuntimeError) and "CUDA" in str(exc))


def provoked(exc: BaseException, gpu_share: int | None = None) -> str | None:
    """Why `exc`, raised by work on an input, is the input's doing although it
    looks like the machine's, in one line; None when it is not such a failure.
    Running out of host memory (the work's limit is far below the machine's),
    out of GPU memory (the work's share: `gpu_share` bytes where known), or a
    device-side assert (a kernel given an index out of range) is what the
    input asks for, not what the machine lacks."""
    if _host_out_of_memory(exc):
        limit = os.environ.get(MEMORY_ENV, "")
        within = f" within its {size(int(limit))} limit" if limit.isdigit() else ""
        asked = re.search(r"tried to allocate ([0-9]+) bytes", str(exc))
        return f"ran out of host memory{within} " + (f"(tried to allocate {size(int(asked.group(1)))})" if asked
                                                     else f"({type(exc).__name__})")
    if not _is_cuda_error(exc):
        return None
    text = str(exc)
    if type(exc).__name__ == "OutOfMemoryError" or any(s in text for s in _CUDA_OUT_OF_MEMORY):
        share = f" within its {size(gpu_share)} share" if gpu_share else ""
        asked = re.search(r"Tried to allocate [0-9.]+ ?[KMGT]?i?B", text)
        return f"ran out of GPU memory{share}" + (f" ({asked.group(0)})" if asked else "")
    if _CUDA_ASSERT in text:
        return "a GPU kernel rejected what it was given (device-side assert triggered)"
    return None


_UPLOAD_CODE = "_ddchallenge_upload_code"  # the attribute `upload_code` marks exceptions with


@contextlib.contextmanager
def upload_code():
    """Marks the work inside as work on an upload, for `is_environment_failure`:
    an exception leaving it carries the mark. The sandboxed child's function
    always is; `--no-sandbox` runs the same work in the scorer's process and
    marks it with this. The GPU memory this process keeps cached is handed
    back first, so that what the work cannot get is what it asked for."""
    _release_gpu_cache()
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(AttributeError, TypeError):
            setattr(exc, _UPLOAD_CODE, True)
        raise


def raised_in_upload_code(exc: BaseException) -> bool:
    return getattr(exc, _UPLOAD_CODE, False) is True


def is_environment_failure(exc: BaseException, upload_code: bool | None = None) -> bool:
    """Whether an exception says the machine failed rather than its input:
    out of disk, too many open files, an I/O error, a lost GPU, no sandbox.

    `upload_code`: it was raised by work on an upload (the sandboxed child's
    function; None: whether `upload_code()` marked it). There, what the upload
    can provoke (`provoked`: host or GPU memory within its limits, a
    device-side assert) is the upload's failure. Elsewhere (the scorer's own
    training, whose inputs the rules bound), out of memory means the machine
    has too little."""
    if isinstance(exc, EnvironmentFailure):
        return True
    if upload_code is None:
        upload_code = raised_in_upload_code(exc)
    if upload_code and provoked(exc) is not None:
        return False
    if _host_out_of_memory(exc):
        return True
    if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
        return True
    return _is_cuda_error(exc)


def _share_gpu(share: int) -> int:
    """Limit this process's PyTorch allocator to `share` bytes of each visible
    GPU (the whole card where it has less); the share in force. This starts
    CUDA, before any of the work runs: a failure here is the machine's."""
    import torch

    if not torch.cuda.is_available():
        raise EnvironmentFailure("CUDA is not available inside the sandbox, though it is outside")
    in_force = share
    for index in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, share / total), index)
        in_force = min(in_force, total)
    return in_force


def _child(call_path: str) -> int:
    call = json.loads(Path(call_path).read_text())
    outbox = Path(call["outbox"])
    code, message, share = 0, "", None
    try:
        if call.get("gpu_memory_bytes"):
            share = _share_gpu(int(call["gpu_memory_bytes"]))
    except BaseException as exc:  # noqa: BLE001  nothing of the work has run: the machine failed
        code, message = ENVIRONMENT_EXIT, f"CUDA could not be started for the work: {type(exc).__name__}: {exc}"
    if code == 0:
        try:
            function = _resolve(call["function"])
            value = function(_decode(call["request"]), {k: Path(v) for k, v in call["inputs"].items()}, outbox)
            (outbox / "_value.json").write_text(json.dumps(value))
            return 0
        except BaseException as exc:  # every outcome is reported to the parent, which decides what it means
            code, message = _report(exc, share)
    with contextlib.suppress(OSError):
        (outbox / "_message.txt").write_text(message[:MAX_MESSAGE * 4])
    return code


def _report(exc: BaseException, share: int | None) -> tuple[int, str]:
    """The exit code and message for what the work raised: here everything
    that runs is work on the input (see `is_environment_failure`)."""
    reason = provoked(exc, share)
    if reason is not None:
        return REFUSED_EXIT, f"the sandboxed work {reason}"
    if is_environment_failure(exc, upload_code=True):
        return ENVIRONMENT_EXIT, f"{type(exc).__name__}: {exc}"
    if isinstance(exc, BudgetExceeded):
        return OVER_BUDGET_EXIT, str(exc)
    if isinstance(exc, OptionMismatch):
        return OPTION_MISMATCH_EXIT, str(exc)
    if isinstance(exc, RuleMismatch):
        return RULE_MISMATCH_EXIT, str(exc)
    if isinstance(exc, DDChallengeError):
        return REFUSED_EXIT, str(exc)
    return CRASHED_EXIT, f"{type(exc).__name__}: {exc}"


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
