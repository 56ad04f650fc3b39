"""Device choice and the per-device numerics of training, in one place.

`resolve_device` turns the user's `--device` into a torch.device once, with
an error that names the fix; every command (scoring, generation, the
diffusion trainer) uses it, so it lives here and not in the scorer's
training loop. `training_numerics` holds the process-wide switches that a
training round sets for its duration and restores afterwards.
"""
from __future__ import annotations

import contextlib

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
        yield
    finally:
        torch.set_flush_denormal(False)  # PyTorch's default; it offers no getter to restore from
