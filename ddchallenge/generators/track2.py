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
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ddchallenge.diffusion.model import ModelError, meta_file
from ddchallenge.protocol import UploadRules, generation_seed
from ddchallenge.submission import DatasetEntry

if TYPE_CHECKING:
    from ddchallenge.diffusion.codebook import DeclaredTable
    from ddchallenge.generators import GenerationReport

# method -> settings a folder may give it (anything else in the section is refused)
METHODS: dict[str, tuple[str, ...]] = {
    "diffusion": ("sampler", "steps", "guidance", "batch_size", "oversample", "match_steps"),
    "d4m": ("strength", "pool_strength", "sampler", "steps", "guidance", "batch_size", "oversample", "match_steps"),
    "d3m": ("per_class", "sampler", "steps", "guidance", "batch_size", "oversample", "match_steps"),
}
MAX_FOLDER_BATCH = 1000  # images per denoiser batch a folder may ask for: twice the default, which fits a GPU
MAX_META_BYTES = 1 << 20


def _settings_bounds() -> dict:
    """setting -> (kind, low, high): what each setting a folder gives must be."""
    from ddchallenge.diffusion.sample import MAX_GUIDANCE, SAMPLERS
    from ddchallenge.protocol import MAX_MATCH_STEPS, MAX_OVERSAMPLE, MAX_RULE_IPC

    return {"sampler": ("choice", SAMPLERS, None), "steps": ("whole", 1, 1000), "guidance": ("number", 0, MAX_GUIDANCE),
            "batch_size": ("whole", 1, MAX_FOLDER_BATCH), "oversample": ("number", 1, MAX_OVERSAMPLE),
            "match_steps": ("whole", 0, MAX_MATCH_STEPS), "strength": ("number", 1e-6, 1),
            "pool_strength": ("number", 1e-6, 1),
            "per_class": ("whole", 1, MAX_RULE_IPC)}


def folder_method(model: str | Path) -> tuple[str, dict]:
    """(method, settings) from a generator folder's ddchallenge.json (or its
    newest checkpoint's), read as bounded JSON: the folder is untrusted, so
    every problem is one ModelError naming the file, the field and what it
    must be, and every size it can ask for is bounded."""
    meta_path, meta = _read_meta(model)
    return _method_of(meta, str(meta_path))


# What `ddchallenge settings` may change: per_class is not among them, it names d3m's table (`invert` sets it).
ADJUSTABLE = ("strength", "pool_strength", "sampler", "steps", "guidance", "batch_size", "oversample", "match_steps")


def method_defaults(method: str, settings: dict) -> dict:
    """What a run of `method` uses for each adjustable setting its folder (`settings`) does not give."""
    from ddchallenge.diffusion.prototypes import DEFAULT_STRENGTH
    from ddchallenge.diffusion.sample import SAMPLING_DEFAULTS

    strength = settings.get("strength", DEFAULT_STRENGTH)
    every = dict(strength=strength, pool_strength=strength, **SAMPLING_DEFAULTS, oversample=1.0, match_steps=0)
    return {k: v for k, v in every.items() if k in METHODS[method]}


@dataclasses.dataclass(frozen=True)
class FolderSettings:
    """What a Track 2 run of a folder reads, as `change_settings` left it."""

    meta_path: Path  # the ddchallenge.json a run reads
    method: str
    settings: dict  # the folder's own settings (a run fills the rest from `method_defaults`)
    tables: list[DeclaredTable]  # every table the folder declares, checked


def change_settings(model: str | Path, changes: dict, unset: tuple[str, ...] = (),
                    drop_tables: tuple[str, ...] = ()) -> FolderSettings:
    """The ddchallenge.json a Track 2 run of `model` reads, its method,
    settings and tables, with `changes` (setting -> value; None: unchanged) merged in,
    each checked against the bounds a run checks, and the settings named in
    `unset` removed (a run then uses `method_defaults`), the tables named in
    `drop_tables` removed (declaration and file: Track 2's table rule counts
    every table a folder carries), and written back; with no change, read
    only. A setting the
    folder's method does not take is refused: the method itself changes
    with `prototypes`/`invert --make-default`, which also store its table."""
    from ddchallenge.diffusion.codebook import declared_tables, table_path, write_meta
    from ddchallenge.errors import UsageError

    if not Path(model).is_dir():
        raise UsageError(f"{model} is not a folder; pass a generator folder (`ddchallenge train` makes one)")
    try:
        meta_file(model)
    except ModelError as exc:  # the user's own folder: a usage mistake
        raise UsageError(str(exc)) from None
    meta_path, meta = _read_meta(model)
    method, settings = _method_of(meta, str(meta_path))
    given = {k: v for k, v in changes.items() if v is not None}
    flag = {k: "--" + k.replace("_", "-") for k in ADJUSTABLE}  # the option that sets each
    for key, value in given.items():
        if key not in ADJUSTABLE:
            raise UsageError(f"--{key.replace('_', '-')} is not a setting `ddchallenge settings` changes; it takes "
                             f"{', '.join(flag.values())}")
        if key not in METHODS[method]:
            raise UsageError(f"{flag[key]} does not apply to method {method}, the one {model} runs; make another "
                             "method the folder's with `ddchallenge prototypes` (d4m) or `invert` (d3m) and "
                             "--make-default")
        try:
            _check_setting("ddchallenge settings", flag[key], key, value)  # named by its option, not its JSON field
        except ModelError as exc:
            raise UsageError(str(exc)) from None
    for key in unset:
        if key not in ADJUSTABLE:
            raise UsageError(f"--unset {key.replace('_', '-')}: not a setting; it takes "
                             f"{', '.join(k.replace('_', '-') for k in ADJUSTABLE)}")
        if key in given:
            raise UsageError(f"{flag[key]} and --unset {key.replace('_', '-')} contradict each other; pass one")
        if key not in METHODS[method]:
            raise UsageError(f"--unset {key.replace('_', '-')}: the setting does not apply to method {method}, the "
                             f"one {model} runs")
        if key not in settings:
            raise UsageError(f"--unset {key.replace('_', '-')}: {model} does not set it (the method's default runs); "
                             "nothing to unset")
    books = meta.get("codebooks") or {}
    if not isinstance(books, dict):
        raise ModelError(f"{meta_path}: 'codebooks' must be an object of table records")
    unknown = sorted(set(drop_tables) - set(books))
    if unknown:
        raise UsageError(f"--drop-table {unknown[0]}: {model} has no such table; it has "
                         f"{', '.join(sorted(books)) or 'none'}")
    dropped = list(unset)  # each one set (checked above)
    if not given and not dropped and not drop_tables:
        return FolderSettings(meta_path, method, settings, declared_tables(meta_path.parent, meta))
    merged = {k: v for k, v in {**settings, **given}.items() if k not in dropped}
    files = [table_path(meta_path.parent, name, books[name]) for name in drop_tables]  # never outside codebooks/
    meta = {**meta, "codebooks": {name: record for name, record in books.items() if name not in drop_tables},
            "generate": {"method": method, "settings": merged}}
    write_meta(meta_path.parent, meta)
    for path in files:  # after the declaration: an interruption leaves a stray file, which a run names
        path.unlink(missing_ok=True)
    return FolderSettings(meta_path, method, merged, declared_tables(meta_path.parent, meta))


def check_folder_tables(model: str | Path, ipc: int | str) -> None:
    """Track 2's table rule, before the folder runs: every table it declares
    is read from ddchallenge.json and its file's header (no tensor data),
    and a folder whose tables hold more rows per class together than this
    run may output is refused."""
    meta_path, meta = _read_meta(model)
    _check_tables(meta_path.parent, meta, ipc)


def _read_meta(model: str | Path) -> tuple[Path, dict]:
    """The folder's ddchallenge.json, read once per run and checked whole
    before anything relies on it."""
    from ddchallenge.diffusion.config import SPACES
    from ddchallenge.diffusion.folder import check_meta, read_json_object
    from ddchallenge.diffusion.model import FORMAT

    meta_path = meta_file(model)
    return meta_path, check_meta(read_json_object(meta_path, MAX_META_BYTES), str(meta_path), FORMAT, SPACES)


def _method_of(meta: dict, where: str) -> tuple[str, dict]:
    from ddchallenge.diffusion.folder import generate_section

    method, settings = generate_section(meta, where)
    if method not in METHODS:
        raise ModelError(f"{where}: generate.method names method {method!r}; Track 2 runs "
                         f"{', '.join(sorted(METHODS))}")
    unknown = sorted(set(settings) - set(METHODS[method]))
    if unknown:
        raise ModelError(f"{where}: generate.settings.{unknown[0]} does not apply to method {method}; "
                         f"allowed: {', '.join(METHODS[method])}")
    for key, value in settings.items():
        _check_setting(where, f"generate.settings.{key}", key, value)
    return method, dict(settings)


def _check_setting(where: str, field: str, key: str, value) -> None:
    """ModelError "WHERE: FIELD must be ..." unless `value` is within setting `key`'s bounds."""
    from ddchallenge.diffusion.folder import choice, number, whole

    kind, low, high = _settings_bounds()[key]
    if kind == "choice":
        choice(where, field, value, low)
    elif kind == "whole":
        whole(where, field, value, low, high)
    else:
        number(where, field, value, low, high)


def _check_tables(folder: Path, meta: dict, ipc: int | str) -> None:
    from ddchallenge.diffusion.codebook import declared_tables

    rules = UploadRules(ipc=ipc if isinstance(ipc, int) else None)
    rules.check_tables({t.name: t.rows_per_class for t in declared_tables(folder, meta)}, folder.name)


def run_folder(model: str | Path, dataset: str, ipc: int | str, scoring_seed: int, budget: float, device: str,
               output: Path, force: bool = False, started: float | None = None) -> GenerationReport:
    """Track 2's one path, the same for `score FOLDER --budget` (in its
    sandboxed child) and `generate --track 2 --model FOLDER`: the folder's
    own method and settings, its tables checked against the rule first,
    generation seeded from the scoring seed under its own tag (never an
    evaluation round's draw), the whole run timed against `budget` from
    `started` (time.monotonic(); default now)."""
    from ddchallenge.generators import GenerateConfig, generate

    meta_path, meta = _read_meta(model)
    method, settings = _method_of(meta, str(meta_path))
    _check_tables(meta_path.parent, meta, ipc)
    oversample = float(settings.pop("oversample", 1.0))
    match_steps = settings.pop("match_steps", 0)
    config = GenerateConfig(dataset, method, ipc, generation_seed(scoring_seed), track=2, budget=budget,
                            device=device, options={"model": str(model), **settings}, oversample=oversample,
                            match_steps=match_steps, scoring_seed=scoring_seed)
    return generate(config, output, force=force, started=started)


def run_track2(model: str, dataset: str, ipc: int | str, seed: int, budget: float, device: str,
               folder: Path, started: float | None = None) -> list[DatasetEntry]:
    """The images a generator folder makes within `budget` seconds from
    `started` (scoring seed `seed`), written to `folder` and read back as
    submission entries."""
    from ddchallenge.submission import load_submission

    report = run_folder(model, dataset, ipc, seed, budget, device, folder / "generated.h5", started=started)
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
