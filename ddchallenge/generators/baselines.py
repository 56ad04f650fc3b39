"""The two classic baselines every distillation paper compares against.

- random: IPC real training images per class, drawn with the seed (what the
  challenge's sample submission is);
- herding: per class, greedy herding in the feature space of the reference
  ConvNet, randomly initialised with the seed (Welling 2009, as used in the
  dataset-condensation literature): repeatedly add the image that brings the
  mean of the chosen features closest to the class mean.
"""
from __future__ import annotations

import numpy as np
import torch

from ddchallenge.data import load_train, normalise
from ddchallenge.errors import DatasetError
from ddchallenge.evaluation.device import resolve_device
from ddchallenge.evaluation.nets import reference_convnet
from ddchallenge.generators import GenerationRequest, register
from ddchallenge.progress import bar


def _class_members(labels: np.ndarray, k: int, ipc: int) -> np.ndarray:
    members = np.flatnonzero(labels == k)
    if len(members) < ipc:
        smallest = int(np.bincount(labels).min())
        raise DatasetError(f"class {k} has only {len(members)} training images; IPC {ipc} asks for more (real "
                           f"images allow IPC {smallest} at most here)")
    return members


def training_images(req: GenerationRequest) -> tuple[np.ndarray, np.ndarray]:
    """The dataset's training images, read once per run (the method and its matching pool share them)."""
    return req.once(("train",), lambda: load_train(req.spec, req.root))


def training_pool(req: GenerationRequest) -> tuple[np.ndarray, np.ndarray, dict]:
    """What matching (`--match-steps`) pulls a real-image set toward: the class's training images."""
    return (*training_images(req), {"source": "training images"})


@register("random", pool=training_pool)
def random_real(req: GenerationRequest) -> tuple[np.ndarray, np.ndarray]:
    images, labels = training_images(req)
    rng = np.random.default_rng(req.seed)
    picks = []
    for k in range(req.spec.classes):
        picks.append(rng.choice(_class_members(labels, k, req.ipc), req.ipc, replace=False))
        req.check_deadline()
    idx = np.concatenate(picks)
    return images[idx], labels[idx], {}


def herding_order(features: torch.Tensor, count: int) -> list[int]:
    """Greedy herding: indices whose running mean tracks the mean feature."""
    feats = features.double()
    mu = feats.mean(0)
    total = torch.zeros_like(mu)
    chosen: list[int] = []
    available = torch.ones(len(feats), dtype=torch.bool)
    for i in range(count):
        dist = ((mu - (total + feats) / (i + 1)) ** 2).sum(1)
        dist[~available] = float("inf")
        j = int(dist.argmin())
        chosen.append(j)
        available[j] = False
        total += feats[j]
    return chosen


@register("herding", pool=training_pool)
def herding(req: GenerationRequest) -> tuple[np.ndarray, np.ndarray]:
    images, labels = training_images(req)
    device = resolve_device(req.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(req.seed)
        net = reference_convnet(req.spec)
    embed = net.features.to(device).eval()
    picks = []
    for k in bar(range(req.spec.classes), desc=f"herding {req.spec.name}", unit="class"):
        members = _class_members(labels, k, req.ipc)
        feats = []
        with torch.inference_mode():
            for s in range(0, len(members), 500):
                x = normalise(images[members[s:s + 500]], req.spec).to(device)
                feats.append(embed(x).flatten(1).cpu())
        picks.append(members[herding_order(torch.cat(feats), req.ipc)])
        req.check_deadline()
    idx = np.concatenate(picks)
    return images[idx], labels[idx], {}
