"""The labelled-set format (HDF5): what `generate` writes and `pack` and
`score` read. Images are pixels (uint8, or float32 in [0, 1]), not normalised;
labels travel with them, so any IPC and any order is allowed.

    /images       (N, C, H, W) uint8 or float32
    /labels       (N,) int64
    /soft_labels  (N, classes) float16, optional: each image's class probabilities
                  (rows non-negative, summing to 1); absent, the file is what it always was
    attrs: dataset, ipc, method, seed, ddchallenge_version, config (JSON)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from ddchallenge import __version__
from ddchallenge.errors import SubmissionError
from ddchallenge.fileio import atomic_path

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # the first bytes of every HDF5 file: what `generate --force` may replace


@dataclass(frozen=True)
class LabelledSet:
    images: np.ndarray  # (N, C, H, W) uint8, or float32 in [0, 1]
    labels: np.ndarray  # (N,) int64
    attrs: dict  # provenance: dataset, ipc, method, seed, version, config
    soft_labels: np.ndarray | None = None  # (N, classes) float16 probabilities, checked (`check_soft_labels`)

    @property
    def dataset(self) -> str | None:
        return self.attrs.get("dataset")


SOFT_LABELS = "soft_labels"
MAX_SOFT_CLASSES = 1000  # columns of a soft-label array; every known dataset has at most 200 classes
# A float16 probability is stored to 2^-11 relative error, so a row of them sums to 1 within about 2^-11
# (5e-4); twice that leaves room for a writer that normalised in float16 and refuses anything meant otherwise.
SOFT_SUM_TOLERANCE = 2e-3


def check_soft_labels(soft, n: int, classes: int | None, source: str) -> np.ndarray:
    """Soft labels as an upload gives them, checked: float16 (N, classes)
    (`classes` None: any count up to MAX_SOFT_CLASSES), finite, non-negative,
    each row summing to 1 within SOFT_SUM_TOLERANCE. No value is quoted: an
    error is shown to whoever uploaded the file."""
    fix = "store each image's class probabilities as float16 (N, classes), rows summing to 1"
    if not isinstance(soft, np.ndarray) or soft.dtype != np.float16:
        found = soft.dtype if isinstance(soft, np.ndarray) else type(soft).__name__
        raise SubmissionError(f"{source}: soft labels are {found}; {fix}")
    wanted = classes if classes is not None else "classes"
    if soft.ndim != 2 or soft.shape[0] != n or not 2 <= soft.shape[1] <= MAX_SOFT_CLASSES \
            or (classes is not None and soft.shape[1] != classes):
        raise SubmissionError(f"{source}: soft labels have shape {soft.shape}; expected ({n}, {wanted}), one row of "
                              f"class probabilities per image")
    values = soft.astype(np.float64)
    if not np.isfinite(values).all():
        raise SubmissionError(f"{source}: soft labels hold NaN or Inf; {fix}")
    if (values < 0).any():
        raise SubmissionError(f"{source}: soft labels hold negative values; {fix}")
    off = np.abs(values.sum(axis=1) - 1.0)
    if (off > SOFT_SUM_TOLERANCE).any():
        bad = int((off > SOFT_SUM_TOLERANCE).sum())
        raise SubmissionError(f"{source}: {bad} row(s) of soft labels do not sum to 1 (within "
                              f"{SOFT_SUM_TOLERANCE:g}); {fix}")
    return soft


def write_labelled_set(
    path: str | os.PathLike, images: np.ndarray, labels: np.ndarray, *, dataset: str, ipc: int,
    method: str, seed: int, config: dict, soft_labels: np.ndarray | None = None,
) -> Path:
    """Write atomically; the file appears whole or not at all. `soft_labels`
    (N, classes) float16 probabilities are checked as a reader checks them;
    without them the file is byte for byte what it was before they existed."""
    images = np.ascontiguousarray(images)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    if images.dtype not in (np.uint8, np.float32) or images.ndim != 4 or labels.shape != (images.shape[0],):
        raise SubmissionError(
            f"a labelled set needs images (N, C, H, W) uint8 or float32 and labels (N,); got "
            f"{images.dtype} {images.shape} and {labels.shape}"
        )
    if soft_labels is not None:
        soft_labels = check_soft_labels(np.ascontiguousarray(soft_labels), images.shape[0], None, str(path))
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("images", data=images)
            f.create_dataset("labels", data=labels)
            if soft_labels is not None:
                f.create_dataset(SOFT_LABELS, data=soft_labels)
            f.attrs.update({
                "dataset": dataset, "ipc": int(ipc), "method": method, "seed": int(seed),
                "ddchallenge_version": __version__, "config": json.dumps(config, sort_keys=True),
            })
    return Path(path)


def written_here(path: str | os.PathLike) -> bool:
    """Whether `path` is a labelled set this package wrote (images, labels
    and its version attribute): what `generate --force` may replace, where
    any other HDF5 file (a training store, someone's data) is kept."""
    try:
        with h5py.File(path, "r") as f:
            return {"images", "labels"} <= set(f) and "ddchallenge_version" in f.attrs
    except (OSError, ValueError):
        return False


def add_soft_labels(path: str | os.PathLike, soft_labels: np.ndarray, source: dict) -> Path:
    """Rewrite the labelled set at `path` (atomically) with `soft_labels`
    (checked) and a `soft_labels_source` attribute (JSON: what made them);
    its images, labels and other attributes stay as they were."""
    lset = read_labelled_set(path)
    soft = check_soft_labels(np.ascontiguousarray(soft_labels), len(lset.labels), None, str(path))
    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)  # as stored (read_labelled_set decoded them)
    attrs["soft_labels_source"] = json.dumps(source, sort_keys=True)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("images", data=lset.images)
            f.create_dataset("labels", data=lset.labels)
            f.create_dataset(SOFT_LABELS, data=soft)
            f.attrs.update(attrs)
    return Path(path)


# The only filters a labelled set may use: HDF5's built-in deflate, shuffle and
# checksum. Any other filter id would make HDF5 look for a plugin library.
ALLOWED_FILTERS = {h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_FLETCHER32}
MAX_CHUNK_BYTES = 64 << 20  # one chunk is inflated whole, whatever the dataset's shape
MAX_ATTRIBUTES, MAX_ATTRIBUTE_BYTES = 32, 1 << 20

# Never load a filter plugin (the set is untrusted and a plugin is code): the
# filter check below refuses unknown filters first, and no search path is left.
while h5py.h5pl.size():
    h5py.h5pl.remove(0)


@dataclass(frozen=True)
class Header:
    images_shape: tuple[int, ...]
    dataset: str | None  # the dataset the set's attributes name
    soft_labels_shape: tuple[int, ...] | None = None  # of /soft_labels, when the set has them


def _check_self_contained(f: h5py.File, path: Path) -> None:
    """Refuse anything that reaches outside the file or costs more than its
    shape says, before a single value is read: links other than plain ones
    (external, soft, user-defined), virtual datasets, external raw storage,
    layouts other than contiguous or chunked, unknown filters, oversized
    chunks, objects other than /images and /labels."""
    names = list(f.keys())
    for name in names:
        link = f.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise SubmissionError(f"labelled set {path}: /{name} is a link ({type(link).__name__}), which can point "
                                  "outside the file; a labelled set holds its data itself")
    extra = sorted(set(names) - {"images", "labels", SOFT_LABELS})
    if extra:
        raise SubmissionError(f"labelled set {path} holds unexpected object(s) {', '.join(map(repr, extra[:5]))}; "
                              "a labelled set holds /images, /labels and optionally /soft_labels only")
    for name in names:
        obj = f[name]
        if not isinstance(obj, h5py.Dataset):
            raise SubmissionError(f"labelled set {path}: /{name} is not a dataset")
        plist = obj.id.get_create_plist()
        layout = plist.get_layout()
        if layout not in (h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED):
            kind = {h5py.h5d.VIRTUAL: "a virtual dataset", h5py.h5d.COMPACT: "compact"}.get(layout, f"layout {layout}")
            raise SubmissionError(f"labelled set {path}: /{name} is {kind}; only plain contiguous or chunked data "
                                  "inside the file is read")
        if plist.get_external_count():
            raise SubmissionError(f"labelled set {path}: /{name} keeps its data in external files; only data inside "
                                  "the file is read")
        for i in range(plist.get_nfilters()):
            code = plist.get_filter(i)[0]
            if code not in ALLOWED_FILTERS:
                raise SubmissionError(f"labelled set {path}: /{name} uses HDF5 filter {code}; only deflate (gzip), "
                                      "shuffle and fletcher32 are read")
        if obj.chunks is not None and int(np.prod(obj.chunks)) * obj.dtype.itemsize > MAX_CHUNK_BYTES:
            raise SubmissionError(f"labelled set {path}: /{name} has chunks of {obj.chunks}, over "
                                  f"{MAX_CHUNK_BYTES >> 20} MiB each; write it with smaller chunks")
        if obj.dtype.fields is not None or obj.dtype.kind not in "uif" or obj.dtype.itemsize > 8:
            raise SubmissionError(f"labelled set {path}: /{name} has type {obj.dtype}; expected plain numbers")
    if len(f.attrs) > MAX_ATTRIBUTES or any(f.attrs.get_id(a).get_storage_size() > MAX_ATTRIBUTE_BYTES
                                             for a in f.attrs):
        raise SubmissionError(f"labelled set {path} has more than {MAX_ATTRIBUTES} attributes or one over "
                              f"{MAX_ATTRIBUTE_BYTES >> 20} MiB; refused")


def _text_attr(name: str, value, path: Path):
    """An attribute as read, bytes decoded: they must be UTF-8 (the file is untrusted)."""
    if not isinstance(value, bytes):
        return value
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise SubmissionError(f"labelled set {path} has a {name[:60]!r} attribute that is not UTF-8 text; write "
                              "it again with `ddchallenge generate` or write_labelled_set") from None


def read_labelled_set(path: str | os.PathLike, pixels: bool = True,
                      check_header: Callable[[Header], None] | None = None) -> LabelledSet:
    """Read and check the structure (not the class counts: see submission.py).
    pixels=False accepts float images that are already normalised.
    `check_header` sees the shapes and the named dataset before any value is
    read, so an upload's size can be refused before it is inflated."""
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"labelled set not found: {path}")
    try:
        with open(path, "rb") as fh:
            start = fh.read(len(HDF5_SIGNATURE))
    except OSError as exc:
        raise SubmissionError(f"labelled set {path} cannot be read: {exc.strerror or exc}") from None
    if not start:  # named apart, and the same words whichever command reads it
        raise SubmissionError(f"labelled set {path} is empty (0 bytes)")
    if start != HDF5_SIGNATURE:
        raise SubmissionError(f"{path} is not an HDF5 file (it does not start with the HDF5 signature); a labelled "
                              "set is the .h5 file `ddchallenge generate` writes")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("images", "labels") if k not in f]
            if missing:
                raise SubmissionError(
                    f"labelled set {path} has no dataset {' or '.join(missing)}; expected /images (N, C, H, W) "
                    "and /labels (N,), as `ddchallenge generate` writes"
                )
            _check_self_contained(f, path)
            attrs = {k: _text_attr(k, v, path) for k, v in f.attrs.items()}
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}
            arrays = sorted(k for k, v in attrs.items() if not isinstance(v, (str, int, float, bool)))
            if arrays:  # provenance is text and numbers: an array would reach every reader of the attributes
                raise SubmissionError(f"labelled set {path} has attribute(s) "
                                      f"{', '.join(repr(k[:60]) for k in arrays[:3])} that are not text or a number; "
                                      "write it again with `ddchallenge generate` or write_labelled_set")
            shape, label_shape = f["images"].shape, f["labels"].shape
            if len(shape) != 4 or label_shape != shape[:1]:
                raise SubmissionError(f"labelled set {path} has images {shape} and labels {label_shape}; expected "
                                      "(N, C, H, W) and (N,)")
            soft_shape = tuple(f[SOFT_LABELS].shape) if SOFT_LABELS in f else None
            # The shape is checked before the values are read: a header cannot make the reader inflate more
            # than N x MAX_SOFT_CLASSES float16 values.
            if soft_shape is not None and (len(soft_shape) != 2 or soft_shape[0] != shape[0]
                                           or not 2 <= soft_shape[1] <= MAX_SOFT_CLASSES):
                raise SubmissionError(f"labelled set {path}: soft labels have shape {soft_shape}; expected "
                                      f"({shape[0]}, classes), one row of class probabilities per image")
            if check_header is not None:
                named = attrs.get("dataset")
                check_header(Header(tuple(shape), named if isinstance(named, str) else None, soft_shape))
            images, labels = f["images"][()], f["labels"][()]
            soft = f[SOFT_LABELS][()] if soft_shape is not None else None
    except OSError as exc:
        raise SubmissionError(f"{path} is not a readable HDF5 labelled set (truncated or corrupt: "
                              f"{str(exc)[:200]})") from None
    if "config" in attrs:
        try:
            attrs["config"] = json.loads(attrs["config"])
        except (TypeError, ValueError, RecursionError):
            raise SubmissionError(f"labelled set {path} has a config attribute that is not JSON") from None
    if not isinstance(attrs.get("method", ""), str):
        raise SubmissionError(f"labelled set {path} has a method attribute that is not text")
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
            # No values in the message: an error is shown to whoever uploaded the file.
            raise SubmissionError(
                f"labelled set {path} has float images outside [0, 1]; a labelled set holds pixels, uint8 or float "
                "in [0, 1], not normalised values (`ddchallenge pack --input-normalised` packs normalised ones)"
            )
    else:
        raise SubmissionError(f"labelled set {path} has images of type {images.dtype}; expected uint8 or float32")
    if soft is not None:
        soft = check_soft_labels(soft, images.shape[0], None, f"labelled set {path}")
    return LabelledSet(images=images, labels=labels.astype(np.int64), attrs=attrs, soft_labels=soft)
