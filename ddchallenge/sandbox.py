"""Running untrusted work in a child process: no network (a new network
namespace through `unshare`), resource limits (address space, file size,
CPU time), a clean environment, a private working folder holding a read-only
copy of the submission, and a wall-clock timeout that kills the whole process
group. Results come back as safetensors files plus JSON, formats that cannot
carry code, and the parent validates them again.

`score` loads every submission this way unless told `--no-sandbox`.
"""
from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, fields
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
    memory_bytes: int = 16 << 30  # address space of the child (torch alone maps ~2 GiB)
    file_bytes: int = 8 << 30  # largest file the child may write
    cpu_seconds: int = 900  # CPU time of the child
    wall_seconds: float = 900.0  # then the whole process group is killed


@functools.lru_cache(maxsize=1)
def isolation() -> tuple[str, ...] | None:
    """The command prefix that gives a child no network, or None. Probed
    once per process: a batch of submissions needs it for every one."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    for prefix in ([unshare, "--net"], [unshare, "--net", "--map-root-user"]):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return tuple(prefix)
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


def _limit(limits: SandboxLimits):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_isolated(argv: list[str], workdir: Path, limits: SandboxLimits = SandboxLimits()) -> subprocess.CompletedProcess:
    """Run argv with no network, the limits, a clean environment and workdir
    as its home and working folder; kill its process group at the wall limit."""
    prefix = isolation()
    if prefix is None:
        raise SandboxUnavailable(
            "cannot isolate untrusted work here: `unshare --net` is missing or not permitted, so the submission "
            "would have network access; pass --no-sandbox only for files you trust"
        )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*prefix, *argv], cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=_limit(limits))
    try:
        out, err = proc.communicate(timeout=limits.wall_seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise SubmissionError(f"the sandboxed work ran past its {limits.wall_seconds:g} s limit and was killed") from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def load_isolated(path: str | os.PathLike, dataset: str | None = None, limits: SandboxLimits = SandboxLimits()):
    """`load_submission` in the sandbox; the entries come back through
    safetensors and are validated again here."""
    from ddchallenge.submission import DatasetEntry, check_images, check_labels

    path = Path(path)
    if not path.exists():
        raise SubmissionError(f"submission not found: {path}")
    with tempfile.TemporaryDirectory(prefix="ddchallenge-sandbox-") as tmp:
        work = Path(tmp)
        # The copy keeps names (they name the datasets) and any manifest beside a res/ folder or zip.
        inbox = work / "in"
        inbox.mkdir()
        if path.is_dir():
            shutil.copytree(path, inbox / path.name, symlinks=True)
        else:
            shutil.copy2(path, inbox / path.name)
            if (path.parent / "manifest.json").is_file():
                shutil.copy2(path.parent / "manifest.json", inbox / "manifest.json")
        for p in inbox.rglob("*"):
            p.chmod(0o555 if p.is_dir() else 0o444)
        outbox = work / "out"
        outbox.mkdir()
        argv = [sys.executable, "-m", "ddchallenge.sandbox", str(inbox / path.name), dataset or "", str(outbox)]
        done = run_isolated(argv, work, limits)

        def user_paths(text: str) -> str:  # name the user's files, not the sandbox copies
            return text.replace(str(inbox / path.name), str(path)).replace(str(inbox), str(path.parent))

        if done.returncode == ERROR_EXIT:
            raise SubmissionError(user_paths((outbox / "error.txt").read_text().strip()))
        if done.returncode != 0:
            why = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit code {done.returncode}"
            last = done.stderr.strip().splitlines()[-1:] or [""]
            raise SubmissionError(f"loading the submission failed in the sandbox ({why}; memory or CPU limit?) {last[0][:200]}")
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


def _worker(path: str, dataset: str, outbox: str) -> int:
    from ddchallenge.submission import load_submission

    out = Path(outbox)
    try:
        entries = load_submission(path, dataset or None)
    except DDChallengeError as exc:
        (out / "error.txt").write_text(str(exc))
        return ERROR_EXIT
    metas = []
    for i, e in enumerate(entries):
        save_file({"images": e.images.contiguous(), "labels": e.labels.contiguous()}, out / f"{i}.safetensors")
        meta = {f.name: getattr(e, f.name) for f in fields(e) if f.name not in ("spec", "images", "labels")}
        meta.update(dataset=e.spec.name, tensors=f"{i}.safetensors", warnings=list(e.warnings))
        metas.append(meta)
    (out / "entries.json").write_text(json.dumps(metas))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(*sys.argv[1:4]))
