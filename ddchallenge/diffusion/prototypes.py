"""D4M prototypes (Su et al., CVPR 2024): per class, k-means with IPC clusters
over the training images in the denoiser's space (pixels in [-1, 1], or the
VAE posterior means); the centres are stored in the model folder and
`generate --method d4m` turns each back into an image by noising it part-way
and denoising it with the class label.

Why centres: they cover the class (one per mode, weighted by its mass), so
IPC images made from them are representative and diverse at once, where
plain sampling gives IPC draws that crowd the middle of the class.

`--fit-steps N` (pixel space) then fits the centres to the class by N steps
of distribution matching against its training images (`fit_centres`), as
d3m's `invert` fits its vectors: still IPC rows per class, made before any
run, so Track 2's table rule holds; what changes is what they store. A
centre is the mean of its cluster, blurred where its members disagree;
matched centres carry the class's spread in the features the evaluation
ConvNet learns, which a run's own matching (against the same centres
redrawn) cannot add.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddchallenge.diffusion.codebook import model_folder, store
from ddchallenge.diffusion.encode import encode_training
from ddchallenge.diffusion.model import TRACK2_MATCH_STEPS, generator_dataset, load_generator
from ddchallenge.errors import UsageError
from ddchallenge.evaluation.device import resolve_device
from ddchallenge.evaluation.matching import match
from ddchallenge.kmeans import kmeans
from ddchallenge.progress import bar
from ddchallenge.protocol import (MAX_IPC, MAX_MATCH_STEPS, MAX_OVERSAMPLE, DatasetSpec, check_match_steps, get_dataset,
                                  stream_seed)

DEFAULT_STRENGTH = 0.5  # best of 0.5, 0.7, 0.9 on mnist5k at IPC 10, read on the test split (docs/generator.md)
PURPOSE = "d4m prototypes: image i of class k starts from centre i of class k"


def class_seed(seed: int, k: int) -> int:
    return stream_seed(seed, "prototypes", k)


def codebook_name(ipc: int) -> str:
    return f"d4m-ipc{ipc}"


def make_command(folder: str | Path, ipc: int) -> str:
    return f"ddchallenge prototypes {folder} --ipc {ipc}"


def check_strength(strength: float, option: str = "--strength") -> None:
    if not 0 < strength <= 1:
        raise UsageError(f"{option} must be in (0, 1] (the fraction of the noise schedule a prototype is noised "
                         f"to; 1 = pure noise), got {strength:g}")


@dataclass(frozen=True)
class PrototypeReport:
    path: Path  # the safetensors file written
    ipc: int  # clusters per class
    iterations: int  # the most Lloyd steps any class needed
    converged: bool  # every class converged
    seconds: float
    fit: dict | None = None  # with --fit-steps: the matching record (steps, loss first and last)


def track2_section(method: str, settings: dict, make_default: bool) -> dict | None:
    """The folder's new "generate" section, or None to leave it as it is.
    Settings for Track 2 are only taken with `make_default`, so that adding
    a table never changes what the folder runs without being asked."""
    given = {k: v for k, v in settings.items() if v is not None}
    if given and not make_default:
        raise UsageError(f"--{next(iter(given)).replace('_', '-')} sets the folder's Track 2 settings; add "
                         "--make-default to make this the method the folder runs")
    if not make_default:
        return None
    oversample, match_steps = given.get("oversample", 1.0), given.get("match_steps", TRACK2_MATCH_STEPS)
    if not 1 <= oversample <= MAX_OVERSAMPLE:
        raise UsageError(f"--oversample must be from 1 to {MAX_OVERSAMPLE}, got {oversample:g}")
    check_match_steps(match_steps)
    return {"method": method, "settings": {**given, "oversample": float(oversample), "match_steps": match_steps}}


def fit_centres(centres: torch.Tensor, codes: torch.Tensor, labels: torch.Tensor, spec: DatasetSpec, steps: int,
                seed: int, device: torch.device) -> tuple[torch.Tensor, dict]:
    """Pixel-space `centres` (classes, IPC, C, H, W) in [-1, 1] after `steps`
    steps of distribution matching toward the class's training images
    (`codes`, the images in [-1, 1], and `labels`), and the matching record.
    The images pass through uint8, as every image matching moves does."""
    def pixels(x: torch.Tensor) -> np.ndarray:
        return x.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()

    classes, ipc = centres.shape[:2]
    out, record = match(pixels(centres.flatten(0, 1)), np.repeat(np.arange(classes), ipc), pixels(codes),
                        labels.cpu().numpy(), spec, steps, stream_seed(seed, "fitting"), device,
                        desc=f"fitting IPC {ipc}")
    record["pool"] = "the class's training images"
    return torch.from_numpy(out).float().div(127.5).sub(1).reshape(centres.shape), record


def make_prototypes(ref: str, ipcs: list[int], seed: int = 0, device: str = "auto", root=None,
                    strength: float | None = None, oversample: float | None = None, match_steps: int | None = None,
                    make_default: bool = False, fit_steps: int = 0) -> list[PrototypeReport]:
    """Cluster every class of the model's dataset into each IPC in `ipcs` and
    store the centres, fitted by `fit_steps` steps of distribution matching
    when given. With `make_default` the folder's Track 2 method becomes d4m
    with `strength`, `oversample` and `match_steps`; otherwise its
    "generate" section is left as it was."""
    import time

    if isinstance(fit_steps, bool) or not isinstance(fit_steps, int) or not 0 <= fit_steps <= MAX_MATCH_STEPS:
        raise UsageError(f"--fit-steps must be a whole number from 0 (plain k-means centres) to {MAX_MATCH_STEPS}, "
                         f"got {fit_steps!r}")

    if strength is not None:
        check_strength(strength)
    if make_default and strength is None:
        strength = DEFAULT_STRENGTH  # recorded, so the folder says what it runs
    section = track2_section("d4m", {"strength": strength, "oversample": oversample, "match_steps": match_steps},
                             make_default)
    if not ipcs or any(not 1 <= i <= MAX_IPC for i in ipcs):
        raise UsageError(f"--ipc must be between 1 and {MAX_IPC} (the largest IPC a Track 2 run may output: a "
                         f"generator may not carry more rows per class than it makes; give --ipc once per codebook), "
                         f"got {', '.join(map(str, ipcs)) or 'none'}")
    folder = model_folder(ref)
    spec = get_dataset(generator_dataset(folder))
    dev = resolve_device(device)
    gen = load_generator(str(folder), spec).to(dev)
    if fit_steps and gen.codec is not None:
        raise UsageError(f"--fit-steps moves pixels; {folder} works in a VAE's latent space, where its centres are "
                         "not images: leave out --fit-steps")
    codes, _, labels = encode_training(gen, spec, root, dev)
    reports = []
    for ipc in sorted(set(ipcs)):
        start = time.perf_counter()
        centres, iterations, converged = [], 0, True
        for k in bar(range(spec.classes), desc=f"k-means IPC {ipc}", unit="class"):
            members = codes[labels == k]
            if len(members) < ipc:
                raise UsageError(f"class {k} of {spec.name} has {len(members)} training images, fewer than IPC {ipc}")
            # One seed per (seed, class): adding classes or IPCs never changes another class's centres.
            result = kmeans(members, ipc, seed=class_seed(seed, k))
            centres.append(result.centres.reshape(ipc, *gen.sample_shape))
            iterations, converged = max(iterations, result.iterations), converged and result.converged
        table, fit = torch.stack(centres), None
        if fit_steps:
            table, fit = fit_centres(table, codes, labels, spec, fit_steps, seed, dev)
        record = {"method": "d4m", "ipc": ipc, "sample_shape": list(gen.sample_shape),
                  "space": gen.meta["space"], "seed": seed, "kmeans_iterations": iterations, "converged": converged,
                  **({"fit": fit} if fit else {})}
        path = store(gen, codebook_name(ipc), {"centres": table}, record, PURPOSE, section)
        reports.append(PrototypeReport(path, ipc, iterations, converged, time.perf_counter() - start, fit))
    return reports
