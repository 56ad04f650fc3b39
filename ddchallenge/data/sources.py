"""Where each dataset's standard files come from, how their integrity is
checked, and how they are parsed.

CIFAR-10/100, MNIST and Fashion-MNIST are parsed by torchvision's dataset
classes (the real parsers); their download addresses and published md5
checksums are torchvision's too. Files are checked here, file by file, before
torchvision reads them: a CIFAR batch is a pickle, and only a file with the
published checksum is ever unpickled. Tiny-ImageNet is read from the standard
`tiny-imagenet-200` layout; its published checksum is of the zip only.

Class order: CIFAR and MNIST-like sets use their files' label indices;
Tiny-ImageNet uses the sorted wnids (the order of ImageFolder, which the
challenge's reference file follows). `$DDCHALLENGE_MIRROR`, when set,
replaces every download host (the file name is appended).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torchvision import datasets as tvd
from torchvision.datasets.utils import calculate_md5, download_and_extract_archive, extract_archive

from ddchallenge.errors import DatasetError

MIRROR_ENV = "DDCHALLENGE_MIRROR"


@dataclass(frozen=True)
class Archive:
    urls: tuple[str, ...]  # tried in order
    filename: str
    md5: str  # published checksum of the archive


@dataclass(frozen=True)
class Splits:
    train_images: np.ndarray  # uint8 (N, C, H, W)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]


@dataclass(frozen=True)
class Source:
    name: str
    folder: str  # under the source dir, where the archives unpack
    archives: tuple[Archive, ...]
    checks: tuple[tuple[str, str], ...] = field(default=())  # (path under folder, md5) verified before parsing

    def urls(self, archive: Archive) -> tuple[str, ...]:
        mirror = os.environ.get(MIRROR_ENV)
        return (f"{mirror.rstrip('/')}/{archive.filename}",) if mirror else archive.urls


def _cifar(name: str, cls) -> Source:
    files = [(f, m) for f, m in cls.train_list + cls.test_list] + [(cls.meta["filename"], cls.meta["md5"])]
    return Source(name, cls.base_folder, (Archive((cls.url,), cls.filename, cls.tgz_md5),), tuple(files))


def _mnist_like(name: str, cls) -> Source:
    # torchvision keeps the idx files in <root>/<ClassName>/raw; the published
    # checksums are of the .gz archives.
    return Source(name, f"{cls.__name__}/raw",
                  tuple(Archive(tuple(m + f for m in cls.mirrors), f, md5) for f, md5 in cls.resources))


SOURCES: dict[str, Source] = {
    "cifar10": _cifar("cifar10", tvd.CIFAR10),
    "cifar100": _cifar("cifar100", tvd.CIFAR100),
    "mnist": _mnist_like("mnist", tvd.MNIST),
    "fashionmnist": _mnist_like("fashionmnist", tvd.FashionMNIST),
    "tinyimagenet": Source("tinyimagenet", "tiny-imagenet-200", (
        Archive(("http://cs231n.stanford.edu/tiny-imagenet-200.zip",), "tiny-imagenet-200.zip",
                "90528d7ca1a48142e341f4ef8d21d0de"),)),
}


def download(source: Source, source_dir: Path) -> None:
    """Fetch and unpack every archive that is not there yet, each checked
    against its published md5; a failure leaves no partial file behind."""
    fresh = next((p for p in reversed([source_dir, *source_dir.parents]) if not p.exists()), None)
    source_dir.mkdir(parents=True, exist_ok=True)
    try:
        _download(source, source_dir)
    except DatasetError:
        # Folders this call created are removed again when nothing landed in them.
        if fresh is not None and not any(p.is_file() for p in fresh.rglob("*")):
            shutil.rmtree(fresh, ignore_errors=True)
        raise


def _download(source: Source, source_dir: Path) -> None:
    target = source_dir / source.folder if source.folder.endswith("/raw") else source_dir
    for archive in source.archives:
        if (target / archive.filename).exists():
            continue
        errors = []
        for url in source.urls(archive):
            with tempfile.TemporaryDirectory(dir=source_dir, prefix=".download-") as tmp:
                try:
                    download_and_extract_archive(url, tmp, filename=archive.filename, md5=archive.md5)
                except (urllib.error.URLError, OSError, RuntimeError, ValueError) as exc:
                    errors.append(f"{url}: {getattr(exc, 'reason', exc)}")
                    continue
                target.mkdir(parents=True, exist_ok=True)
                for item in Path(tmp).iterdir():
                    dest = target / item.name
                    if dest.exists():
                        shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
                    shutil.move(str(item), dest)
                break
        else:
            raise DatasetError(f"could not download {archive.filename} ({'; '.join(errors)}); check the network, "
                               f"or place the file in {target} and run again without --download")


def check_files(source: Source, source_dir: Path) -> None:
    """Verify the published checksums of what is on disk, naming the first
    file that is missing or differs."""
    base = source_dir / source.folder
    hint = f"run `ddchallenge data prepare {source.name} --download`, or place the standard files in {base}"
    for rel, md5 in source.checks:
        path = base / rel
        if not path.is_file():
            raise DatasetError(f"{path} is missing; {hint}")
        if calculate_md5(path) != md5:
            raise DatasetError(f"{path} does not match its published md5 {md5} (corrupt or truncated); "
                               "delete it and download again")
    if source.folder.endswith("/raw"):
        for archive in source.archives:
            gz, raw = base / archive.filename, base / archive.filename[: -len(".gz")]
            if gz.is_file():
                if calculate_md5(gz) != archive.md5:
                    raise DatasetError(f"{gz} does not match its published md5 {archive.md5} (corrupt or "
                                       "truncated); delete it and download again")
                if not raw.is_file():
                    extract_archive(str(gz), str(base))
            elif not raw.is_file():
                raise DatasetError(f"{gz} is missing; {hint}")


def read(source: Source, source_dir: Path, workers: int = 8) -> Splits:
    check_files(source, source_dir)
    if source.name == "tinyimagenet":
        return _read_tinyimagenet(source_dir / source.folder, workers)
    try:
        if source.name in ("cifar10", "cifar100"):
            return _read_cifar(source, source_dir)
        return _read_mnist_like(source, source_dir)
    except (RuntimeError, ValueError, KeyError, EOFError, OSError) as exc:
        raise DatasetError(f"cannot parse the {source.name} files in {source_dir / source.folder} ({exc}); "
                           "delete them and download again") from None


def _read_cifar(source: Source, source_dir: Path) -> Splits:
    base = tvd.CIFAR10 if source.name == "cifar10" else tvd.CIFAR100
    # The files were checked above against the same checksums torchvision
    # knows; skipping its second check lets tests use small files of the same format.
    cls = type(base.__name__, (base,), {"_check_integrity": lambda self: True, "meta": {**base.meta, "md5": None}})
    train, test = (cls(str(source_dir), train=t, download=False) for t in (True, False))
    return Splits(train.data.transpose(0, 3, 1, 2).copy(), np.asarray(train.targets, np.int64),
                  test.data.transpose(0, 3, 1, 2).copy(), np.asarray(test.targets, np.int64), list(train.classes))


def _read_mnist_like(source: Source, source_dir: Path) -> Splits:
    cls = tvd.MNIST if source.name == "mnist" else tvd.FashionMNIST
    train, test = (cls(str(source_dir), train=t, download=False) for t in (True, False))
    return Splits(train.data.numpy()[:, None].copy(), train.targets.numpy().astype(np.int64),
                  test.data.numpy()[:, None].copy(), test.targets.numpy().astype(np.int64), list(train.classes))


def _decode(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            # A few Tiny-ImageNet images are greyscale: store every image as RGB.
            pixels = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{path} does not decode as an image ({exc}); the dataset copy is damaged") from None
    if pixels.shape != (64, 64, 3):
        raise DatasetError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]} pixels; Tiny-ImageNet images are 64x64")
    return pixels.transpose(2, 0, 1)


def _decode_all(paths: list[Path], workers: int) -> np.ndarray:
    from tqdm.auto import tqdm

    out = np.empty((len(paths), 3, 64, 64), np.uint8)
    # PIL releases the GIL while decoding, so threads decode in parallel.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, pixels in enumerate(tqdm(pool.map(_decode, paths), total=len(paths), desc="decode", unit="img",
                                        leave=False)):
            out[i] = pixels
    return out


def _read_tinyimagenet(base: Path, workers: int) -> Splits:
    hint = "run `ddchallenge data prepare tinyimagenet --download`, or unzip tiny-imagenet-200.zip there"
    wnids_file = base / "wnids.txt"
    if not wnids_file.is_file():
        raise DatasetError(f"{wnids_file} is missing; {hint}")
    wnids = sorted(w.strip() for w in wnids_file.read_text().split() if w.strip())
    index = {w: k for k, w in enumerate(wnids)}
    words = {}
    if (base / "words.txt").is_file():
        for line in (base / "words.txt").read_text().splitlines():
            wnid, _, name = line.partition("\t")
            words[wnid] = name.strip()
    train_paths, train_labels = [], []
    for w in wnids:
        folder = base / "train" / w / "images"
        files = sorted(folder.glob("*.JPEG")) if folder.is_dir() else []
        if not files:
            raise DatasetError(f"class folder {folder} is missing or holds no .JPEG image; {hint}")
        train_paths += files
        train_labels += [index[w]] * len(files)
    annotations = base / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DatasetError(f"{annotations} is missing; {hint}")
    test_paths, test_labels = [], []
    for line in annotations.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise DatasetError(f"{annotations} has a line that names no known wnid: {line[:80]!r}")
        test_paths.append(base / "val" / "images" / parts[0])
        test_labels.append(index[parts[1]])
    missing = next((p for p in test_paths if not p.is_file()), None)
    if missing is not None:
        raise DatasetError(f"{missing} is listed in {annotations} but missing; {hint}")
    return Splits(_decode_all(train_paths, workers), np.asarray(train_labels, np.int64),
                  _decode_all(test_paths, workers), np.asarray(test_labels, np.int64),
                  [words.get(w, w) for w in wnids])
