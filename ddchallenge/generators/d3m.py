"""The `d3m` method (after Abbasi et al., "D3M: Dataset Condensation with
Diffusion Models", 2024): sample with the class vectors that `ddchallenge
invert` learned (diffusion/invert.py): image i of class k is conditioned on
vector i mod K of class k, so a class's IPC images are spread over its K
parts. A run reads its K vectors per class and must output IPC >= K
(protocol.TABLE_RULE).

Options: model (required), per_class (which stored K; default: the one the
folder's "generate" section names, else the largest stored), sampler,
steps, guidance, batch_size. `--ipc auto` goes slot by slot like the
diffusion method (slot i uses vector i mod K).
"""
from __future__ import annotations

import numpy as np

from ddchallenge.diffusion.codebook import load_table, stored
from ddchallenge.diffusion.invert import class_embedding, codebook_name, extend_embedding, make_command
from ddchallenge.diffusion.model import ModelError
from ddchallenge.errors import UsageError
from ddchallenge.generators import GenerationRequest, register
from ddchallenge.generators.diffusion import SAMPLING, generated_pool, load_model, run_sampling, sampling_settings


@register("d3m", pool=generated_pool, options=("model", "per_class") + SAMPLING, auto_ipc=True)
def d3m(req: GenerationRequest) -> tuple[np.ndarray, np.ndarray, dict]:
    settings = sampling_settings(req)
    gen, device = load_model(req, "d3m")
    folder = gen.provenance["folder"]
    have = sorted(int(r["per_class"]) for r in stored(gen, "d3m").values() if isinstance(r.get("per_class"), int))
    # A run reads K vectors per class and may not output fewer images per class than that.
    usable = [k for k in have if req.keep is None or k <= req.keep]
    per_class = req.options.get("per_class")
    if per_class is None:
        named = (gen.meta.get("generate") or {}).get("settings", {}).get("per_class")
        per_class = named if named in usable else (usable[-1] if usable else None)
    if per_class is None:
        raise ModelError(f"{folder} has no d3m class vectors for IPC {req.keep} or less (stored K: "
                         f"{', '.join(map(str, have)) or 'none'}); make them with "
                         f"`{make_command(folder, min(10, req.keep or 10))}`")
    per_class = int(per_class)
    if per_class < 1:
        raise UsageError(f"--per-class must be at least 1, got {per_class}")
    if req.keep is not None and per_class > req.keep:
        raise UsageError(f"--per-class {per_class} reads {per_class} stored vectors per class, more than the IPC "
                         f"{req.keep} the run makes; a run reads at most as many stored rows per class as it outputs")
    name = codebook_name(per_class)
    if per_class not in have:
        raise ModelError(f"{folder} has no d3m vectors for K {per_class} (stored: {', '.join(map(str, have)) or 'none'}"
                         f"); make them with `{make_command(folder, per_class)}`")
    dim = class_embedding(gen).embedding_dim
    vectors, record = load_table(gen, name, "vectors", (req.spec.classes, per_class, dim),
                                 make_command(folder, per_class), req.tables)
    conditions = extend_embedding(gen, vectors)
    images, labels = run_sampling(req, gen, settings, device, conditions=conditions)
    provenance = {"model": gen.provenance, "sampling": settings,
                  "codebook": {"name": name, "file": record["file"], "sha256": record["sha256"],
                               "seed": record.get("seed")}}
    return images, labels, provenance
