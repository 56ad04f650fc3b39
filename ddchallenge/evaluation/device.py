"""Device choice and the per-device numerics of training, in one place.

`resolve_device` turns the user's `--device` into a torch.device once, with
an error that names the fix; every command (scoring, generation, the
diffusion trainer) uses it, so it lives here and not in the scorer's
training loop. `training_numerics` holds the process-wide switches that a
training round sets for its duration and restores afterwards (cuDNN
determinism; on the CPU, denormal flushing and the C allocator's keeping of
freed memory).
"""
from __future__ import annotations

import contextlib
import ctypes
import sys
import threading

import torch

from ddchallenge.errors import UsageError


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


# glibc's mallopt parameters (malloc.h) and the defaults restored afterwards.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_GLIBC_DEFAULTS = ((_M_MMAP_MAX, 65536), (_M_TRIM_THRESHOLD, 128 * 1024), (_M_TOP_PAD, 128 * 1024))
_KEEP = 2**31 - 1  # mallopt takes a C int: keep up to 2 GiB free at the top of the heap


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
    reused) and up to 2 GiB of free heap is kept rather than trimmed. On exit
    glibc's defaults come back and the free memory is returned (malloc_trim).
    Nothing changes numerically. Other C libraries: nothing is done.
    """
    global _keepers
    libc = _glibc()
    if libc is None:
        yield
        return
    # The settings are the process's: with rounds in several threads (or one
    # context inside another), the first to enter sets them, the last to
    # leave restores them.
    with _keep_lock:
        if _keepers == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP)
            libc.mallopt(_M_TOP_PAD, _KEEP)
        _keepers += 1
    try:
        yield
    finally:
        with _keep_lock:
            _keepers -= 1
            if _keepers == 0:
                for param, value in _GLIBC_DEFAULTS:
                    libc.mallopt(param, value)
                libc.malloc_trim(0)


_keep_lock = threading.Lock()
_keepers = 0  # contexts inside keep_freed_memory now
