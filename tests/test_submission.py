"""Every form `score` reads, and every bad input refused before training."""
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from ddchallenge.errors import OptionMismatch, SubmissionError, UploadRuleError
from ddchallenge.labelled import write_labelled_set
from ddchallenge.protocol import UploadRules
from ddchallenge.submission import load_submission


class FileCreatingPayload:
    """Unpickling this would create a file through os.system."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def labelled_h5(path, images, labels, dataset="mnist5k"):
    write_labelled_set(path, images, labels, dataset=dataset, ipc=0, method="test", seed=0, config={})
    return path


def test_official_file_labels_are_class_major(official_file):
    (entry,) = load_submission(official_file)
    assert (entry.spec.name, entry.ipc, entry.kind) == ("mnist5k", 10, "official")
    assert entry.images.shape == (100, 1, 28, 28) and entry.images.dtype == torch.float32
    assert entry.labels.tolist() == [i // 10 for i in range(100)]
    assert len(entry.sha256) == 64 and entry.warnings == ()


def test_labelled_h5_any_ipc_is_normalised(tmp_path, mnist5k_spec):
    images = np.full((30, 1, 28, 28), 255, np.uint8)
    labels = np.tile(np.arange(10), 3)  # interleaved order, IPC 3
    (entry,) = load_submission(labelled_h5(tmp_path / "set.h5", images, labels))
    assert (entry.ipc, entry.kind, entry.spec.name) == (3, "labelled", "mnist5k")
    assert torch.equal(entry.labels, torch.from_numpy(labels))
    assert torch.allclose(entry.images, torch.full_like(entry.images, (1 - 0.1307) / 0.3081))


def test_labelled_pt_dict(tmp_path):
    path = tmp_path / "mnist5k.pt"
    torch.save({"images": torch.randn(20, 1, 28, 28), "labels": torch.arange(20) % 10}, path)
    (entry,) = load_submission(path)
    assert (entry.ipc, entry.kind) == (2, "labelled")


def test_zip_and_folder_with_several_datasets(tmp_path):
    cifar = torch.randn(1000, 3, 32, 32)
    tiny = torch.randn(200, 3, 64, 64)  # IPC 1 keeps the test small
    res = tmp_path / "sub" / "res"
    res.mkdir(parents=True)
    torch.save(cifar, res / "cifar100.pt")
    torch.save(tiny, res / "tinyimagenet.pt")
    with zipfile.ZipFile(tmp_path / "submission.zip", "w") as z:
        z.write(res / "cifar100.pt", "cifar100.pt")
        z.write(res / "tinyimagenet.pt", "tinyimagenet.pt")
    for path in (tmp_path / "sub", res, tmp_path / "submission.zip"):
        entries = load_submission(path, rules=None)
        assert [(e.spec.name, e.ipc) for e in entries] == [("cifar100", 10), ("tinyimagenet", 1)]
        # The challenge's rules hold a Track 1 upload to IPC 10 for every dataset, before training.
        with pytest.raises(UploadRuleError, match="holds IPC 1 for tinyimagenet; the rules require IPC 10"):
            load_submission(path)


def test_dataset_inferred_from_unique_shape(tmp_path):
    path = tmp_path / "anything.pt"
    torch.save(torch.randn(400, 3, 64, 64), path)
    assert load_submission(path)[0].spec.name == "tinyimagenet"


@pytest.mark.parametrize("payload_format", ["torch_save", "raw_pickle"])
def test_code_running_pickle_is_refused_and_never_runs(tmp_path, payload_format):
    target = tmp_path / "pwned"
    path = tmp_path / "mnist5k.pt"
    if payload_format == "torch_save":
        torch.save({"images": FileCreatingPayload(target)}, path)
    else:
        path.write_bytes(pickle.dumps(FileCreatingPayload(target)))
    # The payload is real: plain unpickling creates its file.
    canary = tmp_path / "canary"
    pickle.loads(pickle.dumps(FileCreatingPayload(canary)))
    assert canary.exists()
    with pytest.raises(SubmissionError, match="refused: it holds Python objects other than tensors") as err:
        load_submission(path)
    assert not target.exists()
    # torch's advice to allow-list the global (or load without weights_only) is never passed on
    assert "safe_globals" not in str(err.value) and "weights_only" not in str(err.value)


BAD_TENSORS = [
    ("wrong_shape", torch.randn(100, 3, 32, 32), "needs \\(N, 1, 28, 28\\)"),
    ("nan", torch.full((100, 1, 28, 28), float("nan")), "NaN or Inf"),
    ("inf", torch.cat([torch.zeros(99, 1, 28, 28), torch.full((1, 1, 28, 28), float("inf"))]), "784 NaN or Inf"),
    ("uint8", torch.zeros(100, 1, 28, 28, dtype=torch.uint8), "torch.uint8 tensor; expected float32"),
    ("3d", torch.randn(100, 28, 28), "expected 4 dimensions"),
    ("not_multiple", torch.randn(95, 1, 28, 28), "95 images, not a multiple of mnist5k's 10 classes"),
    ("empty", torch.randn(0, 1, 28, 28), "needs \\(N, 1, 28, 28\\)"),
]


@pytest.mark.parametrize("name, tensor, message", BAD_TENSORS, ids=[b[0] for b in BAD_TENSORS])
def test_bad_tensors_are_refused(tmp_path, name, tensor, message):
    path = tmp_path / "mnist5k.pt"
    torch.save(tensor, path)
    with pytest.raises(SubmissionError, match=message):
        load_submission(path)


def test_missing_empty_truncated_and_unknown_files(tmp_path, official_file):
    with pytest.raises(SubmissionError, match="submission not found"):
        load_submission(tmp_path / "nope.pt")
    (tmp_path / "e").mkdir()
    empty = tmp_path / "e" / "mnist5k.pt"
    empty.write_bytes(b"")
    with pytest.raises(SubmissionError, match="is empty"):
        load_submission(empty)
    data = official_file.read_bytes()
    official_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(SubmissionError, match="not a readable torch file \\(truncated or corrupt"):
        load_submission(official_file)
    official_file.write_text("tensor([1, 2, 3])\n")  # text where a torch file should be
    with pytest.raises(SubmissionError, match="is not a torch file \\(torch.save writes a zip archive, or a pickle"):
        load_submission(official_file)
    other = tmp_path / "images.npy"
    other.write_bytes(b"x")
    with pytest.raises(SubmissionError, match="unknown file type '.npy'"):
        load_submission(other)


def test_unexpected_containers_are_refused(tmp_path):
    path = tmp_path / "mnist5k.pt"
    torch.save({"images": torch.randn(10, 1, 28, 28), "labels": torch.arange(10), "extra": torch.zeros(1)}, path)
    with pytest.raises(SubmissionError, match="dict with keys \\['extra', 'images', 'labels'\\]"):
        load_submission(path)
    torch.save([torch.randn(10, 1, 28, 28)], path)
    with pytest.raises(SubmissionError, match="holds list; expected a bare float tensor"):
        load_submission(path)


def test_ambiguous_dataset_needs_flag_and_name_conflicts(tmp_path):
    path = tmp_path / "sub.pt"
    torch.save(torch.randn(100, 1, 28, 28), path)
    with pytest.raises(SubmissionError, match="could be mnist, fashionmnist, mnist5k; pass --dataset"):
        load_submission(path)
    assert load_submission(path, dataset="mnist")[0].spec.name == "mnist"
    named = tmp_path / "mnist5k.pt"
    torch.save(torch.randn(100, 1, 28, 28), named)
    with pytest.raises(OptionMismatch, match="named for mnist5k but --dataset says mnist"):  # the option's fault
        load_submission(named, dataset="mnist")


def test_labelled_sets_need_every_class_exactly_ipc_times(tmp_path):
    images = np.zeros((20, 1, 28, 28), np.uint8)
    uneven = np.array([0] * 3 + [1] * 1 + list(range(2, 10)) * 2)
    with pytest.raises(SubmissionError, match="class 0 has 3, class 1 has 1"):
        load_submission(labelled_h5(tmp_path / "a.h5", images, uneven))
    with pytest.raises(SubmissionError, match="labels outside 0..9"):
        load_submission(labelled_h5(tmp_path / "b.h5", images, np.arange(20)))
    path = tmp_path / "mnist5k.pt"
    torch.save({"images": torch.randn(20, 1, 28, 28), "labels": torch.arange(20).float()}, path)
    with pytest.raises(SubmissionError, match="labels of type torch.float32; expected int64"):
        load_submission(path)


def test_labelled_h5_refuses_normalised_floats_and_missing_datasets(tmp_path):
    import h5py

    path = tmp_path / "set.h5"
    labelled_h5(path, np.full((10, 1, 28, 28), 2.0, np.float32), np.arange(10))
    with pytest.raises(SubmissionError, match="float images outside \\[0, 1\\]"):
        load_submission(path)
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["images"] = np.zeros((10, 1, 28, 28), np.uint8)
    with pytest.raises(SubmissionError, match="has no dataset labels"):
        load_submission(tmp_path / "bad.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(SubmissionError, match="junk.h5 is not an HDF5 file \\(it does not start with the HDF5 "):
        load_submission(tmp_path / "junk.h5")
    data = (tmp_path / "bad.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[:len(data) // 3])  # an HDF5 file, truncated
    with pytest.raises(SubmissionError, match="not a readable HDF5 labelled set \\(truncated or corrupt"):
        load_submission(tmp_path / "cut.h5")


@pytest.mark.parametrize("command", [("show", "{set}", "-o", "{out}.png"), ("pack", "{set}", "-o", "{out}"),
                                     ("score", "{set}", "--no-sandbox", "--epochs", "0", "--rounds", "1", "--quiet",
                                      "--output", "{out}")])
def test_an_attribute_that_is_not_utf8_is_one_line_for_every_reader(tmp_path, run_cli, command):
    """An uploaded HDF5 file's attributes are untrusted bytes: not UTF-8 is the file's fault, said in one line."""
    import h5py

    path = tmp_path / "set.h5"
    labelled_h5(path, np.zeros((100, 1, 28, 28), np.uint8), np.repeat(np.arange(10), 10))
    with h5py.File(path, "a") as f:
        f.attrs["method"] = np.bytes_(b"\xff\xfe")
    out = tmp_path / "out"
    r = run_cli(*[a.format(set=path, out=out) for a in command])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "has a 'method' attribute that is not UTF-8 text" in r.stderr, r.stderr
    if command[0] == "score":  # a broken upload is the upload's failure, recorded as one
        (failed,) = out.glob("*.json")
        assert failed.name.endswith(".failed.json") and "not UTF-8 text" in failed.read_text()
    else:
        assert not any(tmp_path.glob("out*"))


@pytest.mark.parametrize("content, says", [(b"", "error: labelled set {set} is empty (0 bytes)"),
                                           (b"images,labels\n", "error: {set} is not an HDF5 file (it does not start "
                                            "with the HDF5 signature); a labelled set is the .h5 file `ddchallenge "
                                            "generate` writes")], ids=["empty", "text"])
@pytest.mark.parametrize("command", [("show", "{set}", "-o", "{out}.png"), ("pack", "{set}", "-o", "{out}"),
                                     ("score", "{set}", "--epochs", "0", "--rounds", "1", "--quiet", "--dataset",
                                      "mnist5k", "--output", "{out}")], ids=lambda c: c[0])
def test_a_set_that_is_no_hdf5_file_reads_the_same_in_every_command(tmp_path, run_cli, command, content, says):
    """A new user's review: an empty .h5 was 'empty' to `score` and 'truncated
    or corrupt: file signature not found' to `pack`."""
    path = tmp_path / "set.h5"
    path.write_bytes(content)
    r = run_cli(*[a.format(set=path, out=tmp_path / "out") for a in command])
    assert r.exit_code == 1 and r.stderr.strip().splitlines() == [says.format(set=path)], r.output


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_bad_zips(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(torch.randn(1000, 3, 32, 32), good)
    blob = good.read_bytes()
    cases = [
        ({"../cifar100.pt": blob}, "unsafe path '../cifar100.pt'"),
        ({"/etc/cifar100.pt": blob}, "unsafe path '/etc/cifar100.pt'"),
        ({"cifar100.pt": blob, "notes.txt": b"hi"}, "unexpected member\\(s\\) notes.txt"),
        ({"res/cifar100.pt": blob}, "unexpected member\\(s\\) res/cifar100.pt"),
        ({"cifar100.pt": blob}, "missing tinyimagenet"),
        ({}, "holds no dataset file"),
    ]
    for i, (members, message) in enumerate(cases):
        with pytest.raises(SubmissionError, match=message):
            load_submission(_zip(tmp_path / f"s{i}.zip", members))
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(SubmissionError, match="not a readable zip archive"):
        load_submission(tmp_path / "broken.zip")


def test_folder_with_stray_file(tmp_path, official_file):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(SubmissionError, match="unexpected file\\(s\\) readme.txt"):
        load_submission(tmp_path)


def test_unnormalised_values_warn(tmp_path):
    path = tmp_path / "mnist5k.pt"
    torch.save(torch.rand(100, 1, 28, 28), path)
    assert "look like unnormalised pixels" in load_submission(path)[0].warnings[0]
    torch.save(torch.randint(0, 256, (100, 1, 28, 28)).float(), path)
    assert "look like raw pixels" in load_submission(path)[0].warnings[0]


def test_dataset_flag_is_refused_for_folders_and_zips(tmp_path, official_file):
    with pytest.raises(SubmissionError, match="--dataset applies to a single file"):
        load_submission(tmp_path, dataset="mnist5k")


def test_symlink_in_a_submission_folder_is_refused(tmp_path):
    res = tmp_path / "sub" / "res"
    res.mkdir(parents=True)
    outside = tmp_path / "secret.pt"
    torch.save(torch.randn(100, 1, 28, 28), outside)
    (res / "mnist5k.pt").symlink_to(outside)
    with pytest.raises(SubmissionError, match="holds symbolic link\\(s\\) mnist5k.pt"):
        load_submission(tmp_path / "sub")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "res").symlink_to(res)
    with pytest.raises(SubmissionError, match="holds symbolic link\\(s\\) res"):
        load_submission(tmp_path / "linked")


def test_zip_bomb_is_refused_before_inflating(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("cifar100.pt", bytes(64 << 20))  # 64 MiB of zeros, a few KiB packed
        z.writestr("tinyimagenet.pt", b"x")
    assert bomb.stat().st_size < 256 << 10
    # An IPC 10 cifar100.pt is 12.3 MB: the declared size alone refuses the member.
    with pytest.raises(UploadRuleError, match="cifar100.pt is 67108864 bytes, more than any set the rules allow"):
        load_submission(bomb)


def test_zip_member_lying_about_its_size_is_refused(tmp_path):
    good = tmp_path / "c.pt"
    torch.save(torch.randn(1000, 3, 32, 32), good)
    path = tmp_path / "liar.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("cifar100.pt", good.read_bytes())
        z.writestr("tinyimagenet.pt", b"x")
    data = bytearray(path.read_bytes())
    # Shrink the declared uncompressed size in the central directory entry of cifar100.pt.
    cd = data.rfind(b"PK\x01\x02", 0, data.rfind(b"PK\x01\x02"))
    declared = int.from_bytes(data[cd + 24:cd + 28], "little")
    data[cd + 24:cd + 28] = (declared // 2).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(SubmissionError, match="cifar100.pt (cannot be extracted|does not match its declared size)"):
        load_submission(path)


def _mnist5k_zip(path, member_bytes, compress=zipfile.ZIP_DEFLATED, flag_bits=0):
    """A zip whose mnist5k.pt member holds `member_bytes`, stored with `compress` and those flag bits."""
    with zipfile.ZipFile(path, "w") as z:
        info = zipfile.ZipInfo("mnist5k.pt")
        info.compress_type = compress
        z.writestr(info, member_bytes)
    if flag_bits:  # set in both headers, as an encrypting zip tool does
        data = bytearray(path.read_bytes())
        for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            at = data.find(signature) + offset
            data[at:at + 2] = (int.from_bytes(data[at:at + 2], "little") | flag_bits).to_bytes(2, "little")
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("compress", [zipfile.ZIP_DEFLATED, zipfile.ZIP_LZMA, zipfile.ZIP_BZIP2],
                         ids=["deflate", "lzma", "bzip2"])
def test_a_corrupt_compressed_member_is_one_submission_error(tmp_path, official_file, compress):
    """An attacker's review: a corrupt deflate or LZMA stream raised zlib.error or LZMAError, which no reader
    caught (a traceback from `show`, a raw reason in a record)."""
    path = _mnist5k_zip(tmp_path / "bad.zip", official_file.read_bytes(), compress)
    data = bytearray(path.read_bytes())
    start = data.find(b"PK\x03\x04") + 30 + len("mnist5k.pt")
    data[start + 40:start + 240] = bytes(range(200))  # the compressed stream, past its header, overwritten
    path.write_bytes(data)
    with pytest.raises(SubmissionError, match=r"bad.zip:mnist5k.pt cannot be extracted \(.*\); zip it again"):
        load_submission(path, rules=UploadRules(("mnist5k",)))


def test_an_encrypted_member_is_refused_by_name(tmp_path, official_file):
    path = _mnist5k_zip(tmp_path / "enc.zip", official_file.read_bytes(), flag_bits=0x1)
    for rules in (UploadRules(("mnist5k",)), None):  # score's reading and show's
        with pytest.raises(SubmissionError, match=r"enc.zip:mnist5k.pt is encrypted; zip the files again without a "
                                                  "password"):
            load_submission(path, rules=rules)


def test_a_zip_of_many_members_is_refused_before_any_is_looked_at(tmp_path):
    """An attacker's review: duplicate names were counted in quadratic time before the stray check, so 20,000
    empty members took 7 s of CPU (a zip of 250,000, the sandbox's whole wall limit)."""
    from ddchallenge.submission import MAX_ZIP_MEMBERS

    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as z:
        for i in range(MAX_ZIP_MEMBERS + 1):
            z.writestr(f"m{i}", b"")
    with pytest.raises(SubmissionError, match=f"many.zip holds {MAX_ZIP_MEMBERS + 1} files; a submission zip holds "
                                              f"at most {MAX_ZIP_MEMBERS} "):
        load_submission(path, rules=None)
    with zipfile.ZipFile(path, "w") as z:  # at the bound, the usual checks speak; names without a suffix are named
        for name in ("notes", "notes", "mnist5k.pt"):
            z.writestr(name, b"")
    with pytest.raises(SubmissionError, match="holds more than one file for notes; keep one per dataset"):
        load_submission(path, rules=None)


def test_a_folder_holding_res_and_other_files_is_refused(tmp_path, official_file):
    """An attacker's review: with res/res/ present, the files of res/ (the ones Codabench's presence check saw)
    were never read, and res/res/ was scored instead."""
    upload = tmp_path / "up"
    (upload / "res").mkdir(parents=True)
    (upload / "res" / "mnist5k.pt").write_bytes(official_file.read_bytes())
    (upload / "mnist5k.pt").write_text("a decoy")
    with pytest.raises(SubmissionError, match=r"up holds res/ and also mnist5k.pt; a submission folder is either a "
                                              r"res/ folder of dataset files or a folder holding res/, not both"):
        load_submission(upload, rules=UploadRules(("mnist5k",)))
    (upload / "mnist5k.pt").unlink()
    for name in ("manifest.json", "submission.zip", "notes.txt"):  # what `pack` writes beside res/, and a note
        (upload / name).write_text("{}")
    assert [e.spec.name for e in load_submission(upload, rules=UploadRules(("mnist5k",)))] == ["mnist5k"]


@pytest.mark.parametrize("folder", [True, False], ids=["res-folder", "single-file"])
def test_a_set_named_for_one_dataset_whose_header_says_another_is_refused(tmp_path, folder):
    """An attacker's review: in a res/ folder the file names were checked against the rules and the headers then
    decided what was scored (two files, both mnist5k inside: mnist5k-val was never scored)."""
    res = tmp_path / "res"
    res.mkdir()
    images, labels = np.zeros((10, 1, 28, 28), np.uint8), np.arange(10)
    labelled_h5(res / "mnist5k.h5", images, labels)
    labelled_h5(res / "mnist5k-val.h5", images, labels)  # header: mnist5k
    upload = res if folder else res / "mnist5k-val.h5"
    with pytest.raises(SubmissionError, match=r"mnist5k-val.h5 is named for mnist5k-val but its header says "
                                              "mnist5k; name the file for the dataset its images are of"):
        load_submission(upload, rules=UploadRules(("mnist5k", "mnist5k-val"), 1) if folder else None)


def test_an_attribute_that_is_an_array_is_refused(tmp_path):
    """An attacker's review: an array attribute reached `pack` (a TypeError from JSON) and an array `dataset`
    attribute a set lookup (unhashable)."""
    import h5py

    for name, value in (("extra", np.arange(3)), ("dataset", np.array(["mnist5k"], dtype=h5py.string_dtype()))):
        path = labelled_h5(tmp_path / f"{name}.h5", np.zeros((10, 1, 28, 28), np.uint8), np.arange(10))
        with h5py.File(path, "a") as f:
            f.attrs[name] = value
        with pytest.raises(SubmissionError, match=f"has attribute\\(s\\) '{name}' that are not text or a number"):
            load_submission(path, rules=None)


def test_a_dataset_the_images_shape_contradicts_is_a_rule_mismatch(tmp_path, official_file):
    """A new user's review: `--dataset cifar10` for a 28x28 file was recorded as the upload's failure; alone it
    is the command line's mistake (RuleMismatch: refused alone, recorded in a batch)."""
    from ddchallenge.errors import RuleMismatch

    single = tmp_path / "foo.pt"
    single.write_bytes(official_file.read_bytes())
    with pytest.raises(RuleMismatch, match=r"foo.pt holds images of shape \(1, 28, 28\), not cifar10's \(3, 32, 32\); "
                                           "check --dataset"):
        load_submission(single, dataset="cifar10", rules=None)


def test_a_finder_zips_resource_forks_are_not_read(tmp_path, official_file):
    """A macOS Finder zip adds __MACOSX/._<file> beside each file: never read, in a zip or an unzipped res/ (what
    Codabench hands the scoring program); a member count past the limit is still refused before anything."""
    rules = UploadRules(("mnist5k",))
    path = tmp_path / "finder.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mnist5k.pt", official_file.read_bytes())
        z.writestr("__MACOSX/._mnist5k.pt", b"\x00\x05\x16\x07 AppleDouble")
        z.writestr("__MACOSX/._manifest.json", b"\x00\x05\x16\x07 AppleDouble")
    res = tmp_path / "res"
    (res / "__MACOSX").mkdir(parents=True)
    (res / "mnist5k.pt").write_bytes(official_file.read_bytes())
    (res / "__MACOSX" / "._mnist5k.pt").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    for upload in (path, res):
        (entry,) = load_submission(upload, rules=rules)
        assert (entry.spec.name, entry.ipc, len(entry.images)) == ("mnist5k", 10, 100)
    with zipfile.ZipFile(path, "a") as z:
        for i in range(100):
            z.writestr(f"__MACOSX/._{i}", b"")
    with pytest.raises(SubmissionError, match="holds 103 files; a submission zip holds at most"):
        load_submission(path, rules=rules)
