"""The labelled-set format (HDF5): what `generate` writes and `pack` and
`score` read. Images are pixels (uint8, or float32 in [0, 1]), not normalised;
labels travel with them, so any IPC and any order is allowed.

    /images  (N, C, H, W) uint8 or float32
    /labels  (N,) int64
    attrs: dataset, ipc, method, seed, ddchallenge_version, config (JSON)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ddchallenge import __version__
from ddchallenge.errors import SubmissionError
from ddchallenge.fileio import atomic_path


@dataclass(frozen=True)
class LabelledSet:
    images: np.ndarray  # (N, C, H, W) uint8, or float32 in [0, 1]
    labels: np.ndarray  # (N,) int64
    attrs: dict  # provenance: dataset, ipc, method, seed, version, config

    @property
    def dataset(self) -> str | None:
        return self.attrs.get("dataset")


def write_labelled_set(
    path: str | os.PathLike, images: np.ndarray, labels: np.ndarray, *, dataset: str, ipc: int,
    method: str, seed: int, config: dict,
) -> Path:
    """Write atomically; the file appears whole or not at all."""
    images = np.ascontiguousarray(images)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    if images.dtype not in (np.uint8, np.float32) or images.ndim != 4 or labels.shape != (images.shape[0],):
        raise SubmissionError(
            f"a labelled set needs images (N, C, H, W) uint8 or float32 and labels (N,); got "
            f"{images.dtype} {images.shape} and {labels.shape}"
        )
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("images", data=images)
            f.create_dataset("labels", data=labels)
            f.attrs.update({
                "dataset": dataset, "ipc": int(ipc), "method": method, "seed": int(seed),
                "ddchallenge_version": __version__, "config": json.dumps(config, sort_keys=True),
            })
    return Path(path)


def read_labelled_set(path: str | os.PathLike, pixels: bool = True) -> LabelledSet:
    """Read and check the structure (not the class counts: see submission.py).
    pixels=False accepts float images that are already normalised."""
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"labelled set not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("images", "labels") if not isinstance(f.get(k), h5py.Dataset)]
            if missing:
                raise SubmissionError(
                    f"labelled set {path} has no dataset {' or '.join(missing)}; expected /images (N, C, H, W) "
                    "and /labels (N,), as `ddchallenge generate` writes"
                )
            images, labels = f["images"][()], f["labels"][()]
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except OSError as exc:
        raise SubmissionError(f"{path} is not a readable HDF5 labelled set (truncated or corrupt: {exc})") from None
    attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}
    if "config" in attrs:
        try:
            attrs["config"] = json.loads(attrs["config"])
        except (TypeError, ValueError):
            raise SubmissionError(f"labelled set {path} has a config attribute that is not JSON") from None
    if not np.issubdtype(labels.dtype, np.integer):
        raise SubmissionError(f"labelled set {path} has labels of type {labels.dtype}; expected int64")
    if images.dtype == np.uint8:
        if not pixels:
            raise SubmissionError(f"labelled set {path} holds uint8 pixels, which cannot be already normalised; "
                                  "drop --input-normalised")
    elif np.issubdtype(images.dtype, np.floating):
        images = images.astype(np.float32)
        if images.size and not np.isfinite(images).all():
            raise SubmissionError(f"labelled set {path} holds NaN or Inf images")
        if pixels and images.size and (images.min() < 0 or images.max() > 1):
            raise SubmissionError(
                f"labelled set {path} has float images outside [0, 1] (min {images.min():.3g}, max "
                f"{images.max():.3g}); a labelled set holds pixels, uint8 or float in [0, 1], not normalised "
                "values (`ddchallenge pack --input-normalised` packs normalised ones)"
            )
    else:
        raise SubmissionError(f"labelled set {path} has images of type {images.dtype}; expected uint8 or float32")
    return LabelledSet(images=images, labels=labels.astype(np.int64), attrs=attrs)
