"""Distribution matching (Zhao & Bilen, "Dataset Condensation with
Distribution Matching", WACV 2023): move a set's pixels so that, in the
features of freshly initialised reference ConvNets, each class's mean
matches the mean of a pool of the same class.

Each step draws a new network (its own seed), one DSA group for the step
(the evaluation's augmentations, so what is matched is what training will
see; one draw shared by pool and kept images, DM's Siamese augmentation),
MATCH_BATCH pool images per class, and takes one SGD step on the images in
normalised space (lr 1, momentum 0.5, as in the DM paper). The images start
from the caller's own, so a few hundred steps refine them rather than draw
from scratch. Matching is anytime: the images are valid after every step,
and at a deadline it keeps what it has and records the steps done.

Two callers, each with its own pool: Track 2 generation
(generators/matching.py: the pool the model draws in the run, or a
real-image baseline's training images) and `prototypes --fit-steps`
(diffusion/prototypes.py: a d4m table fitted to the class's training images
before any run, as d3m's `invert` fits its vectors).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ddchallenge.data import normalise
from ddchallenge.data.reference import denormalise
from ddchallenge.errors import UsageError
from ddchallenge.evaluation.augment import apply_group, draw_params, parse_strategy
from ddchallenge.evaluation.nets import reference_convnet
from ddchallenge.progress import bar
from ddchallenge.protocol import OFFICIAL, DatasetSpec, stream_seed

MATCH_BATCH = 64  # pool images per class in each step
MATCH_LR, MATCH_MOMENTUM = 1.0, 0.5  # the DM paper's image optimiser
CHUNK_IMAGES = 4096  # pool images per forward pass: bounds activation memory on 200-class datasets


def match(images: np.ndarray, labels: np.ndarray, pool: np.ndarray, pool_labels: np.ndarray, spec: DatasetSpec,
          steps: int, seed: int, device: torch.device, deadline: float | None = None,
          desc: str = "matching") -> tuple[np.ndarray, dict]:
    """`images` (uint8, class-major, `labels`) refined for up to `steps`
    steps toward the class means of `pool`; returns uint8 images of the same
    shape and a provenance record. With a `deadline` (time.monotonic()) a
    step starts only if one more step, at the pace measured so far, ends
    before it; the record says how many ran."""
    classes = spec.classes
    members = [np.flatnonzero(pool_labels == k) for k in range(classes)]
    if any(len(m) == 0 for m in members):
        raise UsageError(f"the matching pool has no image of class {next(k for k, m in enumerate(members) if not len(m))}")
    syn = normalise(images, spec).to(device).requires_grad_(True)
    kept = [torch.from_numpy(np.flatnonzero(labels == k)).to(device) for k in range(classes)]
    real = torch.from_numpy(pool)  # uint8 on the host; each step moves only its batch
    optimiser = torch.optim.SGD([syn], lr=MATCH_LR, momentum=MATCH_MOMENTUM)
    groups = parse_strategy(OFFICIAL.dsa_strategy)
    per_chunk = max(1, CHUNK_IMAGES // MATCH_BATCH)
    losses = []
    began = time.monotonic()
    for step in bar(range(steps), desc=desc, unit="step"):
        pace = (time.monotonic() - began) / step if step else 0.0
        if deadline is not None and time.monotonic() + pace > deadline:
            break
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(seed, "matching", step, 1))
            net = reference_convnet(spec)
        embed = net.features.to(device).requires_grad_(False)
        host = np.random.default_rng(stream_seed(seed, "matching", step, 2))
        draws = torch.Generator(device).manual_seed(stream_seed(seed, "matching", step, 3))
        group = groups[host.integers(len(groups))]
        # Siamese augmentation, as in DM: one draw of the group for the whole step, applied alike to pool and
        # kept images, so the two means are compared under the same transformation.
        drawn = draw_params(group, 1, *spec.image_shape[1:], draws)

        def same(x: torch.Tensor) -> torch.Tensor:
            return apply_group(group, x, {k: v.expand(len(x), *v.shape[1:]) for k, v in drawn.items()})

        optimiser.zero_grad(set_to_none=True)
        total = 0.0
        for first in range(0, classes, per_chunk):
            chunk = range(first, min(classes, first + per_chunk))
            counts = [min(MATCH_BATCH, len(members[k])) for k in chunk]
            batch = np.concatenate([host.choice(members[k], n, replace=False) for k, n in zip(chunk, counts)])
            with torch.no_grad():
                x = normalise(real[batch], spec).to(device)
                target = embed(same(x)).flatten(1)
                target = torch.stack([t.mean(0) for t in target.split(counts)])
            mine = torch.cat([kept[k] for k in chunk])
            feats = embed(same(syn[mine])).flatten(1)
            means = torch.stack([f.mean(0) for f in feats.split([len(kept[k]) for k in chunk])])
            loss = ((target - means) ** 2).sum()
            loss.backward()
            total += loss.item()
        optimiser.step()
        losses.append(total)
    out = (denormalise(syn.detach().cpu(), spec) * 255).round().to(torch.uint8).numpy()
    record = {"steps": steps, "steps_done": len(losses), "stopped_by_deadline": len(losses) < steps,
              "pool_per_class": int(min(len(m) for m in members)), "batch_per_class": MATCH_BATCH,
              "lr": MATCH_LR, "momentum": MATCH_MOMENTUM, "seed": seed, "features": "reference ConvNet, a fresh "
              "initialisation per step", "augmentation": OFFICIAL.dsa_strategy + ", one Siamese draw per step"}
    if losses:
        record["loss_first_last"] = [float(np.mean(losses[:10])), float(np.mean(losses[-10:]))]
    return out, record
