"""The Codabench/Codalab scoring program on a real mnist5k res/ref pair."""
import json
import subprocess
import sys
from pathlib import Path

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


def test_scores_a_res_ref_pair(tmp_path, official_file):
    inp, out = _input(tmp_path, official_file), tmp_path / "output"
    proc = _run(inp, out, "--epochs", 1, "--rounds", 1, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert (out / "scores.txt").read_text() == f"correct: {result['score']}\n"
    assert 0.2 < result["score"] <= 1 and result["datasets"][0]["ipc"] == 10
    assert "NOT THE OFFICIAL BUDGET" in (out / "detailed_results.html").read_text()
    assert "mnist5k" in proc.stdout


def test_missing_dataset_fails_with_one_line_and_no_scores(tmp_path):
    inp, out = _input(tmp_path), tmp_path / "output"
    proc = _run(inp, out)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: the submission is missing mnist5k.pt; upload a zip holding mnist5k.pt"
    assert not out.exists()


def test_bad_submission_fails_before_training(tmp_path):
    inp, out = _input(tmp_path), tmp_path / "output"
    torch.save(torch.full((100, 1, 28, 28), float("nan")), inp / "res" / "mnist5k.pt")
    proc = _run(inp, out)
    assert proc.returncode == 1 and "NaN or Inf" in proc.stderr and not out.exists()


def test_an_output_that_is_a_file_is_refused_before_training(tmp_path, official_file, capsys):
    """An organiser's review: OUTPUT naming a file trained for the whole
    recipe, then ended in a traceback. (The program's main, in this process.)"""
    import importlib.util

    spec = importlib.util.spec_from_file_location("codabench_evaluate", PROGRAM)
    program = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(program)
    inp, out = _input(tmp_path, official_file), tmp_path / "output"
    out.write_text("not a folder")
    assert program.main([str(inp), str(out), "--epochs", "0", "--rounds", "1", "--device", "cpu"]) == 1
    assert capsys.readouterr().err == f"error: {out} is not a folder; OUTPUT is the folder scores.txt is written into\n"
    assert out.read_text() == "not a folder"


def test_a_res_folder_nested_under_decoy_files_is_refused(tmp_path, official_file):
    """An attacker's review: the presence check saw res/mnist5k.pt (a decoy) and the scorer read res/res/
    instead, exit 0."""
    inp, out = _input(tmp_path), tmp_path / "output"
    (inp / "res" / "mnist5k.pt").write_text("not a tensor")
    (inp / "res" / "res").mkdir()
    (inp / "res" / "res" / "mnist5k.pt").write_bytes(official_file.read_bytes())
    proc = _run(inp, out, "--epochs", 0, "--rounds", 1, "--device", "cpu")
    assert proc.returncode == 1 and not out.exists()
    assert proc.stderr == (f"error: {inp / 'res'} holds res/ and also mnist5k.pt; a submission folder is either a "
                           "res/ folder of dataset files or a folder holding res/, not both\n")


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
                           "permitted); this is the host's failure, not the submission's\n")
