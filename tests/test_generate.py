"""`ddchallenge generate`: the registry, the baselines, the track rules."""
import hashlib

import h5py
import numpy as np
import pytest
import torch

from ddchallenge.data import mnist5k
from ddchallenge.generators import GENERATORS, BudgetExceeded, GenerateConfig, generate, register
from ddchallenge.generators.baselines import herding_order
from ddchallenge.labelled import read_labelled_set


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("method", ["random", "herding"])
def test_exact_counts_real_images_and_same_seed_same_bytes(tmp_path, run_cli, method):
    a, b, c = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "c.h5"
    for out, seed in ((a, 0), (b, 0), (c, 1)):
        r = run_cli("generate", "--dataset", "mnist5k", "--method", method, "--ipc", 7, "--seed", seed, "-o", out,
                    "--device", "cpu")
        assert r.exit_code == 0, r.output
    assert "70 images" in r.stdout and "images/s" in r.stdout
    lset = read_labelled_set(a)
    assert lset.images.shape == (70, 1, 28, 28) and lset.images.dtype == np.uint8
    assert lset.labels.tolist() == [k for k in range(10) for _ in range(7)]
    assert (lset.attrs["dataset"], lset.attrs["ipc"], lset.attrs["method"], lset.attrs["seed"]) == ("mnist5k", 7, method, 0)
    assert lset.attrs["config"]["method"] == method and lset.attrs["ddchallenge_version"]
    # Every image is a real training digit of its class, none twice.
    train_x, train_y = mnist5k.load("train")
    flat = {img.tobytes(): int(y) for img, y in zip(train_x, train_y)}
    assert [flat[img.tobytes()] for img in lset.images] == lset.labels.tolist()
    assert len({img.tobytes() for img in lset.images}) == 70
    assert sha(a) == sha(b) != sha(c)


def test_herding_order_tracks_the_mean():
    feats = torch.tensor([[0.0, 0.0], [10.0, 0.0], [4.0, 1.0], [6.0, -1.0], [5.0, 0.0]])
    assert herding_order(feats, 1) == [4]  # the mean (5, 0) itself
    assert herding_order(feats, 3) == [4, 2, 3]  # then the pair that keeps the running mean at (5, 0)


def test_track_rules(run_cli, tmp_path):
    out = tmp_path / "s.h5"
    cases = [
        (("--dataset", "mnist5k", "--method", "random", "--ipc", 10, "--track", 1), 2, "Track 1 is scored on cifar100, tinyimagenet, not mnist5k"),
        (("--dataset", "cifar100", "--method", "random", "--ipc", 5, "--track", 1), 2, "Track 1 fixes IPC at 10"),
        (("--dataset", "mnist5k", "--method", "magic", "--ipc", 10), 2, "unknown method 'magic'; methods: d3m, d4m, diffusion, herding, random"),
        (("--dataset", "mnist5k", "--method", "random", "--ipc", 0), 2, "--ipc must be a whole number of at least 1 or 'auto', got 0"),
        (("--dataset", "mnist5k", "--method", "random", "--ipc", 401), 1,
         "class 0 has only 400 training images; IPC 401 asks for more (real images allow IPC 400 at most here)"),
        (("--dataset", "mnist5k", "--method", "random", "--ipc", 1, "--budget", -1), 2, "Invalid value for '--budget'"),
        (("--dataset", "cifar100", "--method", "random", "--ipc", 10, "--root", tmp_path), 1, "no training images for cifar100"),
    ]
    for args, code, message in cases:
        r = run_cli("generate", *args, "-o", out)
        assert (r.exit_code, r.stdout) == (code, ""), (args, r.output)
        assert message in r.stderr, r.stderr
        assert not out.exists()


def test_budget_exceeded_writes_nothing(tmp_path, monkeypatch):
    import time

    @register("slow-test-method", pool=lambda req: None)
    def slow(req):
        time.sleep(0.3)
        req.check_deadline()
        raise AssertionError("the deadline check should have stopped this run")

    try:
        out = tmp_path / "s.h5"
        with pytest.raises(BudgetExceeded, match="budget ran out"):
            generate(GenerateConfig("mnist5k", "slow-test-method", 1, track=2, budget=0.1), out)
        assert not out.exists() and list(tmp_path.iterdir()) == []
    finally:
        GENERATORS.pop("slow-test-method")


def test_existing_output_needs_force(run_cli, tmp_path):
    out = tmp_path / "s.h5"
    out.write_bytes(b"keep me")
    for force in ((), ("--force",)):  # not a labelled set (no HDF5 file): never replaced
        r = run_cli("generate", "--dataset", "mnist5k", "--method", "random", "--ipc", 1, "-o", out, *force)
        assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
            f"error: -o {out} exists and is not a file this option writes; name a new file, or move that one away"]
        assert out.read_bytes() == b"keep me"
    out.unlink()
    with h5py.File(out, "w") as f:  # an HDF5 file of someone else's (a training store, say)
        f["images"] = np.zeros((2, 1, 28, 28), np.uint8)
    for force in ((), ("--force",)):
        r = run_cli("generate", "--dataset", "mnist5k", "--method", "random", "--ipc", 1, "-o", out, *force)
        assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
            f"error: {out} is an HDF5 file but no labelled set this tool wrote; name a new file, or move that one away"]
    out.unlink()
    assert run_cli("generate", "--dataset", "mnist5k", "--method", "random", "--ipc", 2, "-o", out).exit_code == 0
    r = run_cli("generate", "--dataset", "mnist5k", "--method", "random", "--ipc", 1, "-o", out)
    assert r.exit_code == 2 and "already exists; pass --force" in r.stderr
    assert read_labelled_set(out).images.shape[0] == 20
    r = run_cli("generate", "--dataset", "mnist5k", "--method", "random", "--ipc", 1, "-o", out, "--force")
    assert r.exit_code == 0 and read_labelled_set(out).images.shape[0] == 10


def test_library_refuses_seeds_out_of_range(tmp_path):
    from ddchallenge.errors import UsageError
    from ddchallenge.generators import GenerateConfig, generate

    for seed in (-1, 2**64):
        with pytest.raises(UsageError, match="--seed must be a whole number from 0 to 2147483647"):
            generate(GenerateConfig("mnist5k", "random", 1, seed), tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()
