"""The `d4m` method (Su et al., "D4M: Dataset Distillation via
Disentangled Diffusion Model", CVPR 2024): each image starts from a stored
k-means prototype of its class (`ddchallenge prototypes`,
diffusion/prototypes.py) noised to `strength`, and is denoised with the
class label and guidance.

Options: model (required), strength (default prototypes.DEFAULT_STRENGTH),
pool_strength (matching's pool; default: strength), sampler, steps,
guidance, batch_size. The folder's codebook for the IPC
made is read (image i of class k from centre i, or i mod IPC when selection
asks for more candidates), and nothing else: a run that outputs IPC k reads
exactly k centres per class (protocol.TABLE_RULE), and no training data.
Matching (`--match-steps`) pulls the set toward the same k prototypes
redrawn with fresh noise, noised to `pool_strength` (`prototype_pool`).

`--ipc auto`: one small batch measures this machine's pace at this
strength, and the largest stored IPC whose candidates fit the time left
(with the diffusion method's margin) is made.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch

from ddchallenge.diffusion.codebook import load_table, stored
from ddchallenge.diffusion.model import Generator, ModelError
from ddchallenge.diffusion.prototypes import DEFAULT_STRENGTH, check_strength, codebook_name, make_command
from ddchallenge.diffusion.sample import images_per_second
from ddchallenge.generators import BudgetExceeded, GenerationRequest, register
from ddchallenge.generators.diffusion import MARGIN, SAMPLING, load_model, run_sampling, sampled_pool, sampling_settings
from ddchallenge.generators.selection import candidates
from ddchallenge.protocol import MAX_IPC, stream_seed

log = logging.getLogger(__name__)


def prototype_pool(req: GenerationRequest) -> tuple[np.ndarray, np.ndarray, dict]:
    """What matching (`--match-steps`) pulls a d4m set toward: the set's own
    IPC prototypes redrawn with fresh noise from the pool's seed stream
    (pool image j of class k from centre j mod IPC), as many as fit the
    pool's share of the budget. The redraws stay on the class's modes that
    the prototypes found, spread by the noise; they read no table beyond
    the k centres the set itself was made from. (The generator's unguided
    samples, the other methods' pool, are narrower than the real class:
    matching toward them lowered d4m, docs/benchmarks.md.) A
    `pool_strength` above the set's noises the prototypes further before
    redrawing them: a pool spread wider around the same modes."""
    gen, device = load_model(req, "d4m")
    centres, book = _centres(req, gen, req.keep)
    strength = _strength(req, "strength" if req.options.get("pool_strength") is None else "pool_strength")
    return sampled_pool(req, gen, device, sampling_settings(req),
                        {"source": "d4m prototypes redrawn", "codebook": book, "strength": strength},
                        starts=centres, strength=strength)


@register("d4m", pool=prototype_pool, options=("model", "strength", "pool_strength") + SAMPLING, auto_ipc=True)
def d4m(req: GenerationRequest) -> tuple[np.ndarray, np.ndarray, dict]:
    strength = _strength(req)
    if req.options.get("pool_strength") is not None:
        _strength(req, "pool_strength")  # checked before any image is made, not when matching needs its pool
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


def _strength(req: GenerationRequest, option: str = "strength") -> float:
    strength = DEFAULT_STRENGTH if req.options.get(option) is None else float(req.options[option])
    check_strength(strength, "--" + option.replace("_", "-"))
    return strength


def _stored_ipcs(gen: Generator) -> list[int]:
    return sorted(int(r["ipc"]) for r in stored(gen, "d4m").values() if isinstance(r.get("ipc"), int))


def _centres(req: GenerationRequest, gen: Generator, ipc: int) -> tuple[torch.Tensor, dict]:
    """The checked centres of the folder's IPC codebook and the record naming it."""
    folder, name = gen.provenance["folder"], codebook_name(ipc)
    centres, record = load_table(gen, name, "centres", (req.spec.classes, ipc, *gen.sample_shape),
                                 make_command(folder, ipc), req.tables)
    return centres, {"name": name, "file": record["file"], "sha256": record["sha256"], "seed": record.get("seed")}


def _auto_ipc(req: GenerationRequest, gen: Generator, settings: dict, device: torch.device, strength: float,
              have: list[int]) -> int:
    """The largest stored IPC whose candidates fit the time left."""
    folder = gen.provenance["folder"]
    if not have:
        raise ModelError(f"{folder} has no d4m codebook; make one with `{make_command(folder, 10)}`")
    with req.clock.phase("measuring"):  # one slot's worth of throw-away images, not a whole batch
        rate = images_per_second(gen, req.spec.classes, stream_seed(req.seed, "calibration"), device=device,
                                 strength=strength, **{**settings, "batch_size": min(settings["batch_size"],
                                                                                     req.spec.classes)})
    left = req.deadline - time.monotonic()
    fits = [p for p in have if p <= MAX_IPC and MARGIN * req.spec.classes * candidates(p, req.oversample) / rate <= left]
    if not fits:
        raise BudgetExceeded(f"at the measured {rate:.2f} images/s, the smallest stored d4m codebook (IPC {have[0]}, "
                             f"{req.spec.classes * candidates(have[0], req.oversample)} images) does not fit in the "
                             f"{max(left, 0):.0f} s left of the method's share of the budget; store a smaller one "
                             f"(`{make_command(folder, 1)}`) or raise the budget")
    log.info("calibration: %.1f images/s on %s; d4m codebooks %s stored, IPC %d fits the %.0f s left",
             rate, device, have, max(fits), left)
    return max(fits)
