"""The fast trainer: the evaluation rounds of the official recipe, one at a
time (`train_round`) or a dataset's rounds together as one batched model
(`train_rounds`).

Same computation as the official loop (shuffled batches of 256, DSA in single
mode, SGD with the lr drop and a fresh optimiser after pass epochs//2+1, test
accuracy after the last pass), without what makes the official loop slow: no
DataLoader (batches are index slices of one tensor already on the device), no
per-image Python loops in the augmentation, no `.item()` or other host
synchronisation until the round ends.

Both paths draw every random number of round r from the same four streams
(`RoundSeeds`), in the same order, through the same helpers (`_Round`), so
training rounds together gives each round what it gives alone, up to the
summation order of the grouped kernels (tests/test_train.py checks it).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ddchallenge.errors import UsageError
from ddchallenge.evaluation.augment import augment, parse_strategy
from ddchallenge.evaluation.device import keep_freed_memory, training_numerics
from ddchallenge.evaluation.nets import StackedConvNet, reference_convnet
from ddchallenge.evaluation.pool import build as build_arch
from ddchallenge.progress import bar
from ddchallenge.protocol import DatasetSpec, EvalRecipe


@dataclass(frozen=True)
class RoundSeeds:
    """The independent random streams of one round, all derived from its seed."""

    init: int  # network initialisation (CPU RNG)
    shuffle: int  # batch order, on the training device
    augment: int  # DSA per-image draws, on the training device
    groups: int  # DSA group per batch, on the CPU so it never waits on the device

    @classmethod
    def from_seed(cls, seed: int) -> "RoundSeeds":
        return cls(*(int(s) for s in np.random.SeedSequence(seed).generate_state(4)))


class _Round:
    """One round's network and random streams, made the same way for both paths."""

    def __init__(self, spec: DatasetSpec, recipe: EvalRecipe, seed: int, device: torch.device,
                 arch: str = "convnet"):
        seeds = RoundSeeds.from_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeds.init)
            # "convnet" is reference_convnet itself; another pool network draws its weights from the same stream
            self.net = reference_convnet(spec, recipe.width, recipe.depth) if arch == "convnet" \
                else build_arch(arch, spec, recipe.width, recipe.depth)
        self.shuffle_gen = torch.Generator(device=device).manual_seed(seeds.shuffle)
        self.aug_gen = torch.Generator(device=device).manual_seed(seeds.augment)
        self.group_gen = torch.Generator().manual_seed(seeds.groups)

    def epoch_plan(self, n: int, batches: int, groups: tuple[str, ...], device: torch.device):
        """This pass's batch order (on the device) and DSA group per batch (CPU)."""
        order = torch.randperm(n, device=device, generator=self.shuffle_gen)
        choice = torch.randint(len(groups) or 1, (batches,), generator=self.group_gen).tolist()
        return order, choice

    def batch(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, group: str | None):
        xb = x[idx]
        if group is not None:
            xb = augment(xb, group, self.aug_gen)
        return xb, y[idx]


def _sgd(params, lr: float, recipe: EvalRecipe) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def _optimise(params: list[torch.Tensor], losses, recipe: EvalRecipe, device: torch.device, progress: bool,
              desc: str) -> None:
    """The official schedule, shared by one round and rounds together:
    `recipe.passes` passes, each one SGD step per loss that `losses()`
    yields (its batches, drawn as the pass begins), and a new optimiser after
    the lr-drop pass, as the official loop builds one: momentum restarts."""
    lr = recipe.lr
    opt = _sgd(params, lr, recipe)
    with training_numerics(device):
        for ep in bar(range(recipe.passes), desc=desc, unit="ep", show=progress, leave=False):
            for loss in losses():
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if ep == recipe.lr_drop_epoch:
                lr *= recipe.lr_drop_factor
                opt = _sgd(params, lr, recipe)


def train_round(
    spec: DatasetSpec,
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: EvalRecipe,
    seed: int,
    device: torch.device,
    progress: bool = True,
    desc: str = "train",
    targets=None,
    arch: str = "convnet",
) -> torch.nn.Module:
    """Train a fresh reference ConvNet (or `arch` of the evaluation pool,
    ddchallenge.evaluation.pool) on (images, labels) with the recipe.
    `targets` None: hard labels and cross-entropy, the challenge's loss; else
    an object whose `loss(logits, images, index)` is the batch's loss (soft
    labels, `ddchallenge.evaluation.soft`). It draws no random number, so the
    round's batches and augmentations are the hard-label round's."""
    groups = parse_strategy(recipe.dsa_strategy)
    rnd = _Round(spec, recipe, seed, device, arch)
    net = rnd.net.to(device).train()
    x = images.to(device, torch.float32)
    y = labels.to(device, torch.int64)
    n = x.shape[0]
    batches = -(-n // recipe.batch_size)

    def losses():
        order, choice = rnd.epoch_plan(n, batches, groups, device)
        for b in range(batches):
            idx = order[b * recipe.batch_size : (b + 1) * recipe.batch_size]
            xb, yb = rnd.batch(x, y, idx, groups[choice[b]] if groups else None)
            logits = net(xb)
            yield F.cross_entropy(logits, yb) if targets is None else targets.loss(logits, xb, idx)

    _optimise(list(net.parameters()), losses, recipe, device, progress, desc)
    return net.eval()


def train_rounds(
    spec: DatasetSpec,
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: EvalRecipe,
    seeds: Sequence[int],
    device: torch.device,
    progress: bool = True,
    desc: str = "train",
    compile: bool = False,
) -> list[torch.nn.Module]:
    """Train one fresh reference ConvNet per seed on (images, labels), all
    rounds together as one batched model (`StackedConvNet`); returns the R
    trained networks in eval mode, as `train_round` would for each seed.

    Each round keeps its own initialisation, batch order, DSA group choices
    and per-image DSA draws (the streams `train_round` uses, drawn in the same
    order), and its own slice of every parameter and momentum buffer: SGD with
    momentum and weight decay is elementwise, and the lr drop re-creates the
    optimiser for all rounds at the same pass, as each round alone does.

    `compile=True` wraps the batched forward in `torch.compile` (on CUDA in
    "reduce-overhead" mode, which captures the step's kernels in CUDA graphs;
    the smaller last batch of an epoch is a second graph). On an H100 it is
    the fastest way measured to train a CIFAR-100-shaped set's rounds (1.7x
    a round alone) and second at the Tiny shape (1.6x), after a 20-30 s
    compilation (docs/benchmarks.md, "On an H100"); it becomes a CUDA
    default only after its accuracy A/B (bench/fidelity.py --arms
    rounds-graph), which no GPU session has run yet.
    """
    seeds = list(seeds)
    if not seeds:
        raise UsageError("train_rounds needs at least one seed")
    groups = parse_strategy(recipe.dsa_strategy)
    rounds = [_Round(spec, recipe, s, device) for s in seeds]
    stacked = StackedConvNet([r.net for r in rounds]).to(device).train()
    forward = stacked
    if compile:
        forward = torch.compile(stacked, mode="reduce-overhead" if device.type == "cuda" else "default")
    x = images.to(device, torch.float32)
    y = labels.to(device, torch.int64)
    n = x.shape[0]
    batches = -(-n // recipe.batch_size)

    def losses():
        plans = [r.epoch_plan(n, batches, groups, device) for r in rounds]
        for b in range(batches):
            sl = slice(b * recipe.batch_size, (b + 1) * recipe.batch_size)
            xs, ys = zip(*(r.batch(x, y, order[sl], groups[choice[b]] if groups else None)
                           for r, (order, choice) in zip(rounds, plans)))
            logits = forward(torch.stack(xs))
            # The sum of the rounds' mean losses: d(sum)/d(round r's slice)
            # is round r's own gradient.
            yield sum(F.cross_entropy(logits[i], ys[i]) for i in range(len(rounds)))

    _optimise(list(stacked.parameters()), losses, recipe, device, progress, desc)
    nets = stacked.unstack([r.net.to(device) for r in rounds])
    return [net.eval() for net in nets]


MAX_ROUNDS_TOGETHER = 8  # rounds in one batched model; more run as further groups (~2.5 GiB a round at 64 px)


def together_by_default(device: torch.device) -> bool:
    """Whether `round_accuracies` trains a dataset's rounds together when not told.

    CPU: no. Measured on the 2-core development machine (docs/benchmarks.md),
    three rounds together are 5 % (mnist5k) to 14 % (CIFAR-100 shape) slower
    than three alone, and two as fast as two alone at the Tiny-ImageNet
    shape: oneDNN's grouped convolution, above all its weight gradient, is
    slower than R plain ones, and a CPU step is compute-bound, so there is
    no launch overhead to save.
    CUDA: no, measured on an H100 (session 11, docs/benchmarks.md): three
    rounds together are as fast as three alone at the CIFAR-100 shape (15
    ms per round-epoch either way) and 9 % slower at the Tiny shape (106
    against 97 ms): both steps are bound by the GPU's kernels, not by their
    launches, so batching the rounds saves nothing by itself. Together pays
    only inside CUDA graphs (`train_rounds(compile=True)`), which waits on
    its accuracy A/B.
    """
    return False


def round_accuracies(
    spec: DatasetSpec,
    images: torch.Tensor,
    labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    recipe: EvalRecipe,
    seeds: Sequence[int],
    device: torch.device,
    progress: bool = True,
    desc: str = "train",
    together: bool | None = None,
    targets=None,
    arch: str = "convnet",
) -> list[float]:
    """Test accuracy of one round per seed, rounds trained alone or together
    (`together=None`: `together_by_default(device)`); the same numbers either
    way up to float summation order. `targets`: see `train_round` (rounds
    then train one at a time). `arch`: the network of the evaluation pool
    (default the challenge's ConvNet); only the ConvNet stacks, so any other
    trains its rounds alone."""
    seeds = list(seeds)
    if together is not None and not isinstance(together, bool):
        raise UsageError(f"together must be True, False or None (the device's default), got {together!r}")
    if targets is not None and together:
        raise UsageError("soft-label training runs rounds one at a time; drop together=True")
    if arch != "convnet" and together:
        raise UsageError(f"{arch} trains its rounds one at a time; drop together=True")
    if together is None:
        together = together_by_default(device) and targets is None and arch == "convnet"
    accs: list[float] = []
    if together:
        for start in range(0, len(seeds), MAX_ROUNDS_TOGETHER):
            group = seeds[start : start + MAX_ROUNDS_TOGETHER]
            label = f"{desc} rounds {start + 1}-{start + len(group)}/{len(seeds)}"
            for net in train_rounds(spec, images, labels, recipe, group, device, progress, label):
                accs.append(accuracy(net, test_images, test_labels, recipe.eval_batch_size))
        return accs
    for r, s in enumerate(seeds):
        net = train_round(spec, images, labels, recipe, s, device, progress, desc=f"{desc} round {r + 1}/{len(seeds)}",
                          targets=targets, arch=arch)
        accs.append(accuracy(net, test_images, test_labels, recipe.eval_batch_size))
    return accs


@torch.inference_mode()
def accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of correctly classified test images, no augmentation."""
    device = next(net.parameters()).device
    correct = torch.zeros((), dtype=torch.int64, device=device)
    # A CPU test batch's activations are 512 MiB: keep them, as training does.
    with keep_freed_memory() if device.type == "cpu" else contextlib.nullcontext():
        for s in range(0, images.shape[0], batch_size):
            xb = images[s : s + batch_size].to(device, torch.float32)
            yb = labels[s : s + batch_size].to(device)
            correct += (net(xb).argmax(1) == yb).sum()
    return correct.item() / images.shape[0]
