"""Reference test sets in the official format, and the normalisation that
turns pixels into what the evaluator trains and tests on."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ddchallenge.data import mnist5k
from ddchallenge.errors import DatasetError
from ddchallenge.fileio import atomic_torch_save, load_torch_bytes, read_limited
from ddchallenge.protocol import VALIDATION_SHARE, DatasetSpec, get_dataset, stream_seed

DATA_ENV = "DDCHALLENGE_DATA"


def data_root() -> Path:
    """$DDCHALLENGE_DATA, else the per-user cache folder."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "ddchallenge"


def normalise(pixels: torch.Tensor | np.ndarray, spec: DatasetSpec) -> torch.Tensor:
    """uint8 in [0, 255] or float in [0, 1] -> float32 normalised with the
    dataset's mean and std, as the official files are."""
    x = torch.as_tensor(pixels)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return (x - mean) / std


def denormalise(x: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """Normalised float -> float pixels in [0, 1] (clamped)."""
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return (x.float() * std + mean).clamp(0, 1)


def embedded_reference(spec: DatasetSpec) -> dict[str, torch.Tensor]:
    images, labels = mnist5k.load("test")
    return {"images_val": normalise(images, spec), "labels_val": torch.from_numpy(labels)}


def validate_reference(ref, spec: DatasetSpec, source: str) -> dict[str, torch.Tensor]:
    expected = f'a dict {{"images_val": float (N, {", ".join(map(str, spec.image_shape))}), "labels_val": int64 (N,)}}'
    if not isinstance(ref, dict) or not {"images_val", "labels_val"} <= set(ref):
        raise DatasetError(f"reference test set {source} is not {expected}")
    x, y = ref["images_val"], ref["labels_val"]
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise DatasetError(f"reference test set {source} is not {expected}")
    if not x.is_floating_point() or x.dim() != 4 or tuple(x.shape[1:]) != spec.image_shape:
        raise DatasetError(f"reference test set {source} has images {x.dtype} {tuple(x.shape)}; expected {expected}")
    if y.dtype not in (torch.int64, torch.int32) or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise DatasetError(f"reference test set {source} has labels {y.dtype} {tuple(y.shape)}; expected {expected}")
    if int(y.min()) < 0 or int(y.max()) >= spec.classes:
        raise DatasetError(f"reference test set {source} has labels outside 0..{spec.classes - 1}")
    if not torch.isfinite(x).all():
        raise DatasetError(f"reference test set {source} holds NaN or Inf values")
    return {"images_val": x.float(), "labels_val": y.long()}


def held_out(labels: np.ndarray, classes: int) -> np.ndarray:
    """The rows of a base dataset's training images that its validation view
    holds out: in each class, a seeded draw of one in VALIDATION_SHARE (at
    least one), the same on every machine."""
    mask = np.zeros(len(labels), dtype=bool)
    for k in range(classes):
        members = np.flatnonzero(labels == k)
        count = max(1, len(members) // VALIDATION_SHARE)
        rng = np.random.default_rng(stream_seed(0, "validation", k))
        mask[rng.choice(members, size=count, replace=False)] = True
    return mask


def _validation_split(spec: DatasetSpec, root) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, held-out mask) of the base of a validation view."""
    base = get_dataset(spec.validation_of)
    images, labels = load_train(base, root)
    return images, labels, held_out(labels, base.classes)


def load_reference(spec: DatasetSpec, ref_dir: str | os.PathLike | None = None,
                   root: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The reference test set of a dataset: `ref_dir/<name>_test.pt` when a
    folder is given, else the data root's, else (mnist5k only) built from the
    embedded data. A validation view's is the share of its base's training
    images it holds out, read from the training store in `root` (default:
    the data root), where the command's --root says."""
    if spec.validation_of is not None:
        if ref_dir is not None:  # it would be ignored, and a result would claim a test set it never used
            from ddchallenge.errors import OptionMismatch

            raise OptionMismatch(f"--ref names a folder of test sets, and {spec.name}'s test set is the share of "
                                 f"{spec.validation_of}'s training images it holds out; score {spec.name} without "
                                 "--ref")
        images, labels, held = _validation_split(spec, root)
        return {"images_val": normalise(images[held], spec), "labels_val": torch.from_numpy(labels[held])}
    folder = Path(ref_dir) if ref_dir is not None else data_root()
    path = folder / spec.reference_file
    if ref_dir is not None and not path.exists() and not path.is_symlink():
        fix = "drop --ref: mnist5k's is built in" if spec.name == "mnist5k" else \
            f"`ddchallenge data prepare {spec.name} --root DIR` writes it in DIR), or drop --ref to use the data root's"
        raise DatasetError(f"reference test set not found: {path}; place {spec.reference_file} in {Path(ref_dir)} "
                           + ("or " if spec.name == "mnist5k" else "(") + fix)
    if path.exists() or ref_dir is not None:
        data = read_limited(path, DatasetError, "reference test set")
        return validate_reference(load_torch_bytes(data, str(path), DatasetError), spec, str(path))
    if spec.name == "mnist5k":
        return embedded_reference(spec)
    raise DatasetError(
        f"no reference test set for {spec.name}: {path} does not exist; run `ddchallenge data prepare "
        f"{spec.name} --download`, place the official {spec.reference_file} there, or pass --ref DIR"
    )


def digest_test_set(ref: dict) -> str:
    """sha256 of a reference test set's tensors (dtype, shape and bytes of
    images and labels): the test set a score, a cached accuracy or a record
    was measured on, whichever file, folder or built-in copy it came from."""
    h = hashlib.sha256()
    for name in ("images_val", "labels_val"):
        t = ref[name].detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.numpy())  # the buffer itself: no copy of a test set of hundreds of MB
    return h.hexdigest()


def current_test_set_digest(name: str, ref_dir: str | os.PathLike | None, root: str | os.PathLike | None,
                            cache: dict[str, str]) -> str:
    """`digest_test_set` of dataset `name`'s test set as `score` would load it
    now (`load_reference`), computed once per `cache` (a batch reads each
    test set once). Raises what `load_reference` raises."""
    if name not in cache:
        cache[name] = digest_test_set(load_reference(get_dataset(name), ref_dir, root))
    return cache[name]


def save_reference(spec: DatasetSpec, path: str | os.PathLike) -> Path:
    """Write a dataset's reference test set in the official format (mnist5k:
    from the embedded data)."""
    if spec.name != "mnist5k":
        raise DatasetError(f"only the embedded mnist5k reference can be written here, not {spec.name}")
    atomic_torch_save(embedded_reference(spec), path)
    return Path(path)


def train_store_path(spec: DatasetSpec, root: str | os.PathLike | None = None) -> Path:
    return (Path(root) if root is not None else data_root()) / f"{spec.name}_train.h5"


def load_train(spec: DatasetSpec, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Training images (uint8 (N, C, H, W)) and labels (int64 (N,)) of a
    dataset: mnist5k from the embedded data, the others from the HDF5
    training store `<root>/<name>_train.h5` (datasets /images and /labels);
    a validation view's are its base's minus the share it holds out."""
    if spec.validation_of is not None:
        images, labels, held = _validation_split(spec, root)
        return images[~held], labels[~held]
    if spec.name == "mnist5k":
        return mnist5k.load("train")
    return _read_store(spec, root, images=True)


def class_sizes(spec: DatasetSpec, root: str | os.PathLike | None = None) -> np.ndarray:
    """Training images per class (int64 (classes,)), reading only the labels:
    what a real-image subset of some IPC can draw from."""
    base = get_dataset(spec.validation_of) if spec.validation_of is not None else spec
    labels = mnist5k.load("train")[1] if base.name == "mnist5k" else _read_store(base, root, images=False)[1]
    if spec.validation_of is not None:
        labels = labels[~held_out(labels, base.classes)]
    return np.bincount(labels, minlength=spec.classes)


def _read_store(spec: DatasetSpec, root, images: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """(images or None, labels) of a training store, checked against `spec`."""
    path = train_store_path(spec, root)
    if not path.is_file():
        raise DatasetError(
            f"no training images for {spec.name}: {path} does not exist; run `ddchallenge data prepare "
            f"{spec.name} --download` (or pass --root DIR where it was prepared)"
        )
    import h5py

    try:
        with h5py.File(path, "r") as f:
            labels = f["labels"][()].astype(np.int64)
            dtype, shape = f["images"].dtype, f["images"].shape
            pixels = f["images"][()] if images else None
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"training store {path} is not readable ({exc}); write it again") from None
    if dtype != np.uint8 or shape[1:] != spec.image_shape or labels.shape != shape[:1] \
            or (len(labels) and not 0 <= labels.min() <= labels.max() < spec.classes):
        raise DatasetError(
            f"training store {path} holds {dtype} {shape} images and {labels.shape} labels; "
            f"expected uint8 (N, {', '.join(map(str, spec.image_shape))}) and (N,) labels from 0 to {spec.classes - 1}"
        )
    empty = np.flatnonzero(np.bincount(labels, minlength=spec.classes) == 0)
    if len(empty):
        raise DatasetError(f"training store {path} has no images of class {int(empty[0])}; write it again with "
                           f"`ddchallenge data prepare {spec.name}`")
    return pixels, labels
