"""The Codabench/Codalab scoring program on a real mnist5k res/ref pair."""
import functools
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddchallenge.data import save_reference
from ddchallenge.protocol import get_dataset

PROGRAM = Path(__file__).resolve().parents[1] / "evaluator" / "evaluate.py"


def _input(tmp_path, official_file=None):
    inp = tmp_path / "input"
    (inp / "res").mkdir(parents=True)
    save_reference(get_dataset("mnist5k"), inp / "ref" / "mnist5k_test.pt")
    if official_file is not None:
        (inp / "res" / "mnist5k.pt").write_bytes(official_file.read_bytes())
    return inp


def _run(*args):
    return subprocess.run([sys.executable, str(PROGRAM), *map(str, args)], capture_output=True, text=True)


@functools.cache
def _program():
    spec = importlib.util.spec_from_file_location("codabench_evaluate", PROGRAM)
    program = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(program)
    return program


def _refused(capsys, *args) -> tuple[int, str]:
    """The program's main in this process, for a refusal that comes before any scoring (a subprocess would only
    add its start-up; the tests above and below run it as Codabench does): its exit code and stderr."""
    code = _program().main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_scores_a_res_ref_pair(tmp_path, official_file):
    inp, out = _input(tmp_path, official_file), tmp_path / "output"
    proc = _run(inp, out, "--epochs", 1, "--rounds", 1, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert (out / "scores.txt").read_text() == f"correct: {result['score']}\n"
    assert 0.2 < result["score"] <= 1 and result["datasets"][0]["ipc"] == 10
    assert "NOT THE OFFICIAL BUDGET" in (out / "detailed_results.html").read_text()
    assert "mnist5k" in proc.stdout


def test_missing_dataset_fails_with_one_line_and_no_scores(tmp_path, capsys):
    inp, out = _input(tmp_path), tmp_path / "output"
    code, err = _refused(capsys, inp, out)
    assert code == 1
    assert err == ("error: the submission is missing mnist5k.pt; it holds nothing; upload a zip holding mnist5k.pt "
                   "at its top level\n")
    assert not out.exists()


def test_bad_submission_fails_before_training(tmp_path, capsys):
    inp, out = _input(tmp_path), tmp_path / "output"
    torch.save(torch.full((100, 1, 28, 28), float("nan")), inp / "res" / "mnist5k.pt")
    code, err = _refused(capsys, inp, out)
    assert code == 1 and "NaN or Inf" in err and len(err.splitlines()) == 1 and not out.exists()


def test_an_output_that_is_a_file_is_refused_before_training(tmp_path, official_file, capsys):
    """An organiser's review: OUTPUT naming a file trained for the whole
    recipe, then ended in a traceback."""
    inp, out = _input(tmp_path, official_file), tmp_path / "output"
    out.write_text("not a folder")
    code, err = _refused(capsys, inp, out, "--epochs", 0, "--rounds", 1, "--device", "cpu")
    assert code == 1 and err == f"error: {out} is not a folder; OUTPUT is the folder scores.txt is written into\n"
    assert out.read_text() == "not a folder"


def test_a_res_folder_nested_under_decoy_files_is_refused(tmp_path, official_file, capsys):
    """An attacker's review: the presence check saw res/mnist5k.pt (a decoy) and the scorer read res/res/
    instead, exit 0."""
    inp, out = _input(tmp_path), tmp_path / "output"
    (inp / "res" / "mnist5k.pt").write_text("not a tensor")
    (inp / "res" / "res").mkdir()
    (inp / "res" / "res" / "mnist5k.pt").write_bytes(official_file.read_bytes())
    code, err = _refused(capsys, inp, out, "--epochs", 0, "--rounds", 1, "--device", "cpu")
    assert code == 1 and not out.exists()
    assert err == (f"error: {inp / 'res'} holds res/ and also mnist5k.pt; a submission folder is either a res/ "
                   "folder of dataset files or a folder holding res/, not both\n")


def test_a_machine_that_cannot_sandbox_is_not_the_submissions_failure(tmp_path, official_file):
    """An attacker's review: with no `unshare`, every submission failed with exit 1 and advice to pass
    --no-sandbox, an option the scoring program does not have."""
    import os

    inp, out = _input(tmp_path, official_file), tmp_path / "output"
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no unshare on it
    proc = subprocess.run([sys.executable, str(PROGRAM), *map(str, (inp, out, "--epochs", 0, "--rounds", 1)),
                           "--device", "cpu"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and not (out / "scores.txt").exists()
    assert proc.stderr == ("error: the scoring machine cannot sandbox submissions (`unshare --net` is missing or not "
                           "permitted); this is the host's failure, not the submission's; on a worker that cannot make "
                           "a network namespace (Codabench's default), pass --container-network in the metadata's "
                           "command\n")


def test_on_a_worker_without_network_namespaces_container_network_scores_and_says_so(tmp_path, official_file):
    """An organiser's review: Codabench's default worker starts the scoring container without CAP_SYS_ADMIN, so
    `unshare --net` fails and no upload was ever scored. The shipped metadata passes --container-network: the
    child then shares the container's network, as nobody where it may switch user, and result.json says so."""
    import os

    inp, out = _input(tmp_path, official_file), tmp_path / "output"
    refusing = tmp_path / "bin"  # `unshare` there but refused, as in that container
    refusing.mkdir()
    (refusing / "unshare").write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    (refusing / "unshare").chmod(0o755)
    env = {**os.environ, "PATH": f"{refusing}:{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, str(PROGRAM), str(inp), str(out), "--container-network", "--epochs", "0",
                           "--rounds", "1", "--device", "cpu"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["sandbox"].startswith("network shared with the scoring container (no namespace could be made), ")
    assert "CPU 900 s" in result["sandbox"] and (out / "scores.txt").is_file()
    # A code review: the child kept root here although `nobody` could be had (a plain `docker run` keeps SETUID),
    # where `nobody` can run this interpreter and import ddchallenge (not from an installation under /root).
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", sys.executable, "-c",
                 "import ddchallenge"]
    can_switch = os.geteuid() == 0 and shutil.which("setpriv")
    if can_switch and subprocess.run(as_nobody, cwd="/", capture_output=True).returncode == 0:
        assert ", user nobody, " in result["sandbox"], result["sandbox"]
    else:
        assert ", the scorer's own user (no user switch could be made), " in result["sandbox"], result["sandbox"]
    assert "--container-network" in (PROGRAM.parent / "metadata").read_text().splitlines()[0]


def test_container_network_whose_child_cannot_start_names_the_install_not_the_flag(tmp_path, official_file,
                                                                                  monkeypatch, capsys):
    """A code review: with --container-network given, no candidate works only where the child cannot import
    ddchallenge; the message told the organiser to pass the flag they had passed."""
    import ddchallenge.isolation

    def no_candidate_works():
        return None

    no_candidate_works.cache_clear = lambda: None
    monkeypatch.setattr(ddchallenge.isolation, "isolation", no_candidate_works)
    monkeypatch.setattr(ddchallenge.isolation, "_network_may_be_shared", False)  # put back after the test
    inp, out = _input(tmp_path, official_file), tmp_path / "output"
    code, err = _refused(capsys, inp, out, "--container-network", "--epochs", 0, "--rounds", 1, "--device", "cpu")
    assert code == 2 and not (out / "scores.txt").exists()
    assert err == ("error: the scoring machine cannot start the sandboxed child: `python -c 'import ddchallenge'` "
                   "fails from /; this is the host's failure, not the submission's; install ddchallenge in the "
                   "scoring image\n")


def test_where_a_namespace_can_be_made_container_network_changes_nothing(tmp_path, official_file):
    inp, out = _input(tmp_path, official_file), tmp_path / "output"
    proc = _run(inp, out, "--container-network", "--epochs", 0, "--rounds", 1, "--device", "cpu")
    assert proc.returncode == 0 and json.loads((out / "result.json").read_text())["sandbox"].startswith("no network")


@pytest.mark.parametrize("layout, message", [
    # An organiser's review: each refusal said only "missing mnist5k.pt", or named an option the team cannot pass.
    ({"submission/mnist5k.pt": "x"}, "the submission is missing mnist5k.pt; it holds submission/ (zip the files "
     "themselves, not the folder that holds them); upload a zip holding mnist5k.pt at its top level"),
    ({"MNIST5K.pt": "x", "mnist5k.h5": "x"}, "the submission is missing mnist5k.pt; it holds MNIST5K.pt, mnist5k.h5; "
     "upload a zip holding mnist5k.pt at its top level"),
    ({}, "the submission is missing mnist5k.pt; it holds nothing; upload a zip holding mnist5k.pt at its top level"),
    ({"model/config.json": "{}"}, "the submission holds a generator or model (model/config.json: a diffusers config); "
     "this competition scores images: upload mnist5k.pt, the images your method made"),
    ({"mnist5k.pt": "official", "mnist.pt": "official"}, "must hold exactly mnist5k (extra mnist); upload one file "
     "per dataset: mnist5k.pt"),
    ({"mnist5k.pt": "ipc1"}, "holds IPC 1 for mnist5k; the rules require IPC 10\n"),
])
def test_a_wrong_upload_is_told_what_was_found_and_what_to_upload(tmp_path, official_file, layout, message, capsys):
    inp, out = _input(tmp_path), tmp_path / "output"
    for name, content in layout.items():
        target = inp / "res" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if content == "official":
            target.write_bytes(official_file.read_bytes())
        elif content == "ipc1":
            torch.save(torch.zeros(10, 1, 28, 28), target)
        else:
            target.write_text(content)
    code, err = _refused(capsys, inp, out, "--epochs", 0, "--rounds", 1, "--device", "cpu")
    assert code == 1 and not out.exists()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert "--" not in err  # no option of a command line the team does not have


def test_a_finder_zips_resource_forks_are_ignored(tmp_path, official_file):
    inp, out = _input(tmp_path, official_file), tmp_path / "output"
    (inp / "res" / "__MACOSX").mkdir()
    (inp / "res" / "__MACOSX" / "._mnist5k.pt").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    proc = _run(inp, out, "--epochs", 0, "--rounds", 1, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", ["foo", "mnist5k-val", "MNIST5K"])
def test_a_reference_set_of_no_dataset_is_the_organisers_failure(tmp_path, official_file, name, capsys):
    """An organiser's review: a stray ref/foo_test.pt told the team to upload foo.pt, exit 1."""
    inp, out = _input(tmp_path, official_file), tmp_path / "output"
    (inp / "ref" / f"{name}_test.pt").write_bytes(b"")
    code, err = _refused(capsys, inp, out, "--epochs", 0, "--rounds", 1, "--device", "cpu")
    assert code == 2 and not out.exists()
    assert err.startswith(f"error: the scoring machine failed, not the submission: {inp / 'ref'} holds "
                          f"{name}_test.pt, which names no dataset this program scores")
