"""The `diffusion` method: sample a trained class-conditional diffusion
generator (`ddchallenge train`, or any folder/Hub id in its format).

Options: model (required), sampler, steps, guidance, batch_size. The
helpers here (settings, loading, fixed or auto IPC sampling) also serve the
d4m and d3m methods, which differ only in where each image starts and what
it is conditioned on.

`--ipc auto`: the first slot (one image of every class) is made on its own
and measures this machine's pace, which sets the largest IPC worth planning
for; sampling then goes on batch by batch and stops as soon as the next
batch would not finish before the deadline with a margin, keeping the whole
slots made. A slower stretch therefore costs images, not the run, and
nothing is thrown away: a run fails for slowness only when not even one
image per class fits.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from ddchallenge.diffusion.model import Generator, load_generator
from ddchallenge.diffusion.sample import SAMPLING_DEFAULTS, check_options, sample
from ddchallenge.errors import UsageError
from ddchallenge.evaluation.device import resolve_device
from ddchallenge.generators import GenerationRequest, register
from ddchallenge.protocol import MAX_IPC

log = logging.getLogger(__name__)

MARGIN = 2.0  # --ipc auto starts a batch only if twice its expected duration is left


SAMPLING = ("sampler", "steps", "guidance", "batch_size")  # options every diffusion-based method takes


def sampling_settings(req: GenerationRequest) -> dict:
    """The sampler settings of a request, defaults filled in and checked."""
    settings = {k: default if req.options.get(k) is None else type(default)(req.options[k])
                for k, default in SAMPLING_DEFAULTS.items()}
    check_options(**settings)
    return settings


def load_model(req: GenerationRequest, method: str) -> tuple[Generator, torch.device]:
    if not req.options.get("model"):
        raise UsageError(f"--method {method} needs --model MODEL_DIR|HUB_ID (a folder written by `ddchallenge train`)")
    device = resolve_device(req.device)
    ref = req.options["model"]
    with req.clock.phase("loading"):
        return req.once(("model", ref, str(device)), lambda: load_generator(ref, req.spec).to(device)), device


def run_sampling(req: GenerationRequest, gen: Generator, settings: dict, device: torch.device,
                 **start) -> tuple[np.ndarray, np.ndarray]:
    """IPC images per class, or with --ipc auto as many whole slots as the
    deadline allows; `start` passes D4M starts/strength or D3M conditions
    through to `sample`."""
    if req.ipc is not None:
        return sample(gen, list(range(req.spec.classes)), req.ipc, req.seed, device=device,
                      between_batches=lambda done: req.check_deadline() or True, **settings, **start)
    return _auto_ipc(req, gen, settings, device, start)


def generated_pool(req: GenerationRequest) -> tuple[np.ndarray, np.ndarray, dict]:
    """What matching (`--match-steps`) pulls a generator's set toward: the
    model's own class-conditional samples, without guidance (the class's
    spread, not its modes), from their own seed stream."""
    settings = {**sampling_settings(req), "guidance": 1.0}
    gen, device = load_model(req, "diffusion")
    return sampled_pool(req, gen, device, settings, {"source": "unguided samples"})


def sampled_pool(req: GenerationRequest, gen: Generator, device: torch.device, settings: dict, record: dict,
                 **start) -> tuple[np.ndarray, np.ndarray, dict]:
    """Up to POOL_PER_CLASS samples per class from the pool's seed stream,
    as many as fit before the request's deadline (the pool's share of the
    budget) at the pace measured while making them."""
    from ddchallenge.generators.matching import POOL_PER_CLASS, pool_seed

    images, labels = sample_until(gen, req.spec.classes, POOL_PER_CLASS, pool_seed(req.seed), req.deadline, settings,
                                  device, 1.0, "matching pool", **start)
    per_class = len(labels) // req.spec.classes
    return images, labels, {**record, "per_class": per_class, "sampling": settings, "seed": pool_seed(req.seed)}


def sample_until(gen: Generator, classes: int, most: int, seed: int, deadline: float | None, settings: dict,
                 device: torch.device, margin: float, desc: str, **start) -> tuple[np.ndarray, np.ndarray]:
    """Up to `most` images per class, slot by slot: slot 0 alone (it
    measures the pace and is kept, whatever the deadline), then runs of
    whole slots, each no larger than a sampling batch and started only if
    `margin` times its expected duration is left before `deadline`. The
    same seed gives the same images as `sample` (noise is per image)."""
    begin = time.monotonic()
    parts = [sample(gen, list(range(classes)), 1, seed, device=device, desc=desc, **settings, **start)[0]]
    made = 1
    while made < most:
        pace = (time.monotonic() - begin) / (made * classes)  # seconds per image so far
        run = min(most - made, max(1, settings["batch_size"] // classes))
        if deadline is not None:
            run = min(run, math.floor((deadline - time.monotonic()) / (margin * pace * classes)))
        if run < 1:
            break
        parts.append(sample(gen, list(range(classes)), made + run, seed, device=device, first=made, desc=desc,
                            **settings, **start)[0])
        made += run
    # Each part is class-major over its own slots: interleave them back into one class-major set.
    shape = parts[0].shape[1:]
    images = np.concatenate([p.reshape(classes, -1, *shape) for p in parts], axis=1).reshape(-1, *shape)
    return images, np.repeat(np.arange(classes, dtype=np.int64), made)


@register("diffusion", pool=generated_pool, options=("model",) + SAMPLING, auto_ipc=True)
def diffusion(req: GenerationRequest) -> tuple[np.ndarray, np.ndarray, dict]:
    settings = sampling_settings(req)
    gen, device = load_model(req, "diffusion")
    images, labels = run_sampling(req, gen, settings, device)
    return images, labels, {"model": gen.provenance, "sampling": settings}


def _auto_ipc(req: GenerationRequest, gen: Generator, settings: dict, device: torch.device,
              start: dict) -> tuple[np.ndarray, np.ndarray]:
    """As many whole slots as fit before the deadline (at most MAX_IPC, the
    most a scorer accepts); slot 0 measures the pace and is always kept."""
    begin = time.monotonic()
    images, labels = sample_until(gen, req.spec.classes, MAX_IPC, req.seed, req.deadline, settings, device, MARGIN,
                                  "sampling", **start)
    log.info("made IPC %d (%d images) in %.0f s on %s", len(labels) // req.spec.classes, len(labels),
             time.monotonic() - begin, device)
    return images, labels
