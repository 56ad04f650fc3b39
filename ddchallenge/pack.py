"""Packing labelled sets into the official submission layout:

    OUTDIR/res/<dataset>.pt   float32, class-major, normalised with the dataset's mean and std:
                              a bare tensor at IPC 10 (the official format), else
                              {"images", "labels"} (Track 2 sets keep their labels)
    OUTDIR/res/<dataset>.soft_labels.pt   only for a set with soft labels: float16 (N, classes), rows in
                              the order of <dataset>.pt's images (the official program never reads it)
    OUTDIR/res/manifest.json  what each file is, its sha256 and the generator's provenance
    OUTDIR/manifest.json      the same, plus the zip's sha256
    OUTDIR/submission.zip     the upload: the res/ files (manifest included) at the top level

The manifest travels inside the upload, so the method and provenance a
score records come from the bytes scored, never from a file beside them
(the zip's copy cannot list the zip's own sha256: only the outer one does).

The folder is built beside OUTDIR and renamed into place at the end, so an
interrupted pack leaves the old folder or none. Same inputs, same bytes.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from ddchallenge import __version__
from ddchallenge.data import normalise
from ddchallenge.errors import SubmissionError, UsageError
from ddchallenge.fileio import OutputMarker, check_output_folder, replace_folder, sha256_bytes, sha256_file, torch_bytes
from ddchallenge.labelled import check_soft_labels, read_labelled_set
from ddchallenge.protocol import DATASETS, TRACK1_DATASETS, TRACK1_IPC, get_dataset
from ddchallenge.submission import MANIFEST, SOFT_SUFFIX, check_image_shape, check_labels, load_submission

ZIP_NAME = "submission.zip"
# A fixed timestamp keeps the zip's bytes a function of its contents only.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
PACKED = OutputMarker(MANIFEST, b'"ddchallenge_version"')  # every folder `pack` writes: its manifest


def _packed_file(set_path: Path, track: int | None, input_normalised: bool) -> tuple[dict[str, bytes], dict]:
    lset = read_labelled_set(set_path, pixels=not input_normalised)
    name = lset.dataset
    if name not in DATASETS:
        raise SubmissionError(f"labelled set {set_path} names dataset {name!r}, which is not one of {', '.join(DATASETS)}")
    spec = get_dataset(name)
    pixels = torch.from_numpy(lset.images)
    check_image_shape(pixels, spec, str(set_path))
    labels, ipc = check_labels(torch.from_numpy(lset.labels), pixels.shape[0], spec, str(set_path))
    if track == 1 and ipc != TRACK1_IPC:
        raise SubmissionError(f"{set_path} has IPC {ipc}; Track 1 fixes IPC at {TRACK1_IPC}")
    order = torch.from_numpy(np.argsort(labels.numpy(), kind="stable"))
    images = pixels[order].float() if input_normalised else normalise(pixels[order], spec)
    labels = labels[order]
    if ipc == TRACK1_IPC:
        fmt, obj = "official", images.contiguous()
    else:
        fmt, obj = "labelled", {"images": images.contiguous(), "labels": labels.contiguous()}
    data = torch_bytes(obj)
    entry = {
        "dataset": name, "file": f"res/{spec.submission_file}", "format": fmt, "ipc": ipc,
        "images": int(images.shape[0]), "shape": list(images.shape), "sha256": sha256_bytes(data),
        "labels": "implicit, class-major (image i has label i // IPC)" if fmt == "official" else "stored with the images",
        "source": {"set": set_path.name, "sha256": sha256_file(set_path), "provenance": lset.attrs},
    }
    files = {spec.submission_file: data}
    if lset.soft_labels is not None:  # a set without them packs to the same bytes as before they existed
        check_soft_labels(lset.soft_labels, pixels.shape[0], spec.classes, str(set_path))
        soft = torch_bytes(torch.from_numpy(lset.soft_labels)[order].contiguous())
        companion = f"{spec.name}{SOFT_SUFFIX}"
        files[companion] = soft
        entry["soft_labels"] = {"file": f"res/{companion}", "sha256": sha256_bytes(soft), "dtype": "float16",
                                "shape": [int(pixels.shape[0]), spec.classes]}
    return files, entry


def _zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, files[name], compresslevel=6)
    return buf.getvalue()


def _check_is_labelled_set(path: Path) -> None:
    """Name what was given when it is not a labelled set, and what to give."""
    wanted = "pack takes labelled .h5 sets written by `ddchallenge generate`"
    if not path.exists():
        raise SubmissionError(f"labelled set not found: {path}; {wanted}")
    if path.is_dir():
        kind = "a packed submission folder" if (path / "res").is_dir() or path.name == "res" else "a folder"
        raise SubmissionError(f"{path} is {kind}, not a labelled set; {wanted} (score a packed folder with "
                              "`ddchallenge score`)")
    if path.suffix.lower() not in (".h5", ".hdf5"):
        what = {".pt": "a torch file (already packed?)", ".zip": "a zip (already packed?)"}.get(
            path.suffix.lower(), f"a {path.suffix or 'suffix-less'} file")
        raise SubmissionError(f"{path} is {what}, not a labelled set; {wanted}")


def pack(sets: list[str | os.PathLike], outdir: str | os.PathLike, track: int | None = None,
         force: bool = False, input_normalised: bool = False) -> dict:
    """Pack labelled sets into OUTDIR; returns the manifest."""
    outdir = Path(outdir)
    if not sets:
        raise UsageError("give at least one labelled set to pack")
    if track not in (None, 1, 2):
        raise UsageError(f"--track must be 1 or 2, got {track}")
    check_output_folder(outdir, PACKED, force)
    files, entries = {}, []
    for s in map(Path, sets):
        _check_is_labelled_set(s)
        packed, entry = _packed_file(s, track, input_normalised)
        if any(name in files for name in packed):
            raise SubmissionError(f"two sets for {entry['dataset']}; pack one set per dataset")
        files.update(packed)
        entries.append(entry)
    packed = {e["dataset"] for e in entries}
    if track == 1 and not packed & TRACK1_DATASETS:  # a set of another dataset, not a missing one
        raise SubmissionError(f"Track 1 is scored on {', '.join(sorted(TRACK1_DATASETS))}; "
                              f"{', '.join(sorted(packed))} is not among them: drop --track 1")
    if (track == 1 or packed & TRACK1_DATASETS) and not TRACK1_DATASETS <= packed:
        missing = ", ".join(sorted(TRACK1_DATASETS - packed))
        raise SubmissionError(f"a challenge upload holds every Track 1 dataset; add a set for {missing}")
    if track == 1 and packed - TRACK1_DATASETS:
        extra = ", ".join(sorted(packed - TRACK1_DATASETS))
        raise SubmissionError(f"Track 1 takes only {', '.join(sorted(TRACK1_DATASETS))}; remove {extra}")
    inner = {"ddchallenge_version": __version__, "track": track, "datasets": entries}
    files[MANIFEST] = _json_bytes(inner)
    archive = _zip_bytes(files)
    manifest = {**inner, "zip": {"file": ZIP_NAME, "sha256": sha256_bytes(archive)}}
    _write_folder(outdir, files, manifest, archive, force)
    return manifest


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _write_folder(outdir: Path, files: dict[str, bytes], manifest: dict, archive: bytes, force: bool) -> None:
    outdir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        (staging / "res").mkdir()
        for name, data in files.items():
            (staging / "res" / name).write_bytes(data)
        (staging / MANIFEST).write_bytes(_json_bytes(manifest))
        (staging / ZIP_NAME).write_bytes(archive)
        # The upload must read back exactly as `score` will read it.
        load_submission(staging / ZIP_NAME, rules=None)
        replace_folder(staging, outdir, PACKED)  # an existing one only with force (checked above)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
