"""`ddchallenge score` end to end through the real CLI on real mnist5k digits."""
import json

import pytest
import torch

from ddchallenge.batch import record_key
from ddchallenge.data import save_reference
from ddchallenge.protocol import UploadRules, get_dataset
from ddchallenge.score import score

SMALL = ("--epochs", 2, "--rounds", 2, "--quiet")


def test_score_official_file_end_to_end(run_cli, official_file, tmp_path):
    out = tmp_path / "out"
    result = run_cli("score", official_file, *SMALL, "--seed", 7, "--json", tmp_path / "r.json", "--output", out)
    assert result.exit_code == 0, result.output
    table = result.stdout
    assert "| mnist5k" in table and "NOT THE OFFICIAL BUDGET" in table and "NO (2 epochs, 2 rounds)" in table
    data = json.loads((tmp_path / "r.json").read_text())
    (ds,) = data["datasets"]
    assert (ds["dataset"], ds["ipc"], ds["images"], ds["kind"], ds["seeds"]) == ("mnist5k", 10, 100, "official", [7, 8])
    assert len(ds["accuracies"]) == 2 and all(0 <= a <= 1 for a in ds["accuracies"])
    # Two passes on 100 real digits already beat chance (10 %) by far.
    assert ds["mean"] > 0.3
    assert data["official_budget"] is False and data["recipe"]["epochs"] == 2
    # scored on its own dataset, not the challenge's two (an organiser's review: it recorded those)
    assert data["rules"] == {"track": 1, "datasets": ["mnist5k"], "ipc": None}
    assert data["submission_sha256"] == ds["sha256"] and len(data["recipe_hash"]) == 16
    assert data["versions"]["torch"] == torch.__version__
    # The record the batch layout keeps, beside the --json copy.
    record = json.loads((out / f"{record_key('mnist5k.pt')}.json").read_text())
    assert record["score"] == data["score"] and record["upload_sha256"] == data["submission_sha256"]


def test_same_seed_same_accuracies_and_round_r_uses_seed_plus_r(official_file):
    from ddchallenge.protocol import OFFICIAL

    two = OFFICIAL.with_overrides(epochs=1, rounds=2)
    a, b = (score(official_file, recipe=two, seed=0, device="cpu", progress=False) for _ in range(2))
    assert a.datasets[0].accuracies == b.datasets[0].accuracies
    assert a.datasets[0].seeds == [0, 1]
    # Round 2 of seed 0 is round 1 of seed 1; different seeds train differently.
    c = score(official_file, recipe=two.with_overrides(rounds=1), seed=1, device="cpu", progress=False)
    assert c.datasets[0].seeds == [1] and c.datasets[0].accuracies == a.datasets[0].accuracies[1:]
    assert a.datasets[0].accuracies[0] != a.datasets[0].accuracies[1]


def test_json_to_stdout_and_ref_folder_equals_embedded(run_cli, official_file, tmp_path):
    ref = tmp_path / "ref"
    save_reference(get_dataset("mnist5k"), ref / "mnist5k_test.pt")
    saved = torch.load(ref / "mnist5k_test.pt", weights_only=True)
    assert saved["images_val"].shape == (1000, 1, 28, 28) and saved["labels_val"].tolist() == [i // 100 for i in range(1000)]

    def run(*extra):
        r = run_cli("score", official_file, "--epochs", 1, "--rounds", 1, "--quiet", "--json", "-", *extra)
        assert r.exit_code == 0, r.stderr
        return json.loads(r.stdout)["datasets"][0]["accuracies"], r.stderr

    embedded, _ = run()
    given, stderr = run("--ref", ref)
    # The same test set either way; the record made without --ref is not reused for a --ref folder's run.
    assert given == embedded and "already scored" not in stderr
    # Other test sets under the same file name: scored again, never the record of the first.
    torch.save({k: v[::2].clone() for k, v in saved.items()}, ref / "mnist5k_test.pt")
    other, stderr = run("--ref", ref)
    assert "already scored" not in stderr and other != given


def test_unnormalised_submission_warns_on_stderr(run_cli, tmp_path):
    path = tmp_path / "mnist5k.pt"
    torch.save(torch.rand(100, 1, 28, 28), path)
    result = run_cli("score", path, "--epochs", 0, "--rounds", 1, "--quiet")
    assert result.exit_code == 0
    assert "look like unnormalised pixels" in result.stderr and "look like" not in result.stdout


@pytest.mark.parametrize(
    "args, code, message",
    [
        (("score", "missing.pt"), 2, "error: upload not found: missing.pt"),
        (("score", "{official}", "--dataset", "imagenet"), 2, "error: unknown dataset 'imagenet'; known datasets: cifar100"),
        (("score", "{official}", "--epochs", -1), 2, "error: Invalid value for '--epochs'"),
        (("score", "{official}", "--rounds", 0), 2, "error: Invalid value for '--rounds'"),
        (("score", "{official}", "--device", "tpu"), 2, "error: unknown device 'tpu'"),
        (("score", "{official}", "--seed", "x"), 2, "Invalid value for '--seed'"),
        (("score", "{official}", "--seed", -1), 2, "Invalid value for '--seed'"),
        (("score", "{official}", "--seed", 2**64), 2, "Invalid value for '--seed'"),
        (("score", "{official}", "--ipc", 0), 2, "Invalid value for '--ipc'"),
        (("score", "{official}", "--budget", 0), 2, "Invalid value for '--budget'"),
        (("score", "{cifar}"), 1, "error: no reference test set for cifar100"),
        (("score", "{official}", "--ref", "{tmp}"), 2, "noref: no such folder; name the folder holding"),  # a typo
    ],
)
def test_bad_input_one_line_error_and_no_output(run_cli, official_file, tmp_path, args, code, message):
    cifar = tmp_path / "cifar100.pt"
    torch.save(torch.randn(1000, 3, 32, 32), cifar)
    out = tmp_path / "out"
    fmt = {"official": official_file, "cifar": cifar, "tmp": tmp_path / "noref"}
    args = [str(a).format(**fmt) for a in args]
    import os

    env_root = tmp_path / "root"
    os.environ["DDCHALLENGE_DATA"] = str(env_root)
    try:
        result = run_cli(*args, "--output", out, "--quiet")
    finally:
        del os.environ["DDCHALLENGE_DATA"]
    assert result.exit_code == code
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stdout == "" and not out.exists()


def test_batch_scoring_isolates_failures_and_resumes(run_cli, official_file, tmp_path):
    bad = tmp_path / "broken"
    bad.mkdir()
    torch.save(torch.full((100, 1, 28, 28), float("nan")), bad / "mnist5k.pt")
    good2 = tmp_path / "second"
    good2.mkdir()
    (good2 / "mnist5k.pt").write_bytes(official_file.read_bytes())
    out = tmp_path / "results"
    args = ("score", official_file, bad, good2, "--dataset", "mnist5k", "--epochs", 0, "--rounds", 1, "--quiet",
            "--output", out)
    r = run_cli(*args)
    assert r.exit_code == 1
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines()[2:-1]}
    assert " scored " in lines["mnist5k.pt"] and " scored " in lines["second"]
    assert " failed " in lines["broken"] and "NaN or Inf" in lines["broken"]
    assert r.stdout.splitlines()[-1].startswith("3 upload(s): 2 scored, 0 done before, 1 failed, 0 environment errors")
    assert json.loads((out / f"{record_key('second')}.json").read_text())["datasets"][0]["ipc"] == 10
    assert "NaN or Inf" in json.loads((out / f"{record_key('broken')}.failed.json").read_text())["reason"]
    first = (out / f"{record_key('mnist5k.pt')}.json").read_bytes()
    r = run_cli(*args)  # a rerun resumes: nothing is scored again
    assert r.stdout.count("done before") == 4 and (out / f"{record_key('mnist5k.pt')}.json").read_bytes() == first
    r = run_cli("score", official_file, good2, "--quiet", "--json", "-")
    assert r.exit_code == 2 and "--json takes one upload" in r.stderr


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_bytes_swapped_after_the_batch_hashed_them_are_neither_scored_nor_recorded(run_cli, official_file, tmp_path,
                                                                                   monkeypatch, kind):
    """The sandbox stages the upload and hashes the very bytes it copies: an
    upload rewritten between the batch's hash and its staging (an attacker
    with write access, a sync) is refused unrecorded, so that no record ever
    names bytes it did not score; the next run scores it as it is then."""
    import ddchallenge.batch
    from ddchallenge.upload import digest

    if kind == "folder":
        upload = tmp_path / "team"
        upload.mkdir()
        target = upload / "mnist5k.pt"
    else:
        upload = target = tmp_path / "team.pt"
    target.write_bytes(official_file.read_bytes())
    other = torch.load(official_file, weights_only=True)
    other[0][0] = 1 - other[0][0]  # the same shape and labels, other pixels

    def hash_then_swap(path, *args, **kwargs):
        hashed = digest(path, *args, **kwargs)
        torch.save(other, target)
        return hashed
    monkeypatch.setattr(ddchallenge.batch, "digest", hash_then_swap)
    out = tmp_path / "results"
    args = ("score", upload, "--dataset", "mnist5k", "--epochs", 0, "--rounds", 1, "--quiet", "--output", out)
    r = run_cli(*args)
    assert r.exit_code != 0 and "changed after it was hashed" in r.output and "Traceback" not in r.output
    assert not out.exists() or not list(out.glob("*.json"))
    monkeypatch.undo()
    r = run_cli(*args)
    assert r.exit_code == 0, r.output
    (record,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert record["upload_sha256"] == record["submission_sha256"] == digest(upload, UploadRules(("mnist5k",)))
