"""The sandbox that reads submissions: each test fails if its protection is missing."""
import http.server
import json
import os
import sys
import threading

import pytest
import torch

from ddchallenge.errors import SubmissionError
from ddchallenge.sandbox import SandboxLimits, isolation, load_isolated, run_isolated

pytestmark = pytest.mark.skipif(isolation() is None, reason="unshare --net is not permitted on this machine")


@pytest.fixture
def loopback_port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def _python(code):
    return [sys.executable, "-c", code]


def test_no_network_inside(tmp_path, loopback_port):
    code = f"import socket; socket.create_connection(('127.0.0.1', {loopback_port}), timeout=2); print('connected')"
    assert "connected" in __import__("subprocess").run(_python(code), capture_output=True, text=True).stdout
    done = run_isolated(_python(code), tmp_path)
    assert done.returncode != 0 and "connected" not in done.stdout


def test_clean_environment_and_private_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    done = run_isolated(_python("import os, json; print(json.dumps(dict(os.environ)))"), tmp_path)
    env = json.loads(done.stdout)
    assert "HF_TOKEN" not in env and env["HOME"] == str(tmp_path) and "secret-token" not in done.stdout


def test_memory_limit(tmp_path):
    done = run_isolated(_python("x = bytearray(3 << 30); print('allocated')"), tmp_path,
                        SandboxLimits(memory_bytes=1 << 30))
    assert done.returncode != 0 and "allocated" not in done.stdout and "MemoryError" in done.stderr


def test_wall_clock_kills_the_process_group(tmp_path):
    marker = tmp_path / "grandchild-survived"
    script = tmp_path / "spawner.py"
    script.write_text(
        "import subprocess, sys, time\n"
        f"code = 'import time; time.sleep(3); open(%r, \"w\")' % {str(marker)!r}\n"
        "subprocess.Popen([sys.executable, '-c', code])\n"
        "time.sleep(60)\n"
    )
    with pytest.raises(SubmissionError, match="ran past its 1 s limit and was killed"):
        run_isolated([sys.executable, str(script)], tmp_path, SandboxLimits(wall_seconds=1))
    import time

    time.sleep(4)
    assert not marker.exists()


def test_sandboxed_load_matches_in_process_load(official_file):
    from ddchallenge.submission import load_submission

    (a,), (b,) = load_isolated(official_file), load_submission(official_file)
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
