"""The `diffusion` method: sample a trained class-conditional diffusion
generator (`ddchallenge train`, or any folder/Hub id in its format).

Options: model (required), sampler, steps, guidance, batch_size. The
helpers here (settings, loading, fixed or auto IPC sampling) also serve the
d4m and d3m methods, which differ only in where each image starts and what
it is conditioned on.

`--ipc auto`: a calibration batch measures images per second on this
machine, which sets the largest IPC worth planning for; sampling then goes
slot by slot (one image of every class at a time) and stops as soon as the
next batch would not finish before the deadline with a margin, keeping the
whole slots made. A slower stretch therefore costs images, not the run.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from ddchallenge.diffusion.model import Generator, load_generator
from ddchallenge.diffusion.sample import (
    DEFAULT_BATCH, DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, check_options, images_per_second, sample,
)
from ddchallenge.errors import UsageError
from ddchallenge.evaluation.device import resolve_device
from ddchallenge.generators import BudgetExceeded, GenerationRequest, register
from ddchallenge.protocol import MAX_IPC

log = logging.getLogger(__name__)

MARGIN = 2.0  # --ipc auto starts a batch only if twice its expected duration is left


SAMPLING = ("sampler", "steps", "guidance", "batch_size")  # options every diffusion-based method takes


def sampling_settings(req: GenerationRequest) -> dict:
    """The sampler settings of a request, defaults filled in and checked."""
    defaults = dict(sampler=DEFAULT_SAMPLER, steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE, batch_size=DEFAULT_BATCH)
    settings = {k: default if req.options.get(k) is None else type(default)(req.options[k])
                for k, default in defaults.items()}
    check_options(**settings)
    return settings


def load_model(req: GenerationRequest, method: str) -> tuple[Generator, torch.device]:
    if not req.options.get("model"):
        raise UsageError(f"--method {method} needs --model MODEL_DIR|HUB_ID (a folder written by `ddchallenge train`)")
    device = resolve_device(req.device)
    ref = req.options["model"]
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
    from ddchallenge.generators.matching import POOL_PER_CLASS, pool_seed

    settings = {**sampling_settings(req), "guidance": 1.0}
    gen, device = load_model(req, "diffusion")
    images, labels = sample(gen, list(range(req.spec.classes)), POOL_PER_CLASS, pool_seed(req.seed), device=device,
                            between_batches=lambda done: req.check_deadline() or True, **settings)
    return images, labels, {"source": "unguided samples", "sampling": settings, "seed": pool_seed(req.seed)}


@register("diffusion", pool=generated_pool, options=("model",) + SAMPLING, auto_ipc=True)
def diffusion(req: GenerationRequest) -> tuple[np.ndarray, np.ndarray, dict]:
    settings = sampling_settings(req)
    gen, device = load_model(req, "diffusion")
    images, labels = run_sampling(req, gen, settings, device)
    return images, labels, {"model": gen.provenance, "sampling": settings}


def _auto_ipc(req: GenerationRequest, gen: Generator, settings: dict, device: torch.device,
              start: dict) -> tuple[np.ndarray, np.ndarray]:
    classes = req.spec.classes  # generate() has made sure there is a deadline
    rate = images_per_second(gen, classes, req.seed, device=device, strength=start.get("strength", 1.0), **settings)
    begin, left = time.monotonic(), req.deadline - time.monotonic()
    if settings["batch_size"] / rate * MARGIN > left:
        raise BudgetExceeded(f"at the measured {rate:.1f} images/s, one batch of {settings['batch_size']} does not fit "
                             f"in the {max(left, 0):.0f} s left of the budget; nothing was written")
    planned = max(1, min(MAX_IPC, math.floor(rate * left / classes)))  # a scorer accepts no more than MAX_IPC

    def keep_going(done: int) -> bool:
        per_image = (time.monotonic() - begin) / done
        return req.deadline - time.monotonic() > MARGIN * per_image * settings["batch_size"]

    images, labels = sample(gen, list(range(classes)), planned, req.seed, device=device, between_batches=keep_going,
                            **settings, **start)
    if len(labels) == 0:
        raise BudgetExceeded(f"the budget ran out before one image of every class was made ({rate:.1f} images/s "
                             f"measured); nothing was written")
    log.info("calibration: %.1f images/s on %s; made IPC %d (%d images) in %.0f s of the %.0f s left",
             rate, device, len(labels) // classes, len(labels), time.monotonic() - begin, left)
    return images, labels
