"""File primitives every stage shares: atomic writes, hashing, and the only
way this project reads a torch file (never unpickling arbitrary objects)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import stat
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ddchallenge.errors import OutputExistsError, UsageError

# No challenge file comes near this; a larger one is refused before it is read
# into memory. (Tiny-ImageNet at IPC 100 is about 1 GB of float32.)
MAX_FILE_BYTES = 4 << 30

# A file written in atomic_path's private folder should get the permissions
# any new file gets. (Read once: os.umask can only be read by setting it.)
_UMASK = os.umask(0)
os.umask(_UMASK)


def json_depth(value) -> int:
    """How deep JSON `value` nests objects and lists (0 for a scalar),
    counted without recursion: a hostile file may nest thousands deep."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def read_json_bounded(path: str | os.PathLike, max_bytes: int, max_depth: int, error: Callable[[str], Exception],
                      finite: bool = False):
    """The JSON value in `path`, read as untrusted input: opened without
    following a link and without blocking (a FIFO is never read), a regular
    file checked on the open descriptor, at most `max_bytes`, UTF-8, nested
    at most `max_depth` deep, and with `finite` no NaN or Infinity. Anything
    else raises `error(why)`, `why` completing a sentence about the path
    ("is a symbolic link ...")."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise error("is missing") from None
    except OSError as exc:
        raise error("is a symbolic link (links are not followed)" if exc.errno == errno.ELOOP else
                    f"cannot be read ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise error("is not a plain file")
        if info.st_size > max_bytes:
            raise error(f"is {info.st_size} bytes, more than the {max_bytes} allowed")
        try:
            raw = fh.read(max_bytes + 1)
        except OSError as exc:
            raise error(f"cannot be read ({exc.strerror or exc})") from None
    if len(raw) > max_bytes:
        raise error(f"grew past {max_bytes} bytes while being read")
    try:
        value = json.loads(raw.decode("utf-8-sig"), **({"parse_constant": _not_finite} if finite else {}))
    except RecursionError:
        raise error(f"is nested deeper than {max_depth} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"is not valid JSON ({(str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]})") \
            from None
    if json_depth(value) > max_depth:
        raise error(f"is nested deeper than {max_depth} levels")
    return value


def _not_finite(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def check_writable(path: str | os.PathLike, option: str, replaceable: bytes | tuple[bytes, ...] | None = None,
                   folder: bool = False) -> None:
    """UsageError, before any work, unless `path` can be written as a file
    (or, with `folder`, as a folder to write into): a file's path is no
    folder, the nearest folder that exists at or above it is a folder where
    a file can be made (tried: a temporary file is made and removed, so
    read-only mounts and /proc are found too), and, with `replaceable`, an
    existing file starts with one of those bytes (what this option writes),
    so that a file of the user's is never overwritten."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise UsageError(f"{option} {path} is a folder; name a file to write")
    where = path if folder else path.parent
    while not os.path.lexists(where) and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise UsageError(f"{option} {path}: {where} is a file, not a folder; name a path in a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ddchallenge-probe.", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"{option} {path} cannot be written ({exc.strerror or exc} in {where}); name a path in a "
                         "folder you can write") from None
    if replaceable is not None and os.path.lexists(path):
        try:
            with open(path, "rb") as fh:
                head = fh.read(64).lstrip()
        except OSError:
            head = b""
        if path.is_symlink() or not path.is_file() or not head.startswith(replaceable):
            raise UsageError(f"{option} {path} exists and is not a file this option writes; name a new file, or "
                             "move that one away")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source_digest(root: Path, names: tuple[str, ...]) -> str:
    """sha256 over the Python source under `root` that `names` name (a
    folder: every .py in it, at any depth), each file's path and bytes, in
    a fixed order: a fingerprint of code that an edit changes, where a
    version number does not."""
    h = hashlib.sha256()
    for name in names:
        target = root / name
        for path in sorted(target.rglob("*.py")) if target.is_dir() else [target]:
            h.update(f"{path.relative_to(root).as_posix()}\n".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB pieces (training stores are GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class OutputMarker:
    """What every output folder of one command holds: a plain file named
    `file` whose start holds `holds` (a name alone is not enough: any web
    app has a manifest.json, any website an index.html)."""

    file: str
    holds: bytes

    def found_in(self, folder: Path) -> bool:
        try:
            fd = os.open(folder / self.file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return False
        with os.fdopen(fd, "rb") as fh:
            return stat.S_ISREG(os.fstat(fh.fileno()).st_mode) and self.holds in fh.read(64 << 10)


def check_replaceable(target: Path, marker: OutputMarker) -> None:
    """OutputExistsError unless `target` is absent, empty, or a folder that
    the same writer made before (it holds `marker`): --force replaces a
    previous output, never a folder of the user's (the working folder, a
    home, the folder holding the inputs)."""
    if not os.path.lexists(target):
        return
    here = Path.cwd().resolve()
    if target.resolve() in (here, *here.parents):
        raise OutputExistsError(f"{target} is the working folder or holds it; name a new folder to write into")
    if target.is_symlink() or not target.is_dir():
        raise OutputExistsError(f"{target} exists and is not a folder; name a new folder to write into")
    if not any(target.iterdir()):
        return  # an empty folder the user made for it holds nothing to lose
    if not marker.found_in(target):
        raise OutputExistsError(f"{target} exists and is not one this command wrote (no {marker.file} of its own); "
                                "--force replaces only such a folder: name a new folder, or move this one away")


def check_output_folder(target: str | os.PathLike, marker: OutputMarker, force: bool) -> None:
    """Before any work: OutputExistsError unless `target` may become this
    command's output folder: absent, empty, or, with `force`, a folder the
    same command wrote before (`check_replaceable`). A refusal suggests
    --force only where --force would be accepted."""
    target = Path(target)
    check_replaceable(target, marker)
    if os.path.lexists(target) and any(target.iterdir()) and not force:
        raise OutputExistsError(f"{target} holds an earlier output of this command; pass --force to replace it, or "
                                "name a new folder")


def replace_folder(staging: Path, target: Path, marker: OutputMarker) -> None:
    """Move a finished `staging` folder onto `target`, replacing a folder
    there that `check_replaceable` allows: the old one is moved aside first
    and removed after, so `target` is at every moment the old folder or the
    new one, never a mix. Should `target` have become a folder it may not
    replace while the work ran, the finished folder is kept beside it, named
    in the error, never thrown away."""
    try:
        check_replaceable(target, marker)
    except OutputExistsError as exc:
        kept = Path(tempfile.mkdtemp(prefix=f"{target.name}.finished-", dir=target.parent))
        os.replace(staging, kept)  # onto the empty folder just made: a name nothing else takes
        raise OutputExistsError(f"{exc}; the finished output is kept in {kept}") from None
    if os.path.lexists(target):
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / "x")
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path for `path`'s new content; rename it onto `path`
    only if the block succeeds, so an interrupted writer leaves the old file
    or none.

    A results folder or data root may be writable by others, who can rename
    and replace any entry of it (a folder of ours included) between our steps.
    So nothing here is reached through a name in that folder after it is
    made: the file is written in a private folder (mkdtemp, mode 0700: no
    one else can add, swap or remove what is in it), reached through the
    descriptor of that folder (/proc/self/fd/N: the folder itself, wherever
    it has been moved to), and renamed onto `path` relative to descriptors of
    both folders; the rename replaces a link planted at `path`, never
    follows it. Writes therefore never land in a file someone else named
    (the record key, say)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    private = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    folder = os.open(private, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)  # a link put in its place: refused
    if stat.S_IMODE(os.fstat(folder).st_mode) != 0o700 or os.fstat(folder).st_uid != os.getuid():
        os.close(folder)
        raise OSError(errno.EPERM, f"the private folder {private} was replaced before it was opened")
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        through = Path(f"/proc/self/fd/{folder}")
        yield (through if through.is_dir() else Path(private)) / path.name  # no /proc: the name, as a last resort
        os.chmod(path.name, 0o666 & ~_UMASK, dir_fd=folder)
        os.replace(path.name, path.name, src_dir_fd=folder, dst_dir_fd=parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.name, dir_fd=folder)
        with contextlib.suppress(OSError):  # only where the name still holds our folder, not what replaced it
            if os.path.samestat(os.lstat(private), os.fstat(folder)):
                os.rmdir(private)
        os.close(folder)
        os.close(parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def torch_bytes(obj) -> bytes:
    """torch.save into memory. Saving to a path would name the archive's
    records after the file (a temporary name here), so the same tensor would
    give different bytes; in memory the name is always 'archive'."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def atomic_torch_save(obj, path: str | os.PathLike) -> bytes:
    """Write torch.save's bytes atomically and return them."""
    data = torch_bytes(obj)
    atomic_write_bytes(path, data)
    return data


def check_file(path: Path, error: type[Exception], what: str) -> int:
    """The size of a regular file, refusing missing, empty and oversized ones."""
    if not path.exists():
        raise error(f"{what} not found: {path}")
    if not path.is_file():
        raise error(f"{what} {path} is not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise error(f"{what} {path} is empty (0 bytes)")
    if size > MAX_FILE_BYTES:
        raise error(f"{what} {path} is {size} bytes, over the {MAX_FILE_BYTES} byte limit")
    return size


def read_limited(path: Path, error: type[Exception], what: str) -> bytes:
    """Read a whole regular file, refusing missing, empty and oversized ones."""
    check_file(path, error, what)
    return path.read_bytes()


TORCH_STARTS = (b"PK\x03\x04", b"\x80")  # a zip archive (torch.save's format), a pickle (its legacy format)


def load_torch_bytes(data: bytes, source: str, error: type[Exception]):
    """torch.load with weights_only=True and no fallback: tensors and plain
    containers come back; anything that would run code is refused."""
    if not data:
        raise error(f"{source} is empty (0 bytes); it should be a file written by torch.save")
    if not data.startswith(TORCH_STARTS):
        raise error(f"{source} is not a torch file (torch.save writes a zip archive, or a pickle in its legacy "
                    "format, and it starts as neither); write it again with torch.save")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it may not support; the
            # outcome (loaded or refused) is what the user needs to know.
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in reason if "Unsupported" in ln or "global" in ln.lower()), "")
        # Only what the file holds: torch's advice to allow-list the global is what this refusal exists to prevent.
        detail = detail.replace("WeightsUnpickler error: ", "").split(" was not an allowed global")[0]
        raise error(
            f"{source} was refused: it holds Python objects other than tensors and would need unsafe "
            f"unpickling{' (' + detail + ')' if detail else ''}; save a plain tensor with torch.save(tensor, path)"
        ) from None
    except Exception as exc:  # the torch reader raises many types for damaged bytes
        raise error(
            f"{source} is not a readable torch file (truncated or corrupt: {type(exc).__name__}); "
            "write it again with torch.save"
        ) from None
    # weights_only still builds sparse, CSR and nested tensors, whose readers fail inside torch with an
    # internal error: every tensor an upload or reference holds is a plain dense one.
    for t in (obj, *(obj.values() if isinstance(obj, dict) else ())):
        if isinstance(t, torch.Tensor) and (t.layout != torch.strided or t.is_nested):
            raise error(f"{source} holds a {'nested' if t.is_nested else str(t.layout).replace('torch.', '')} "
                        "tensor; save a plain dense one (tensor.to_dense() before torch.save)")
    return obj
