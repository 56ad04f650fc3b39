"""The training images in the denoiser's space, for the commands that fit a
table to them (`prototypes`, `invert`). Kept apart from codebook.py and the
generation methods: nothing that Track 2 generation imports reads training
data (tests/test_methods.py runs every method with the readers patched to
raise)."""
from __future__ import annotations

import numpy as np
import torch

from ddchallenge.diffusion.model import Generator
from ddchallenge.progress import bar
from ddchallenge.protocol import DatasetSpec


def encode_training(gen: Generator, spec: DatasetSpec, root, device: torch.device,
                    batch: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dataset's training images in the space the denoiser works in:
    (mean, std, labels). Pixel space: the images in [-1, 1] (std 0); latent
    space: the scaled VAE posterior (mean, std), as training saw them."""
    from ddchallenge.data import load_train

    images, labels = load_train(spec, root)
    means, stds = [], []
    with torch.no_grad(), bar(total=len(images), desc=f"encoding {spec.name}", unit="image") as encoded:
        for s in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch])).to(device).float().div_(127.5).sub_(1)
            if gen.codec is None:
                means.append(x)
                stds.append(torch.zeros_like(x))
            else:
                m, sd = gen.codec.encode(x)
                means.append(m)
                stds.append(sd)
            encoded.update(len(x))
    return torch.cat(means), torch.cat(stds), torch.from_numpy(labels).to(device)
