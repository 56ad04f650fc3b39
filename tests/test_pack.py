"""`ddchallenge pack` and `show`: the official layout, byte for byte."""
import hashlib
import json
import os
import zipfile

import numpy as np
import pytest
import torch

from ddchallenge.data import normalise
from ddchallenge.labelled import write_labelled_set
from ddchallenge.protocol import get_dataset
from ddchallenge.protocol import UploadRules
from ddchallenge.submission import load_submission


def make_set(path, dataset="mnist5k", ipc=10, order="interleaved", dtype=np.uint8, seed=0):
    spec = get_dataset(dataset)
    rng = np.random.default_rng(seed)
    n = spec.classes * ipc
    images = rng.integers(0, 256, (n, *spec.image_shape), dtype=np.uint8)
    if dtype == np.float32:
        images = images.astype(np.float32) / 255
    labels = np.tile(np.arange(spec.classes), ipc) if order == "interleaved" else np.repeat(np.arange(spec.classes), ipc)
    write_labelled_set(path, images, labels, dataset=dataset, ipc=ipc, method="test", seed=seed, config={"k": 1})
    return images, labels


def test_pack_official_layout_class_major_and_round_trip(tmp_path, run_cli):
    images, labels = make_set(tmp_path / "s.h5")
    out = tmp_path / "sub"
    r = run_cli("pack", tmp_path / "s.h5", "-o", out)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "res", "submission.zip"]
    tensor = torch.load(out / "res" / "mnist5k.pt", weights_only=True)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.shape == (100, 1, 28, 28)
    order = np.argsort(labels, kind="stable")
    torch.testing.assert_close(tensor, normalise(images[order], get_dataset("mnist5k")))
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = manifest["datasets"]
    assert entry["sha256"] == hashlib.sha256((out / "res" / "mnist5k.pt").read_bytes()).hexdigest()
    assert (entry["format"], entry["ipc"], entry["shape"]) == ("official", 10, [100, 1, 28, 28])
    assert entry["source"]["provenance"]["method"] == "test"
    assert manifest["zip"]["sha256"] == hashlib.sha256((out / "submission.zip").read_bytes()).hexdigest()
    # The upload carries its own manifest (without the zip's hash, which it cannot hold); res/ is the zip unpacked.
    inner = {k: v for k, v in manifest.items() if k != "zip"}
    with zipfile.ZipFile(out / "submission.zip") as z:
        assert z.namelist() == ["manifest.json", "mnist5k.pt"]
        assert z.read("mnist5k.pt") == (out / "res" / "mnist5k.pt").read_bytes()
        assert json.loads(z.read("manifest.json")) == inner
        assert z.read("manifest.json") == (out / "res" / "manifest.json").read_bytes()
    mnist5k_rules = UploadRules(datasets=("mnist5k",))
    for form in (out, out / "res", out / "submission.zip", out / "res" / "mnist5k.pt"):
        (e,) = load_submission(form, rules=mnist5k_rules)
        assert e.labels.tolist() == [i // 10 for i in range(100)] and torch.equal(e.images, tensor)
    for form in (out, out / "res", out / "submission.zip"):
        (e,) = load_submission(form, rules=mnist5k_rules)
        assert e.method == "test" and e.provenance["seed"] == 0 and json.loads(e.provenance["config"]) == {"k": 1}
    umask = os.umask(0)
    os.umask(umask)
    for written in (out, out / "res" / "mnist5k.pt", out / "manifest.json"):
        want = (0o777 if written.is_dir() else 0o666) & ~umask
        assert written.stat().st_mode & 0o777 == want, written


@pytest.mark.filterwarnings("ignore:Duplicate name")  # the zip with two manifests is made on purpose
def test_method_and_provenance_come_from_the_upload_alone(tmp_path, run_cli):
    """The same zip bytes give the same method wherever they lie; a manifest
    beside an upload speaks for nothing; a hostile manifest inside one is
    bounded or ignored, never an error."""
    make_set(tmp_path / "s.h5")
    assert run_cli("pack", tmp_path / "s.h5", "-o", tmp_path / "sub").exit_code == 0
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "submission.zip").write_bytes((tmp_path / "sub" / "submission.zip").read_bytes())
    rules = UploadRules(datasets=("mnist5k",))
    (e,) = load_submission(alone / "submission.zip", rules=rules)
    assert e.method == "test" and e.provenance["method"] == "test"
    sha = e.sha256

    def zip_with(members, name="z.zip"):
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("mnist5k.pt", (tmp_path / "sub" / "res" / "mnist5k.pt").read_bytes())
            for member, data in members:
                z.writestr(member, data)
        return path

    def manifest(provenance):
        return json.dumps({"datasets": [{"sha256": sha, "source": {"provenance": provenance}}]})

    bare = zip_with([])
    (tmp_path / "manifest.json").write_text(manifest({"method": "forged"}))  # beside the zip: not the upload's
    (e,) = load_submission(bare, rules=rules)
    assert e.method is None and e.provenance is None
    huge = {"method": "m" * 100, "nested": {"a": [1, 2]}, "nan": float("nan"), "big": 10 ** 30, "": "x"} | {
        f"k{i}": "v" * 5000 for i in range(100)}
    (e,) = load_submission(zip_with([("manifest.json", manifest(huge))], "h.zip"), rules=rules)
    assert e.method == "m" * 64 and len(e.provenance) == 32 and max(map(len, map(str, e.provenance.values()))) <= 2048
    assert e.provenance["nested"] == '{"a":[1,2]}' and not {"nan", "big", ""} & set(e.provenance)
    # Lone surrogates, which JSON's escapes spell and no record may hold, become their escapes (a review: such a
    # zip was recorded, then every rerun set its record aside as planted); a file name's escapes stay.
    (e,) = load_submission(zip_with([("manifest.json", manifest({"method": "d4m\ud800", "\udfffk": "\udbff",
                                                                 "name": "\udc80"}))], "s.zip"), rules=rules)
    assert e.method == "d4m\\ud800" and e.provenance == {"method": "d4m\\ud800", "\\udfffk": "\\udbff",
                                                          "name": "\udc80"}
    for bad in ("not json", "[" * 100_000, json.dumps({"datasets": "x"}), manifest(["list"]),
                manifest({"method": ["not", "text"]})):
        (e,) = load_submission(zip_with([("manifest.json", bad)], "b.zip"), rules=rules)
        assert e.method is None, bad[:20]
    # Over 1 MiB inflated (from a few KiB): ignored, never inflated past the cap.
    (e,) = load_submission(zip_with([("manifest.json", " " * (2 << 20) + manifest({"method": "late"}))], "c.zip"),
                           rules=rules)
    assert e.method is None
    r = run_cli("score", zip_with([("manifest.json", "{}"), ("manifest.json", "{}")], "d.zip"), "--dataset", "mnist5k")
    assert r.exit_code == 1 and "more than one file for manifest" in r.stderr
    r = run_cli("score", zip_with([("x/manifest.json", "{}")], "e.zip"), "--dataset", "mnist5k")
    assert r.exit_code == 1 and "unexpected member(s) x/manifest.json" in r.stderr


def test_pack_twice_gives_the_same_bytes(tmp_path):
    from ddchallenge.pack import pack

    make_set(tmp_path / "s.h5")
    a, b = pack([tmp_path / "s.h5"], tmp_path / "a"), pack([tmp_path / "s.h5"], tmp_path / "b")
    assert a["zip"]["sha256"] == b["zip"]["sha256"]
    assert (tmp_path / "a" / "submission.zip").read_bytes() == (tmp_path / "b" / "submission.zip").read_bytes()


def test_track2_ipc_other_than_10_keeps_labels(tmp_path, run_cli):
    make_set(tmp_path / "s.h5", ipc=3, dtype=np.float32)
    r = run_cli("pack", tmp_path / "s.h5", "-o", tmp_path / "sub", "--track", 2)
    assert r.exit_code == 0, r.output
    packed = torch.load(tmp_path / "sub" / "res" / "mnist5k.pt", weights_only=True)
    assert set(packed) == {"images", "labels"} and packed["labels"].tolist() == [i // 3 for i in range(30)]
    assert json.loads((tmp_path / "sub" / "manifest.json").read_text())["datasets"][0]["format"] == "labelled"
    assert load_submission(tmp_path / "sub" / "submission.zip", rules=UploadRules(("mnist5k",), ipc=3))[0].ipc == 3


def test_track1_pack_needs_both_datasets_at_ipc_10(tmp_path, run_cli):
    make_set(tmp_path / "c.h5", "cifar100")
    make_set(tmp_path / "t.h5", "tinyimagenet", ipc=1)
    r = run_cli("pack", tmp_path / "c.h5", "-o", tmp_path / "x", "--track", 1)
    assert r.exit_code == 1 and "add a set for tinyimagenet" in r.stderr
    r = run_cli("pack", tmp_path / "c.h5", tmp_path / "t.h5", "-o", tmp_path / "x", "--track", 1)
    assert r.exit_code == 1 and "has IPC 1; Track 1 fixes IPC at 10" in r.stderr
    make_set(tmp_path / "m.h5")
    r = run_cli("pack", tmp_path / "m.h5", "-o", tmp_path / "x", "--track", 1)
    assert r.exit_code == 1 and "Track 1 is scored on cifar100, tinyimagenet; mnist5k is not among them: drop " \
        "--track 1" in r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_track1_pack_of_both_challenge_datasets(tmp_path, run_cli):
    make_set(tmp_path / "c.h5", "cifar100")
    make_set(tmp_path / "t.h5", "tinyimagenet")
    r = run_cli("pack", tmp_path / "c.h5", tmp_path / "t.h5", "-o", tmp_path / "x", "--track", 1)
    assert r.exit_code == 0
    assert [(e.spec.name, e.ipc) for e in load_submission(tmp_path / "x" / "submission.zip")] == [("cifar100", 10), ("tinyimagenet", 10)]


def test_pack_refusals_leave_nothing(tmp_path, run_cli):
    make_set(tmp_path / "a.h5")
    make_set(tmp_path / "b.h5", seed=1)
    out = tmp_path / "sub"
    bad = tmp_path / "bad.h5"
    write_labelled_set(bad, np.zeros((20, 1, 28, 28), np.uint8), np.array([0] * 11 + list(range(1, 10))),
                       dataset="mnist5k", ipc=2, method="t", seed=0, config={})
    cases = [
        ((tmp_path / "a.h5", tmp_path / "b.h5"), "two sets for mnist5k"),
        ((bad,), "class 0 has 11"),
        ((tmp_path / "missing.h5",), "labelled set not found"),
    ]
    for sets, message in cases:
        r = run_cli("pack", *sets, "-o", out)
        assert r.exit_code == 1 and message in r.stderr, r.output
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_existing_output_needs_force_and_input_normalised(tmp_path, run_cli):
    make_set(tmp_path / "a.h5")
    out = tmp_path / "sub"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    # --force replaces a folder that pack wrote before, never another one (the user's, the working folder), and
    # is suggested only where it would be accepted
    for manifest in (None, '{"name": "my web app", "version": "1.0"}'):  # a web app's manifest is not pack's
        if manifest:
            (out / "manifest.json").write_text(manifest)
        for force in ((), ("--force",)):
            r = run_cli("pack", tmp_path / "a.h5", "-o", out, *force)
            assert r.exit_code == 2 and "is not one this command wrote (no manifest.json of its own)" in r.stderr
            assert "pass --force" not in r.stderr
    (out / "manifest.json").unlink()
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    os.chdir(out)
    for here in (".", "", ".."):
        r = run_cli("pack", tmp_path / "a.h5", "-o", here, "--force")
        assert r.exit_code == 2 and "is the working folder or holds it" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    (tmp_path / "packed").mkdir()  # an empty folder made for it
    r = run_cli("pack", tmp_path / "a.h5", "-o", tmp_path / "packed")
    assert r.exit_code == 0, r.output
    (tmp_path / "packed" / "stale.txt").write_text("x")
    r = run_cli("pack", tmp_path / "a.h5", "-o", tmp_path / "packed")
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'packed'} holds an earlier output of this command; pass --force to replace it, or name a "
        "new folder"]
    r = run_cli("pack", tmp_path / "a.h5", "-o", tmp_path / "packed", "--force")
    assert r.exit_code == 0 and not (tmp_path / "packed" / "stale.txt").exists()
    assert (tmp_path / "packed" / "res" / "mnist5k.pt").exists()
    normed = tmp_path / "n.h5"
    x = torch.randn(10, 1, 28, 28).numpy()
    write_labelled_set(normed, x, np.arange(10), dataset="mnist5k", ipc=1, method="t", seed=0, config={})
    r = run_cli("pack", normed, "-o", tmp_path / "n")
    assert r.exit_code == 1 and "not normalised values" in r.stderr
    r = run_cli("pack", normed, "-o", tmp_path / "n", "--input-normalised")
    assert r.exit_code == 0
    assert torch.equal(torch.load(tmp_path / "n" / "res" / "mnist5k.pt", weights_only=True)["images"], torch.from_numpy(x))


def test_show_writes_one_row_per_class(tmp_path, run_cli):
    from PIL import Image

    make_set(tmp_path / "s.h5", ipc=3)
    r = run_cli("show", tmp_path / "s.h5", "-o", tmp_path / "g.png")
    assert r.exit_code == 0, r.output
    img = Image.open(tmp_path / "g.png")
    # 10 rows and 3 columns of 56-px tiles (28 px doubled) with 2-px padding.
    assert img.size == (3 * 58 + 2, 10 * 58 + 2) and img.mode == "L"
    r = run_cli("show", tmp_path / "nothing.pt", "-o", tmp_path / "h.png")
    assert r.exit_code == 1 and not (tmp_path / "h.png").exists()


def test_show_checks_every_grid_it_writes_before_writing_any(run_cli, tmp_path, official_file):
    """A new user's review: with several datasets, `show -o g.png` replaced the user's g_<dataset>.png files;
    only -o itself was checked."""
    res = tmp_path / "up" / "res"
    res.mkdir(parents=True)
    for name in ("mnist5k", "mnist5k-val"):
        (res / f"{name}.pt").write_bytes(official_file.read_bytes())
    (tmp_path / "g_mnist5k-val.png").write_text("my notes")
    r = run_cli("show", tmp_path / "up", "-o", tmp_path / "g.png")
    assert r.exit_code == 2 and "g_mnist5k-val.png" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.glob("g*")) == ["g_mnist5k-val.png"]
    assert (tmp_path / "g_mnist5k-val.png").read_text() == "my notes"
    (tmp_path / "g_mnist5k-val.png").unlink()
    r = run_cli("show", tmp_path / "up", "-o", tmp_path / "g.png")
    assert r.exit_code == 0 and sorted(p.name for p in tmp_path.glob("g*")) == ["g_mnist5k-val.png", "g_mnist5k.png"]


def test_a_finished_output_the_target_refuses_is_kept_and_named(tmp_path):
    """The target was empty when the work began and holds a file of the
    user's when it ends: nothing is replaced and the work is not lost."""
    from ddchallenge.errors import OutputExistsError
    from ddchallenge.fileio import replace_folder
    from ddchallenge.pack import PACKED

    target, staging = tmp_path / "out", tmp_path / ".out.staging"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    staging.mkdir()
    (staging / "manifest.json").write_text('{"ddchallenge_version": "x"}')
    with pytest.raises(OutputExistsError, match=r"is not one this command wrote .*; the finished output is kept in "
                                                r".*/out\.finished-"):
        replace_folder(staging, target, PACKED)
    (kept,) = tmp_path.glob("out.finished-*")
    assert [p.name for p in kept.iterdir()] == ["manifest.json"] and not staging.exists()
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
