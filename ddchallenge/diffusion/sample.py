"""Sampling a generator: exactly IPC images per class, class-major, batched
across classes, with classifier-free guidance and a choice of sampler.

Determinism: the starting noise of image i of class k comes from its own
CPU generator seeded from the tagged stream (seed, "sampling", k, i), and both samplers are deterministic
after it (DDIM with eta 0, DPM-Solver++ multistep), so the same seed, batch
size and device give the same bytes, and IPC 10 is the first ten images of
IPC 20.

Images are produced slot by slot (image 0 of every class, then image 1, ...),
so a run that must stop at a deadline (`--ipc auto`) can stop after any
whole slot and still hold the same number of images for every class.
"""
from __future__ import annotations

import time
from types import MappingProxyType
from typing import Callable

import numpy as np
import torch

from ddchallenge.diffusion.model import Generator
from ddchallenge.errors import UsageError
from ddchallenge.progress import Fraction, bar
from ddchallenge.protocol import stream_seed

SAMPLERS = ("dpm++", "ddim")
DEFAULT_SAMPLER = "dpm++"
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 2.0
MAX_GUIDANCE = 20.0
DEFAULT_BATCH = 500
# What a run uses for each sampler setting a request or folder does not give: `generate` and the Track 2 listing
# (`ddchallenge settings`) read this one table.
SAMPLING_DEFAULTS = MappingProxyType(dict(sampler=DEFAULT_SAMPLER, steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE,
                                          batch_size=DEFAULT_BATCH))


def check_options(sampler: str, steps: int, guidance: float, batch_size: int) -> None:
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}; samplers: {', '.join(SAMPLERS)}")
    if not 1 <= steps <= 1000:
        raise UsageError(f"--steps must be between 1 and 1000 sampling steps, got {steps}")
    if not 0 <= guidance <= MAX_GUIDANCE:
        raise UsageError(f"--guidance must be between 0 (unconditional) and {MAX_GUIDANCE:g}; 1 means no guidance, "
                         f"got {guidance:g}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")


def _sampler(name: str, config: dict):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(config)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)


def image_noise(shape: tuple[int, ...], pairs: list[tuple[int, int]], seed: int) -> torch.Tensor:
    """Starting noise of the (class, index) pairs, each from its own CPU generator."""
    out = torch.empty((len(pairs), *shape))
    for row, (k, i) in enumerate(pairs):
        state = stream_seed(seed, "sampling", k, i)
        out[row] = torch.randn(shape, generator=torch.Generator().manual_seed(state))
    return out


@torch.no_grad()
def denoise(gen: Generator, noise: torch.Tensor, labels: torch.Tensor, sampler: str, steps: int,
            guidance: float, device: torch.device, start: torch.Tensor | None = None,
            strength: float = 1.0, on_step: Callable[[float], None] | None = None) -> torch.Tensor:
    """One batch from noise to uint8 pixels (N, C, H, W) on the CPU. With
    `start` (samples in the denoiser's space), each image begins as its start
    noised to `strength` of the schedule and only the last round(strength *
    steps) sampler steps run (the img2img scheme D4M uses). `on_step(f)`
    hears the fraction f of the batch's sampler steps done after each."""
    scheduler = _sampler(sampler, gen.scheduler_config)  # fresh: multistep samplers keep per-run state
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    if start is None:
        x = noise.to(device) * scheduler.init_noise_sigma
    else:
        skip = steps - active_steps(steps, strength)
        timesteps = timesteps[skip:]
        if hasattr(scheduler, "set_begin_index"):  # the multistep solver must know it starts part-way
            scheduler.set_begin_index(skip)
        t0 = timesteps[:1].repeat(len(noise))
        x = scheduler.add_noise(start.to(device), noise.to(device), t0)
    y = labels.to(device)
    guided = guidance != 1.0
    y_in = torch.cat([y, torch.full_like(y, gen.null_class)]) if guided else y
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for n, t in enumerate(timesteps, 1):
        x_in = scheduler.scale_model_input(x, t)
        with autocast:
            out = gen.unet(torch.cat([x_in, x_in]) if guided else x_in, t, class_labels=y_in).sample.float()
        if guided:
            cond, uncond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        x = scheduler.step(out, t, x).prev_sample
        if on_step is not None:
            on_step(n / len(timesteps))
    if gen.codec is not None:
        x = gen.codec.decode(x)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def active_steps(steps: int, strength: float) -> int:
    """Sampler steps run from a start noised to `strength` (at least one)."""
    return max(1, min(steps, round(steps * strength)))


def sample(gen: Generator, classes: list[int], ipc: int, seed: int, *, sampler: str = DEFAULT_SAMPLER,
           steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, batch_size: int = DEFAULT_BATCH,
           device: torch.device = torch.device("cpu"),
           between_batches: Callable[[int], bool] = lambda done: True,
           starts: torch.Tensor | None = None, strength: float = 1.0,
           conditions: torch.Tensor | None = None, desc: str = "sampling",
           first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to `ipc` images for each class in `classes`: (uint8 (N, C, H, W),
    int64 (N,)), class-major. `between_batches(images_done)` runs after each
    batch; when it returns False the run stops and keeps the whole slots made.

    `starts` (classes, M, *sample_shape): image i of class k starts from
    starts[k, i % M] noised to `strength` (D4M). `conditions` (classes, K)
    int64: image i of class k is conditioned on embedding row
    conditions[k, i % K] instead of k (D3M). The labels returned are always
    the classes. `desc` names the progress bar (which counts images).
    `first`: start at slot `first` (the slots before it made by an earlier
    call, e.g. the one that measured the pace)."""
    check_options(sampler, steps, guidance, batch_size)
    pairs = [(k, i) for i in range(first, ipc) for k in classes]  # slot-major
    done = []
    with bar(total=len(pairs), desc=desc, unit="image") as made:
        images_made = Fraction(made)
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            noise = image_noise(gen.sample_shape, chunk, seed)
            if conditions is None:
                labels = torch.tensor([k for k, _ in chunk], dtype=torch.int64)
            else:
                labels = torch.stack([conditions[k, i % conditions.shape[1]] for k, i in chunk]).long()
            init = None if starts is None else torch.stack([starts[k, i % starts.shape[1]] for k, i in chunk])
            done.append(denoise(gen, noise, labels, sampler, steps, guidance, device, start=init, strength=strength,
                                on_step=lambda f, first=start, n=len(chunk): images_made.to(first + f * n)))
            if not between_batches(start + len(chunk)):
                break
    slots = sum(len(d) for d in done) // len(classes)
    images = torch.cat(done)[:slots * len(classes)]
    # slot-major -> class-major
    images = images.reshape(slots, len(classes), *images.shape[1:]).transpose(0, 1).reshape(-1, *images.shape[1:])
    return images.numpy(), np.repeat(np.asarray(classes, dtype=np.int64), slots)


def images_per_second(gen: Generator, classes: int, seed: int, *, sampler: str, steps: int, guidance: float,
                      batch_size: int, device: torch.device, strength: float = 1.0) -> float:
    """Measured throughput: one small warm-up batch (first-call costs), then
    one timed full batch of throw-away images."""
    check_options(sampler, steps, guidance, batch_size)
    shape = gen.sample_shape
    labels = torch.arange(batch_size) % classes
    g = torch.Generator().manual_seed(seed)
    warm = min(batch_size, 8)
    with bar(total=warm + batch_size, desc="measuring speed", unit="image") as made:
        images_made = Fraction(made)
        denoise(gen, torch.randn((warm, *shape), generator=g), labels[:warm], sampler, 2, guidance, device,
                on_step=lambda f: images_made.to(f * warm))
        start = time.perf_counter()
        noise = torch.randn((batch_size, *shape), generator=g)
        # A partial start (strength < 1) runs fewer steps: time exactly that.
        denoise(gen, noise, labels, sampler, steps, guidance, device, start=None if strength >= 1 else noise,
                strength=strength, on_step=lambda f: images_made.to(warm + f * batch_size))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return batch_size / (time.perf_counter() - start)
