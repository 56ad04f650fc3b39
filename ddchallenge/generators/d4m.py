"""The `d4m` method: each image starts from a stored k-means prototype of its
class (`ddchallenge prototypes`, diffusion/prototypes.py) noised to
`strength`, and is denoised with the class label and guidance.

Options: model (required), strength (default prototypes.DEFAULT_STRENGTH),
sampler, steps, guidance, batch_size. The folder's codebook for the IPC asked
for is used (image i of class k from centre i, or i mod IPC when selection
asks for more candidates); generation reads no training data. Matching
(`--match-steps`) pulls the set toward a finer stored codebook redrawn
(`codebook_pool`).

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
from ddchallenge.diffusion.sample import images_per_second, sample
from ddchallenge.generators import BudgetExceeded, GenerationRequest, register
from ddchallenge.generators.diffusion import (
    MARGIN, SAMPLING, generated_pool, load_model, run_sampling, sampling_settings,
)
from ddchallenge.generators.selection import candidates
from ddchallenge.protocol import MAX_IPC

log = logging.getLogger(__name__)


def codebook_pool(req: GenerationRequest) -> tuple[np.ndarray, np.ndarray, dict]:
    """What matching (`--match-steps`) pulls a d4m set toward: every centre
    of a stored codebook finer than the set (IPC above the kept IPC: the
    smallest with at least POOL_PER_CLASS centres, else the largest) redrawn
    once, the way the method draws, from the pool's own seed stream. Those
    redraws stay on the real class's modes, at a finer grain than the set;
    the generator's unguided samples (the other methods' pool, and the
    fallback when no finer codebook is stored) are narrower than the real
    class, and matching toward them lowered d4m (docs/benchmarks.md)."""
    from ddchallenge.generators.matching import POOL_PER_CLASS, pool_seed

    gen, device = load_model(req, "d4m")
    finer = [p for p in _stored_ipcs(gen) if p > req.keep]
    if not finer:
        log.info("no d4m codebook finer than IPC %d is stored; matching against the model's unguided samples "
                 "(`%s` makes one)", req.keep, make_command(gen.provenance["folder"], POOL_PER_CLASS))
        return generated_pool(req)
    ipc = min((p for p in finer if p >= POOL_PER_CLASS), default=max(finer))  # bounded: the pool is redrawn in budget
    centres, book = _centres(req, gen, ipc)
    strength, settings = _strength(req), sampling_settings(req)
    images, labels = sample(gen, list(range(req.spec.classes)), ipc, pool_seed(req.seed), device=device,
                            between_batches=lambda done: req.check_deadline() or True, starts=centres,
                            strength=strength, **settings)
    return images, labels, {"source": "d4m codebook redrawn", "codebook": book,
                            "strength": strength, "sampling": settings, "seed": pool_seed(req.seed)}


@register("d4m", pool=codebook_pool, options=("model", "strength") + SAMPLING, auto_ipc=True)
def d4m(req: GenerationRequest) -> tuple[np.ndarray, np.ndarray, dict]:
    strength = _strength(req)
    settings = sampling_settings(req)
    gen, device = load_model(req, "d4m")
    folder = gen.provenance["folder"]
    have = _stored_ipcs(gen)
    if req.keep is not None:
        ipc = req.keep
        if ipc not in have:
            raise ModelError(f"{folder} has no d4m codebook for IPC {ipc} (stored: {', '.join(map(str, have)) or 'none'}"
                             f"); make it with `{make_command(folder, ipc)}`")
    else:
        ipc = _auto_ipc(req, gen, settings, device, strength, have)
        req = dataclasses.replace(req, ipc=candidates(ipc, req.oversample))
    centres, book = _centres(req, gen, ipc)
    images, labels = run_sampling(req, gen, settings, device, starts=centres, strength=strength)
    return images, labels, {"model": gen.provenance, "sampling": settings, "strength": strength, "codebook": book}


def _strength(req: GenerationRequest) -> float:
    strength = DEFAULT_STRENGTH if req.options.get("strength") is None else float(req.options["strength"])
    check_strength(strength)
    return strength


def _stored_ipcs(gen: Generator) -> list[int]:
    return sorted(int(r["ipc"]) for r in stored(gen, "d4m").values() if isinstance(r.get("ipc"), int))


def _centres(req: GenerationRequest, gen: Generator, ipc: int) -> tuple[torch.Tensor, dict]:
    """The checked centres of the folder's IPC codebook and the record naming it."""
    folder, name = gen.provenance["folder"], codebook_name(ipc)
    tensors, record = load(gen, name, make_command(folder, ipc))
    centres = tensors.get("centres")
    if centres is None:
        raise ModelError(f"{folder}: codebook {name} holds no 'centres' tensor; remake it with "
                         f"`{make_command(folder, ipc)}`")
    check_shape(gen, name, centres, (req.spec.classes, ipc, *gen.sample_shape), make_command(folder, ipc))
    return centres, {"name": name, "file": record["file"], "sha256": record["sha256"], "seed": record.get("seed")}


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
