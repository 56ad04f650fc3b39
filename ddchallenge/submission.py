"""Reading submissions: every form `score` accepts, validated before any
training starts.

Forms:
- official file `<dataset>.pt`: a bare float tensor (K*IPC, C, H, W),
  normalised, class-major (image i has label i // IPC);
- packed labelled file `.pt`: {"images": normalised float (N, C, H, W),
  "labels": int64 (N,)}, the Track 2 form `pack` writes for IPC other than 10;
- labelled set `.h5`: pixels with labels (see labelled.py), normalised here;
- a `res/` folder (or a folder holding `res/`) of dataset files;
- a submission `.zip` holding `<dataset>.pt` files at its top level.

Soft labels (optional, for the soft-label measures; the challenge score never
reads them): a labelled set's /soft_labels, or beside a dataset file in a
res/ folder or zip the companion `<dataset>.soft_labels.pt`, a bare float16
tensor (N, classes) written by torch.save whose rows follow the file's
images. The official program reads `<dataset>.pt` by name and never sees it.
"""
from __future__ import annotations

import dataclasses
import io
import json
import lzma
import math
import os
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch

from ddchallenge.data import normalise
from ddchallenge.errors import OptionMismatch, RuleMismatch, SubmissionError
from ddchallenge.fileio import MAX_FILE_BYTES, check_file, load_torch_bytes, read_limited, sha256_bytes, sha256_file
from ddchallenge.labelled import Header, check_soft_labels, read_labelled_set
from ddchallenge.protocol import DATASETS, TRACK1_DATASETS, DatasetSpec, UploadRules, get_dataset

MAX_MANIFEST_BYTES = 1 << 20
MAX_METHOD = 64  # characters of a method name kept from an upload's manifest or attributes
MANIFEST = "manifest.json"  # what `pack` writes: inside the zip, in res/ and beside them
MACOS_FORKS = "__MACOSX"  # the folder of resource forks a macOS Finder zip adds
# Provenance kept in a record: a flat object, this many keys of this many characters at most.
MAX_PROVENANCE_KEYS, MAX_PROVENANCE_KEY, MAX_PROVENANCE_VALUE = 32, 64, 2048
FORMS = "an official <dataset>.pt file, a labelled .h5 set, a res/ folder or a submission .zip"
# Files a Codabench/Codalab res/ folder may hold beside the submission, never read: Codabench's own file,
# what `pack` writes, and the resource forks a macOS Finder zip adds
IGNORED_IN_FOLDER = {"metadata", MANIFEST, MACOS_FORKS}
SOFT_SUFFIX = ".soft_labels.pt"  # <dataset>.soft_labels.pt: a dataset file's soft labels, a bare float16 tensor
# A zip holds one file per dataset, its soft labels and pack's manifest: more members are refused before any is
# looked at, so that no check costs more than a look at each of these few.
MAX_ZIP_MEMBERS = 2 * len(DATASETS) + 1
# What an inflating zip member may raise besides BadZipFile: a corrupt deflate or LZMA stream.
_INFLATE_ERRORS = (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, zlib.error, lzma.LZMAError)


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of a submission, ready to train on."""

    spec: DatasetSpec
    images: torch.Tensor  # float32 (N, C, H, W), normalised with the dataset's mean and std
    labels: torch.Tensor  # int64 (N,)
    ipc: int  # images per class
    kind: str  # "official" (bare tensor, class-major) or "labelled"
    source: str  # file (and zip member) the images came from
    sha256: str  # of the exact bytes read (a Track 2 generator's set: of its images and labels)
    warnings: tuple[str, ...] = field(default=())
    method: str | None = None  # generating method, when the set or pack's manifest records it
    provenance: dict | None = None  # the set's attributes (see `bounded_provenance`), when the upload holds them
    soft_labels: torch.Tensor | None = None  # float16 (N, classes) probabilities, rows following images; checked


def load_submission(path: str | os.PathLike, dataset: str | None = None,
                    rules: UploadRules | None = UploadRules()) -> list[DatasetEntry]:
    """Every dataset in the submission at `path`, validated against `rules`
    (None: any known dataset at any IPC, for viewing one's own files).
    `dataset` names the dataset of a single file whose name and shape do not
    tell it; rules that name one dataset tell it too."""
    path = Path(path)
    if not path.exists():
        raise SubmissionError(f"submission not found: {path}; pass {FORMS}")
    if dataset is not None and (path.is_dir() or path.suffix.lower() == ".zip"):
        raise SubmissionError(
            f"--dataset applies to a single file, but {path} names its datasets by file name; drop --dataset"
        )
    if dataset is None and rules is not None and rules.datasets is not None and len(rules.datasets) == 1:
        dataset = rules.datasets[0]
    if path.is_dir():
        entries = _load_folder(path, rules)
        # Only a manifest inside the upload speaks for it, so the same bytes give the same record.
        inside = [path / "res" / MANIFEST, path / MANIFEST] if (path / "res").is_dir() else [path / MANIFEST]
        entries = _with_methods(entries, next(filter(None, map(_read_manifest_file, inside)), None))
    elif path.suffix.lower() == ".zip":
        entries = _with_methods(*_load_zip(path, rules))
    elif path.suffix.lower() in (".h5", ".hdf5"):
        return [_from_labelled_h5(path, dataset, rules)]
    elif path.suffix.lower() == ".pt":
        if rules is not None:
            named = DATASETS.get(path.stem.lower()) or (DATASETS.get(dataset) if dataset else None)
            candidates = [named] if named else [s for s in _GUESSABLE if rules.allows(s)]
            _check_size(path.stat().st_size, rules.max_bytes(candidates), str(path))
        data = read_limited(path, SubmissionError, "submission")
        return [_from_torch_bytes(data, str(path), path.stem, dataset, rules)]
    else:
        raise SubmissionError(f"cannot read {path}: unknown file type {path.suffix!r}; pass {FORMS}")
    return entries


def _check_size(size: int, limit: int, source: str) -> None:
    if size > limit:
        raise RuleMismatch(f"{source} is {size} bytes, more than any set the rules allow can take ({limit} bytes); "
                              "check the IPC and the dataset")


def visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name not in IGNORED_IN_FOLDER and not p.name.startswith("."))


def _load_folder(path: Path, rules: UploadRules | None) -> list[DatasetEntry]:
    folder = path / "res" if (path / "res").is_dir() else path
    if folder != path:
        # A folder holding res/ holds no dataset file of its own: the files checked are the files scored (a
        # res/ of decoys beside a res/res/ would be read as res/res/). What `pack` writes beside res/ is not one.
        beside = [p.name for p in visible_files(path) if _is_dataset_file(p.name) or soft_companion_of(p.name)]
        if beside:
            raise SubmissionError(f"{path} holds res/ and also {', '.join(beside[:5])}; a submission folder is "
                                  "either a res/ folder of dataset files or a folder holding res/, not both")
    files = visible_files(folder)
    links = [p.name for p in [folder, *files] if p.is_symlink()]
    if links:
        # A link could make the scorer read any file it can see.
        raise SubmissionError(f"{folder} holds symbolic link(s) {', '.join(links)}; a submission holds plain files only")
    stray = [p.name for p in files if not _is_dataset_file(p.name) and soft_companion_of(p.name) is None]
    if stray:
        raise SubmissionError(
            f"unexpected file(s) {', '.join(stray)} in {folder}; a res/ folder holds only <dataset>.pt or "
            f"<dataset>.h5 files and their <dataset>{SOFT_SUFFIX} soft labels (datasets: {', '.join(DATASETS)})"
        )
    companions = {soft_companion_of(p.name): p for p in files if soft_companion_of(p.name) is not None}
    files = [p for p in files if soft_companion_of(p.name) is None]
    if not files:
        raise SubmissionError(f"{folder} holds no dataset file; expected files such as cifar100.pt and tinyimagenet.pt")
    _refuse_duplicates([p.name for p in files], str(folder))
    if rules is not None:
        rules.check_track1([p.name.rpartition(".")[0] for p in files], str(folder))
    entries = []
    for p in files:
        if p.suffix == ".h5":
            entries.append(_from_labelled_h5(p, None, rules, official=True))
        else:
            if rules is not None:
                _check_size(p.stat().st_size, rules.max_bytes([DATASETS[p.stem]], official=True), str(p))
            data = read_limited(p, SubmissionError, "submission")
            entries.append(_from_torch_bytes(data, str(p), p.stem, None, rules, official=True))
    for name, p in companions.items():
        limit = _soft_limit(DATASETS[name], rules, official=True)
        _check_size(p.stat().st_size, limit, str(p))
        entries = _with_soft_labels(entries, name, read_limited(p, SubmissionError, "soft labels"), str(p))
    return entries


def _load_zip(path: Path, rules: UploadRules | None) -> tuple[list[DatasetEntry], bytes | None]:
    """The zip's datasets and the bytes of its own manifest.json, if any."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SubmissionError(f"{path} is not a readable zip archive ({exc}); zip the dataset .pt files again") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > MAX_ZIP_MEMBERS:
            raise SubmissionError(f"{path} holds {len(members)} files; a submission zip holds at most "
                                  f"{MAX_ZIP_MEMBERS} (one <dataset>.pt per dataset, its soft labels and the "
                                  f"{MANIFEST} `pack` writes)")
        for m in members:
            pure = PurePosixPath(m.filename.replace("\\", "/"))
            if pure.is_absolute() or ".." in pure.parts or ":" in m.filename:
                raise SubmissionError(f"{path} has a member with an unsafe path {m.filename!r}; refused")
        members = [m for m in members if not m.filename.startswith(MACOS_FORKS + "/")]  # counted, never read
        _refuse_duplicates([m.filename for m in members], str(path))
        manifest = next((m for m in members if m.filename == MANIFEST), None)
        members = [m for m in members if m is not manifest]
        companions = {soft_companion_of(m.filename): m for m in members
                      if "/" not in m.filename and soft_companion_of(m.filename) is not None}
        members = [m for m in members if m not in companions.values()]
        stray = [m.filename for m in members if "/" in m.filename or not m.filename.endswith(".pt")
                 or m.filename[:-3] not in DATASETS]
        if stray:
            raise SubmissionError(
                f"{path} has unexpected member(s) {', '.join(stray[:5])}; a submission zip holds only "
                f"<dataset>.pt files (and the manifest.json and <dataset>{SOFT_SUFFIX} soft labels `pack` writes) "
                "at its top level (for the challenge: cifar100.pt and tinyimagenet.pt)"
            )
        if not members:
            raise SubmissionError(f"{path} holds no dataset file; expected cifar100.pt and tinyimagenet.pt")
        names = {m.filename[:-3] for m in members}
        if rules is not None:
            rules.check_track1(names, str(path))
        elif names & TRACK1_DATASETS and not TRACK1_DATASETS <= names:
            missing = ", ".join(sorted(f"{n}.pt" for n in TRACK1_DATASETS - names))
            raise SubmissionError(f"{path} is missing {missing}; a challenge upload holds one file per Track 1 dataset")
        entries = []
        for m in sorted(members, key=lambda m: m.filename):
            # The declared size is checked before anything is inflated.
            limit = MAX_FILE_BYTES if rules is None else rules.max_bytes([DATASETS[m.filename[:-3]]], official=True)
            data = _member_bytes(archive, m, limit, path)
            entries.append(_from_torch_bytes(data, f"{path}:{m.filename}", m.filename[:-3], None, rules, official=True))
        for name, m in sorted(companions.items()):
            data = _member_bytes(archive, m, _soft_limit(DATASETS[name], rules, official=True), path)
            entries = _with_soft_labels(entries, name, data, f"{path}:{m.filename}")
        return entries, _read_manifest_member(archive, manifest)


def _member_bytes(archive: zipfile.ZipFile, m: zipfile.ZipInfo, limit: int, path: Path) -> bytes:
    _check_size(m.file_size, limit, f"{path}:{m.filename}")
    if m.flag_bits & 0x1:
        raise SubmissionError(f"{path}:{m.filename} is encrypted; zip the files again without a password")
    try:
        with archive.open(m) as fh:
            # Read at most one byte past the declared size: a member
            # that lies about its size is caught without inflating it.
            data = fh.read(m.file_size + 1)
    except _INFLATE_ERRORS as exc:
        raise SubmissionError(f"{path}:{m.filename} cannot be extracted ({str(exc)[:200]}); zip it again") from None
    if len(data) != m.file_size:
        raise SubmissionError(f"{path}:{m.filename} does not match its declared size; refused")
    return data


def soft_companion_of(name: str) -> str | None:
    """The dataset whose soft labels the file `name` holds, or None."""
    stem = name[: -len(SOFT_SUFFIX)] if name.endswith(SOFT_SUFFIX) else None
    return stem if stem in DATASETS else None


def _soft_limit(spec: DatasetSpec, rules: UploadRules | None, official: bool) -> int:
    """The largest soft-label file that fits the images the rules allow: float16 (N, classes) and 1 MiB."""
    images = MAX_FILE_BYTES // 2 if rules is None else rules.max_images(spec, official)
    return min(MAX_FILE_BYTES, images * spec.classes * 2 + (1 << 20))


def soft_labels_from_bytes(data: bytes, n: int, classes: int, source: str) -> torch.Tensor:
    """A companion file's soft labels, read as a dataset file is (no
    compressed records, weights_only, no fallback): a bare float16 tensor
    (n, classes) storing every byte it claims, its values checked
    (`check_soft_labels`)."""
    _check_torch_container(data, source)
    soft = load_torch_bytes(data, source, SubmissionError)
    fix = "save the soft labels with torch.save(probabilities.half(), path), a float16 (N, classes) tensor"
    if not isinstance(soft, torch.Tensor):
        raise SubmissionError(f"{source} holds {type(soft).__name__}; {fix}")
    if soft.dtype != torch.float16:
        raise SubmissionError(f"{source}: soft labels are {soft.dtype}; {fix}")
    if soft.untyped_storage().nbytes() < soft.numel() * soft.element_size():
        raise SubmissionError(f"{source} claims a {'x'.join(map(str, soft.shape))} tensor but stores fewer bytes; "
                              f"{fix}")
    soft = soft.detach().contiguous()
    check_soft_labels(soft.numpy(), n, classes, source)
    return soft


def _with_soft_labels(entries: list[DatasetEntry], name: str, data: bytes, source: str) -> list[DatasetEntry]:
    """`entries` with the companion's soft labels on dataset `name`'s entry."""
    found = [e for e in entries if e.spec.name == name]
    if not found:
        raise SubmissionError(f"{source} holds soft labels for {name}, but the upload has no {name} file; remove "
                              "it or add the dataset")
    (entry,) = found
    if entry.soft_labels is not None:
        raise SubmissionError(f"{source}: {name} has soft labels in its set already; keep one of the two")
    soft = soft_labels_from_bytes(data, entry.images.shape[0], entry.spec.classes, source)
    return [dataclasses.replace(e, soft_labels=soft) if e is entry else e for e in entries]


def _is_dataset_file(name: str) -> bool:
    stem, _, suffix = name.rpartition(".")
    return stem in DATASETS and suffix in ("pt", "h5")


def _refuse_duplicates(names: list[str], where: str) -> None:
    dup = sorted(s for s, n in Counter(n.rpartition(".")[0] or n for n in names).items() if n > 1)
    if dup:
        raise SubmissionError(f"{where} holds more than one file for {', '.join(dup)}; keep one per dataset")


# A validation view shares its base's shape: a set for one is named (file name, HDF5 header or --dataset).
_GUESSABLE = [s for s in DATASETS.values() if s.validation_of is None]


def _resolve_spec(source: str, stem: str | None, dataset: str | None, image_shape: tuple, n: int) -> DatasetSpec:
    named = DATASETS.get(stem.lower()) if stem else None
    if dataset is not None:
        spec = get_dataset(dataset)
        if named is not None and named is not spec:
            raise OptionMismatch(f"{source} is named for {named.name} but --dataset says {spec.name}; fix one")
        if named is None and tuple(image_shape) != spec.image_shape:  # alone, --dataset is wrong; in a batch, the set
            raise RuleMismatch(f"{source} holds images of shape {tuple(image_shape)}, not {spec.name}'s "
                               f"{spec.image_shape}; check --dataset")
        return spec
    if named is not None:
        return named
    fits = [s for s in _GUESSABLE if s.image_shape == tuple(image_shape) and n % s.classes == 0]
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise SubmissionError(
            f"{source} holds images of shape {tuple(image_shape)}, which fit no known dataset; known: "
            + "; ".join(f"{s.name} {s.image_shape}" for s in _GUESSABLE)
        )
    raise SubmissionError(
        f"cannot tell the dataset of {source} from its name or shape {tuple(image_shape)}: it could be "
        f"{', '.join(s.name for s in fits)}; pass --dataset NAME"
    )


def _check_torch_container(data: bytes, source: str) -> None:
    """torch.save writes an uncompressed zip; a compressed record would let a
    few KB inflate to GBs inside torch.load, before any shape is seen."""
    if not data.startswith(b"PK"):
        return  # the legacy format: what it holds is what the file holds
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, ValueError):
        return  # torch.load names the damage
    packed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED]
    if packed or sum(r.file_size for r in records) > len(data):
        raise SubmissionError(f"{source} holds compressed records, which torch.save never writes; save it again "
                              "with torch.save")


def _from_torch_bytes(data: bytes, source: str, stem: str | None, dataset: str | None, rules: UploadRules | None,
                      official: bool = False) -> DatasetEntry:
    _check_torch_container(data, source)
    obj = load_torch_bytes(data, source, SubmissionError)
    digest = sha256_bytes(data)
    if isinstance(obj, torch.Tensor):
        _check_image_tensor(obj, source)
        spec = _resolve_spec(source, stem, dataset, obj.shape[1:], obj.shape[0])
        if rules is not None:
            rules.check_count(spec, obj.shape[0], source, official)
        images = check_images(obj, spec, source)
        ipc, rest = divmod(images.shape[0], spec.classes)
        if rest or ipc == 0:
            raise SubmissionError(
                f"{source} holds {images.shape[0]} images, not a multiple of {spec.name}'s {spec.classes} classes; "
                f"an official file is (classes x IPC, {', '.join(map(str, spec.image_shape))}), e.g. "
                f"({spec.classes * 10}, {', '.join(map(str, spec.image_shape))}) for IPC 10"
            )
        if rules is not None:
            rules.check_ipc(spec, ipc, source, official)
        labels = torch.arange(images.shape[0]) // ipc
        return DatasetEntry(spec, images, labels, ipc, "official", source, digest, _normalisation_warnings(images, source))
    if isinstance(obj, dict) and set(obj) == {"images", "labels"} and all(isinstance(v, torch.Tensor) for v in obj.values()):
        _check_image_tensor(obj["images"], source)
        spec = _resolve_spec(source, stem, dataset, obj["images"].shape[1:], obj["images"].shape[0])
        if rules is not None:
            rules.check_count(spec, obj["images"].shape[0], source, official)
        images = check_images(obj["images"], spec, source)
        labels, ipc = check_labels(obj["labels"], images.shape[0], spec, source)
        if rules is not None:
            rules.check_ipc(spec, ipc, source, official)
        return DatasetEntry(spec, images, labels, ipc, "labelled", source, digest, _normalisation_warnings(images, source))
    found = type(obj).__name__ if not isinstance(obj, dict) else f"a dict with keys {sorted(map(str, obj))[:8]}"
    raise SubmissionError(
        f"{source} holds {found}; expected a bare float tensor (official format) or "
        '{"images": float tensor, "labels": int64 tensor} (labelled)'
    )


def _from_labelled_h5(path: Path, dataset: str | None, rules: UploadRules | None, official: bool = False) -> DatasetEntry:
    check_file(path, SubmissionError, "labelled set")  # refuses missing, empty and oversized files
    found: dict = {}

    def check_header(header: Header) -> None:
        by_file = DATASETS.get(path.stem.lower())
        if by_file is not None and header.dataset in DATASETS and DATASETS[header.dataset] is not by_file:
            # The name is what the rules were checked against (a res/ folder's files): the set must be that one.
            raise SubmissionError(f"{path} is named for {by_file.name} but its header says {header.dataset}; name "
                                  "the file for the dataset its images are of")
        named = header.dataset if header.dataset in DATASETS else path.stem
        spec = _resolve_spec(str(path), named, dataset, header.images_shape[1:], header.images_shape[0])
        if rules is not None and not official and DATASETS.get(named.lower()) is spec and not rules.allows(spec):
            # The set names its dataset (header or file name), like a file named for one: --dataset is wrong.
            raise OptionMismatch(f"{path} is named for {spec.name} but --dataset says {', '.join(rules.required())}; "
                                 "fix one")
        if rules is not None:
            rules.check_count(spec, header.images_shape[0], str(path), official)
        if header.soft_labels_shape is not None and header.soft_labels_shape[1] != spec.classes:
            raise SubmissionError(f"labelled set {path}: soft labels have shape {header.soft_labels_shape}; "
                                  f"expected ({header.images_shape[0]}, {spec.classes}) for {spec.name}")
        found["spec"] = spec

    lset = read_labelled_set(path, check_header=check_header)
    spec = found["spec"]
    pixels = torch.from_numpy(lset.images)
    check_image_shape(pixels, spec, str(path))
    labels, ipc = check_labels(torch.from_numpy(lset.labels), pixels.shape[0], spec, str(path))
    if rules is not None:
        rules.check_ipc(spec, ipc, str(path), official)
    method = lset.attrs.get("method")
    soft = None if lset.soft_labels is None else torch.from_numpy(lset.soft_labels)
    return DatasetEntry(spec, normalise(pixels, spec), labels, ipc, "labelled", str(path), sha256_file(path),
                        method=recordable(method)[:MAX_METHOD] if isinstance(method, str) else None,
                        provenance=bounded_provenance(lset.attrs), soft_labels=soft)


def recordable(text: str) -> str:
    """Untrusted `text` as a record can hold it: a lone surrogate (which a
    manifest's JSON escapes or an HDF5 attribute can carry, and no page, CSV
    or hash encodes) becomes its escape, `\\ud800`; the escapes of a file
    name's undecodable bytes (U+DC80..U+DCFF) stay as they are."""
    try:
        text.encode(errors="surrogateescape")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def bounded_provenance(value) -> dict | None:
    """Untrusted provenance (a set's attributes, a manifest's entry) made
    safe to record and show: a flat object of at most MAX_PROVENANCE_KEYS
    text keys; nested values become their JSON text; text is cut to
    MAX_PROVENANCE_VALUE characters; anything else is dropped. None when
    nothing is left."""
    if not isinstance(value, dict):
        return None
    kept = {}
    for key, v in value.items():
        if len(kept) == MAX_PROVENANCE_KEYS:
            break
        if not isinstance(key, str) or not key or len(key) > MAX_PROVENANCE_KEY:
            continue
        if isinstance(v, (dict, list)):
            try:
                v = json.dumps(v, sort_keys=True, separators=(",", ":"), allow_nan=False)
            except (TypeError, ValueError, RecursionError):
                continue
        if (isinstance(v, float) and not math.isfinite(v)) or (isinstance(v, int) and abs(v) > 1 << 63):
            continue
        if isinstance(v, str):
            v = recordable(v)[:MAX_PROVENANCE_VALUE]
        elif not (v is None or isinstance(v, (bool, int, float))):
            continue
        kept[recordable(key)] = v
    return kept or None


def _read_manifest_file(path: Path) -> bytes | None:
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        with open(path, "rb") as fh:
            return fh.read(MAX_MANIFEST_BYTES + 1)  # a file grown since stat() is still read only so far
    except OSError:
        return None


def _read_manifest_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo | None) -> bytes | None:
    if member is None or member.file_size > MAX_MANIFEST_BYTES:
        return None
    try:
        with archive.open(member) as fh:
            return fh.read(MAX_MANIFEST_BYTES + 1)  # never inflated past the cap, whatever the header says
    except (*_INFLATE_ERRORS, RuntimeError):  # RuntimeError: an encrypted member; the manifest is informational
        return None


def _with_methods(entries: list[DatasetEntry], manifest: bytes | None) -> list[DatasetEntry]:
    """Methods and provenance from the manifest `pack` put inside the upload,
    for the files whose sha256 it lists; the manifest is informational, so a
    missing or unreadable one changes nothing."""
    if manifest is None or len(manifest) > MAX_MANIFEST_BYTES:
        return entries
    try:
        listed = json.loads(manifest)["datasets"]
        found = {d["sha256"]: (d["source"]["provenance"].get("method"), bounded_provenance(d["source"]["provenance"]))
                 for d in listed}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return entries
    found = {k: v for k, v in found.items() if isinstance(k, str) and v[1] is not None}
    out = []
    for e in entries:
        method, provenance = found.get(e.sha256, (None, None))
        if provenance is None:
            out.append(e)
            continue
        # Text only, and short: the method is shown in tables and leaderboards.
        method = recordable(method)[:MAX_METHOD] if isinstance(method, str) else e.method
        out.append(dataclasses.replace(e, method=method, provenance=provenance))
    return out


def _check_image_tensor(x: torch.Tensor, source: str) -> None:
    if not x.is_floating_point():
        raise SubmissionError(f"{source} holds a {x.dtype} tensor; expected float32 images normalised with the dataset mean and std")
    if x.dim() != 4:
        raise SubmissionError(f"{source} holds a tensor of shape {tuple(x.shape)}; expected 4 dimensions (N, C, H, W)")


def check_image_shape(x: torch.Tensor, spec: DatasetSpec, source: str) -> None:
    if tuple(x.shape[1:]) != spec.image_shape or x.shape[0] == 0:
        raise SubmissionError(
            f"{source} holds images of shape {tuple(x.shape)}; {spec.name} needs (N, "
            f"{', '.join(map(str, spec.image_shape))}) with N = {spec.classes} classes x IPC"
        )


def check_images(x: torch.Tensor, spec: DatasetSpec, source: str) -> torch.Tensor:
    check_image_shape(x, spec, source)
    stored = x.untyped_storage().nbytes()
    if stored < x.numel() * x.element_size():
        # A header can claim a huge shape over a few stored bytes (stride 0); copying it would
        # allocate the claimed size.
        raise SubmissionError(f"{source} claims a {'x'.join(map(str, x.shape))} tensor but stores only {stored} bytes "
                              "(repeated or overlapping memory); save a plain tensor with torch.save")
    x = x.detach().to(torch.float32).contiguous()
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise SubmissionError(f"{source} holds {bad} NaN or Inf value(s); every pixel must be finite")
    return x


def check_labels(y: torch.Tensor, n: int, spec: DatasetSpec, source: str) -> tuple[torch.Tensor, int]:
    if y.dtype.is_floating_point or y.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise SubmissionError(f"{source} has labels of type {y.dtype}; expected int64 class indices")
    if y.shape != (n,):
        raise SubmissionError(f"{source} has labels of shape {tuple(y.shape)} for {n} images; expected ({n},)")
    y = y.to(torch.int64)
    if int(y.min()) < 0 or int(y.max()) >= spec.classes:
        raise SubmissionError(f"{source} has labels outside 0..{spec.classes - 1} ({spec.name} has {spec.classes} classes)")
    counts = torch.bincount(y, minlength=spec.classes)
    ipc = int(counts[0])
    if ipc == 0 or not bool((counts == ipc).all()):
        uneven = {k: int(c) for k, c in enumerate(counts.tolist()) if c != ipc}
        raise SubmissionError(
            f"{source} does not hold the same number of images for every class (class 0 has {ipc}, "
            f"{_first(uneven)}); every class must appear exactly IPC times"
        )
    return y, ipc


def _first(counts: dict[int, int], limit: int = 3) -> str:
    items = [f"class {k} has {c}" for k, c in list(counts.items())[:limit]]
    return ", ".join(items) + (f" and {len(counts) - limit} more differ" if len(counts) > limit else "")


def _normalisation_warnings(x: torch.Tensor, source: str) -> tuple[str, ...]:
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0 and hi <= 1:
        return (f"{source}: values lie in [0, 1]; they look like unnormalised pixels, but the scorer normalises "
                "nothing: normalise with the dataset mean and std",)
    if lo >= 0 and hi <= 255 and hi > 1:
        return (f"{source}: values lie in [0, 255]; they look like raw pixels, but the scorer normalises nothing: "
                "divide by 255 and normalise with the dataset mean and std",)
    return ()
