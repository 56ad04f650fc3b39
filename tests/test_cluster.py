"""Batch scoring on a real local Ray instance (2 CPUs), started by the tests."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddchallenge.batch import BatchSettings, record_key, score_batch
from ddchallenge.cluster import score_batch_on_cluster
from ddchallenge.protocol import OFFICIAL, UploadRules

ray = pytest.importorskip("ray", reason="the [cluster] extra is not installed")

SETTINGS = BatchSettings(UploadRules(("mnist5k",)), OFFICIAL.with_overrides(epochs=2, rounds=2), seed=7)


@pytest.fixture(scope="module")
def cluster():
    """A Ray head on this machine; its address, for drivers in other processes."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture
def uploads(tmp_path, mnist5k_random_images):
    """Two good uploads (different images) and one of NaNs."""
    paths = []
    for name, images in (("alpha", mnist5k_random_images), ("beta", mnist5k_random_images.roll(1, dims=3)),
                         ("broken", torch.full((100, 1, 28, 28), float("nan")))):
        (tmp_path / name).mkdir()
        torch.save(images.clone(), tmp_path / name / "mnist5k.pt")
        paths.append(tmp_path / name)
    return paths


def accuracies(summary):
    return {o.name: o.result.datasets[0].accuracies for o in summary.outcomes if o.result is not None}


def test_a_local_cluster_started_by_the_cli(uploads, tmp_path):
    # The timeout guards against a hang, nothing more: on a 2-core machine busy with other work this took 345 s.
    r = subprocess.run([sys.executable, "-m", "ddchallenge", "score", str(uploads[0]), str(uploads[1]), "--dataset",
                        "mnist5k", "--epochs", "0", "--rounds", "1", "--output", "res", "--cluster", "local", "--quiet"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].startswith("2 upload(s): 2 scored, 0 done before, 0 failed, 0 environment "
                                                "errors; 0 retried;"), r.stdout
    assert "Token authentication" not in r.stderr and "WARNING" not in r.stderr, r.stderr  # Ray's own warnings
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == [f"{record_key('alpha')}.json",
                                                                   f"{record_key('beta')}.json"]


def test_sigterm_stops_a_cluster_batch_in_one_line(uploads, tmp_path):
    """A new user's review: SIGTERM to `score --cluster local` printed Ray's
    C++ stack dump (ray.init puts its own handler in) and exited 130. The
    CLI's handlers are put back: one line, exit 143, Ray stopped."""
    proc = subprocess.Popen([sys.executable, "-m", "ddchallenge", "score", str(uploads[0]), "--dataset", "mnist5k",
                             "--epochs", "1000", "--rounds", "1", "--output", "res", "--cluster", "local"],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    seen = ""
    while "uploads:" not in seen:  # the batch's bar: Ray is up and the task submitted
        char = proc.stderr.read(1)
        assert char, seen
        seen += char
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, seen + rest
    assert "SIGTERM received" not in rest and "logging.cc" not in rest, rest
    assert rest.replace("\r", "\n").strip().splitlines()[-1].startswith(
        "interrupted by SIGTERM: this run recorded 0 scored and 0 failed of 1 upload in res"), rest


def one_thread_plain_batch(uploads, out, settings, monkeypatch):
    """A plain batch with the one thread a one-CPU task uses, here and in the
    sandbox child: on a CPU the last bits depend on the thread count."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return score_batch(uploads, out, settings, device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)


def test_cluster_batch_equals_plain_batch_and_resumes(cluster, uploads, tmp_path, monkeypatch, run_cli):
    plain = one_thread_plain_batch(uploads, tmp_path / "plain", SETTINGS, monkeypatch)
    on_ray = score_batch_on_cluster(uploads, tmp_path / "ray", "auto", SETTINGS, device="auto", progress=False)
    assert [o.status for o in on_ray.outcomes] == ["scored", "scored", "failed"]
    assert accuracies(on_ray) == accuracies(plain) and len(accuracies(on_ray)) == 2
    assert "NaN or Inf" in on_ray.outcomes[2].reason
    # The plain batch's layout: leaderboard-ready records, the failure recorded alone.
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == sorted(
        [f"{record_key('alpha')}.json", f"{record_key('beta')}.json", f"{record_key('broken')}.failed.json"])
    record = json.loads((tmp_path / "ray" / f"{record_key('alpha')}.json").read_text())
    assert record["datasets"][0]["accuracies"] == plain.outcomes[0].result.datasets[0].accuracies
    assert record["settings"] == SETTINGS.fingerprint() and record["seed"] == 7
    assert on_ray.retried == 0 and not on_ray.on_gpu and on_ray.busy_seconds > 0
    board = run_cli("leaderboard", tmp_path / "ray", "--include-unofficial")  # SETTINGS are a short recipe
    assert board.exit_code == 0 and "alpha" in board.stdout and "beta" in board.stdout and "1 failed" in board.stdout
    assert "broken" not in board.stdout
    before = {p.name: p.read_bytes() for p in (tmp_path / "ray").iterdir()}
    again = score_batch_on_cluster(uploads, tmp_path / "ray", "auto", SETTINGS, progress=False)
    assert [o.status for o in again.outcomes] == ["done before"] * 3 and again.busy_seconds == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "ray").iterdir()} == before


def _task_pids() -> list[int]:
    """Ray workers running a scoring task (Ray titles a busy worker ray::<function>)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes().startswith(b"ray::score_on_node"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            pass
    return pids


def test_a_killed_worker_is_retried_and_the_upload_scored(cluster, uploads, tmp_path):
    out = tmp_path / "results"
    driver = subprocess.Popen(
        [sys.executable, "-m", "ddchallenge", "score", str(uploads[0]), str(uploads[2]), "--dataset", "mnist5k",
         "--epochs", "10", "--rounds", "1", "--output", str(out), "--cluster", cluster, "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and driver.poll() is None:
        pids = _task_pids()
        if pids:  # an upload is being scored: kill its worker mid-task
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    stdout, stderr = driver.communicate(timeout=300)
    assert killed is not None, stderr
    assert driver.returncode == 1, stderr  # the NaN upload failed on its own merits
    assert "1 scored, 0 done before, 1 failed, 0 environment errors; 1 retried" in stdout.splitlines()[-1], stdout
    assert "attempt 1 of 3 lost" in stderr and "WorkerCrashedError" in stderr
    assert (out / f"{record_key('alpha')}.json").exists() and (out / f"{record_key('broken')}.failed.json").exists()
    assert len(list(out.iterdir())) == 2


def test_cluster_mistakes_are_one_line_and_start_nothing(run_cli, uploads, tmp_path, monkeypatch):
    base = ("score", uploads[0], "--dataset", "mnist5k", "--epochs", 0, "--rounds", 1, "--output", tmp_path / "r")
    for value, code, message in (("a b", 2, "--cluster must be local, auto or a head's HOST:PORT"),
                                 ("head:99999", 2, "--cluster must be local, auto"),
                                 ("127.0.0.1:1", 1, "no Ray cluster answers at 127.0.0.1:1")):
        r = run_cli(*base, "--cluster", value)
        assert r.exit_code == code and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    r = run_cli(*base, "--cluster", "local", "--device", "cuda:3")
    assert r.exit_code != 0 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    # A review: a driver without a GPU refused --device cuda for a GPU cluster ("CUDA is not available here"); the
    # device is the cluster's, checked once it is joined (here: none answers).
    r = run_cli(*base, "--device", "cuda", "--cluster", "127.0.0.1:1")
    assert r.exit_code == 1 and "no Ray cluster answers at 127.0.0.1:1" in r.stderr, r.stderr
    # ... and the batch's own refusals come first, as in a plain batch (they started Ray and hashed every upload)
    plain = run_cli(*base, "--budget", 600, "--labels", "soft")
    r = run_cli(*base, "--budget", 600, "--labels", "soft", "--cluster", "127.0.0.1:1")
    assert plain.exit_code == r.exit_code == 2 and r.stderr == plain.stderr and r.stderr.count("\n") == 1, r.stderr
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the [cluster] extra were not installed
    r = run_cli(*base, "--cluster", "local")
    assert r.exit_code == 2 and "pip install 'ddchallenge[cluster]'" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_track2_generators_run_inside_the_task(cluster, uploads, tiny_model, tmp_path, monkeypatch):
    settings = BatchSettings(UploadRules(("mnist5k",), 1), OFFICIAL.with_overrides(epochs=0, rounds=1), budget=120)
    batch = [uploads[0], tiny_model]
    plain = one_thread_plain_batch(batch, tmp_path / "plain", settings, monkeypatch)
    on_ray = score_batch_on_cluster(batch, tmp_path / "ray", "auto", settings, progress=False)
    assert [o.status for o in on_ray.outcomes] == ["failed", "scored"]
    assert "is not a generator folder" in on_ray.outcomes[0].reason
    generated = on_ray.outcomes[1].result.datasets[0]
    assert generated.ipc == 1 and generated.images == 10 and generated.method == "diffusion"
    assert accuracies(on_ray) == accuracies(plain)
    assert generated.sha256 == plain.outcomes[1].result.datasets[0].sha256  # the same images were generated


def test_a_node_refuses_to_score_with_other_code_or_other_test_sets(uploads, tmp_path):
    """A review: nodes compared a version string no edit changes, and read --ref's test sets unchecked, so a node
    with other code or an older test set at the same path scored uploads that the driver recorded as its own."""
    from ddchallenge.batch import Pending, reference_digest
    from ddchallenge.cluster import installed_code, score_on_node
    from ddchallenge.upload import digest

    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "mnist5k_test.pt").write_bytes(b"the driver's test set")
    settings = BatchSettings(SETTINGS.rules, SETTINGS.recipe, SETTINGS.seed, reference=reference_digest(ref))
    todo = Pending(uploads[0], "alpha", digest(uploads[0], settings.rules))
    tried = score_on_node(todo, settings, str(ref), "cpu", "ddchallenge 0.1.0 (source sha256 0), torch 0")
    assert tried.environment and f"runs {installed_code()}, the driver ddchallenge 0.1.0" in tried.reason
    (ref / "mnist5k_test.pt").write_bytes(b"an older test set at the same path")
    tried = score_on_node(todo, settings, str(ref), "cpu", installed_code())
    assert tried.environment and "sees other test sets in --ref" in tried.reason and tried.result is None


def test_the_driver_refuses_a_result_scored_on_another_test_set(uploads, tmp_path, monkeypatch):
    """Without --ref each node reads its own data root: a node whose test set
    is not the driver's returns a result the driver never records (a rerun
    would not trust it), as the node's fault, retried elsewhere."""
    import dataclasses

    from ddchallenge.batch import attempt
    from ddchallenge.cluster import driver_checked
    from ddchallenge.data.reference import DATA_ENV
    from ddchallenge.protocol import get_dataset

    monkeypatch.setenv(DATA_ENV, str(tmp_path / "driver-data"))  # none there: mnist5k's built-in test set
    tried = attempt(uploads[0], dataclasses.replace(SETTINGS, recipe=OFFICIAL.with_overrides(epochs=0, rounds=1)),
                    None, "cpu", progress=False)
    assert tried.result is not None and driver_checked(tried, SETTINGS, None, {}) is tried  # the same test set
    elsewhere = dataclasses.replace(tried.result, datasets=[dataclasses.replace(tried.result.datasets[0],
                                                                                test_sha256="ab" * 32)])
    refused = driver_checked(dataclasses.replace(tried, result=elsewhere), SETTINGS, None, {})
    assert refused.environment and refused.result is None and refused.reason.startswith(
        "a node scored mnist5k on another test set (abababababab) than the driver reads (")
    # a driver with no copy of the test set to compare leaves the result as scored (a rerun scores it again)
    moved = tmp_path / "driver-data" / get_dataset("mnist5k").reference_file
    moved.parent.mkdir()
    moved.write_bytes(b"not a test set")
    assert driver_checked(dataclasses.replace(tried, result=elsewhere), SETTINGS, None, {}).result is elsewhere


def test_ray_failures_at_the_driver_are_one_line_environment_failures():
    from ddchallenge.cluster import _on_cluster, task_options
    from ddchallenge.errors import EnvironmentFailure

    def lost(*args, **kwargs):
        raise ConnectionError("Failed to reconnect within the reconnection grace period (30s)\nmore")

    with pytest.raises(EnvironmentFailure, match=r"^lost the Ray cluster \(ConnectionError: Failed to reconnect "
                                                 r"within the reconnection grace period \(30s\)\); what finished"):
        _on_cluster(lost, 1)
    assert _on_cluster(lambda a, b=0: a + b, 1, b=2) == 3
    # A GPU task's worker ends with it: a reused worker keeps its CUDA context on its first task's GPU.
    assert task_options({"num_cpus": 1, "num_gpus": 1}) == {"max_retries": 0, "max_calls": 1, "num_cpus": 1,
                                                             "num_gpus": 1}
    assert task_options({"num_cpus": 1, "num_gpus": 0})["max_calls"] == 0
