import json
import os
import resource
import subprocess
import sys

import pytest
import torch

from ddchallenge.evaluation import device as device_module
from ddchallenge.evaluation.device import keep_freed_memory

MIB = 2**20


# Run in a fresh Python: a process that has trained before (earlier tests, in-process) may hold a freed block
# of 256 MiB in its heap, which glibc's default then reuses without a fault, and the control below would fail.
FAULTS = """
import json, resource
from ddchallenge.evaluation.device import keep_freed_memory
import torch

MIB = 2**20

def faults_of_a_step(size, steps=8):
    # The fewest minor page faults among a few "steps" that each fill and free a buffer of `size` bytes, as a
    # training step does with its activations (the first steps may take new memory: glibc's aligned allocation
    # does not fit a freed block of exactly its size until the heap has settled).
    faults = []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffer = torch.ones(size // 4)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del buffer
    return min(faults)

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

seen = {"default": faults_of_a_step(256 * MIB)}
rss = resident()
with keep_freed_memory():
    with keep_freed_memory():  # nested: the inner exit keeps the outer's settings
        seen["nested"] = faults_of_a_step(256 * MIB)
    seen["outer"] = faults_of_a_step(256 * MIB)
    seen["kept"] = resident() - rss
seen["returned"] = resident() - rss
print(json.dumps(seen))
"""


@pytest.mark.skipif(device_module._glibc() is None, reason="keep_freed_memory only tunes glibc's malloc")
def test_freed_training_memory_is_reused_without_page_faults_and_returned_afterwards():
    pages = 256 * MIB // resource.getpagesize()

    def holds(seen: dict) -> bool:
        return (seen["default"] > pages // 2  # glibc's default: a block this large is a fresh mmap, faulted in again
                and seen["nested"] < pages // 10 and seen["outer"] < pages // 10
                and seen["kept"] > 200 * MIB  # kept while training
                and seen["returned"] < 64 * MIB)  # handed back afterwards

    # Up to three fresh processes: once, in a full run of the suite (session 19), one saw every page fault again
    # inside keep_freed_memory, which 25 runs alone never did. A broken keep_freed_memory fails all three.
    tries = []
    for _ in range(3):
        tries.append(_run(FAULTS))
        if holds(tries[-1]):
            return
    pytest.fail(f"page faults and memory in three fresh processes: {tries}")


# What the probe below prints: whether a 512 MiB malloc is served by mmap (glibc's mallinfo2 counts mmapped
# blocks) before, inside and after keep_freed_memory, and whether a 256 MiB tensor could be made inside it.
# 512 MiB is above the largest dynamic mmap threshold (32 MiB) and above any free block the heap holds here: with
# mmap allowed it is always mmapped.
PROBE = """
import ctypes, json, resource, sys
from ddchallenge.evaluation.device import keep_freed_memory
import torch

libc = ctypes.CDLL(None)
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]

def mmapped():
    before = libc.mallinfo2().hblks
    block = libc.malloc(512 << 20)
    during = libc.mallinfo2().hblks
    libc.free(block)
    return during > before

if sys.argv[1] != "none":  # room for the 256 MiB tensor or the probe: the 2 GiB pad would not fit
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (int(sys.argv[1]) << 20), resource.RLIM_INFINITY))
seen = {"before": mmapped()}
try:
    with keep_freed_memory():
        seen["inside"] = mmapped()
        seen["tensor"] = float(torch.ones(64 << 20).sum())
except (MemoryError, RuntimeError) as exc:
    seen["error"] = type(exc).__name__
seen["after"] = mmapped()
print(json.dumps(seen))
"""


def _probe(limit_mib, **env):
    return _run(PROBE, str(limit_mib), **env)


def _run(script, *args, **env):
    """What `script` prints as JSON, run in a fresh Python."""
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(device_module._glibc() is None, reason="keep_freed_memory only tunes glibc's malloc")
def test_under_an_address_space_limit_a_valid_allocation_succeeds_and_the_settings_stay_as_found():
    # Without a limit: mmap is off inside (the speed-up), and on again afterwards.
    assert _probe("none") == {"before": True, "inside": False, "tensor": 64 * 2**20, "after": True}
    # Under RLIMIT_AS with 768 MiB of room, the 256 MiB tensor fits; with the 2 GiB pad it would not.
    assert _probe(768) == {"before": True, "inside": True, "tensor": 64 * 2**20, "after": True}
    # Settings found at start-up (here: mmap off, from glibc's environment variable) are what comes back,
    # not glibc's defaults.
    assert _probe("none", MALLOC_MMAP_MAX_="0") == {"before": False, "inside": False, "tensor": 64 * 2**20,
                                                    "after": False}
    # Inside the sandbox (its memory limit is in the environment), nothing is changed either.
    from ddchallenge.isolation import MEMORY_ENV

    assert _probe("none", **{MEMORY_ENV: str(1 << 30)})["inside"] is True


def test_the_settings_glibc_started_with_are_read_from_its_environment():
    start = device_module._start_values
    assert start({}) == {-4: 65536, -1: 128 * 1024, -2: 128 * 1024}
    given = {"GLIBC_TUNABLES": "glibc.malloc.top_pad=0x100000:glibc.malloc.mmap_max=0:glibc.other=1",
             "MALLOC_MMAP_MAX_": "7", "MALLOC_TRIM_THRESHOLD_": "010", "MALLOC_TOP_PAD_": "12"}
    # The tunable wins over the older variable; octal and hex as glibc reads them.
    assert start(given) == {-4: 0, -1: 8, -2: 0x100000}
    # What glibc would not read is ignored, as glibc ignores it.
    assert start({"MALLOC_TOP_PAD_": "12k", "GLIBC_TUNABLES": "glibc.malloc.mmap_max=-1"}) == start({})
