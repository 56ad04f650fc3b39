"""Speed of the diffusion generator: sampling images per second with the
default sampler (DPM-Solver++, 20 steps, guidance 2, so 40 UNet passes per
image) for the mnist5k (28 px), cifar100 (32 px) and tinyimagenet (64 px,
latent 16x16 + VAE decoder) presets, and training images per second of the
CIFAR-100 preset (the real loop on a store of random CIFAR-shaped pixels).
Weights are freshly initialised: speed does not depend on them. Sampling:
median of --repeats timed batches, each after a warm-up.

    python bench/generation_speed.py --repeats 3 --batch 100 --train-steps 3
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from ddchallenge.diffusion.config import train_config, vae_config
from ddchallenge.diffusion.model import Generator, PixelCodec, build_scheduler, build_unet
from ddchallenge.diffusion.sample import images_per_second
from ddchallenge.diffusion.train import train
from ddchallenge.evaluation.device import resolve_device


def _vae(preset: str, channels: int):
    from diffusers import AutoencoderKL

    c = vae_config("tinyimagenet", preset)
    return AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=c.latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * len(c.channels),
                         up_block_types=("UpDecoderBlock2D",) * len(c.channels), block_out_channels=c.channels,
                         norm_num_groups=32, mid_block_add_attention=False)


def generator(preset: str, device: torch.device) -> tuple[Generator, int]:
    dataset, classes, shape = {"mnist5k": ("mnist5k", 10, (1, 28, 28)), "cifar100": ("cifar100", 100, (3, 32, 32)),
                               "tinyimagenet": ("tinyimagenet", 200, (4, 16, 16))}[preset]
    config = train_config(dataset, preset, vae="bench" if preset == "tinyimagenet" else None)
    unet = build_unet(config, shape, classes).eval().requires_grad_(False)
    codec = PixelCodec(_vae("tinyimagenet", 3).eval().requires_grad_(False), 3, 1.0) if preset == "tinyimagenet" else None
    meta = {"classes": classes, "image_shape": list(shape), "latent_shape": list(shape)}
    return Generator(unet, dict(build_scheduler("v_prediction").config), codec, meta, {}).to(device), classes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=100, help="images per sampling batch")
    ap.add_argument("--train-steps", type=int, default=3, help="timed CIFAR training steps (0: skip)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for preset in ("mnist5k", "cifar100", "tinyimagenet"):
        gen, classes = generator(preset, device)
        rates = [images_per_second(gen, classes, seed, sampler="dpm++", steps=20, guidance=2.0,
                                   batch_size=args.batch, device=device) for seed in range(args.repeats)]
        rate = statistics.median(rates)
        print(f"{preset}: {rate:.1f} images/s (median of {args.repeats}: {', '.join(f'{r:.1f}' for r in rates)}); "
              f"IPC 10 of {classes} classes in {10 * classes / rate:.0f} s", flush=True)
    if args.train_steps:
        print(f"cifar100 preset training: {_cifar_training_rate(args.train_steps, args.device):.1f} images/s "
              f"({args.train_steps} steps of {train_config('cifar100').batch_size}, checkpoint writing excluded)")


def _cifar_training_rate(steps: int, device: str) -> float:
    """The real training loop on a CIFAR-100-shaped store of random pixels."""
    import numpy as np

    from ddchallenge.data.prepare import write_train_store

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        write_train_store(Path(tmp) / "cifar100_train.h5", rng.integers(0, 256, (1000, 3, 32, 32), dtype=np.uint8),
                          np.repeat(np.arange(100), 10), 100)
        config = train_config("cifar100", steps=steps, checkpoint_every=steps)
        return train(config, Path(tmp) / "model", device=device, root=tmp, progress=False).images_per_second


if __name__ == "__main__":
    main()
