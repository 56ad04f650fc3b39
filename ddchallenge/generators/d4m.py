"""The `d4m` method: each image starts from a stored k-means prototype of its
class (`ddchallenge prototypes`, diffusion/prototypes.py) noised to
`strength`, and is denoised with the class label and guidance.

Options: model (required), strength (default prototypes.DEFAULT_STRENGTH),
sampler, steps, guidance, batch_size. The folder's codebook for the IPC asked
for is used (image i of class k from centre i, or i mod IPC when selection
asks for more candidates); generation reads no training data.

`--ipc auto`: a calibration batch measures images per second at this
strength, and the largest stored IPC whose candidates fit the time left
(with the diffusion method's margin) is made.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch

from ddchallenge.diffusion.codebook import check_shape, load, stored
from ddchallenge.diffusion.model import Generator, ModelError
from ddchallenge.diffusion.prototypes import DEFAULT_STRENGTH, check_strength, codebook_name, make_command
from ddchallenge.diffusion.sample import images_per_second
from ddchallenge.generators import BudgetExceeded, GenerationRequest, register
from ddchallenge.generators.diffusion import (
    MARGIN, SAMPLING, generated_pool, load_model, run_sampling, sampling_settings,
)
from ddchallenge.generators.selection import candidates
from ddchallenge.protocol import MAX_IPC

log = logging.getLogger(__name__)


@register("d4m", pool=generated_pool, options=("model", "strength") + SAMPLING, auto_ipc=True)
def d4m(req: GenerationRequest) -> tuple[np.ndarray, np.ndarray, dict]:
    strength = DEFAULT_STRENGTH if req.options.get("strength") is None else float(req.options["strength"])
    check_strength(strength)
    settings = sampling_settings(req)
    gen, device = load_model(req, "d4m")
    folder = gen.provenance["folder"]
    have = sorted(int(r["ipc"]) for r in stored(gen, "d4m").values() if isinstance(r.get("ipc"), int))
    if req.keep is not None:
        ipc = req.keep
        if ipc not in have:
            raise ModelError(f"{folder} has no d4m codebook for IPC {ipc} (stored: {', '.join(map(str, have)) or 'none'}"
                             f"); make it with `{make_command(folder, ipc)}`")
    else:
        ipc = _auto_ipc(req, gen, settings, device, strength, have)
        req = dataclasses.replace(req, ipc=candidates(ipc, req.oversample))
    name = codebook_name(ipc)
    tensors, record = load(gen, name, make_command(folder, ipc))
    centres = tensors.get("centres")
    if centres is None:
        raise ModelError(f"{folder}: codebook {name} holds no 'centres' tensor; remake it with "
                         f"`{make_command(folder, ipc)}`")
    check_shape(gen, name, centres, (req.spec.classes, ipc, *gen.sample_shape), make_command(folder, ipc))
    images, labels = run_sampling(req, gen, settings, device, starts=centres, strength=strength)
    provenance = {"model": gen.provenance, "sampling": settings, "strength": strength,
                  "codebook": {"name": name, "file": record["file"], "sha256": record["sha256"],
                               "seed": record.get("seed")}}
    return images, labels, provenance


def _auto_ipc(req: GenerationRequest, gen: Generator, settings: dict, device: torch.device, strength: float,
              have: list[int]) -> int:
    """The largest stored IPC whose candidates fit the time left."""
    folder = gen.provenance["folder"]
    if not have:
        raise ModelError(f"{folder} has no d4m codebook; make one with `{make_command(folder, 10)}`")
    rate = images_per_second(gen, req.spec.classes, req.seed, device=device, strength=strength, **settings)
    left = req.deadline - time.monotonic()
    fits = [p for p in have if p <= MAX_IPC and MARGIN * req.spec.classes * candidates(p, req.oversample) / rate <= left]
    if not fits:
        raise BudgetExceeded(f"at the measured {rate:.1f} images/s, the smallest stored d4m codebook (IPC {have[0]}) "
                             f"does not fit in the {max(left, 0):.0f} s left of the budget; nothing was written")
    log.info("calibration: %.1f images/s on %s; d4m codebooks %s stored, IPC %d fits the %.0f s left",
             rate, device, have, max(fits), left)
    return max(fits)
