"""Device choice and the per-device numerics of training, in one place.

`resolve_device` turns the user's `--device` into a torch.device once, with
an error that names the fix; every command (scoring, generation, the
diffusion trainer) uses it, so it lives here and not in the scorer's
training loop. `training_numerics` holds the process-wide switches that a
training round sets for its duration and restores afterwards (cuDNN
determinism; on the CPU, denormal flushing and the C allocator's keeping of
freed memory, which is skipped under a memory limit and restores the
settings it found).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import resource
import sys
import threading
from typing import Mapping

import torch

from ddchallenge.errors import UsageError
from ddchallenge.isolation import MEMORY_ENV


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cpu', 'cuda', 'cuda:N' as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} asked for but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device {device!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise UsageError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return dev


@contextlib.contextmanager
def training_numerics(device: torch.device):
    """CUDA: deterministic cuDNN kernels, so the same seed on the same device
    gives the same accuracies. CPU: flush denormal floats to zero. Rotated and
    scaled batches (zero fill, bilinear weights) create denormals in the
    backward pass, and x86 arithmetic on them is slow enough to make such a
    batch ~25% slower; values below 1e-38 cannot change an accuracy, and GPU
    kernels flush them routinely."""
    if device.type == "cuda":
        saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        try:
            yield
        finally:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
        return
    torch.set_flush_denormal(True)
    try:
        with keep_freed_memory():
            yield
    finally:
        torch.set_flush_denormal(False)  # PyTorch's default; it offers no getter to restore from


# glibc's mallopt parameters (malloc.h) this module sets: for each, the value glibc starts with when nothing
# sets it (mallopt(3)), and the tunable and the older environment variable that set it at start-up instead.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_GLIBC_START = {
    _M_MMAP_MAX: (65536, "glibc.malloc.mmap_max", "MALLOC_MMAP_MAX_"),
    _M_TRIM_THRESHOLD: (128 * 1024, "glibc.malloc.trim_threshold", "MALLOC_TRIM_THRESHOLD_"),
    _M_TOP_PAD: (128 * 1024, "glibc.malloc.top_pad", "MALLOC_TOP_PAD_"),
}
_KEEP = 2**31 - 1  # mallopt takes a C int: keep up to 2 GiB free at the top of the heap
_C_INTEGER = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")  # what glibc's tunable parser reads


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has mallopt and malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version, libc.mallopt, libc.malloc_trim  # noqa: B018 (AttributeError if not glibc)
    except (OSError, AttributeError):
        return None
    return libc


def _start_values(environ: Mapping[str, str]) -> dict[int, int]:
    """The values glibc took at start-up for the parameters set here, from
    the environment it started with: a GLIBC_TUNABLES entry first, then the
    older MALLOC_*_ variable, else glibc's default (an unreadable value is
    ignored, as glibc ignores it)."""
    tunables = dict(item.partition("=")[::2] for item in environ.get("GLIBC_TUNABLES", "").split(":") if "=" in item)
    values = {}
    for param, (default, tunable, variable) in _GLIBC_START.items():
        values[param] = default
        for given in (environ.get(variable), tunables.get(tunable)):  # the tunable wins, as in glibc
            read = _c_integer(given)
            if read is not None:
                values[param] = read
    return values


def _c_integer(text: str | None) -> int | None:
    """A number as glibc reads one from the environment (decimal, 0x hex, 0 octal), else None."""
    text = (text or "").strip()
    if not _C_INTEGER.fullmatch(text):
        return None
    return int(text, 16) if text[:2] in ("0x", "0X") else int(text, 8) if text.startswith("0") else int(text)


def _environment_at_start() -> dict[str, str]:
    """The environment this process started with, which is what glibc read
    (os.environ may have been changed since)."""
    try:
        with open("/proc/self/environ", "rb") as fh:
            items = fh.read().split(b"\0")
    except OSError:
        return dict(os.environ)
    return dict(item.decode(errors="replace").partition("=")[::2] for item in items if b"=" in item)


def memory_limited() -> bool:
    """Whether this process's memory is limited below the machine's: an
    address-space or data limit (RLIMIT_AS, RLIMIT_DATA), or the sandbox's
    limit (a memory cgroup or watchdog; `isolation` tells its children)."""
    for which in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
        if resource.getrlimit(which)[0] != resource.RLIM_INFINITY:
            return True
    return MEMORY_ENV in os.environ


@contextlib.contextmanager
def keep_freed_memory():
    """While training on the CPU, keep freed memory in the process instead of
    handing it back to the kernel after every step.

    A training step allocates and frees the same few large tensors (a CIFAR-100
    batch's activations are 128 MiB each, Tiny-ImageNet's 512 MiB). glibc
    serves every allocation above its mmap threshold (at most 32 MiB) with a
    fresh mmap and returns it with munmap on free, so every step faults in
    every page of every activation again, zero-filled by the kernel: on the
    2-core development machine, 2.5 million minor page faults and 40 % of all
    CPU time in the kernel for 8 CIFAR-100 steps (docs/benchmarks.md). Here
    mmap is switched off for the heap (large blocks come from the heap and are
    reused) and up to 2 GiB of free heap is kept rather than trimmed. Nothing
    changes numerically. Other C libraries: nothing is done.

    Under a memory limit (`memory_limited`: inside the sandbox, or with
    RLIMIT_AS or RLIMIT_DATA set) nothing is done either: the 2 GiB pad is
    address space a limit counts, and with mmap off a freed block stays in the
    heap, where fragmentation can hold more memory than glibc's defaults ever
    would, by an amount no pad size bounds. Only skipping guarantees that work
    which fits its limit without this still fits with it.

    On exit the settings found on entry come back and the free memory is
    returned (malloc_trim). glibc has no getter for them: the values found are
    what this module last set, or, before it ever set them, what glibc started
    with (its defaults, or GLIBC_TUNABLES / MALLOC_*_ in the environment the
    process started with). A value set by other code through mallopt is not
    seen (nothing in this package does that). One effect cannot be undone:
    any of these mallopt calls switches off glibc's dynamic mmap threshold for
    the rest of the process (the threshold stays where it was, and the trim
    threshold is the value restored rather than twice the mmap threshold).
    """
    global _keepers, _found
    libc = _glibc()
    if libc is None or memory_limited():
        yield
        return
    # The settings are the process's: with rounds in several threads (or one
    # context inside another), the first to enter sets them, the last to
    # leave restores them.
    with _keep_lock:
        if _keepers == 0:
            _found = {param: _in_force.get(param, start) for param, start in _start_values(_environment_at_start()).items()}
            for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP), (_M_TOP_PAD, _KEEP)):
                _set(libc, param, value)
        _keepers += 1
    try:
        yield
    finally:
        with _keep_lock:
            _keepers -= 1
            if _keepers == 0:
                for param, value in _found.items():
                    _set(libc, param, value)
                libc.malloc_trim(0)


def _set(libc: ctypes.CDLL, param: int, value: int) -> None:
    if libc.mallopt(param, min(value, _KEEP)):  # 1 on success; a C int either way
        _in_force[param] = min(value, _KEEP)


_keep_lock = threading.Lock()
_keepers = 0  # contexts inside keep_freed_memory now
_found: dict[int, int] = {}  # the settings the first of them found, restored by the last
_in_force: dict[int, int] = {}  # what this module last set, per parameter
