import resource

import pytest
import torch

from ddchallenge.evaluation import device as device_module
from ddchallenge.evaluation.device import keep_freed_memory

MIB = 2**20


def _faults_of_a_step(size: int, steps: int = 8) -> int:
    """The fewest minor page faults among a few "steps" that each fill and
    free a buffer of `size` bytes, as a training step does with its
    activations (the first steps may take new memory: glibc's aligned
    allocation does not fit a freed block of exactly its size until the heap
    has settled)."""
    faults = []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffer = torch.ones(size // 4)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del buffer
    return min(faults)


@pytest.mark.skipif(device_module._glibc() is None, reason="keep_freed_memory only tunes glibc's malloc")
def test_freed_training_memory_is_reused_without_page_faults_and_returned_afterwards():
    pages = 256 * MIB // resource.getpagesize()
    # glibc's default: a block this large is a fresh mmap, every page faulted in again.
    assert _faults_of_a_step(256 * MIB) > pages // 2
    rss = _resident()
    with keep_freed_memory():
        with keep_freed_memory():  # nested: the inner exit keeps the outer's settings
            assert _faults_of_a_step(256 * MIB) < pages // 10
        assert _faults_of_a_step(256 * MIB) < pages // 10
        assert _resident() > rss + 200 * MIB  # kept while training
    assert _resident() < rss + 64 * MIB  # handed back afterwards


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
