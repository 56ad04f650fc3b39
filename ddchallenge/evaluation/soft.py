"""Soft-label measures (issue 23), as DD-Ranking (NUS-HPC-AI-Lab, 2025)
defines them: the evaluation network learns from class probabilities instead
of hard labels, with the KL divergence at a temperature T.

- Mode S (`StoredTargets`): each image's stored probabilities p, softened
  at T: q = softmax(log p / T), i.e. p^(1/T) renormalised. DD-Ranking stores
  a teacher's logits z and uses softmax(z / T); with p = softmax(z) the two
  are the same target. The rows follow their images through every shuffle
  and augmentation (an augmented image keeps its stored label).
- Mode M (`TeacherTargets`): every augmented batch is relabelled by a
  teacher network, q = softmax(teacher(x) / T).

The loss is KL(q || softmax(logits / T)) averaged over the batch
(`kl_loss`), without the T^2 factor of Hinton's distillation, as in
DD-Ranking's `KLDivergenceLoss`. At T = 1 with one-hot q its gradient with
respect to the logits is softmax(logits) - q over the batch size, which is
the cross-entropy's; the kernels are the same too, so a set whose soft
labels are its one-hot labels trains bit for bit as with hard labels
(tests/test_soft_labels.py).

Everything else is the challenge's recipe: the same network, SGD schedule,
DSA and seeds (`train.train_round` with `targets`); the targets draw no
random number.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from ddchallenge.errors import OptionMismatch, UsageError
from ddchallenge.evaluation.train import round_accuracies
from ddchallenge.extras import LABEL_MODES, LABELS_PREFIX, LOSS, MAX_TEMPERATURE, MIN_TEMPERATURE, ExtraScore
from ddchallenge.protocol import EvalRecipe



class SoftLabelsMissing(OptionMismatch):
    """`--labels soft` on an upload without soft labels: the command line
    asks for a measure the upload cannot give. The option's mistake, not the
    upload's: never recorded (a batch counts it as refused)."""


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise UsageError(f"--temperature must be a number from {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g}, got "
                         f"{temperature!r} (1: the probabilities as they are; DD-Ranking's default is 1)")
    return float(temperature)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # At T = 1 no division at all, so that the graph is the cross-entropy's.
    return logits if temperature == 1 else logits / temperature


def kl_loss(logits: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(target || softmax(logits / T)) summed over classes, averaged over
    the batch (`target` rows are probabilities)."""
    return F.kl_div(F.log_softmax(_scaled(logits, temperature), dim=1), target, reduction="batchmean")


def soften(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Stored probabilities (N, K) softened at T: p^(1/T) over its row sum,
    in float32. At T = 1 the rows are only renormalised (float16 storage
    leaves them a few 1e-4 off 1), so a one-hot row stays exactly one-hot."""
    p = probs.to(torch.float32)
    if temperature == 1:
        return p / p.sum(dim=1, keepdim=True)
    # exp((log p - max log p) / T): the largest entry is exp(0) = 1, so nothing overflows or underflows to an
    # all-zero row at any allowed T; zeros stay zeros (log 0 = -inf).
    logp = torch.log(p)
    q = torch.exp((logp - logp.max(dim=1, keepdim=True).values) / temperature)
    return q / q.sum(dim=1, keepdim=True)


class StoredTargets:
    """Mode S: the set's own soft labels, softened once, rows by image index."""

    def __init__(self, soft_labels: torch.Tensor, temperature: float, device: torch.device):
        self.temperature = check_temperature(temperature)
        self.q = soften(soft_labels, self.temperature).to(device)

    def loss(self, logits: torch.Tensor, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return kl_loss(logits, self.q[index], self.temperature)


class TeacherTargets:
    """Mode M: the teacher's softened outputs on the augmented batch."""

    def __init__(self, teacher: torch.nn.Module, temperature: float, device: torch.device):
        self.temperature = check_temperature(temperature)
        self.teacher = teacher.to(device).eval().requires_grad_(False)

    def loss(self, logits: torch.Tensor, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            q = F.softmax(_scaled(self.teacher(images), self.temperature), dim=1)
        return kl_loss(logits, q, self.temperature)


@torch.inference_mode()
def teacher_probabilities(teacher: torch.nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The teacher's class probabilities (T = 1) of normalised images, float32
    (N, K), in batches on the teacher's device."""
    device = next(teacher.parameters()).device
    teacher = teacher.eval()
    out = [F.softmax(teacher(images[s : s + batch_size].to(device, torch.float32)), dim=1).cpu()
           for s in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


def as_soft_labels(probs: torch.Tensor) -> torch.Tensor:
    """float32 probabilities -> float16 rows as stored, renormalised in float32
    first (the float16 rounding then leaves each row within 2^-11 of 1)."""
    p = probs.to(torch.float32).clamp_min(0)
    return (p / p.sum(dim=1, keepdim=True)).to(torch.float16)


def label_row(entry, ref: dict, recipe: EvalRecipe, seed: int, device: torch.device, mode: str, temperature: float,
              teacher: torch.nn.Module | None = None, teacher_settings: dict | None = None,
              progress: bool = True) -> ExtraScore:
    """One soft-label measure of a dataset entry (`submission.DatasetEntry`):
    the challenge's recipe and seeds, the loss of `mode` ("soft": the entry's
    stored soft labels; "teacher": `teacher` relabels every augmented batch)
    at `temperature`. The row's recipe is the evaluation recipe plus the
    mode, T, the loss and, for a teacher, what identifies it."""
    if mode not in LABEL_MODES:
        raise UsageError(f"--labels must be one of {', '.join(LABEL_MODES)}, got {mode!r}")
    temperature = check_temperature(temperature)
    start = time.perf_counter()
    seeds = [seed + r for r in range(recipe.rounds)]
    own = {"labels": mode, "temperature": temperature, "loss": LOSS}
    if mode == "soft":
        if entry.soft_labels is None:
            raise SoftLabelsMissing(missing_message(entry))
        targets = StoredTargets(entry.soft_labels, temperature, device)
    else:
        if teacher is None:
            raise UsageError("--labels teacher needs --teacher DIR (made by `ddchallenge teacher DATASET`)")
        targets = TeacherTargets(teacher, temperature, device)
        own.update(teacher_settings or {})
    accs = round_accuracies(entry.spec, entry.images, entry.labels, ref["images_val"], ref["labels_val"], recipe,
                            seeds, device, progress, desc=f"{entry.spec.name} labels {mode}", together=False,
                            targets=targets)
    return ExtraScore.make(LABELS_PREFIX + mode, entry.spec.name, {**dataclasses.asdict(recipe), **own}, seeds, accs,
                           time.perf_counter() - start)


def missing_message(entry) -> str:
    return (f"{entry.source} has no soft labels for {entry.spec.name}; --labels soft trains on the soft labels a set "
            "carries (a labelled set's /soft_labels, or <dataset>.soft_labels.pt beside a packed file: "
            "`ddchallenge generate --soft-labels teacher`); score without it, or relabel with --teacher DIR")
