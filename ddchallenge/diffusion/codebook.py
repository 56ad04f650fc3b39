"""Tables that a generation method keeps in the model folder beside the
denoiser: the D4M prototypes (`ddchallenge prototypes`) and the D3M class
vectors (`ddchallenge invert`).

    step-0002500/
      ddchallenge.json            "codebooks": {name: {file, sha256, purpose, rows_per_class, ...}},
                                  "generate": {method, settings}
      codebooks/d4m-ipc10.safetensors
      codebooks/d3m-k10.safetensors

Each table is declared in ddchallenge.json: its file and sha256, what it is
for, its classes and rows per class, its float32 shape and byte size. The
folder is one of the parts the model hash covers (model.SERVING_PARTS), so a
labelled set's provenance names the exact table it was made from.

Track 2's table rule (protocol.TABLE_RULE) is enforced here twice:
`declared_tables` reads every declaration and file header before a run (no
tensor data) so that the scorer can refuse a folder whose tables carry more
rows per class in all than the run may output, or a file nobody declared; `load_table`,
the one reader d4m and d3m use, checks the file (hash, dtype float32,
finite, shape against the model) and notes in the run's ledger how many
rows per class it read.

The "generate" section says which method the folder is meant to run with
and its settings; `train` writes diffusion with matching; `prototypes` and `invert`
add a table without touching it unless asked (`--make-default`).

Reading the training images (`encode.py`) lives apart: nothing that
generation imports can reach them.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ddchallenge.diffusion.model import (META_FILE, NEVER_READ, Generator, ModelArgumentError, ModelError, checkpoints,
                                        resolve)

FOLDER = "codebooks"


def model_folder(ref: str) -> Path:
    """The local checkpoint folder that `prototypes`/`invert` write into: the
    folder itself, or the newest step-* checkpoint of a training folder."""
    path = Path(ref).expanduser()
    if not path.is_dir():
        raise ModelArgumentError(f"{ref} is not a local model folder; codebooks are written into a folder made "
                                 "by `ddchallenge train` (download a Hub model first)")
    folder, _ = resolve(str(path))
    if not (folder / META_FILE).is_file() and checkpoints(folder):
        folder = checkpoints(folder)[-1]
    return folder


def write_meta(folder: Path, meta: dict) -> None:
    """FOLDER's ddchallenge.json, written atomically."""
    from ddchallenge.fileio import atomic_write_bytes

    atomic_write_bytes(folder / META_FILE, json.dumps(meta, indent=2, sort_keys=True).encode())


def store(gen: Generator, name: str, tensors: dict[str, torch.Tensor], record: dict, purpose: str,
          generate: dict | None = None) -> Path:
    """Write codebooks/NAME.safetensors (one float32 table, (classes, rows,
    ...)) and declare it, with its sha256, in ddchallenge.json; with
    `generate`, that becomes the folder's method section too."""
    from safetensors.torch import save_file

    from ddchallenge.fileio import atomic_path, sha256_file

    (key, table), = tensors.items()
    table = table.detach().float().cpu().contiguous()
    folder = Path(gen.provenance["folder"])
    path = folder / FOLDER / f"{name}.safetensors"
    path.parent.mkdir(exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({key: table}, str(tmp))
    meta = json.loads((folder / META_FILE).read_text())
    meta.setdefault("codebooks", {})[name] = {
        **record, "file": f"{FOLDER}/{path.name}", "sha256": sha256_file(path), "purpose": purpose,
        "classes": int(table.shape[0]), "rows_per_class": int(table.shape[1]), "shape": list(table.shape),
        "dtype": "float32", "bytes": path.stat().st_size}
    if generate is not None:
        meta["generate"] = generate
    write_meta(folder, meta)
    gen.meta = meta
    return path


def stored(gen: Generator, method: str) -> dict[str, dict]:
    """The codebook records of `method` in the folder's ddchallenge.json."""
    books = gen.meta.get("codebooks") or {}
    if not isinstance(books, dict):
        raise ModelError(f"{gen.provenance['folder']}/{META_FILE}: 'codebooks' is not a mapping")
    return {n: r for n, r in books.items() if isinstance(r, dict) and r.get("method") == method}


def load_table(gen: Generator, name: str, key: str, expected: tuple[int, ...], hint: str,
               ledger: dict[str, int]) -> tuple[torch.Tensor, dict]:
    """Table NAME's tensor `key` and its record, checked: the file against
    the recorded sha256, float32, finite, shape `expected` (classes, rows,
    ...). The rows per class read are noted in `ledger`. `hint` is the
    command that makes the table."""
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
    path = table_path(folder, name, record)
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
    tensor = tensors.get(key)
    if tensor is None:
        raise ModelError(f"{folder}: codebook {name} holds no {key!r} tensor; remake it with `{hint}`")
    if tensor.dtype != torch.float32:
        raise ModelError(f"{folder}: codebook {name} is {str(tensor.dtype).replace('torch.', '')}; tables are "
                         f"float32; remake it with `{hint}`")
    if tuple(tensor.shape) != expected:
        raise ModelError(f"{folder}: codebook {name} holds a {tuple(tensor.shape)} tensor; this model needs "
                         f"{expected} (classes, count, shape); remake it with `{hint}`")
    if not torch.isfinite(tensor).all():
        raise ModelError(f"{folder}: codebook {name} holds non-finite values (NaN or inf); remake it with `{hint}`")
    ledger[name] = max(ledger.get(name, 0), int(tensor.shape[1]))
    return tensor, record


@dataclass(frozen=True)
class DeclaredTable:
    name: str
    file: str  # relative to the folder
    classes: int
    rows_per_class: int
    bytes: int


MAX_HEADER = 1 << 20  # a one-tensor safetensors header is a few hundred bytes


def declared_tables(folder: Path, meta: dict) -> list[DeclaredTable]:
    """Every table the folder declares, checked from ddchallenge.json and the
    files' headers alone (no tensor data is read): one float32 tensor of
    shape (classes, rows, ...), rows equal to the declared rows per class,
    the file exactly the size its header says, the declared byte size; and
    no file under codebooks/ that is not declared. The folder is untrusted."""
    where = f"{folder.name}/{META_FILE}"
    books = meta.get("codebooks") or {}
    if not isinstance(books, dict):
        raise ModelError(f"{where}: 'codebooks' must be an object of table records")
    tables, files = [], set()
    for name, record in sorted(books.items()):
        path = table_path(folder, name, record)
        if not path.is_file() or path.is_symlink():
            raise ModelError(f"{where}: table {name} names {record['file']}, which is missing or not a regular file")
        classes, rows, size = _header(path, f"{folder.name}/{record['file']}")
        declared = record.get("rows_per_class", record.get("ipc", record.get("per_class")))
        if isinstance(declared, bool) or not isinstance(declared, int) or declared != rows:
            raise ModelError(f"{where}: table {name} declares {declared!r} rows per class but its file holds {rows}; "
                             "remake the table")
        if record.get("bytes") is not None and record["bytes"] != size:
            raise ModelError(f"{where}: table {name} declares {record['bytes']!r} bytes but its file has {size}; "
                             "remake the table")
        files.add(path.name)
        tables.append(DeclaredTable(name, record["file"], classes, rows, size))
    # A name generation never reads is left out of a sandboxed run's copy; ignored here too, so that a run in-process
    # (`--no-sandbox`) judges the folder the sandbox's child sees.
    stray = sorted(p.name for p in (folder / FOLDER).iterdir()
                   if p.name not in files and not any(fnmatch.fnmatch(p.name, pattern) for pattern in NEVER_READ)) \
        if (folder / FOLDER).is_dir() and not (folder / FOLDER).is_symlink() else []
    if stray:
        raise ModelError(f"{folder.name}/{FOLDER}/{stray[0]} is not declared in {META_FILE}; a generator folder "
                         "carries only declared tables: remove the file")
    return tables


def table_path(folder: Path, name: str, record) -> Path:
    """Where a declared table's file is: under codebooks/, or ModelError (the folder is untrusted)."""
    if not isinstance(record, dict) or not isinstance(record.get("file"), str):
        raise ModelError(f"{folder}/{META_FILE}: codebooks.{name} must be an object with a 'file' name")
    rel = Path(record["file"])
    if rel.is_absolute() or ".." in rel.parts or rel.parts[:1] != (FOLDER,) or len(rel.parts) != 2:
        raise ModelError(f"{folder}/{META_FILE}: codebook {name} points outside {FOLDER}/; refused")
    return folder / rel


def _header(path: Path, shown: str) -> tuple[int, int, int]:
    """(classes, rows per class, file size) from a safetensors header."""
    try:  # the folder is untrusted: no link (swapped in since it was checked), no FIFO
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise ModelError(f"{shown} cannot be read ({exc.strerror}); remake the table") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ModelError(f"{shown} is not a regular file; remake the table")
        size = info.st_size
        head = fh.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(MAX_HEADER, size - 8):
            raise ModelError(f"{shown} is not a safetensors table (bad header length); remake the table")
        try:
            header = json.loads(fh.read(length))
        except (ValueError, RecursionError):  # RecursionError: nested thousands deep
            raise ModelError(f"{shown} is not a safetensors table (unreadable header); remake the table") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else {}
    if len(tensors) != 1:
        raise ModelError(f"{shown} must hold exactly one tensor, holds {len(tensors)}; remake the table")
    (info,) = tensors.values()
    shape = info.get("shape") if isinstance(info, dict) else None
    if not (isinstance(shape, list) and len(shape) >= 2
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
        raise ModelError(f"{shown}: the table's shape must be (classes, rows, ...), got {shape!r}; remake the table")
    if info.get("dtype") != "F32":
        raise ModelError(f"{shown}: tables are float32, this one is {info.get('dtype')!r}; remake the table")
    if size != 8 + length + 4 * math.prod(shape):
        raise ModelError(f"{shown}: the file is {size} bytes, not what its {shape} float32 header says; remake the "
                         "table")
    return shape[0], shape[1], size
