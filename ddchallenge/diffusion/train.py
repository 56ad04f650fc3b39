"""Training the denoiser (`train`) and a VAE for latent space (`train_vae`).

Resuming is exact: everything random is a function of (seed, step) — the
batch's images (a fresh permutation of the training set per epoch), the
noise, timesteps, flips and label dropout — and the learning rate is a
function of the step. A checkpoint therefore only needs the raw weights, the
EMA weights and the optimiser state to continue bit for bit where an
uninterrupted run would be.

Checkpoints are written whole into a hidden folder and then renamed to
`step-NNNNNNN`, so a crash mid-save leaves the previous checkpoint intact;
older ones are deleted only after the new one has its name.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddchallenge.data import load_train
from ddchallenge.diffusion.config import TrainConfig, VaeConfig
from ddchallenge.diffusion.model import (
    META_FILE, Generator, PixelCodec, build_scheduler, build_unet, checkpoints, describe, latent_shape, load_vae,
)
from ddchallenge.errors import DatasetError, OutputExistsError, UsageError
from ddchallenge.fileio import OutputMarker, check_output_folder, replace_folder
from ddchallenge.progress import bar, shown
from ddchallenge.protocol import DatasetSpec, get_dataset, stream_seed
from ddchallenge.evaluation.device import resolve_device

log = logging.getLogger(__name__)

STATE = "training_state"


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    return stream_seed(seed, "training", step, stream)


class BatchOrder:
    """The training-set indices of step s: positions s*B .. s*B+B-1 of an
    endless sequence of per-epoch permutations seeded by (seed, epoch)."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch, self.seed = n, batch, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def __call__(self, step: int) -> np.ndarray:
        pos = np.arange(step * self.batch, (step + 1) * self.batch)
        return np.array([self._perm(int(p // self.n))[p % self.n] for p in pos])


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _signed(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [-1, 1], the range the networks work in."""
    return pixels.float().div_(127.5).sub_(1)


def _pixels(images: np.ndarray, device: torch.device) -> torch.Tensor:
    return _signed(torch.from_numpy(images).to(device))


@dataclass(frozen=True)
class TrainReport:
    output: Path
    checkpoint: Path
    steps: int
    resumed_from: int
    seconds: float  # wall time of this run, checkpoints included
    images_per_second: float  # training images per second, checkpoint writing excluded
    final_loss: float


class _Data:
    """Training examples on the device: pixels in [-1, 1] (uint8 kept, converted
    per batch), or, in latent space, the VAE posterior's mean and std of every
    image computed once (deterministically) at the start."""

    def __init__(self, config: TrainConfig, spec: DatasetSpec, root, device: torch.device):
        images, labels = load_train(spec, root)
        if len(images) < config.batch_size:
            raise DatasetError(f"{spec.name} has {len(images)} training images, fewer than the batch size "
                               f"{config.batch_size}")
        self.labels = torch.from_numpy(labels).to(device)
        self.codec, self.vae_provenance, self.latent = None, None, None
        self.scale = 1.0
        if config.space == "pixel":
            self.images = torch.from_numpy(images).to(device)
            return
        vae, self.vae_provenance = load_vae(config.vae)
        vae = vae.to(device).eval().requires_grad_(False)
        self.latent = latent_shape(vae, spec.size)
        codec = PixelCodec(vae, spec.channels, 1.0)
        means, stds = [], []
        with torch.no_grad():
            for start in bar(range(0, len(images), 256), desc=f"encoding {spec.name} (VAE)", unit="batch of 256"):
                m, s = codec.encode(_pixels(images[start:start + 256], device))
                means.append(m)
                stds.append(s)
        self.mean, self.std = torch.cat(means), torch.cat(stds)
        # Unit-variance latents, as the noise schedule assumes.
        self.scale = float(1.0 / self.mean.std())
        self.mean *= self.scale
        self.std *= self.scale
        codec.scale = self.scale
        self.codec = codec

    def batch(self, idx: np.ndarray, g: torch.Generator) -> torch.Tensor:
        index = torch.from_numpy(idx).to(self.labels.device)
        if self.codec is None:
            return _signed(self.images[index])
        mean, std = self.mean[index], self.std[index]
        return mean + std * torch.randn(mean.shape, generator=g, device=mean.device)


def _checkpoint_meta(checkpoint: Path) -> tuple[TrainConfig, int]:
    """The configuration and step a checkpoint says it holds, read as the
    generator folder's JSON is (bounded, no link); a broken one is a
    one-line ModelError that says how to go on."""
    from ddchallenge.diffusion.folder import ModelError, read_json_object

    meta = read_json_object(checkpoint / META_FILE)
    try:
        config, step = TrainConfig.from_json(meta["train_config"]), meta["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(step)
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"{checkpoint / META_FILE} does not describe a training checkpoint (train_config and "
                         "step); remove that checkpoint to resume from the one before, or start a new output "
                         "folder") from None
    return config, step


def saved_config(output: str | os.PathLike, dataset: str, preset: str | None = None, **given) -> TrainConfig:
    """The configuration of the run in `output`, for --resume; options given
    again must agree with it."""
    get_dataset(dataset)  # an unknown name is named as such first
    found = checkpoints(Path(output))
    if not found:
        raise UsageError(f"nothing to resume: {output} holds no step-* checkpoint; start without --resume")
    config = _checkpoint_meta(found[-1])[0]
    given.update(dataset=dataset, preset=preset)
    for name, value in given.items():
        if value is not None and value != getattr(config, name):
            raise UsageError(f"{output} was trained with {name} {getattr(config, name)!r}, not {value!r}; resume "
                             "with the same options (or none), or start a new output folder")
    return config


def train(config: TrainConfig, output: str | os.PathLike, *, device: str = "auto", root=None, resume: bool = False,
          stop_after: int | None = None, progress: bool = True) -> TrainReport:
    """Train (or, with `resume`, continue) a generator into `output`.
    `stop_after` ends the run early after that many steps in total, as an
    interruption would (used to test resuming). `progress`: bars on stderr
    for the steps, the latent encoding and each checkpoint written."""
    with shown(progress):
        return _train(config, output, device, root, resume, stop_after)


def _train(config: TrainConfig, output: str | os.PathLike, device: str, root, resume: bool,
           stop_after: int | None) -> TrainReport:
    spec = get_dataset(config.dataset)
    output = Path(output)
    dev = resolve_device(device)
    existing = checkpoints(output)
    # A save that an interruption cut half-way, the only thing a run stopped during its first save leaves: removed,
    # and not counted as content (a folder holding only that is the new run's to start in).
    stale = [p for p in output.glob(".tmp-step-*") if p.is_dir() and not p.is_symlink()] if output.is_dir() else []
    if resume:
        if not existing:
            raise UsageError(f"nothing to resume: {output} holds no step-* checkpoint; start without --resume")
        if _checkpoint_meta(existing[-1])[0] != config:
            raise UsageError(f"{existing[-1]} was trained with another configuration; resume with the same "
                             "options (or start a new output folder)")
    elif output.exists() and any(p not in stale for p in output.iterdir()):
        raise OutputExistsError(f"{output} is not empty; pass --resume to continue its training, or choose a new folder")
    for folder in stale:
        shutil.rmtree(folder)

    data = _Data(config, spec, root, dev)
    if config.preset == "tiny":  # said once the run is sure to start, not before an error
        log.warning("the tiny preset is a smoke test: its 0.16 M-parameter model samples noise, not %s images "
                    "(%d steps); train with the dataset's preset for a usable generator", spec.name, config.steps)
    in_shape = data.latent or spec.image_shape
    torch.manual_seed(step_seed(config.seed, 0, 99))  # the initial weights
    unet = build_unet(config, in_shape, spec.classes).to(dev)
    ema = build_unet(config, in_shape, spec.classes).to(dev).requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    optimiser = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = build_scheduler(config.prediction)
    start_step = 0
    if resume:
        start_step = _load_state(existing[-1], unet, ema, optimiser, dev)
        log.info("resuming from %s (step %d of %d)", existing[-1].name, start_step, config.steps)

    order = BatchOrder(len(data.labels), config.batch_size, config.seed)
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    steps = bar(total=config.steps, initial=start_step, unit="step", desc=f"train {spec.name}")
    unet.train()
    loss_value, begin, last = float("nan"), time.perf_counter(), existing[-1] if existing else None
    saving = 0.0  # seconds spent writing checkpoints (and their sample grids), left out of the training rate
    for step in range(start_step, end):
        g = torch.Generator(dev).manual_seed(step_seed(config.seed, step))
        idx = order(step)
        x0 = data.batch(idx, g)
        labels = data.labels[torch.from_numpy(idx).to(dev)]
        if config.hflip:  # in latent space, flipping the latent stands in for encoding the flipped image
            flip = torch.rand(len(x0), generator=g, device=dev) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        drop = torch.rand(len(x0), generator=g, device=dev) < config.label_dropout
        labels = torch.where(drop, torch.full_like(labels, spec.classes), labels)
        noise = torch.randn(x0.shape, generator=g, device=dev)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=g, device=dev)
        xt = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t) if config.prediction == "v_prediction" else noise
        for group in optimiser.param_groups:
            group["lr"] = lr_at(step, config.lr, config.warmup, config.steps)
        with autocast:
            pred = unet(xt, t, class_labels=labels).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
        optimiser.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - decay)
        done = step + 1
        if done % 10 == 0 or done == end:
            loss_value = loss.item()
            rate = (done - start_step) * config.batch_size / (time.perf_counter() - begin - saving)
            steps.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{rate:.0f}", refresh=False)
        steps.update(1)
        if done % config.checkpoint_every == 0 or done == config.steps:
            saving -= time.perf_counter()
            last = _save(output, config, spec, done, unet, ema, optimiser, scheduler, data, dev)
            saving += time.perf_counter()
    steps.close()
    if last is None or _checkpoint_meta(last)[1] != end:
        saving -= time.perf_counter()
        last = _save(output, config, spec, end, unet, ema, optimiser, scheduler, data, dev)
        saving += time.perf_counter()
    seconds = time.perf_counter() - begin
    rate = (end - start_step) * config.batch_size / max(seconds - saving, 1e-9)
    return TrainReport(output, last, end, start_step, seconds, rate, loss_value)


def _save(output: Path, config: TrainConfig, spec: DatasetSpec, step: int, unet, ema, optimiser, scheduler,
          data: _Data, dev: torch.device) -> Path:
    from safetensors.torch import save_file

    from ddchallenge.fileio import torch_bytes
    from ddchallenge.report import image_grid

    output.mkdir(parents=True, exist_ok=True)
    final = output / f"step-{step:07d}"
    tmp = output / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    meta = describe(config, spec, step, data.scale, data.latent, data.vae_provenance)
    gen = Generator(ema, dict(scheduler.config), data.codec, meta, {})

    def state() -> None:
        (tmp / STATE).mkdir()
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, tmp / STATE / "unet.safetensors")
        (tmp / STATE / "optimizer.pt").write_bytes(torch_bytes(optimiser.state_dict()))

    parts = [("unet/", lambda: ema.save_pretrained(tmp / "unet", safe_serialization=True)),
             ("scheduler/", lambda: scheduler.save_pretrained(tmp / "scheduler")),
             *([("vae/", lambda: data.codec.vae.save_pretrained(tmp / "vae", safe_serialization=True))]
               if data.codec is not None else []),
             (f"{STATE}/", state),
             # Sampling the grid is most of a checkpoint's time on a CPU: it shows its own bar of images.
             ("samples.png", lambda: (tmp / "samples.png").write_bytes(
                 image_grid(_sample_entry(gen, spec, dev), max_classes=10, max_per_class=8))),
             # Last: the description marks the folder complete.
             (META_FILE, lambda: (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True)))]
    with bar(total=len(parts), desc=f"checkpoint {final.name}", unit="part") as written:
        for name, write in parts:
            written.set_postfix_str(name, refresh=False)
            write()
            written.update(1)
    if final.exists():  # the same step saved before (a resumed run that ended where it started)
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in checkpoints(output)[:-config.keep_checkpoints]:
        shutil.rmtree(old)
    log.debug("saved %s", final)
    return final


def _sample_entry(gen: Generator, spec: DatasetSpec, dev: torch.device):
    """Eight samples for each of the first ten classes, as a DatasetEntry for the PNG grid."""
    from ddchallenge.data import normalise
    from ddchallenge.diffusion.sample import sample
    from ddchallenge.submission import DatasetEntry

    images, labels = sample(gen, list(range(min(10, spec.classes))), 8, seed=0, device=dev, desc="samples.png")
    return DatasetEntry(spec=spec, images=normalise(images, spec), labels=torch.from_numpy(labels), ipc=8,
                        kind="labelled", source="samples", sha256="")


def _load_state(folder: Path, unet, ema, optimiser, dev: torch.device) -> int:
    from safetensors.torch import load_file

    from ddchallenge.diffusion.model import load_unet

    from ddchallenge.fileio import load_torch_bytes

    unet.load_state_dict(load_file(folder / STATE / "unet.safetensors", device=str(dev)))
    ema.load_state_dict(load_unet(folder / "unet").state_dict())  # checked config, local weights only
    state = load_torch_bytes((folder / STATE / "optimizer.pt").read_bytes(), str(folder), DatasetError)
    optimiser.load_state_dict(state)
    return _checkpoint_meta(folder)[1]


@dataclass(frozen=True)
class VaeReport:
    output: Path
    steps: int
    seconds: float
    test_l1: float  # mean absolute reconstruction error on the test images, in [0, 1] pixel units
    latent_shape: tuple[int, int, int]


VAE_META = "ddchallenge-vae.json"
VAE_MARKER = OutputMarker(VAE_META, b'"vae_config"')  # what every folder `train-vae` writes holds


def train_vae(config: VaeConfig, output: str | os.PathLike, *, device: str = "auto", root=None,
              force: bool = False, progress: bool = True) -> VaeReport:
    """Train an AutoencoderKL on the dataset's training images (L1
    reconstruction plus a small KL term; no adversarial or perceptual loss,
    which would need downloaded weights) and save it with save_pretrained."""
    from diffusers import AutoencoderKL

    from ddchallenge.data import load_reference
    from ddchallenge.data.reference import denormalise

    spec = get_dataset(config.dataset)
    output = Path(output)
    check_output_folder(output, VAE_MARKER, force)
    if spec.size % 2 ** (len(config.channels) - 1):
        raise UsageError(f"a {len(config.channels)}-level VAE does not divide {spec.size}-pixel images; use fewer levels")
    dev = resolve_device(device)
    images, _ = load_train(spec, root)
    torch.manual_seed(step_seed(config.seed, 0, 99))
    vae = AutoencoderKL(in_channels=spec.channels, out_channels=spec.channels,
                        down_block_types=("DownEncoderBlock2D",) * len(config.channels),
                        up_block_types=("UpDecoderBlock2D",) * len(config.channels),
                        block_out_channels=tuple(config.channels), latent_channels=config.latent_channels,
                        norm_num_groups=min(32, min(config.channels)), sample_size=spec.size,
                        mid_block_add_attention=False).to(dev)
    optimiser = torch.optim.AdamW(vae.parameters(), lr=config.lr)
    order = BatchOrder(len(images), config.batch_size, config.seed)
    begin = time.perf_counter()
    vae.train()
    for step in bar(range(config.steps), desc=f"train-vae {spec.name}", unit="step", show=progress):
        g = torch.Generator(dev).manual_seed(step_seed(config.seed, step))
        x = _pixels(images[order(step)], dev)
        for group in optimiser.param_groups:
            group["lr"] = lr_at(step, config.lr, max(1, config.steps // 20), config.steps)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(generator=g)).sample
        loss = (recon - x).abs().mean() + config.kl_weight * dist.kl().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimiser.step()
    seconds = time.perf_counter() - begin
    vae.eval()
    own = spec.name != "mnist5k" and spec.validation_of is None  # a view's test set is held-out training images
    test = load_reference(spec, root if own else None, root)["images_val"][:512]
    with torch.no_grad():
        pixels = denormalise(test, spec).to(dev) * 2 - 1
        test_l1 = float((vae(pixels).sample.clamp(-1, 1) - pixels).abs().mean() / 2)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        vae.save_pretrained(staging, safe_serialization=True)
        (staging / VAE_META).write_text(json.dumps({"vae_config": config.to_json(), "test_l1": test_l1},
                                                     indent=2, sort_keys=True))
        replace_folder(staging, output, VAE_MARKER)  # the old folder or the new one, never a mix
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return VaeReport(output, config.steps, seconds, test_l1, latent_shape(vae, spec.size))
