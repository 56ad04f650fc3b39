"""D3M class vectors (textual inversion for a class-conditional UNet): K new
conditioning vectors per class, learned with the denoiser frozen.

The class's training images are split into K groups by k-means in the
denoiser's space; vector j of class k starts as the class's own embedding
row and is trained on the diffusion loss (the training objective, same
noise schedule and target) over group j only, so each vector comes to
stand for one part of the class. `generate --method d3m` spreads a class's
IPC images over its K vectors.

How a vector replaces the label: UNet2DModel adds `class_embedding(label)`
to the time embedding. The model's nn.Embedding (classes + 1 rows, the last
the null class) is swapped for one with the K x classes learned rows
appended (`extend_embedding`), and an image is conditioned on vector j of
class k by the label `classes + 1 + k * K + j`. Nothing else in the UNet or
its forward pass changes; guidance still uses the null row.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddchallenge.diffusion.codebook import model_folder, store
from ddchallenge.diffusion.encode import encode_training
from ddchallenge.diffusion.model import Generator, generator_dataset, load_generator
from ddchallenge.errors import UsageError
from ddchallenge.kmeans import kmeans
from ddchallenge.progress import bar
from ddchallenge.diffusion.prototypes import track2_section
from ddchallenge.protocol import MAX_IPC, get_dataset, stream_seed
from ddchallenge.evaluation.device import resolve_device

DEFAULT_STEPS = 300
DEFAULT_BATCH = 64
DEFAULT_LR = 5e-3  # Adam on a handful of vectors: the embeddings' scale is ~0.1-1, so this moves them in tens of steps
PURPOSE = "d3m class vectors: image i of class k is conditioned on vector i mod K of class k"


def codebook_name(per_class: int) -> str:
    return f"d3m-k{per_class}"


def make_command(folder: str | Path, per_class: int) -> str:
    return f"ddchallenge invert {folder} --per-class {per_class}"


def class_embedding(gen: Generator) -> torch.nn.Embedding:
    emb = getattr(gen.unet, "class_embedding", None)
    if not isinstance(emb, torch.nn.Embedding):
        raise UsageError("this model's UNet has no class-embedding table (num_class_embeds); D3M needs one")
    return emb


class _Extended(torch.nn.Module):
    """The frozen class table followed by trainable rows, looked up as one."""

    def __init__(self, base: torch.Tensor, extra: torch.Tensor):
        super().__init__()
        self.register_buffer("base", base)
        self.extra = torch.nn.Parameter(extra)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(labels, torch.cat([self.base, self.extra]))


def extend_embedding(gen: Generator, vectors: torch.Tensor) -> torch.Tensor:
    """Append `vectors` (classes, K, D) to the UNet's class table; returns
    the (classes, K) labels that select them."""
    emb = class_embedding(gen)
    classes, per_class, dim = vectors.shape
    table = torch.cat([emb.weight.detach(), vectors.to(emb.weight.device, emb.weight.dtype).reshape(-1, dim)])
    gen.unet.class_embedding = torch.nn.Embedding.from_pretrained(table, freeze=True)
    first = emb.num_embeddings
    return first + torch.arange(classes * per_class).reshape(classes, per_class)


@dataclass(frozen=True)
class InvertReport:
    path: Path  # the safetensors file written
    per_class: int
    steps: int
    first_loss: float  # mean diffusion loss over the first 10 steps
    last_loss: float  # ... and over the last 10
    seconds: float


MAX_STEPS, MAX_BATCH = 1_000_000, 65_536  # far past any useful run; beyond, a typo would run for days


def invert(ref: str, per_class: int, steps: int = DEFAULT_STEPS, seed: int = 0, device: str = "auto", root=None,
           batch_size: int = DEFAULT_BATCH, lr: float = DEFAULT_LR, oversample: float | None = None,
           match_steps: int | None = None, make_default: bool = False) -> InvertReport:
    """Learn and store K = `per_class` vectors per class. With
    `make_default` the folder's Track 2 method becomes d3m with K,
    `oversample` and `match_steps`; otherwise it is left as it was."""
    if not 1 <= per_class <= MAX_IPC:
        raise UsageError(f"--per-class must be between 1 and {MAX_IPC} (the largest IPC a Track 2 run may output: a "
                         f"generator may not carry more rows per class than it makes), got {per_class}")
    if not (1 <= steps <= MAX_STEPS and 1 <= batch_size <= MAX_BATCH):
        raise UsageError(f"--steps must be from 1 to {MAX_STEPS} and --batch-size from 1 to {MAX_BATCH}, got {steps} "
                         f"and {batch_size}")
    if not 0 < lr <= 10:
        raise UsageError(f"--lr must be in (0, 10], got {lr:g}")
    section = track2_section("d3m", {"per_class": per_class if make_default else None, "oversample": oversample,
                                     "match_steps": match_steps}, make_default)
    start = time.perf_counter()
    folder = model_folder(ref)
    spec = get_dataset(generator_dataset(folder))
    dev = resolve_device(device)
    gen = load_generator(str(folder), spec).to(dev)
    emb = class_embedding(gen)
    mean, std, labels = encode_training(gen, spec, root, dev)

    # Groups: k-means per class in the denoiser's space; label of every image = its vector's row.
    rows = torch.empty_like(labels)
    first_row = emb.num_embeddings
    for k in bar(range(spec.classes), desc=f"grouping (k-means, K {per_class})", unit="class"):
        members = torch.nonzero(labels == k).flatten()
        if len(members) < per_class:
            raise UsageError(f"class {k} of {spec.name} has {len(members)} training images, fewer than K {per_class}")
        groups = kmeans(mean[members], per_class, seed=stream_seed(seed, "inversion", k)).assignment
        rows[members] = first_row + k * per_class + groups

    init = emb.weight.detach()[:spec.classes, None, :].repeat(1, per_class, 1)  # each class's own row
    module = _Extended(emb.weight.detach().clone(), init.reshape(-1, init.shape[-1]).clone())
    gen.unet.class_embedding = module
    optimiser = torch.optim.Adam([module.extra], lr=lr)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(gen.scheduler_config)
    prediction = gen.meta["prediction"]
    losses = []
    for step in bar(range(steps), desc=f"inverting {spec.name}", unit="step"):
        g = torch.Generator(dev).manual_seed(stream_seed(seed, "inversion", step, 1))  # (k,) above: grouping
        idx = torch.randint(len(labels), (batch_size,), generator=g, device=dev)
        x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g, device=dev)
        noise = torch.randn(x0.shape, generator=g, device=dev)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=g, device=dev)
        xt = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t) if prediction == "v_prediction" else noise
        pred = gen.unet(xt, t, class_labels=rows[idx]).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    vectors = module.extra.detach().reshape(spec.classes, per_class, -1)
    record = {"method": "d3m", "per_class": per_class, "dim": int(vectors.shape[-1]),
              "sample_shape": list(gen.sample_shape), "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr}
    path = store(gen, codebook_name(per_class), {"vectors": vectors}, record, PURPOSE, section)
    return InvertReport(path, per_class, steps, float(np.mean(losses[:10])), float(np.mean(losses[-10:])),
                        time.perf_counter() - start)
