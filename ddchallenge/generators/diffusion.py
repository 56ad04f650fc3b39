"""The `diffusion` method: sample a trained class-conditional diffusion
generator (`ddchallenge train`, or any folder/Hub id in its format).

Options: model (required), sampler, steps, guidance, batch_size.

`--ipc auto`: a calibration batch measures images per second on this
machine, which sets the largest IPC worth planning for; sampling then goes
slot by slot (one image of every class at a time) and stops as soon as the
next batch would not finish before the deadline with a margin, keeping the
whole slots made. A slower stretch therefore costs images, not the run.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np

from ddchallenge.diffusion.model import load_generator
from ddchallenge.diffusion.sample import (
    DEFAULT_BATCH, DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, check_options, images_per_second, sample,
)
from ddchallenge.errors import UsageError
from ddchallenge.generators import BudgetExceeded, GenerationRequest, register
from ddchallenge.train import resolve_device

log = logging.getLogger(__name__)

MARGIN = 2.0  # --ipc auto starts a batch only if twice its expected duration is left


@register("diffusion", options=("model", "sampler", "steps", "guidance", "batch_size"), auto_ipc=True)
def diffusion(req: GenerationRequest) -> tuple[np.ndarray, np.ndarray, dict]:
    opts = dict(req.options)
    if not opts.get("model"):
        raise UsageError("--method diffusion needs --model MODEL_DIR|HUB_ID (a folder written by `ddchallenge train`)")
    defaults = dict(sampler=DEFAULT_SAMPLER, steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE, batch_size=DEFAULT_BATCH)
    settings = {k: default if opts.get(k) is None else type(default)(opts[k]) for k, default in defaults.items()}
    check_options(**settings)
    device = resolve_device(req.device)
    gen = load_generator(opts["model"], req.spec).to(device)
    if req.ipc is not None:
        images, labels = sample(gen, list(range(req.spec.classes)), req.ipc, req.seed, device=device,
                                between_batches=lambda done: req.check_deadline() or True, **settings)
    else:
        images, labels = _auto_ipc(req, gen, settings, device)
    return images, labels, {"model": gen.provenance, "sampling": settings}


def _auto_ipc(req: GenerationRequest, gen, settings: dict, device) -> tuple[np.ndarray, np.ndarray]:
    classes = req.spec.classes  # generate() has made sure there is a deadline
    rate = images_per_second(gen, classes, req.seed, device=device, **settings)
    start, left = time.monotonic(), req.deadline - time.monotonic()
    if settings["batch_size"] / rate * MARGIN > left:
        raise BudgetExceeded(f"at the measured {rate:.1f} images/s, one batch of {settings['batch_size']} does not fit "
                             f"in the {max(left, 0):.0f} s left of the budget; nothing was written")
    planned = max(1, math.floor(rate * left / classes))

    def keep_going(done: int) -> bool:
        per_image = (time.monotonic() - start) / done
        return req.deadline - time.monotonic() > MARGIN * per_image * settings["batch_size"]

    images, labels = sample(gen, list(range(classes)), planned, req.seed, device=device, between_batches=keep_going,
                            **settings)
    if len(labels) == 0:
        raise BudgetExceeded(f"the budget ran out before one image of every class was made ({rate:.1f} images/s "
                             f"measured); nothing was written")
    log.info("calibration: %.1f images/s on %s; made IPC %d (%d images) in %.0f s of the %.0f s left",
             rate, device, len(labels) // classes, len(labels), time.monotonic() - start, left)
    return images, labels


def run_generator(model: str, dataset: str, ipc: int | str, seed: int, budget: float, device: str, folder: Path):
    """Track 2: the images a generator folder makes within `budget` seconds,
    written to `folder` and read back as submission entries (used in the
    sandbox's child and, with --no-sandbox, in process)."""
    from ddchallenge.generators import GenerateConfig, generate
    from ddchallenge.submission import load_submission

    config = GenerateConfig(dataset, "diffusion", ipc, seed, budget=budget, device=device, options={"model": str(model)})
    report = generate(config, folder / "generated.h5")
    return [dataclasses.replace(e, source=f"{model} (generated IPC {report.ipc} in {report.seconds:.1f} s)")
            for e in load_submission(report.path, dataset)]
