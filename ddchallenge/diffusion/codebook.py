"""Tensors that a generation method keeps in the model folder beside the
denoiser: the D4M prototypes (`ddchallenge prototypes`) and the D3M class
vectors (`ddchallenge invert`).

    step-0002500/
      ddchallenge.json            "codebooks": {name: {file, sha256, ...}}, "generate": {method, settings}
      codebooks/d4m-ipc10.safetensors
      codebooks/d3m-k10.safetensors

Each file is recorded in ddchallenge.json with its sha256, and the folder is
one of the parts the model hash covers (model.SERVING_PARTS), so a labelled
set's provenance names the exact codebook it was made from. Reading checks
the recorded hash first: a tampered or missing file is refused, never used.

The "generate" section says which method the folder is meant to run with
and its settings; `train` writes plain diffusion, `prototypes` and `invert`
overwrite it with their own method (the last one run decides). Track 2
(generators.track2) reads it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ddchallenge.diffusion.model import META_FILE, Generator, ModelError, checkpoints, resolve
from ddchallenge.protocol import DatasetSpec

FOLDER = "codebooks"


def model_folder(ref: str) -> Path:
    """The local checkpoint folder that `prototypes`/`invert` write into: the
    folder itself, or the newest step-* checkpoint of a training folder."""
    path = Path(ref).expanduser()
    if not path.is_dir():
        raise ModelError(f"{ref} is not a local model folder; codebooks are written into a folder made by "
                         "`ddchallenge train` (download a Hub model first)")
    folder, _ = resolve(str(path))
    if not (folder / META_FILE).is_file() and checkpoints(folder):
        folder = checkpoints(folder)[-1]
    return folder


def _write_meta(folder: Path, meta: dict) -> None:
    from ddchallenge.fileio import atomic_write_bytes

    atomic_write_bytes(folder / META_FILE, json.dumps(meta, indent=2, sort_keys=True).encode())


def store(gen: Generator, name: str, tensors: dict[str, torch.Tensor], record: dict, generate: dict) -> Path:
    """Write codebooks/NAME.safetensors, record it (with its sha256) in
    ddchallenge.json and make `generate` the folder's method section."""
    from safetensors.torch import save_file

    from ddchallenge.fileio import atomic_path, sha256_file

    folder = Path(gen.provenance["folder"])
    path = folder / FOLDER / f"{name}.safetensors"
    path.parent.mkdir(exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    meta = json.loads((folder / META_FILE).read_text())
    meta.setdefault("codebooks", {})[name] = {**record, "file": f"{FOLDER}/{path.name}", "sha256": sha256_file(path)}
    meta["generate"] = generate
    _write_meta(folder, meta)
    gen.meta = meta
    return path


def stored(gen: Generator, method: str) -> dict[str, dict]:
    """The codebook records of `method` in the folder's ddchallenge.json."""
    books = gen.meta.get("codebooks") or {}
    if not isinstance(books, dict):
        raise ModelError(f"{gen.provenance['folder']}/{META_FILE}: 'codebooks' is not a mapping")
    return {n: r for n, r in books.items() if isinstance(r, dict) and r.get("method") == method}


def load(gen: Generator, name: str, hint: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of codebook NAME and its record, after checking the file
    against the recorded sha256. `hint` is the command that makes it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ddchallenge.fileio import sha256_file

    folder = Path(gen.provenance["folder"])
    record = (gen.meta.get("codebooks") or {}).get(name)
    if not isinstance(record, dict) or not isinstance(record.get("file"), str):
        raise ModelError(f"{folder} has no {name} codebook; make it with `{hint}`")
    if record.get("sample_shape") is not None and list(record["sample_shape"]) != list(gen.sample_shape):
        raise ModelError(f"{folder}: codebook {name} was made in a {record['sample_shape']} space; this model samples "
                         f"{list(gen.sample_shape)}; remake it with `{hint}`")
    path = folder / record["file"]
    if Path(record["file"]).is_absolute() or ".." in Path(record["file"]).parts:
        raise ModelError(f"{folder}/{META_FILE}: codebook {name} points outside the folder; refused")
    if not path.is_file() or path.is_symlink():
        raise ModelError(f"{folder}: the {name} codebook file {record['file']} is missing; copy the whole model "
                         f"folder or remake it with `{hint}`")
    if sha256_file(path) != record.get("sha256"):
        raise ModelError(f"{folder}: {record['file']} does not match the sha256 recorded in {META_FILE} (changed "
                         f"since it was made); remake it with `{hint}`")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{folder}: {record['file']} is not a readable safetensors file ({exc}); remake it with "
                         f"`{hint}`") from None
    return tensors, record


def encode_training(gen: Generator, spec: DatasetSpec, root, device: torch.device,
                    batch: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dataset's training images in the space the denoiser works in:
    (mean, std, labels). Pixel space: the images in [-1, 1] (std 0); latent
    space: the scaled VAE posterior (mean, std), as training saw them."""
    from ddchallenge.data import load_train

    images, labels = load_train(spec, root)
    means, stds = [], []
    with torch.no_grad():
        for s in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch])).to(device).float().div_(127.5).sub_(1)
            if gen.codec is None:
                means.append(x)
                stds.append(torch.zeros_like(x))
            else:
                m, sd = gen.codec.encode(x)
                means.append(m)
                stds.append(sd)
    return torch.cat(means), torch.cat(stds), torch.from_numpy(labels).to(device)


def check_shape(gen: Generator, name: str, tensor: torch.Tensor, expected: tuple[int, ...], hint: str) -> None:
    """A codebook made for another model (class count, IPC/K, latent shape) is refused."""
    if tuple(tensor.shape) != expected:
        raise ModelError(f"{gen.provenance['folder']}: codebook {name} holds a {tuple(tensor.shape)} tensor; this "
                         f"model needs {expected} (classes, count, shape); remake it with `{hint}`")

