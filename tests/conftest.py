import json
import logging
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ddchallenge.cli import cli
from ddchallenge.data import mnist5k, normalise
from ddchallenge.protocol import get_dataset

# The sandboxed child takes OMP_NUM_THREADS (2 when unset); in-process runs that must give the child's bytes use
# the same count.
torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "2")))


# tox runs the tests on two workers, a file to a worker (`pytest -n 2 --dist loadfile --no-loadscope-reorder`), in
# this order: the slowest files first, so that neither worker starts a long file while the other is nearly done.
SLOWEST_FIRST = ("test_cluster.py", "test_verify.py", "test_hostile.py", "test_track2_rules.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def library_logs_reach_caplog():
    """The CLI makes the `ddchallenge` logger print to stderr and stop
    propagating; a later test that calls the library directly and reads
    `caplog` must not depend on whether a CLI test ran before it."""
    logging.getLogger("ddchallenge").propagate = True


@pytest.fixture(scope="session")
def mnist5k_spec():
    return get_dataset("mnist5k")


@pytest.fixture(scope="session")
def mnist5k_random_images(mnist5k_spec):
    """A real random IPC-10 mnist5k selection, normalised and class-major."""
    x, y = mnist5k.load("train")
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(y == k), 10, replace=False) for k in range(10)])
    return normalise(x[idx], mnist5k_spec)


@pytest.fixture
def official_file(tmp_path, mnist5k_random_images):
    path = tmp_path / "mnist5k.pt"
    torch.save(mnist5k_random_images.clone(), path)
    return path


@pytest.fixture
def run_cli(tmp_path, monkeypatch):
    """Invoke the real CLI in a fresh working folder (`score` records its
    results in ./results by default); stdout and stderr kept apart."""
    monkeypatch.chdir(tmp_path)

    def run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return run


@pytest.fixture(scope="session")
def tiny_training(tmp_path_factory):
    """A tiny pixel-space diffusion model trained on mnist5k for 4 steps,
    checkpoints at steps 2 and 4, with its progress bars on: (the folder,
    what the training wrote to stderr, its warnings included). One training
    serves every test."""
    import contextlib
    import io
    import logging

    from ddchallenge.diffusion.config import train_config
    from ddchallenge.diffusion.train import train
    from ddchallenge.generators.track2 import change_settings

    out = tmp_path_factory.mktemp("model") / "m"
    stderr = io.StringIO()
    logs = logging.StreamHandler(stderr)
    logging.getLogger("ddchallenge").addHandler(logs)
    try:
        with contextlib.redirect_stderr(stderr):
            train(train_config("mnist5k", "tiny", steps=4, checkpoint_every=2), out, device="cpu", progress=True)
    finally:
        logging.getLogger("ddchallenge").removeHandler(logs)
    written = {c.name: json.loads((c / "ddchallenge.json").read_text())["generate"] for c in sorted(out.glob("step-*"))}
    # A trained folder matches for up to 300 steps under Track 2, which fills a test's budget on a CPU; the tests
    # run the tiny folders plain and set matching where they test it (test_diffusion checks what train wrote).
    for checkpoint in written:
        change_settings(out / checkpoint, {"match_steps": 0})
    return out, stderr.getvalue(), written


@pytest.fixture(scope="session")
def tiny_model(tiny_training):
    return tiny_training[0]
