"""Hostile uploads, one class of attack each, crafted here (no binary
fixtures) and scored the way organisers score them: a sandboxed batch. Each
test asserts the refusal, its record, and that the other uploads of the
batch are still scored."""
import json
import os
import re
import socket
import stat
import zipfile

import h5py
import numpy as np
import pytest
import torch

from ddchallenge.batch import record_key
from ddchallenge.data import save_reference
from ddchallenge.isolation import isolation
from ddchallenge.protocol import UploadRules, get_dataset
from ddchallenge.report import leaderboard

pytestmark = pytest.mark.skipif(isolation() is None, reason="unshare --net is not permitted on this machine")

FAST = ("--epochs", 0, "--rounds", 1, "--quiet")
SECRET = b"TOPSECRET-answer-key-" * 4000  # a file no upload may read: its bytes must never come back


def labelled(path, n_per_class=10, zeros=False, **dataset_options):
    """A labelled mnist5k set, optionally with h5py dataset options for /images."""
    shape = (10 * n_per_class, 1, 28, 28)
    images = np.zeros(shape, np.uint8) if zeros else np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images, **dataset_options)
        f["labels"] = np.repeat(np.arange(10), n_per_class)
        f.attrs["dataset"] = "mnist5k"
    return path


def batch(run_cli, uploads, out, *extra):
    r = run_cli("score", *uploads, "--dataset", "mnist5k", *FAST, "--output", out, *extra)
    rows = {}
    for line in r.stdout.splitlines()[2:-1]:
        cells = re.split(r"\s{2,}", line)
        if len(cells) >= 2:  # a table row, not a note under the table (e.g. a non-official budget)
            rows[cells[0]] = cells[1]
    return r, rows


def failed_reason(out, name):
    return json.loads((out / f"{record_key(name)}.failed.json").read_text())["reason"]


def assert_never_echoed(out, r):
    everything = r.stdout + r.stderr + "".join(p.read_text() for p in out.glob("*.json"))
    assert "TOPSECRET" not in everything


def test_hdf5_references_outside_the_file_are_refused_before_reading(run_cli, official_file, tmp_path):
    """External links, virtual datasets, external raw storage (a secret file,
    /dev/zero), soft links, unknown filters, compact data, huge chunks."""
    up = tmp_path / "uploads"
    up.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    other_team = labelled(tmp_path / "other-team.h5")
    labels = np.repeat(np.arange(10), 10)

    with h5py.File(up / "extlink.h5", "w") as f:
        f["labels"] = labels
        f["images"] = h5py.ExternalLink(str(other_team), "/images")
    with h5py.File(up / "virtual.h5", "w") as f:
        f["labels"] = labels
        layout = h5py.VirtualLayout(shape=(100, 1, 28, 28), dtype="uint8")
        layout[:] = h5py.VirtualSource(str(other_team), "images", shape=(100, 1, 28, 28))
        f.create_virtual_dataset("images", layout)
    with h5py.File(up / "external-secret.h5", "w") as f:
        f["labels"] = labels
        f.create_dataset("images", shape=(100, 1, 28, 28), dtype="uint8", external=[(str(secret), 0, 78400)])
    with h5py.File(up / "devzero.h5", "w") as f:
        f["labels"] = np.repeat(np.arange(10), 10_000)
        f.create_dataset("images", shape=(100_000, 1, 28, 28), dtype="uint8",
                         external=[("/dev/zero", 0, h5py.h5f.UNLIMITED)])
    with h5py.File(up / "softlink.h5", "w") as f:
        f["labels"] = labels
        f["images"] = h5py.SoftLink("/elsewhere")
    with h5py.File(up / "filter.h5", "w") as f:
        f["labels"] = labels
        plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        plist.set_chunk((10, 1, 28, 28))
        plist.set_filter(32099, h5py.h5z.FLAG_OPTIONAL, ())  # a plugin filter id HDF5 would go looking for
        space = h5py.h5s.create_simple((100, 1, 28, 28))
        h5py.h5d.create(f.id, b"images", h5py.h5t.STD_U8LE, space, dcpl=plist)
    with h5py.File(up / "compact.h5", "w") as f:
        f.create_dataset("images", data=np.zeros((100, 1, 28, 28), np.uint8))
        plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        plist.set_layout(h5py.h5d.COMPACT)
        h5py.h5d.create(f.id, b"labels", h5py.h5t.STD_I64LE, h5py.h5s.create_simple((100,)), dcpl=plist)
    labelled(up / "hugechunk.h5", maxshape=(None, 1, 28, 28), chunks=(100_000, 1, 28, 28), compression="gzip")
    good = up / "good.pt"
    good.write_bytes(official_file.read_bytes())

    out = tmp_path / "results"
    r, rows = batch(run_cli, sorted(up.iterdir()), out)
    assert r.exit_code == 1 and rows.pop("good.pt") == "scored"
    assert set(rows.values()) == {"failed"} and len(rows) == 8
    expected = {
        "extlink.h5": "/images is a link (ExternalLink), which can point outside the file",
        "virtual.h5": "/images is a virtual dataset",
        "external-secret.h5": "/images keeps its data in external files",
        "devzero.h5": "/images keeps its data in external files",
        "softlink.h5": "/images is a link (SoftLink)",
        "filter.h5": "/images uses HDF5 filter 32099",
        "compact.h5": "/labels is compact",
        "hugechunk.h5": "has chunks of (100000, 1, 28, 28), over 64 MiB each",
    }
    for name, message in expected.items():
        assert message in failed_reason(out, name), name
    assert_never_echoed(out, r)


def test_one_upload_never_stops_the_batch(run_cli, official_file, tmp_path):
    """A deeply nested ddchallenge.json, a manifest `method` that is a list,
    a 240-byte name, a corrupt record from an earlier run."""
    up = tmp_path / "uploads"
    up.mkdir()
    nested = up / "nested-generator"
    (nested / "unet").mkdir(parents=True)
    (nested / "ddchallenge.json").write_text("[" * 200_000 + "]" * 200_000)
    listy = up / "listy"
    (listy / "res").mkdir(parents=True)
    (listy / "res" / "mnist5k.pt").write_bytes(official_file.read_bytes())
    sha = __import__("hashlib").sha256(official_file.read_bytes()).hexdigest()
    (listy / "manifest.json").write_text(json.dumps({"datasets": [{"sha256": sha, "source": {"provenance": {
        "method": ["not", "text"]}}}]}))
    long_name = up / ("x" * 240)
    long_name.mkdir()
    (long_name / "mnist5k.pt").write_bytes(official_file.read_bytes())
    corrupt = up / "corrupt.pt"
    corrupt.write_bytes(official_file.read_bytes())
    out = tmp_path / "results"
    out.mkdir()
    (out / f"{record_key('corrupt.pt')}.json").write_text('{"score": 1.0, "datasets": [')  # a crashed earlier writer

    uploads = [nested, listy, long_name, corrupt]
    r, rows = batch(run_cli, uploads, out)
    assert r.exit_code == 1
    # A batch without --budget is Track 1: the generator is refused by its names, before its JSON is read.
    assert rows["nested-generator"] == "failed" and "holds a generator or model (ddchallenge.json" in \
        failed_reason(out, "nested-generator")
    assert rows["listy"] == rows["x" * 240] == rows["corrupt.pt"] == "scored"
    assert json.loads((out / f"{record_key('listy')}.json").read_text())["method"] is None
    assert len(record_key("x" * 240)) < 80 and json.loads((out / f"{record_key('corrupt.pt')}.json").read_text())["score"] < 1
    r, rows = batch(run_cli, uploads, out)  # the rerun trusts the records it can, and crashes on none
    assert rows.pop("nested-generator") == "failed"  # refused again from its names alone, before any record is read
    assert set(rows.values()) == {"done before"}


def test_special_files_are_refused_before_anything_is_copied(run_cli, official_file, tmp_path):
    up = tmp_path / "uploads"
    up.mkdir()
    fifo_folder = up / "fifo-folder"
    (fifo_folder / "res").mkdir(parents=True)
    os.mkfifo(fifo_folder / "res" / "mnist5k.pt")  # reading it would hang the scorer
    os.mkfifo(up / "mnist5k-fifo.pt")
    sock_folder = up / "socket-folder"
    sock_folder.mkdir()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_folder / "mnist5k.pt"))
    device = up / "device-folder"
    device.mkdir()
    os.mknod(device / "mnist5k.pt", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero
    sparse = up / "sparse.pt"
    with open(sparse, "wb") as fh:
        fh.truncate(1 << 30)  # 1 GiB apparent, nothing stored: a copy would fill TMPDIR
    linked = up / "linked.pt"
    linked.symlink_to(official_file)
    (up / "good.pt").write_bytes(official_file.read_bytes())

    out = tmp_path / "results"
    r, rows = batch(run_cli, sorted(up.iterdir()), out)
    server.close()
    assert r.exit_code == 1 and rows.pop("good.pt") == "scored" and set(rows.values()) == {"failed"}
    expected = {"fifo-folder": "mnist5k.pt is a FIFO", "mnist5k-fifo.pt": "is a FIFO",
                "socket-folder": "is a socket", "device-folder": "is a character device",
                "sparse.pt": "is a sparse file", "linked.pt": "is a symbolic link"}
    for name, message in expected.items():
        assert message in failed_reason(out, name), name


def test_what_an_upload_costs_is_checked_from_its_header(run_cli, tmp_path):
    """A few KB of compressed zeros must not become 100,000 images."""
    up = tmp_path / "uploads"
    up.mkdir()
    labelled(up / "zeros.h5", n_per_class=10_000, zeros=True, compression="gzip", compression_opts=9)
    assert (up / "zeros.h5").stat().st_size < 1 << 20
    data = torch.zeros(1000, 1, 28, 28)
    torch.save(data, tmp_path / "plain.pt")
    with zipfile.ZipFile(tmp_path / "plain.pt") as src, zipfile.ZipFile(up / "mnist5k.pt", "w",
                                                                         zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))  # what torch.save stores, deflated
    assert (up / "mnist5k.pt").stat().st_size < 64 << 10
    (up / "big.pt").write_bytes(os.urandom(6 << 20))  # more bytes than any mnist5k set the rules allow
    out = tmp_path / "results"
    r, rows = batch(run_cli, sorted(up.iterdir()), out)
    assert set(rows.values()) == {"failed"}
    assert "holds 100000 mnist5k images; the rules allow at most IPC 100" in failed_reason(out, "zeros.h5")
    assert "holds compressed records, which torch.save never writes" in failed_reason(out, "mnist5k.pt")
    assert "holds more than 5261152 bytes, more than any set the rules allow can take" in failed_reason(out, "big.pt")
    # --ipc is the organiser's rule: exactly that many images per class (scored alone, the command line's mistake)
    r, _ = batch(run_cli, [up / "zeros.h5", up / "big.pt"], tmp_path / "r2", "--ipc", 5)
    assert r.exit_code == 1 and "the rules allow IPC 5" in failed_reason(tmp_path / "r2", "zeros.h5")
    r = run_cli("score", up / "zeros.h5", "--dataset", "mnist5k", *FAST, "--ipc", 5, "--output", tmp_path / "r3")
    assert r.exit_code == 2 and "the rules allow IPC 5" in r.stderr and not (tmp_path / "r3").exists()


def test_a_generator_making_more_than_asked_is_refused():
    from ddchallenge.submission import DatasetEntry
    from ddchallenge.upload import GenerateRequest, _check_generated

    spec = get_dataset("mnist5k")
    entry = DatasetEntry(spec, torch.zeros(30, 1, 28, 28), torch.arange(30) // 3, 3, "labelled", "g", "0" * 64)
    _check_generated(entry, GenerateRequest("mnist5k", 3, 0.0, 0, "cpu", 600.0), "gen")
    for asked in (2, 4):
        with pytest.raises(Exception, match=f"made IPC 3 when asked for {asked}"):
            _check_generated(entry, GenerateRequest("mnist5k", asked, 0.0, 0, "cpu", 600.0), "gen")
    with pytest.raises(Exception, match="made mnist5k images when asked for cifar10"):
        _check_generated(entry, GenerateRequest("cifar10", 3, 0.0, 0, "cpu", 600.0), "gen")


def test_track1_rules_hold_for_every_form(run_cli, official_file, tmp_path, mnist5k_random_images):
    """A res/ folder or zip is a Track 1 upload: exactly the organiser's
    datasets, IPC 10 each, nothing else; --dataset and --ipc change the rules."""
    def res(name, files):
        folder = tmp_path / "uploads" / name
        (folder / "res").mkdir(parents=True)
        for fname, tensor in files.items():
            torch.save(tensor, folder / "res" / fname)
        return folder

    ipc5 = mnist5k_random_images.view(10, 10, 1, 28, 28)[:, :5].reshape(50, 1, 28, 28).clone()
    cifar10 = torch.randn(100, 3, 32, 32)
    uploads = [res("ipc5", {"mnist5k.pt": ipc5}), res("extra", {"mnist5k.pt": mnist5k_random_images,
                                                                 "cifar10.pt": cifar10}),
               res("good", {"mnist5k.pt": mnist5k_random_images})]
    with zipfile.ZipFile(tmp_path / "uploads" / "zipped-extra.zip", "w") as z:
        z.writestr("mnist5k.pt", official_file.read_bytes())
        z.writestr("cifar10.pt", __import__("ddchallenge.fileio").fileio.torch_bytes(cifar10))
    uploads.append(tmp_path / "uploads" / "zipped-extra.zip")
    out = tmp_path / "results"
    r, rows = batch(run_cli, uploads, out)
    assert rows == {"ipc5": "failed", "extra": "failed", "good": "scored", "zipped-extra.zip": "failed"}
    assert "holds IPC 5 for mnist5k; the rules require IPC 10" in failed_reason(out, "ipc5")
    assert "must hold exactly mnist5k (extra cifar10)" in failed_reason(out, "extra")
    assert "must hold exactly mnist5k (extra cifar10)" in failed_reason(out, "zipped-extra.zip")
    # By default a folder is held to the challenge's datasets: an easy mnist5k set is no challenge upload (alone,
    # the command line's mistake: --dataset left out)
    r = run_cli("score", uploads[2], *FAST, "--output", tmp_path / "r-default")
    assert r.exit_code == 2 and "must hold exactly cifar100, tinyimagenet (missing cifar100, tinyimagenet; extra " \
                                "mnist5k)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r, _ = batch(run_cli, [uploads[0]], tmp_path / "r-ipc5", "--ipc", 5)
    assert r.exit_code == 0 and (tmp_path / "r-ipc5" / f"{record_key('ipc5')}.json").exists()


def test_a_non_generator_in_a_track2_batch_fails_alone(run_cli, official_file, tiny_model, tmp_path):
    out = tmp_path / "results"
    r, rows = batch(run_cli, [official_file, tiny_model], out, "--budget", 120, "--ipc", 1)
    assert r.exit_code == 1 and rows == {"mnist5k.pt": "failed", tiny_model.name: "scored"}
    assert "is not a generator folder; a Track 2 run (--budget)" in failed_reason(out, "mnist5k.pt")


def test_records_are_keyed_retried_and_checked(run_cli, official_file, tmp_path, mnist5k_random_images):
    up = tmp_path / "uploads"
    up.mkdir()
    for name, images in (("team", mnist5k_random_images), ("team.failed", torch.full((100, 1, 28, 28), float("nan")))):
        (up / name).mkdir()
        torch.save(images, up / name / "mnist5k.pt")
    out = tmp_path / "results"
    r, rows = batch(run_cli, [up / "team", up / "team.failed"], out)
    assert rows == {"team": "scored", "team.failed": "failed"}
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{record_key('team')}.json",
                                                            f"{record_key('team.failed')}.failed.json"])
    board = run_cli("leaderboard", out, "--include-unofficial")  # the scored records ranked, the failed counted
    assert board.exit_code == 0 and len(board.stdout.strip().splitlines()) == 7 and " team " in board.stdout
    assert board.stdout.splitlines()[-1] == "0 ranked; 1 not the official budget (ranked apart); 1 failed; 0 refused"
    # A record that does not belong to the upload's bytes is not trusted.
    record = out / f"{record_key('team')}.json"
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "upload_sha256": "0" * 64, "score": 0.99}))
    r, _ = batch(run_cli, [up / "team"], out)
    assert r.exit_code == 0 and json.loads(record.read_text())["score"] == data["score"]
    # An environment failure (here: the reference data is missing) is not the upload's fault.
    out2, ref = tmp_path / "r-env", tmp_path / "ref"
    ref.mkdir()  # a folder without the test set (a folder that does not exist is a typo: exit 2)
    r = run_cli("score", official_file, *FAST, "--output", out2, "--ref", ref)
    assert r.exit_code == 1 and "reference test set not found" in r.stderr and not out2.exists()
    save_reference(get_dataset("mnist5k"), ref / "mnist5k_test.pt")
    r = run_cli("score", official_file, *FAST, "--output", out2, "--ref", ref)
    assert r.exit_code == 0 and (out2 / f"{record_key('mnist5k.pt')}.json").exists()
    # A batch of one records its failure like a batch of many.
    r = run_cli("score", up / "team.failed", "--dataset", "mnist5k", *FAST, "--output", tmp_path / "r-one")
    assert r.exit_code == 1 and (tmp_path / "r-one" / f"{record_key('team.failed')}.failed.json").exists()


def test_output_injection_is_escaped(run_cli, official_file, tmp_path):
    up = tmp_path / "uploads"
    up.mkdir()
    evil = "evil\n\x1b[2J\x1b[31mfirst place"
    (up / evil).mkdir()
    torch.save(torch.full((100, 1, 28, 28), float("nan")), up / evil / "mnist5k.pt")
    (up / "=HYPERLINK(1)").mkdir()
    (up / "=HYPERLINK(1)" / "mnist5k.pt").write_bytes(official_file.read_bytes())
    out = tmp_path / "results"
    r = run_cli("score", up / evil, up / "=HYPERLINK(1)", "--dataset", "mnist5k", *FAST, "--output", out)
    assert "\x1b" not in r.stdout + r.stderr and "evil\\n\\x1b[2J" in r.stdout
    assert len(json.loads((out / f"{record_key(evil)}.failed.json").read_text())["reason"]) <= 503
    result = json.loads((out / f"{record_key('=HYPERLINK(1)')}.json").read_text())
    for name, method in (("<img src=x onerror=alert(1)>|", "[click](javascript:alert(1))"),):
        board = leaderboard([{**result, "name": name, "method": method}], "md")
        assert "<img" not in board and "](javascript" not in board and "&lt;img" in board
    csv_board = leaderboard([result], "csv")
    assert "'=HYPERLINK(1)" in csv_board and ",=HYPERLINK" not in csv_board
    assert "<img" not in leaderboard([{**result, "name": "<img>"}], "html")


def test_what_the_record_says_was_enforced(run_cli, official_file):
    r = run_cli("score", official_file, *FAST, "--json", "-")
    sandbox = json.loads(r.stdout)["sandbox"]
    assert sandbox.startswith("no network (unshare)") and "read-only copy" in sandbox
    assert "memory 16 GiB (cgroup)" in sandbox or "address space 16 GiB (rlimit)" in sandbox


def test_upload_rules_validate_their_options():
    with pytest.raises(Exception, match="unknown dataset 'imagenet'"):
        UploadRules(("imagenet",))
    with pytest.raises(Exception, match="names a dataset twice"):
        UploadRules(("mnist5k", "MNIST5K"))
    with pytest.raises(Exception, match="--ipc must be a whole number from 1 to 10000"):
        UploadRules(ipc=0)


@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr", "nested", "soft labels sparse"])
def test_a_tensor_that_is_not_dense_is_one_line_naming_its_layout(run_cli, tmp_path, mnist5k_random_images, layout):
    """weights_only builds sparse and nested tensors; each was an internal
    error of torch's (recorded as such). Now the upload's own failure, named."""
    images = mnist5k_random_images.clone()
    res = tmp_path / "res"
    res.mkdir()
    if layout == "soft labels sparse":
        torch.save(images, res / "mnist5k.pt")
        soft = torch.full((len(images), 10), 0.1, dtype=torch.float16)
        torch.save(soft.to_sparse(), res / "mnist5k.soft_labels.pt")
        expected = "holds a sparse_coo tensor; save a plain dense one"
    else:
        zeros = torch.zeros_like(images)  # stored sparse, random pixels would pass the size limit
        made = {"sparse_coo": lambda: zeros.to_sparse(), "sparse_csr": lambda: zeros.reshape(len(zeros), -1).to_sparse_csr(),
                "nested": lambda: torch.nested.nested_tensor(list(images))}[layout]()
        torch.save(made, res / "mnist5k.pt")
        expected = f"holds a {layout} tensor; save a plain dense one"
    r = run_cli("score", res, "--dataset", "mnist5k", "--ipc", 10, "--epochs", 0, "--rounds", 1, "--quiet",
                "--output", tmp_path / "out", "--no-sandbox")
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert expected in r.stderr and "internal error" not in r.stderr, r.stderr
