"""An upload on its way to being scored: what kind it is (`upload_kind`,
from the organiser's rules alone), what its reading may cost, and the
isolated child that reads it (or, for Track 2, runs it).

Everything an upload controls is handled here or below: `isolation.py` stages
it (only regular files and folders, bounded in size and count) and runs the
child; `submission.py` reads its bytes in that child under the organiser's
`UploadRules`; what comes back is validated again here against the same
rules before any training starts.
"""
from __future__ import annotations

import os
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors, save_file

from ddchallenge import isolation
from ddchallenge.diffusion.model import checkpoints, generator_marker, META_FILE, NEVER_READ
from ddchallenge.errors import BudgetExceeded, RuleMismatch, SubmissionError, UploadChanged, UploadRuleError
from ddchallenge.isolation import Input, Limits
from ddchallenge.labelled import check_soft_labels
from ddchallenge.progress import ticking
from ddchallenge.protocol import DATASETS, MAX_IPC, UploadRules, get_dataset
from ddchallenge.submission import DatasetEntry, bounded_provenance, check_images, check_labels, load_submission

GENERATOR_BYTES = 8 << 30  # a Stable Diffusion VAE is 0.3 GiB, the largest preset UNet 0.1 GiB
BUDGET_HINT = "raise --budget, pass a smaller --ipc, or score on a GPU (--device cuda); the challenge allows 600 s"
MAX_ENTRIES = len(DATASETS)
IMAGES, GENERATOR = "images", "generator"  # the kinds of upload


def is_generator(path: str | os.PathLike) -> bool:
    """A Track 2 generator folder (or a training output holding checkpoints).
    Decided from names and types alone, links not followed; what is scored
    as what is `upload_kind`'s decision, not this."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    meta = path / META_FILE
    return (meta.is_file() and not meta.is_symlink()) or bool(checkpoints(path))


def upload_kind(path: str | os.PathLike, track2: bool) -> str:
    """The one place that decides how an upload is scored: from the
    organiser's rules (`track2`: a Track 2 budget was given), never from the
    upload. Track 2 runs generator folders only. Every Track 1 path (a file,
    a zip, a res/ folder, the Codabench program, a batch without a budget)
    reads images only, and refuses an upload that is or holds a generator
    anywhere (ddchallenge.json, a diffusers config, weights, step-*
    checkpoints), named in one line; a zip's members are checked where it is
    opened (`refuse_generator_zip`), in the sandbox."""
    path = Path(path)
    if track2:
        if not is_generator(path):
            raise SubmissionError(f"{path} is not a generator folder; a Track 2 run (--budget) scores folders "
                                  "written by `ddchallenge train`")
        return GENERATOR
    found = generator_inside(path)
    if found:
        raise UploadRuleError(track1_refusal(str(path), found))
    return IMAGES


def generator_inside(path: Path) -> str | None:
    """What in a folder shows a generator or model (`generator_marker`), or
    None; None for a file."""
    if not path.is_dir() or path.is_symlink():
        return None
    try:  # names and types only (lstat), bounded in count; nothing is opened
        inventory = isolation.inspect(path, Limits(input_bytes=GENERATOR_BYTES))
    except isolation.Refused as exc:
        raise SubmissionError(str(exc)) from None
    return generator_marker([*inventory.folders, *(rel for rel, _ in inventory.files)])


def track1_refusal(where: str, found: str) -> str:
    return (f"{where} holds a generator or model ({found}); a Track 1 upload holds images only, and generators are "
            "scored only in a Track 2 run, with --budget SECONDS")


def refuse_generator_zip(path: Path) -> None:
    """A zip read as Track 1 images must not hold a generator folder (its
    member names are read here, in the child that reads the upload)."""
    if path.is_dir() or path.suffix.lower() != ".zip":
        return
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # reading it names the damage
    found = generator_marker(names)
    if found:
        raise UploadRuleError(track1_refusal(str(path), found))


def upload_limits(kind: str, rules: UploadRules) -> Limits:
    """What staging may copy: a generator folder up to GENERATOR_BYTES; images
    no more than the rules allow for every dataset they may hold."""
    if kind == GENERATOR:
        return Limits(input_bytes=GENERATOR_BYTES)
    specs = [s for s in DATASETS.values() if rules.allows(s)]
    soft = sum(rules.max_images(s) * s.classes * 2 for s in specs)  # optional float16 soft labels
    return Limits(input_bytes=sum(rules.max_bytes([s]) for s in specs) + soft + (1 << 20))


def inspect(path: str | os.PathLike, rules: UploadRules, track2: bool | None) -> isolation.Inventory:
    """The upload's kind under the rules (`upload_kind`), then refuse what
    must not be read (links, special and sparse files, too much data) from
    lstat alone; also done without the sandbox. `track2` None: hashing only,
    no kind decided (the bounds follow the upload's shape; scoring decides)."""
    path = Path(path)
    if track2 is None:
        kind = GENERATOR if is_generator(path) else IMAGES
    else:
        kind = upload_kind(path, track2)
    limits = upload_limits(kind, rules)
    try:
        return isolation.inspect(path, limits, NEVER_READ if kind == GENERATOR else ())
    except isolation.OverLimit:
        if kind == GENERATOR:
            raise
        # images the rules' IPC and datasets could not fill: the upload is not what they ask (another IPC?)
        raise RuleMismatch(f"{path} holds more than {limits.input_bytes} bytes, more than any set the rules allow "
                           "can take; check the IPC and the dataset") from None


def digest(path: str | os.PathLike, rules: UploadRules, track2: bool | None = None) -> str:
    """sha256 of a file upload's bytes, or over a folder's names, sizes and
    bytes (after `inspect`; with `track2` given, an upload of the wrong kind
    for the track is refused here already): a batch trusts an earlier record
    only for the same upload."""
    path = Path(path)
    return isolation.digest(path, inspect(path, rules, track2))


def describe(sandbox: bool, device: torch.device) -> str:
    if not sandbox:
        return "none (--no-sandbox)"
    return isolation.describe(Limits(), cuda=device.type == "cuda")


# ---------------------------------------------------------------- images

@dataclass(frozen=True)
class ReadRequest:
    rules: UploadRules


def read_upload(path: str | os.PathLike, rules: UploadRules, sandbox: bool = True,
                sha256: str | None = None) -> list[DatasetEntry]:
    """Every dataset of a Track 1 (image) upload, read under `rules`; one
    that is or holds a generator is refused (`upload_kind`). Staging into
    the sandbox runs the same `inspect` checks; without it they run here.
    `sha256`: the upload's `digest` when hashed before (a batch's), which
    the staged copy must have (UploadChanged otherwise)."""
    path = Path(path)
    try:
        if not sandbox:
            inspect(path, rules, track2=False)
            refuse_generator_zip(path)
            return load_submission(path, rules=rules)
        upload_kind(path, track2=False)
        given = Input(path, sha256=sha256)
        with isolation.run(_read_in_child, ReadRequest(rules), {"upload": given}, upload_limits(IMAGES, rules)) as out:
            return _collect(out, rules, official=path.is_dir() or path.suffix.lower() == ".zip")
    except isolation.Changed as exc:
        raise UploadChanged(str(exc)) from None
    except isolation.Refused as exc:
        raise SubmissionError(str(exc)) from None


def _read_in_child(request: ReadRequest, inputs: dict[str, Path], outbox: Path) -> list[dict]:
    refuse_generator_zip(inputs["upload"])
    return _write_entries(load_submission(inputs["upload"], rules=request.rules), outbox)


# ---------------------------------------------------------------- Track 2

@dataclass(frozen=True)
class GenerateRequest:
    dataset: str
    ipc: int | None  # None: the most that fit, at most MAX_IPC
    deadline: float  # time.monotonic() value (CLOCK_MONOTONIC is shared with the child)
    seed: int
    device: str
    budget: float  # seconds; the deadline is when they end, the child's start-up included


def generate_upload(model: str | os.PathLike, rules: UploadRules, budget: float, seed: int = 0, device: str = "auto",
                    sandbox: bool = True, grace: float = 30.0, sha256: str | None = None) -> list[DatasetEntry]:
    """Track 2: run a generator folder for each dataset the rules score (not
    one of its own choosing), `budget` seconds each, and return its images.
    Each budget starts when its run does, so the child's start-up counts; the
    process group is killed `grace` seconds after the deadline whatever it
    does. More images than asked for are refused. `sha256`: as read_upload's,
    checked at each dataset's staging."""
    model = Path(model)
    try:
        inspect(model, rules, track2=True)
    except isolation.Refused as exc:
        raise SubmissionError(str(exc)) from None
    entries = []
    for dataset in rules.required():
        deadline = time.monotonic() + budget
        request = GenerateRequest(dataset, rules.ipc, deadline, seed, device, budget)
        if not sandbox:  # the upload's work, as in the child: running out of memory there is its own failure
            with tempfile.TemporaryDirectory(prefix="ddchallenge-track2-") as scratch, isolation.upload_code():
                made = _generate(request, model, Path(scratch))
        else:
            cuda = device != "cpu" and torch.cuda.is_available()
            limits = Limits(input_bytes=GENERATOR_BYTES, wall_seconds=budget + grace,
                            cpu_seconds=max(Limits().cpu_seconds, int(budget + grace) * 64))
            given = Input(model, skip=NEVER_READ, sha256=sha256)
            try:
                with ticking(f"Track 2 run for {dataset} (sandboxed, {budget:g} s budget)", budget), \
                        isolation.run(_generate_in_child, request, {"model": given}, limits, cuda=cuda) as out:
                    made = _collect(out, rules, official=False)
            except isolation.TimedOut:
                raise BudgetExceeded(f"the generator {model} did not finish within its {budget:g} s budget and "
                                     f"was killed; {BUDGET_HINT}") from None
            except isolation.OverBudget as exc:
                raise BudgetExceeded(f"{exc}; {BUDGET_HINT}") from None
            except isolation.Changed as exc:
                raise UploadChanged(str(exc)) from None
            except isolation.Refused as exc:
                raise SubmissionError(str(exc)) from None
        for entry in made:
            _check_generated(entry, request, str(model))
        entries.extend(made)
    return entries


def _generate(request: GenerateRequest, model: Path, folder: Path) -> list[DatasetEntry]:
    from ddchallenge.generators.track2 import run_track2

    return run_track2(str(model), request.dataset, "auto" if request.ipc is None else request.ipc, request.seed,
                      request.budget, request.device, folder, started=request.deadline - request.budget)


def _generate_in_child(request: GenerateRequest, inputs: dict[str, Path], outbox: Path) -> list[dict]:
    made = _generate(request, inputs["model"], outbox)
    for entry in made:  # refused here already, before anything is written back
        _check_generated(entry, request, str(inputs["model"]))
    return _write_entries(made, outbox)


def _check_generated(entry: DatasetEntry, request: GenerateRequest, model: str) -> None:
    if entry.spec.name != request.dataset:
        raise SubmissionError(f"the generator {model} made {entry.spec.name} images when asked for {request.dataset}")
    wanted = request.ipc if request.ipc is not None else MAX_IPC
    if entry.ipc > wanted or (request.ipc is not None and entry.ipc != request.ipc):
        raise SubmissionError(f"the generator {model} made IPC {entry.ipc} when asked for "
                              f"{request.ipc if request.ipc is not None else f'at most {MAX_IPC}'}; refused")


# ---------------------------------------------------------------- the way back

def _write_entries(entries: list[DatasetEntry], outbox: Path) -> list[dict]:
    metas = []
    for i, e in enumerate(entries):
        tensors = {"images": e.images.contiguous(), "labels": e.labels.contiguous()}
        if e.soft_labels is not None:
            tensors["soft_labels"] = e.soft_labels.contiguous()
        save_file(tensors, outbox / f"{i}.safetensors")
        metas.append({"dataset": e.spec.name, "ipc": e.ipc, "kind": e.kind, "source": e.source, "sha256": e.sha256,
                      "method": e.method, "warnings": list(e.warnings), "provenance": e.provenance})
    return metas


def _collect(out: isolation.Outcome, rules: UploadRules, official: bool) -> list[DatasetEntry]:
    """The entries the child returned, untrusted: every field checked, every
    tensor validated again under the rules."""
    metas = out.value
    if not isinstance(metas, list) or not 0 < len(metas) <= MAX_ENTRIES:
        raise SubmissionError("the sandboxed work returned no usable entries; refused")
    entries = []
    for i, meta in enumerate(metas):
        try:
            spec = get_dataset(meta["dataset"])
            ipc, kind, source, sha = meta["ipc"], meta["kind"], meta["source"], meta["sha256"]
            method, warnings = meta["method"], meta["warnings"]
            if not (isinstance(ipc, int) and kind in ("official", "labelled") and isinstance(source, str)
                    and isinstance(sha, str) and (method is None or isinstance(method, str))
                    and isinstance(warnings, list) and all(isinstance(w, str) for w in warnings)):
                raise TypeError
        except Exception:  # any shape of bad value: the child is not trusted
            raise SubmissionError("the sandboxed work returned malformed entries; refused") from None
        source = isolation.clean(out.unstage(source))
        # images and labels, and float16 soft labels for as many images
        limit = rules.max_bytes([spec], official) + rules.max_images(spec, official) * spec.classes * 2
        try:
            tensors = load_safetensors(out.read(f"{i}.safetensors", limit))
            images, labels = tensors["images"], tensors["labels"]
        except (SafetensorError, KeyError, ValueError):
            raise SubmissionError(f"the sandboxed work returned unreadable tensors for {source}; refused") from None
        if set(tensors) - {"images", "labels", "soft_labels"}:
            raise SubmissionError(f"the sandboxed work returned unexpected tensors for {source}; refused")
        rules.check_count(spec, images.shape[0] if images.dim() else 0, source, official)
        images = check_images(images, spec, source)
        labels, found = check_labels(labels, images.shape[0], spec, source)
        if found != ipc or tensors["images"].dtype != torch.float32:
            raise SubmissionError(f"the sandboxed work returned inconsistent data for {source}; refused")
        rules.check_ipc(spec, ipc, source, official)
        soft = tensors.get("soft_labels")
        if soft is not None:  # checked again, as the child's every other tensor
            if soft.dtype != torch.float16:
                raise SubmissionError(f"the sandboxed work returned soft labels of type {soft.dtype} for {source}; "
                                      "refused")
            check_soft_labels(soft.numpy(), images.shape[0], spec.classes, source)
        entries.append(DatasetEntry(spec, images, labels, ipc, kind, source, isolation.clean(sha)[:64],
                                    tuple(isolation.clean(out.unstage(w)) for w in warnings[:8]),
                                    None if method is None else isolation.clean(method)[:64],
                                    bounded_provenance(meta.get("provenance")), soft))
    if official:
        rules.check_track1([e.spec.name for e in entries], "the upload")
    return entries

