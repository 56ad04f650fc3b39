"""Datasets: the embedded mnist5k digits, reference test sets and normalisation."""
from ddchallenge.data.reference import (
    data_root,
    denormalise,
    load_reference,
    load_train,
    normalise,
    save_reference,
)

__all__ = ["data_root", "denormalise", "load_reference", "load_train", "normalise", "save_reference"]
