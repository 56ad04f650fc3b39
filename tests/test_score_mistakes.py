"""`score`: the command line being wrong is not the upload being bad.

An option that contradicts what an upload says it is (a labelled set whose
own header names a dataset that --dataset leaves out; only reading the set,
in the sandbox, finds it) is the user's mistake: one line, exit 2, nothing
recorded, alone or in a batch. A broken upload is still the team's failure,
recorded. Scoring's bars go to stderr and --quiet hides them."""
import json
import re

import numpy as np
import pytest

from ddchallenge.batch import record_key
from ddchallenge.isolation import isolation
from ddchallenge.labelled import write_labelled_set

FAST = ("--epochs", 0, "--rounds", 1, "--quiet")
sandboxed = pytest.mark.skipif(isolation() is None, reason="unshare --net is not permitted on this machine")


def _set(path, dataset):
    """A labelled set of IPC 1 whose header names `dataset`; its file name names none."""
    write_labelled_set(path, np.zeros((10, 1, 28, 28), np.uint8), np.arange(10), dataset=dataset, ipc=1,
                       method="test", seed=0, config={})
    return path


def _one_line(r):
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.mark.parametrize("options", [("--dataset", "mnist"), ("--dataset", "mnist", "--dataset", "cifar10")],
                         ids=["one", "two"])
def test_a_dataset_the_set_contradicts_is_one_line_and_no_record(run_cli, tmp_path, options):
    upload = _set(tmp_path / "set.h5", "mnist5k")
    r = run_cli("score", upload, *options, *FAST, "--no-sandbox")
    says = ", ".join(sorted(options[1::2]))
    assert r.exit_code == 2
    assert _one_line(r) == f"error: {upload} is named for mnist5k but --dataset says {says}; fix one"
    assert not (tmp_path / "results").exists()


def test_the_fixed_command_scores_it_with_each_rounds_epochs_on_stderr(run_cli, tmp_path):
    upload = _set(tmp_path / "set.h5", "mnist5k")
    r = run_cli("score", upload, "--dataset", "mnist5k", "--epochs", 2, "--rounds", 1, "--no-sandbox")
    assert r.exit_code == 0 and [p.name for p in (tmp_path / "results").iterdir()] == [f"{record_key('set.h5')}.json"]
    assert re.search(r"mnist5k[^\n]*: +\d+%\|[^\n]*\| [0-3]/3 [^\n]*ep", r.stderr.replace("\r", "\n")), r.stderr
    assert "%|" not in r.stdout


@sandboxed
def test_the_sandbox_reports_the_mismatch_as_the_command_lines(run_cli, tmp_path):
    upload = _set(tmp_path / "set.h5", "mnist5k")
    r = run_cli("score", upload, "--dataset", "mnist", *FAST)
    assert r.exit_code == 2
    assert _one_line(r) == f"error: {upload} is named for mnist5k but --dataset says mnist; fix one"
    assert not (tmp_path / "results").exists()


def test_in_a_batch_the_mismatch_is_refused_unrecorded_and_a_broken_upload_recorded(run_cli, tmp_path):
    good, wrong = _set(tmp_path / "good.h5", "mnist5k"), _set(tmp_path / "wrong.h5", "mnist")
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"not an HDF5 file at all")
    r = run_cli("score", good, wrong, broken, "--dataset", "mnist5k", "--dataset", "cifar10", *FAST, "--no-sandbox")
    assert r.exit_code == 2 and "%|" not in r.stderr, r.stderr  # --quiet: the good one trained without bars
    out = tmp_path / "results"
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{record_key('good.h5')}.json",
                                                           f"{record_key('broken.h5')}.failed.json"])
    assert re.search(r"wrong\.h5 +refused .*wrong\.h5 is named for mnist but --dataset says cifar10, mnist5k", r.stdout)
    assert "1 scored, 0 done before, 1 failed, 1 refused by the command line, 0 environment errors" in r.stdout
    assert "refused: an option contradicts what the upload says it is, not recorded: fix the option" in r.stdout



def test_ref_is_refused_for_a_validation_view_and_a_missing_one_says_how_to_fix_it(run_cli, tmp_path):
    """A validation view's test set is its base's held-out training images:
    --ref would be ignored while the result recorded the folder's digest, so
    it is the command line's mistake (exit 2, nothing recorded). A --ref
    folder without the test set says what to place there or to drop --ref."""
    view = _set(tmp_path / "view.h5", "mnist5k-val")
    refs = tmp_path / "refs"
    refs.mkdir()
    r = run_cli("score", view, *FAST, "--no-sandbox", "--ref", refs)
    assert r.exit_code == 2 and _one_line(r) == (
        "error: --ref names a folder of test sets, and mnist5k-val's test set is the share of mnist5k's training "
        "images it holds out; score mnist5k-val without --ref")
    assert not (tmp_path / "results").exists()
    r = run_cli("score", _set(tmp_path / "set.h5", "mnist5k"), *FAST, "--no-sandbox", "--ref", refs)
    assert r.exit_code == 1 and _one_line(r) == (
        f"error: reference test set not found: {refs}/mnist5k_test.pt; place mnist5k_test.pt in {refs} or drop "
        "--ref: mnist5k's is built in")
    r = run_cli("score", _set(tmp_path / "mnist.h5", "mnist"), *FAST, "--no-sandbox", "--ref", refs)
    assert r.exit_code == 1 and _one_line(r).endswith(
        f"place mnist_test.pt in {refs} (`ddchallenge data prepare mnist --root DIR` writes it in DIR), or drop --ref "
        "to use the data root's")
    assert not (tmp_path / "results").exists()


def test_root_is_where_a_validation_views_test_set_is_read_from(run_cli, tmp_path, monkeypatch):
    """A view's test set is cut from its base's training store, which lives
    in --root: `score` and `reference full` read it there, never from the
    default data root (which here holds nothing; they said "pass --root DIR"
    while it was passed)."""
    import h5py

    monkeypatch.setenv("DDCHALLENGE_DATA", str(tmp_path / "empty"))
    root = tmp_path / "root"
    root.mkdir()
    with h5py.File(root / "mnist_train.h5", "w") as f:  # 16 noise digits per class: 14 to train on, 2 held out
        f["images"] = np.random.default_rng(0).integers(0, 255, (160, 1, 28, 28), dtype=np.uint8)
        f["labels"] = np.repeat(np.arange(10), 16)
    made = run_cli("generate", "--dataset", "mnist-val", "--method", "random", "--ipc", 1, "--root", root, "-o",
                   tmp_path / "view.h5", "--quiet")
    assert made.exit_code == 0, made.output
    full = run_cli("reference", "full", "mnist-val", "--root", root, "--epochs", 0, "--rounds", 1, "--quiet")
    assert full.exit_code == 0 and "mnist-val full data" in full.stdout, full.output
    r = run_cli("score", tmp_path / "view.h5", *FAST, "--no-sandbox", "--root", root)
    assert r.exit_code == 0 and "| mnist-val " in r.stdout, r.output
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize("ipc", [2, 5])  # fewer images than asked, and more than one IPC more
def test_one_upload_not_at_the_ipc_asked_is_refused_and_in_a_batch_recorded(run_cli, tmp_path, ipc):
    """A new user's review: `--ipc` mistyped for one upload was recorded as
    its failure (and set its earlier score aside). Alone, an upload that is
    not what the rules of the command line ask is the command line's
    mistake; in a batch the rules are the organiser's, and such an upload
    has failed them: recorded."""
    one = _set(tmp_path / "one.h5", "mnist5k")
    r = run_cli("score", one, "--dataset", "mnist5k", "--ipc", ipc, *FAST, "--no-sandbox")
    assert r.exit_code == 2
    assert _one_line(r) == f"error: {one} holds IPC 1 for mnist5k; the rules require IPC {ipc} (--ipc {ipc})"
    assert not (tmp_path / "results").exists()
    two = _set(tmp_path / "two.h5", "mnist5k")
    r = run_cli("score", one, two, "--dataset", "mnist5k", "--ipc", ipc, *FAST, "--no-sandbox")
    assert r.exit_code == 1, r.output
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [
        f"{record_key('one.h5')}.failed.json", f"{record_key('two.h5')}.failed.json"]


@sandboxed
def test_the_sandbox_reports_a_rule_mismatch_as_such(run_cli, tmp_path):
    one = _set(tmp_path / "one.h5", "mnist5k")
    r = run_cli("score", one, "--dataset", "mnist5k", "--ipc", 3, *FAST)
    assert r.exit_code == 2
    assert _one_line(r) == f"error: {one} holds IPC 1 for mnist5k; the rules require IPC 3 (--ipc 3)"
    assert not (tmp_path / "results").exists()


def test_a_res_folder_of_no_required_dataset_wants_dataset_and_records_nothing(run_cli, tmp_path):
    """Without --dataset a res/ folder is held to the challenge's datasets:
    one holding none of them is no challenge upload (the user left out
    --dataset); one holding some of them but not all is a broken upload."""
    upload = tmp_path / "up"
    (upload / "res").mkdir(parents=True)
    _set(upload / "res" / "mnist5k.h5", "mnist5k")
    r = run_cli("score", upload, *FAST, "--no-sandbox")
    assert r.exit_code == 2
    assert _one_line(r) == (f"error: {upload}/res must hold exactly cifar100, tinyimagenet (missing cifar100, "
                            "tinyimagenet; extra mnist5k); an organiser scoring the datasets it holds says so with "
                            "--dataset mnist5k")
    assert not (tmp_path / "results").exists()
    assert run_cli("score", upload, "--dataset", "mnist5k", "--ipc", 1, *FAST, "--no-sandbox").exit_code == 0


def test_the_wrong_track_for_one_upload_is_refused_before_reading_it(run_cli, tiny_model, tmp_path):
    one = _set(tmp_path / "one.h5", "mnist5k")
    r = run_cli("score", tiny_model, *FAST)
    assert r.exit_code == 2
    assert _one_line(r) == (f"error: {tiny_model} is a generator folder: it is scored by running it, in a Track 2 "
                            "run with --budget SECONDS (the challenge's: 600)")
    r = run_cli("score", one, "--budget", 60, *FAST)
    assert r.exit_code == 2
    assert _one_line(r) == (f"error: {one} is not a generator folder, and --budget scores generator folders only: "
                            "drop --budget, or add --mixed to score images beside generators")
    # A new user's review: the documented `score MODEL_DIR --budget 600` on a generator trained for mnist5k ran it
    # for the challenge's datasets and recorded the failure; the dataset a folder names is known before it runs.
    r = run_cli("score", tiny_model, "--budget", 60, *FAST)
    assert r.exit_code == 2
    assert _one_line(r) == (f"error: {tiny_model} is a generator trained for mnist5k (10 classes of 1x28x28), which "
                            "cannot make cifar100, tinyimagenet (the datasets scored by default); pass --dataset "
                            "mnist5k")
    r = run_cli("score", tiny_model, "--budget", 60, "--dataset", "cifar10", *FAST)
    assert r.exit_code == 2 and "which cannot make cifar10 (the datasets scored); pass --dataset mnist5k" in r.stderr
    assert not (tmp_path / "results").exists()


def test_a_dataset_the_files_shape_contradicts_is_refused_alone_and_recorded_in_a_batch(run_cli, tmp_path,
                                                                                       official_file):
    """A new user's review: `score foo.pt --dataset cifar10` on a 28x28 file recorded the upload's failure."""
    foo = tmp_path / "foo.pt"
    foo.write_bytes(official_file.read_bytes())
    r = run_cli("score", foo, "--dataset", "cifar10", *FAST, "--no-sandbox")
    assert r.exit_code == 2
    assert _one_line(r) == (f"error: {foo} holds images of shape (1, 28, 28), not cifar10's (3, 32, 32); check "
                            "--dataset")
    assert not (tmp_path / "results").exists()
    bar = tmp_path / "bar.pt"
    bar.write_bytes(official_file.read_bytes())
    r = run_cli("score", foo, bar, "--dataset", "cifar10", *FAST, "--no-sandbox")
    assert r.exit_code == 1 and sorted(p.name for p in (tmp_path / "results").iterdir()) == \
        sorted(f"{record_key(n)}.failed.json" for n in ("foo.pt", "bar.pt"))


def test_a_failure_replayed_from_its_record_says_so(run_cli, tmp_path):
    """A new user's review: a reused failure printed only its old reason, so fixing its cause seemed to do
    nothing."""
    broken = tmp_path / "mnist5k.pt"
    broken.write_text("not a tensor")
    first = run_cli("score", broken, *FAST, "--no-sandbox")
    record = tmp_path / "results" / f"{record_key('mnist5k.pt')}.failed.json"
    assert first.exit_code == 1 and record.exists()
    again = run_cli("score", broken, *FAST, "--no-sandbox")
    assert again.exit_code == 1
    assert _one_line(again) == (f"{_one_line(first)} (recorded by an earlier run with the same bytes and settings in "
                                f"results/{record.name}; delete it to score again)")


def test_json_to_stdout_says_another_recipe_on_stderr(run_cli, tmp_path, official_file):
    r = run_cli("score", official_file, *FAST, "--no-sandbox", "--json", "-")
    assert r.exit_code == 0 and json.loads(r.stdout)["official_budget"] is False
    assert "*** NOT THE OFFICIAL BUDGET: recipe " in r.stderr


@pytest.mark.parametrize("inside", ["up", "up/res/records"])
def test_records_are_never_written_into_an_upload(run_cli, tmp_path, inside):
    upload = tmp_path / "up"
    (upload / "res").mkdir(parents=True)
    _set(upload / "res" / "mnist5k.h5", "mnist5k")
    before = sorted(map(str, tmp_path.rglob("*")))
    r = run_cli("score", upload, "--dataset", "mnist5k", "--ipc", 1, *FAST, "--output", tmp_path / inside)
    assert r.exit_code == 2
    assert _one_line(r) == (f"error: --output {tmp_path / inside} is inside the upload {upload}; write the records "
                            "to a folder outside every upload")
    assert sorted(map(str, tmp_path.rglob("*"))) == before


@pytest.mark.parametrize("name", ["mnist5k.pt", "set.h5"])
def test_one_upload_too_big_for_the_rules_is_refused_whichever_check_finds_it(run_cli, tmp_path, name):
    """More bytes than any set of the rules' IPC can take is found by the
    hash's size bound before anything is read: scoring one upload, the
    command line's mistake too (another --ipc?), not a record."""
    upload = tmp_path / name
    with open(upload, "wb") as fh:
        fh.write(b"\x89HDF\r\n\x1a\n" if name.endswith(".h5") else b"PK\x03\x04")
        fh.write(bytes(6 << 20))
    r = run_cli("score", upload, "--dataset", "mnist5k", "--ipc", 10, *FAST)
    assert r.exit_code == 2
    assert _one_line(r).startswith(f"error: {upload} holds more than ") and _one_line(r).endswith(
        " bytes, more than any set the rules allow can take; check the IPC and the dataset")
    assert not (tmp_path / "results").exists()


def test_an_unreadable_folder_in_a_batch_is_left_to_fail_alone(tmp_path, monkeypatch):
    """Deciding the track reads the folder; one that cannot be read is no
    reason to refuse the whole batch: it fails alone when it is read."""
    from ddchallenge import upload
    from ddchallenge.batch import BatchSettings, not_an_upload

    locked = tmp_path / "locked"
    locked.mkdir()

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(upload, "is_generator", unreadable)
    assert not_an_upload(locked, BatchSettings(), alone=False) is None
    assert not_an_upload(locked, BatchSettings(), alone=True) is None
