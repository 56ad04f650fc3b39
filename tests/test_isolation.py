"""The isolation of untrusted work (isolation.py) and the scoring that uses
it (upload.py): each test fails if its protection is missing."""
import contextlib
import http.server
import json
import os
import sys
import threading
from pathlib import Path

import pytest
import torch

from ddchallenge.errors import SubmissionError
from ddchallenge.isolation import Limits, Refused, describe, isolation, spawn, workdir
from ddchallenge.protocol import UploadRules
from ddchallenge.upload import generate_upload, read_upload

pytestmark = pytest.mark.skipif(isolation() is None, reason="unshare --net is not permitted on this machine")


@pytest.fixture
def loopback_port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def _python(code):
    return [sys.executable, "-c", code]


@pytest.fixture
def box():
    with workdir() as work:
        yield work


def run_isolated(argv, work, limits=Limits()):
    return spawn(argv, work, limits)


def load_isolated(path):
    return read_upload(path, UploadRules())


def test_no_network_inside(box, loopback_port):
    code = f"import socket; socket.create_connection(('127.0.0.1', {loopback_port}), timeout=2); print('connected')"
    assert "connected" in __import__("subprocess").run(_python(code), capture_output=True, text=True).stdout
    done = run_isolated(_python(code), box)
    assert done.returncode != 0 and "connected" not in done.stdout


def test_clean_environment_and_private_home(box, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # a scheduler's choice of GPU holds inside too
    done = run_isolated(_python("import os, json; print(json.dumps(dict(os.environ)))"), box)
    env = json.loads(done.stdout)
    assert "HF_TOKEN" not in env and env["HOME"] == str(box / "home") and "secret-token" not in done.stdout
    assert env["CUDA_VISIBLE_DEVICES"] == "3"


def test_memory_limit(box):
    # Touch every page: a memory cgroup counts what is used, an address-space limit what is mapped.
    code = "x = bytearray(3 << 30)\nfor i in range(0, len(x), 4096): x[i] = 1\nprint('allocated')"
    done = run_isolated(_python(code), box, Limits(memory_bytes=1 << 30))
    assert done.returncode != 0 and "allocated" not in done.stdout
    assert "memory 1 GiB (cgroup)" in describe(Limits(memory_bytes=1 << 30)) or "MemoryError" in done.stderr


@pytest.mark.skipif("(cgroup)" not in describe().split("memory")[-1][:20], reason="no memory cgroup on this machine")
def test_memory_limit_holds_without_an_address_space_limit(box):
    """CUDA lifts the address-space limit; the memory cgroup still holds."""
    code = ("import resource; print(resource.getrlimit(resource.RLIMIT_AS), flush=True)\n"
            "x = bytearray(3 << 30)\nfor i in range(0, len(x), 4096): x[i] = 1\nprint('allocated')")
    done = spawn(_python(code), box, Limits(memory_bytes=1 << 30), cuda=True)
    assert "(-1, -1)" in done.stdout and "allocated" not in done.stdout and done.returncode == -9


def test_wall_clock_kills_the_process_group(box):
    marker = box / "home" / "grandchild-survived"
    script = box / "spawner.py"
    script.write_text(
        "import subprocess, sys, time\n"
        f"code = 'import time; time.sleep(3); open(%r, \"w\")' % {str(marker)!r}\n"
        "subprocess.Popen([sys.executable, '-c', code])\n"
        "time.sleep(60)\n"
    )
    with pytest.raises(Refused, match="ran past its 1 s limit and was killed"):
        run_isolated([sys.executable, str(script)], box, Limits(wall_seconds=1))
    import time

    time.sleep(4)
    assert not marker.exists()
    # Unkilled, the sandboxed child can write the marker: the check above can fail.
    run_isolated(_python(f"open({str(marker)!r}, 'w')"), box)
    assert marker.exists()


needs_own_user = pytest.mark.skipif(isolation() is None or isolation().uid is None,
                                    reason="the child runs as a user of its own only when the scorer is root and "
                                           "`nobody` can run this Python")
needs_process_limit = pytest.mark.skipif("processes" not in describe(),
                                         reason="no pids cgroup and no user of its own: processes are not limited")


@needs_process_limit
def test_process_limit(box):
    code = ("import os, time\nn = 0\ntry:\n    for _ in range(200):\n        if os.fork() == 0:\n"
            "            time.sleep(5); os._exit(0)\n        n += 1\nexcept OSError as e:\n    print('refused', type(e).__name__)\n"
            "print('forked', n)")
    done = run_isolated(_python(code), box, Limits(processes=20, wall_seconds=20))
    forked = int(done.stdout.split("forked ")[1])
    assert "refused BlockingIOError" in done.stdout and forked < 20, done.stdout


@pytest.mark.skipif("pids cgroup" not in describe(), reason="no pids cgroup: a process that leaves its group survives")
def test_process_that_left_the_group_is_killed(box):
    marker = box / "home" / "daemon-survived"
    code = ("import os, sys, time\nif os.fork() == 0:\n    os.setsid(); sys.stdout.close(); time.sleep(3)\n"
            f"    open({str(marker)!r}, 'w'); os._exit(0)\nprint('parent done')")
    done = run_isolated(_python(code), box, Limits(wall_seconds=20))
    assert "parent done" in done.stdout
    import time

    time.sleep(4)
    assert not marker.exists()


@needs_own_user
def test_organiser_files_are_out_of_reach(box, tmp_path):
    secret = tmp_path / "organiser-secret.txt"
    secret.write_text("answer key")
    secret.chmod(0o600)
    done = run_isolated(_python(f"print(open({str(secret)!r}).read())"), box)
    assert done.returncode != 0 and "answer key" not in done.stdout and "PermissionError" in done.stderr
    done = run_isolated(_python(f"open({str(tmp_path / 'planted')!r}, 'w')"), box)
    assert done.returncode != 0 and not (tmp_path / "planted").exists()


def test_sandboxed_load_matches_in_process_load(official_file):
    (a,), (b,) = load_isolated(official_file), read_upload(official_file, UploadRules(), sandbox=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert (a.source, a.sha256, a.ipc, a.kind) == (b.source, b.sha256, b.ipc, b.kind)


def test_code_running_pickle_refused_through_the_default_cli(run_cli, tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save(Payload(), tmp_path / "mnist5k.pt")
    r = run_cli("score", tmp_path / "mnist5k.pt", "--quiet")
    assert r.exit_code == 1 and f"{tmp_path / 'mnist5k.pt'} was refused" in r.stderr
    assert not (tmp_path / "pwned").exists()


def test_no_sandbox_is_recorded(run_cli, official_file):
    runs = [json.loads(run_cli("score", official_file, "--epochs", 0, "--rounds", 1, "--quiet", "--json", "-", *flag).stdout)
            for flag in ((), ("--no-sandbox",))]
    assert runs[0]["sandbox"].startswith("no network") and runs[1]["sandbox"] == "none (--no-sandbox)"
    assert runs[0]["datasets"][0]["accuracies"] == runs[1]["datasets"][0]["accuracies"]


def test_tensor_header_claiming_a_huge_shape(run_cli, tmp_path):
    huge = torch.zeros(1, 1, 1, 1).expand(10_000_000, 1, 28, 28)  # 31 GB if ever made contiguous
    torch.save(huge, tmp_path / "mnist5k.pt")
    assert (tmp_path / "mnist5k.pt").stat().st_size < 10_000
    r = run_cli("score", tmp_path / "mnist5k.pt", "--quiet")  # alone: not what the rules ask, refused unrecorded
    assert r.exit_code == 2 and "holds 10000000 mnist5k images; the rules allow at most IPC 100" in r.stderr
    assert not (tmp_path / "results").exists()
    # Within the count the rules allow, the storage behind the header is checked before any copy.
    torch.save(torch.zeros(1, 1, 1, 1).expand(1000, 1, 28, 28), tmp_path / "mnist5k.pt")
    r = run_cli("score", tmp_path / "mnist5k.pt", "--quiet")
    assert r.exit_code == 1 and "claims a 1000x1x28x28 tensor but stores only 4 bytes" in r.stderr


def test_nan_images_refused_through_the_sandbox(run_cli, tmp_path, mnist5k_random_images):
    bad = mnist5k_random_images.clone()
    bad[17, 0, 3, 3] = float("nan")
    bad[40, 0, 0, 0] = float("inf")
    torch.save(bad, tmp_path / "mnist5k.pt")
    r = run_cli("score", tmp_path / "mnist5k.pt", "--quiet")
    assert r.exit_code == 1 and "holds 2 NaN or Inf value(s)" in r.stderr


def test_label_order_travels_with_the_images(tmp_path, mnist5k_random_images):
    """Labels in any order are kept with their images through the sandbox;
    uneven classes are refused."""
    labels = torch.arange(100) // 10
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    torch.save({"images": mnist5k_random_images[perm], "labels": labels[perm]}, tmp_path / "mnist5k.pt")
    (entry,) = load_isolated(tmp_path / "mnist5k.pt")
    assert torch.equal(entry.labels, labels[perm]) and torch.equal(entry.images, mnist5k_random_images[perm])
    labels[0] = 1
    torch.save({"images": mnist5k_random_images, "labels": labels}, tmp_path / "mnist5k.pt")
    with pytest.raises(SubmissionError, match="does not hold the same number of images for every class"):
        load_isolated(tmp_path / "mnist5k.pt")


def test_track2_generator_runs_in_the_sandbox(run_cli, tiny_model):
    r = run_cli("score", tiny_model, "--dataset", "mnist5k", "--ipc", 2, "--epochs", 1, "--rounds", 1, "--quiet",
                "--json", "-", "--budget", 600)
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    (d,) = result["datasets"]
    assert (d["dataset"], d["ipc"], d["images"], d["method"]) == ("mnist5k", 2, 20, "diffusion")
    assert d["source"].startswith(f"{tiny_model} (generated IPC 2 in ") and result["sandbox"].startswith("no network")
    r = run_cli("score", tiny_model / "step-0000002", "--dataset", "mnist5k", "--ipc", 2, "--epochs", 1, "--rounds",
                1, "--quiet", "--json", "-", "--no-sandbox", "--budget", 600)
    assert r.exit_code == 0 and json.loads(r.stdout)["sandbox"] == "none (--no-sandbox)"
    # The organiser's dataset, not the generator's: by default the challenge's two, which it cannot make. Alone,
    # the command line's mistake, refused before it runs; in a batch, the upload's failure, found when it runs.
    for extra in (("--dataset", "cifar10"), ()):
        r = run_cli("score", tiny_model, *extra, "--ipc", 1, "--quiet", "--budget", 600)
        assert r.exit_code == 2 and "is a generator trained for mnist5k" in r.stderr, r.stderr
    r = run_cli("score", tiny_model, tiny_model / "step-0000002", "--ipc", 1, "--quiet", "--budget", 600,
                "--output", "batch")
    failed = [json.loads(p.read_text())["reason"] for p in sorted(Path("batch").glob("*.failed.json"))]
    assert r.exit_code == 1 and len(failed) == 2 and all("was trained for mnist5k" in f for f in failed), r.output


def test_track2_generator_past_its_budget_is_killed(tiny_model, tmp_path):
    """One batch far longer than budget + grace: the run cannot reach its own
    deadline check, so only the kill stops it."""
    from ddchallenge.errors import BudgetExceeded

    with pytest.raises(BudgetExceeded, match="did not finish within its 2 s budget and was killed; raise --budget"):
        generate_upload(tiny_model, UploadRules(("mnist5k",), ipc=400), budget=2, grace=1)


def test_a_budget_needs_a_generator(run_cli, official_file):
    r = run_cli("score", official_file, "--budget", 5)  # alone: the command line's mistake, nothing recorded
    assert r.exit_code == 2 and "is not a generator folder, and --budget scores generator folders only" in r.stderr
    assert not os.path.exists("results")  # run_cli works in tmp_path


def test_generator_folder_with_a_symlink_is_refused(run_cli, tiny_model, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model / "step-0000004", model)
    (model / "unet" / "config.json").unlink()
    (model / "unet" / "config.json").symlink_to("/etc/passwd")
    r = run_cli("score", model, "--dataset", "mnist5k", "--ipc", 1, "--quiet", "--budget", 600)
    assert r.exit_code == 1 and "config.json is a symbolic link" in r.stderr


def test_socket_opening_pickle_refused_through_the_default_cli(run_cli, tmp_path):
    import pickle
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted = []

    def accept():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)
    threading.Thread(target=accept, daemon=True).start()

    class Payload:
        def __reduce__(self):
            return (socket.create_connection, (("127.0.0.1", port),))

    pickle.loads(pickle.dumps(Payload()))  # the payload is live: unpickled, it connects
    import time

    time.sleep(0.2)
    assert len(accepted) == 1
    torch.save({"images": Payload()}, tmp_path / "mnist5k.pt")
    r = run_cli("score", tmp_path / "mnist5k.pt", "--quiet")
    assert r.exit_code == 1 and "was refused" in r.stderr
    time.sleep(0.2)
    assert len(accepted) == 1
    listener.close()


# ---------------------------------------------------------------- whose fault: limits the upload can reach

ALLOCATE_300_MB = "x = bytearray(300 << 20)\nfor i in range(0, len(x), 4096): x[i] = 1\nprint('allocated', flush=True)\n"


@pytest.fixture
def no_memory_cgroup(monkeypatch):
    """This machine as one without a memory cgroup: a CUDA child's host memory is then the watchdog's."""
    from ddchallenge import isolation as isolation_module

    found = isolation_module._cgroup_root
    monkeypatch.setattr(isolation_module, "_cgroup_root", lambda c: None if c == "memory" else found(c))


@pytest.mark.parametrize("code", [
    ALLOCATE_300_MB + "import time; time.sleep(60)",
    # A grandchild in a session of its own, the child waiting for it: found by its parent link.
    "import subprocess, sys\nsubprocess.run([sys.executable, '-c', %r], start_new_session=True)"
    % (ALLOCATE_300_MB + "import time; time.sleep(60)"),
], ids=["child", "grandchild-in-own-session"])
def test_watchdog_kills_a_cuda_child_past_its_host_memory_and_it_is_the_uploads_failure(box, no_memory_cgroup, code):
    from ddchallenge.batch import classify
    from ddchallenge.isolation import MemoryExceeded

    limits = Limits(memory_bytes=100 << 20, wall_seconds=30)
    assert "memory 100 MiB (watchdog on resident memory), GPU memory 16 GiB (allocator share)" in describe(limits, cuda=True)
    with pytest.raises(MemoryExceeded) as caught:
        spawn(_python(code), box, limits, cuda=True)  # without the watchdog: killed at 30 s, TimedOut
    assert str(caught.value) == "the sandboxed work used more than 100 MiB of host memory and was killed"
    tried = classify(SubmissionError(str(caught.value)))  # as upload.py hands it on
    assert not tried.environment and tried.reason == str(caught.value)
    assert not classify(caught.value).environment
    # Within its limit a CUDA child runs to the end; without CUDA, RLIMIT_AS holds instead (no watchdog).
    assert spawn(_python("print('small')"), box, limits, cuda=True).stdout == "small\n"
    done = spawn(_python(ALLOCATE_300_MB), box, limits)
    assert done.returncode != 0 and "MemoryError" in done.stderr and "address space 100 MiB (rlimit)" in describe(limits)


OOM = "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.2 GiB is free."


def test_cuda_out_of_memory_in_upload_code_is_the_uploads_failure_elsewhere_the_machines():
    from ddchallenge.batch import classify
    from ddchallenge.isolation import is_environment_failure, provoked, upload_code

    oom = torch.cuda.OutOfMemoryError(OOM)
    assert is_environment_failure(oom, upload_code=True) is False
    assert provoked(oom, 16 << 30) == "ran out of GPU memory within its 16 GiB share (Tried to allocate 20.00 GiB)"
    # The scorer's own training: the rules bound its inputs, so running out there is the machine's.
    assert is_environment_failure(torch.cuda.OutOfMemoryError(OOM)) is True
    assert classify(torch.cuda.OutOfMemoryError(OOM)).environment
    # Work on an upload in the scorer's process (--no-sandbox) is marked, and classified as the upload's.
    with pytest.raises(torch.cuda.OutOfMemoryError) as caught:
        with upload_code():
            raise torch.cuda.OutOfMemoryError(OOM)
    tried = classify(caught.value)
    assert not tried.environment and tried.reason == "the work on this upload ran out of GPU memory (Tried to allocate 20.00 GiB)"
    # Other variants the upload can provoke, and failures it cannot.
    for exc, uploads in [(RuntimeError("CUDA error: out of memory"), True), (MemoryError(), True),
                         (RuntimeError("CUDA error: device-side assert triggered"), True),
                         (RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate (CUDA)"), True),
                         (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                                       "allocate memory: you tried to allocate 68719476736 bytes."), True),
                         (RuntimeError("CUDA error: uncorrectable ECC error encountered"), False),
                         (OSError(28, "No space left on device"), False)]:
        assert is_environment_failure(exc, upload_code=True) is not uploads, exc
        assert is_environment_failure(exc) is True, exc
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes.")
    assert provoked(cpu) == "ran out of host memory (tried to allocate 64 GiB)"


def _raise_cuda_oom(request, inputs, outbox):
    raise torch.cuda.OutOfMemoryError(OOM)


def _write_marker(request, inputs, outbox):
    (outbox / "ran").write_text("the work ran")
    return "done"


def _call_child(tmp_path, function, gpu_memory_bytes=None):
    """The sandboxed child's entry point, run here (no GPU needed): its exit code and what the parent makes of it."""
    from ddchallenge.isolation import _child, _outcome

    outbox = tmp_path / "out"
    outbox.mkdir(parents=True)
    call = {"function": f"{function.__module__}:{function.__qualname__}", "request": None, "inputs": {},
            "outbox": str(outbox), "gpu_memory_bytes": gpu_memory_bytes}
    (tmp_path / "call.json").write_text(json.dumps(call))
    code = _child(str(tmp_path / "call.json"))
    try:
        return code, _outcome(code, outbox, "", Limits()), outbox
    except Exception as exc:  # noqa: BLE001
        return code, exc, outbox


def test_child_reports_cuda_out_of_memory_as_the_uploads_and_a_cuda_start_failure_as_the_machines(tmp_path, monkeypatch):
    from ddchallenge.batch import classify
    from ddchallenge.errors import EnvironmentFailure
    from ddchallenge.isolation import REFUSED_EXIT

    code, refused, _ = _call_child(tmp_path / "a", _raise_cuda_oom)
    assert code == REFUSED_EXIT and isinstance(refused, Refused)
    assert str(refused) == "the sandboxed work ran out of GPU memory (Tried to allocate 20.00 GiB)"
    assert not classify(SubmissionError(str(refused))).environment
    # A GPU share is asked for where this machine has no CUDA: CUDA fails before any of the work runs.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, failed, outbox = _call_child(tmp_path / "b", _write_marker, gpu_memory_bytes=1 << 30)
    assert isinstance(failed, EnvironmentFailure) and not (outbox / "ran").exists()
    assert "CUDA could not be started for the work" in str(failed) and classify(failed).environment
    # Without a share asked for, the same function runs.
    code, value, outbox = _call_child(tmp_path / "c", _write_marker)
    assert (code, value) == (0, "done") and (outbox / "ran").exists()


def test_no_sandbox_generator_out_of_gpu_memory_is_the_uploads_failure(tiny_model, monkeypatch):
    """--no-sandbox runs a generator in the scorer's process: what it asks for is still its own. (No GPU here:
    the generation step raises what PyTorch raises when a batch does not fit.)"""
    from ddchallenge import upload
    from ddchallenge.batch import BatchSettings, attempt

    def generate_too_much(request, model, folder):
        raise torch.cuda.OutOfMemoryError(OOM)

    monkeypatch.setattr(upload, "_generate", generate_too_much)
    settings = BatchSettings(rules=UploadRules(("mnist5k",), ipc=1), budget=60, sandbox=False)
    tried = attempt(tiny_model, settings, None, "cpu", progress=False)
    assert not tried.environment and tried.result is None
    assert tried.reason == "the work on this upload ran out of GPU memory (Tried to allocate 20.00 GiB)"


def test_a_batch_stopped_by_sigterm_kills_its_sandboxed_child_and_removes_its_folder(run_cli, official_file, tmp_path,
                                                                                      monkeypatch):
    """An organiser's review: a batch stopped by SIGTERM (a scheduler's time
    limit, `kill`, `timeout`) or SIGHUP (a lost login) died at once, leaving
    its sandboxed child running (a generator: up to its whole budget) and
    the child's folder, with its copy of the upload, in the temporary folder.
    Now it stops as Ctrl-C does: the child killed and reaped, the folder
    removed, a line saying how to resume, exit 128 + the signal."""
    import signal
    import tempfile
    import time

    import ddchallenge.batch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    child = []

    def stalled(*args, **kwargs):
        with workdir() as work:
            def stop():  # once the child runs: its pid, then SIGTERM to this process
                while not (work / "home" / "pid").exists():
                    time.sleep(0.05)
                time.sleep(0.2)
                child.append(int((work / "home" / "pid").read_text()))
                os.kill(os.getpid(), signal.SIGTERM)
            threading.Thread(target=stop, daemon=True).start()
            spawn(_python("import os, time; open('pid', 'w').write(str(os.getpid())); time.sleep(8)"), work)

    monkeypatch.setattr(ddchallenge.batch, "score", stalled)
    unhandled = []
    before = signal.signal(signal.SIGTERM, lambda *a: unhandled.append(a))  # without the fix: not this process's end
    try:
        r = run_cli("score", official_file, "--dataset", "mnist5k", "--output", tmp_path / "out")
    finally:
        signal.signal(signal.SIGTERM, before)
    assert r.exit_code == 128 + signal.SIGTERM and not unhandled, r.output
    assert r.stderr.startswith("\ninterrupted by SIGTERM: this run recorded 0 scored and 0 failed of 1 upload"), r.stderr
    with pytest.raises(ProcessLookupError):
        os.kill(child[0], 0)  # killed and reaped
    assert list((tmp_path / "tmp").iterdir()) == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_any_command_stopped_by_a_signal_exits_as_the_signal_would(run_cli, tmp_path, monkeypatch, signame):
    """Not only `score`: any command stopped by SIGTERM or Ctrl-C (SIGINT) runs
    its cleanups (the handler raises where Python's default would end the
    process at once) and exits 128 + the signal with one line, not click's
    "Aborted!" and exit 1, which a scheduler or a script would read as the
    command's own failure."""
    import signal
    import time

    import ddchallenge.report

    signum = getattr(signal, signame)

    def stopped(paths):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises here, long before this ends
        return paths

    monkeypatch.setattr(ddchallenge.report, "record_files", stopped)
    inherited = signal.getsignal(signum)
    if signum == signal.SIGINT:  # as Ctrl-C in a terminal finds it, however the tests were started: a script's
        signal.signal(signum, signal.default_int_handler)  # background job inherits SIGINT ignored, and keeps it
    try:
        before = signal.getsignal(signum)  # Python's default, or what another library set (Ray does)
        r = run_cli("leaderboard", tmp_path)
        assert r.exit_code == 128 + signum, r.output
        assert r.stderr == f"\ninterrupted by {signame}\n"
        assert signal.getsignal(signum) is before  # put back as it was
    finally:
        signal.signal(signum, inherited)


def test_the_sandboxed_child_dies_with_a_parent_killed_by_sigkill(tmp_path):
    """An organiser's batch killed by SIGKILL (the OOM killer, `kill -9`, a
    scheduler's hard limit) runs no handler: its sandboxed child (a generator,
    up to its whole budget) went on running, orphaned. The kernel now kills it
    with its parent (`setpriv --pdeathsig`)."""
    import shutil
    import signal
    import subprocess
    import time
    from pathlib import Path

    if "setpriv" not in " ".join(isolation().prefix):
        pytest.skip("setpriv --pdeathsig is not available here")
    child_code = "import os, time; open('pid', 'w').write(str(os.getpid())); time.sleep(60)"
    parent_code = ("import sys\nfrom ddchallenge.isolation import spawn, workdir\nwith workdir() as work:\n"
                   f"    print(work, flush=True)\n    spawn([sys.executable, '-c', {child_code!r}], work)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    work = Path(parent.stdout.readline().strip())
    try:
        pid_file = work / "home" / "pid"
        for _ in range(400):
            if pid_file.is_file() and pid_file.read_text():
                break
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert _state(child) not in (None, "Z")  # running
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        for _ in range(200):
            if _state(child) in (None, "Z"):  # gone, or dead and waiting for init to reap it
                break
            time.sleep(0.05)
        assert _state(child) in (None, "Z"), "the child outlived its SIGKILLed parent"
        assert work.is_dir()  # no handler of the parent ran: its folder, with the upload's copy, is left
        with workdir():  # the next run removes it
            assert not work.exists()
    finally:
        parent.kill()
        shutil.rmtree(work, ignore_errors=True)


def _state(pid):
    """A process's state letter from /proc, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def test_only_the_folders_of_gone_processes_of_this_pid_namespace_are_removed(tmp_path, monkeypatch):
    import subprocess
    import tempfile

    from ddchallenge.isolation import WORKDIR_PREFIX, _pid_namespace

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ns = _pid_namespace()
    names = {"gone": f"{WORKDIR_PREFIX}{ns}-{gone.pid}-abc", "alive": f"{WORKDIR_PREFIX}{ns}-{os.getppid()}-abc",
             "other namespace": f"{WORKDIR_PREFIX}{ns}1-{gone.pid}-abc", "not a pid": f"{WORKDIR_PREFIX}{ns}-x-abc",
             "no owner": f"{WORKDIR_PREFIX}abc"}
    for name in names.values():
        (tmp_path / name / "home").mkdir(parents=True)
    with workdir() as work:
        assert work.name.startswith(f"{WORKDIR_PREFIX}{ns}-{os.getpid()}-")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([work.name] + [
            names[k] for k in ("alive", "other namespace", "not a pid", "no owner")])
    assert not work.exists()


def test_a_gone_parents_cgroup_is_emptied_and_removed_by_the_next_child():
    """Where setpriv is missing a SIGKILLed parent's child runs on in its cgroup: the next child's setup kills
    what still runs there and removes the group; a live process's group is left alone."""
    import subprocess
    import time

    from ddchallenge.isolation import CGROUP_PREFIX, _cgroup_root, _cgroups, _pid_namespace

    found = _cgroup_root("pids")
    if found is None:
        pytest.skip("no pids cgroup can be made here")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = found[0] / f"{CGROUP_PREFIX}{_pid_namespace()}-{gone.pid}-abc"
    alive = found[0] / f"{CGROUP_PREFIX}{_pid_namespace()}-{os.getppid()}-abc"
    orphan.mkdir()
    alive.mkdir()
    left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (orphan / "cgroup.procs").write_text(str(left.pid))
        with _cgroups(Limits()) as groups:
            assert groups["pids"].name.startswith(f"{CGROUP_PREFIX}{_pid_namespace()}-{os.getpid()}-")
            assert not orphan.exists() and alive.is_dir()
        assert left.wait(timeout=10) == -9
    finally:
        left.kill()
        for group in (orphan, alive):
            for _ in range(50):
                if not group.exists():
                    break
                with contextlib.suppress(OSError):
                    group.rmdir()
                time.sleep(0.05)


def test_a_hard_limit_below_the_sandboxs_is_the_machines_failure_not_the_uploads(official_file, tmp_path):
    """A new user's review: under `ulimit -t 100` (a login node's) the child could not be given its CPU limit;
    `SubprocessError: Exception occurred in preexec_fn` was recorded as the upload's failure, then replayed."""
    import resource
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "ddchallenge", "score", str(official_file), "--epochs", "0",
                           "--rounds", "1", "--quiet"], capture_output=True, text=True, cwd=tmp_path,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CPU, (100, 100)))
    assert proc.returncode == 1 and proc.stderr == (
        "error: this machine's hard limit on CPU time (ulimit -t) is 100, below the 900 the sandbox gives untrusted "
        "work; raise it, or score where it is unlimited\n"), proc.stderr
    assert not list(tmp_path.glob("results/*.json"))  # not recorded: the next run, with the limit raised, scores it
