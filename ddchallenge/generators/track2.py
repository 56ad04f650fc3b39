"""The Track 2 interface: run a submitted generator folder, whatever method
made it, the same way on every path (the sandbox's child, `score
--no-sandbox`).

The folder's ddchallenge.json has a "generate" section, {"method": NAME,
"settings": {...}}, written by `train` (diffusion), `prototypes` (d4m) or
`invert` (d3m); a folder written before the section existed is plain
diffusion. `METHODS` maps a name to the settings the method accepts from
the folder; everything else about a method lives in its own module, so
adding one touches this table and that module only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from ddchallenge.diffusion.model import META_FILE, ModelError, checkpoints
from ddchallenge.submission import DatasetEntry

# method -> settings a folder may give it (anything else in the section is refused)
METHODS: dict[str, tuple[str, ...]] = {
    "diffusion": ("sampler", "steps", "guidance", "batch_size", "oversample", "match_steps"),
    "d4m": ("strength", "sampler", "steps", "guidance", "batch_size", "oversample", "match_steps"),
    "d3m": ("per_class", "sampler", "steps", "guidance", "batch_size", "oversample", "match_steps"),
}
WHOLE = ("steps", "batch_size", "per_class", "match_steps")  # settings that must be whole numbers
MAX_META_BYTES = 1 << 20


def folder_method(model: str | Path) -> tuple[str, dict]:
    """(method, settings) from a generator folder's ddchallenge.json (or its
    newest checkpoint's), read as bounded JSON: the folder is untrusted."""
    path = Path(model)
    folder = path if (path / META_FILE).is_file() or not checkpoints(path) else checkpoints(path)[-1]
    meta_path = folder / META_FILE
    if not meta_path.is_file() or meta_path.is_symlink() or meta_path.stat().st_size > MAX_META_BYTES:
        raise ModelError(f"{meta_path} is missing, a symbolic link or larger than 1 MiB; refused")
    try:
        section = json.loads(meta_path.read_text()).get("generate") or {"method": "diffusion", "settings": {}}
        method, settings = section["method"], dict(section.get("settings") or {})
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise ModelError(f"{meta_path}: the 'generate' section is not {{method, settings}} ({exc})") from None
    if method not in METHODS:
        raise ModelError(f"{meta_path} names method {method!r}; Track 2 runs {', '.join(sorted(METHODS))}")
    for key, value in settings.items():
        kind = str if key == "sampler" else int if key in WHOLE else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ModelError(f"{meta_path}: setting {key!r} has the wrong type ({value!r})")
    unknown = sorted(set(settings) - set(METHODS[method]))
    if unknown:
        raise ModelError(f"{meta_path}: setting {unknown[0]!r} does not apply to method {method}; "
                         f"allowed: {', '.join(METHODS[method])}")
    return method, settings


def run_track2(model: str, dataset: str, ipc: int | str, seed: int, budget: float, device: str,
               folder: Path) -> list[DatasetEntry]:
    """The images a generator folder makes within `budget` seconds, written
    to `folder` and read back as submission entries."""
    from ddchallenge.generators import GenerateConfig, generate
    from ddchallenge.submission import load_submission

    method, settings = folder_method(model)
    oversample = float(settings.pop("oversample", 1.0))
    match_steps = settings.pop("match_steps", 0)
    config = GenerateConfig(dataset, method, ipc, seed, budget=budget, device=device,
                            options={"model": str(model), **settings}, oversample=oversample, match_steps=match_steps)
    report = generate(config, folder / "generated.h5")
    # The file records where the folder was staged, a fresh path each run: the set is named by its
    # images and labels instead, so that the same generator and seed give the same record.
    return [dataclasses.replace(e, source=f"{model} (generated IPC {report.ipc} in {report.seconds:.1f} s)",
                                sha256=content_sha256(e.images, e.labels))
            for e in load_submission(report.path, dataset)]


def content_sha256(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of a set's float32 images then int64 labels, C order."""
    h = hashlib.sha256(images.to(torch.float32).contiguous().numpy().tobytes())
    h.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()
