"""The fast trainer: one evaluation round of the official recipe.

Same computation as the official loop (shuffled batches of 256, DSA in single
mode, SGD with the lr drop and a fresh optimiser after pass epochs//2+1, test
accuracy after the last pass), without what makes the official loop slow: no
DataLoader (batches are index slices of one tensor already on the device), no
per-image Python loops in the augmentation, no `.item()` or other host
synchronisation until the round ends.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ddchallenge.evaluation.augment import augment, parse_strategy
from ddchallenge.evaluation.device import training_numerics
from ddchallenge.evaluation.nets import reference_convnet
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


def train_round(
    spec: DatasetSpec,
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: EvalRecipe,
    seed: int,
    device: torch.device,
    progress: bool = True,
    desc: str = "train",
) -> torch.nn.Module:
    """Train a fresh reference ConvNet on (images, labels) with the recipe."""
    seeds = RoundSeeds.from_seed(seed)
    groups = parse_strategy(recipe.dsa_strategy)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeds.init)
        net = reference_convnet(spec, recipe.width, recipe.depth)
    net = net.to(device).train()
    x = images.to(device, torch.float32)
    y = labels.to(device, torch.int64)
    n = x.shape[0]
    shuffle_gen = torch.Generator(device=device).manual_seed(seeds.shuffle)
    aug_gen = torch.Generator(device=device).manual_seed(seeds.augment)
    group_gen = torch.Generator().manual_seed(seeds.groups)
    batches = -(-n // recipe.batch_size)

    def new_optimiser(lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(net.parameters(), lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)

    lr = recipe.lr
    opt = new_optimiser(lr)
    with training_numerics(device):
        for ep in tqdm(range(recipe.passes), desc=desc, unit="ep", disable=not progress, leave=False):
            order = torch.randperm(n, device=device, generator=shuffle_gen)
            choice = torch.randint(len(groups) or 1, (batches,), generator=group_gen).tolist()
            for b in range(batches):
                idx = order[b * recipe.batch_size : (b + 1) * recipe.batch_size]
                xb = x[idx]
                if groups:
                    xb = augment(xb, groups[choice[b]], aug_gen)
                loss = F.cross_entropy(net(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if ep == recipe.lr_drop_epoch:
                # The official loop builds a new optimiser: momentum restarts.
                lr *= recipe.lr_drop_factor
                opt = new_optimiser(lr)
    return net.eval()


@torch.inference_mode()
def accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of correctly classified test images, no augmentation."""
    device = next(net.parameters()).device
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for s in range(0, images.shape[0], batch_size):
        xb = images[s : s + batch_size].to(device, torch.float32)
        yb = labels[s : s + batch_size].to(device)
        correct += (net(xb).argmax(1) == yb).sum()
    return correct.item() / images.shape[0]
