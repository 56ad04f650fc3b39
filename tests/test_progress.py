"""A user's day through the CLI: every long step shows a progress bar on
stderr that names its unit (none with --quiet); a path that is no upload, a
folder that is no model and a set named .png are refused in one line with
nothing written; a batch on an unofficial budget says so in its summary;
Ctrl-C in a batch says what was kept and how to go on."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

BAR = re.compile(r"\d+%\|")  # what every tqdm bar line holds


def bars(stderr: str) -> str:
    """The bar lines of stderr (tqdm redraws with carriage returns)."""
    return "\n".join(line for line in stderr.replace("\r", "\n").splitlines() if BAR.search(line))


@pytest.fixture
def model(tiny_model, tmp_path):
    """A copy of the tiny model: prototypes and invert write into it."""
    shutil.copytree(tiny_model / "step-0000004", tmp_path / "model")
    return tmp_path / "model"


def test_sampling_shows_images_on_stderr_and_quiet_hides_them(run_cli, tiny_model, tmp_path):
    args = ["generate", "--dataset", "mnist5k", "--method", "diffusion", "--model", tiny_model, "--ipc", 1,
            "--steps", 2, "--batch-size", 4]
    r = run_cli(*args, "-o", tmp_path / "a.h5")
    assert r.exit_code == 0, r.stderr
    shown = bars(r.stderr)
    assert "sampling: 100%" in shown and "10/10" in shown and "image/s" in shown, r.stderr
    assert "%|" not in r.stdout  # results on stdout, bars on stderr
    r = run_cli(*args, "-o", tmp_path / "b.h5", "--quiet")
    assert r.exit_code == 0 and bars(r.stderr) == "", r.stderr
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()


def test_herding_and_selection_count_classes_and_epochs(run_cli, tmp_path):
    r = run_cli("generate", "--dataset", "mnist5k", "--method", "herding", "--ipc", 1, "--oversample", 2,
                "--device", "cpu", "-o", tmp_path / "h.h5")
    assert r.exit_code == 0, r.stderr
    shown = bars(r.stderr)
    assert re.search(r"herding mnist5k: 100%\|.*\| 10/10 .*class", shown), shown
    assert re.search(r"selection \(feature net\): .*ep", shown), shown


def test_prototypes_and_invert_show_each_step(run_cli, model):
    r = run_cli("prototypes", model, "--ipc", 1)
    assert r.exit_code == 0, r.stderr
    shown = bars(r.stderr)
    assert re.search(r"encoding mnist5k: 100%\|.*\| 4000/4000 .*image", shown), shown
    assert re.search(r"k-means IPC 1: 100%\|.*\| 10/10 .*class", shown), shown
    r = run_cli("invert", model, "--per-class", 1, "--steps", 2, "--batch-size", 4)
    assert r.exit_code == 0, r.stderr
    shown = bars(r.stderr)
    assert re.search(r"grouping \(k-means, K 1\): 100%\|.*\| 10/10 .*class", shown), shown
    assert re.search(r"inverting mnist5k: 100%\|.*\| 2/2 .*step", shown), shown
    r = run_cli("prototypes", model, "--ipc", 2, "--quiet")
    assert r.exit_code == 0 and bars(r.stderr) == "", r.stderr


def test_train_shows_steps_then_each_checkpoint_it_writes(tiny_training):
    """The minute after the step bar ends: the checkpoint's parts and its
    sample grid, each with a bar; the tiny preset says it is a smoke test.
    (`train(progress=...)` is what `train [--quiet]` calls: the session's
    one training, with its bars on, is the run looked at.)"""
    shown = bars(tiny_training[1])
    assert re.search(r"train mnist5k: 100%\|.*\| 4/4 .*step", shown), shown
    for step in (2, 4):
        assert re.search(rf"checkpoint step-000000{step}: .*\| [0-5]/5 .*part", shown), shown
    # The grid's bar is nested, so it is cleared when it ends; its last refresh (every 0.5 s) may come before
    # 80/80 on a fast machine: that the bar is there, over 80 images, is what holds everywhere.
    assert re.search(r"samples.png: +\d+%\|.*\| \d+/80 .*image", shown), shown
    assert "the tiny preset is a smoke test: its 0.16 M-parameter model samples noise" in tiny_training[1]


@pytest.mark.parametrize("command", [["prototypes", "{m}", "--ipc", "1"], ["invert", "{m}", "--per-class", "1"],
                                     ["generate", "--dataset", "mnist5k", "--method", "d4m", "--model", "{m}",
                                      "--ipc", "1", "-o", "x.h5"],
                                     ["generate", "--dataset", "mnist5k", "--track", "2", "--ipc", "auto", "--model", "{m}", "-o",
                                      "x.h5"]], ids=["prototypes", "invert", "generate", "generate-track2"])
def test_a_folder_that_is_no_model_is_one_line(run_cli, tmp_path, command):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("hello")
    before = sorted(map(str, tmp_path.rglob("*")))
    r = run_cli(*[a.format(m=tmp_path / "notes") for a in command])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "is not a ddchallenge diffusion model" in lines[0] and "`ddchallenge train`" in lines[0]
    assert sorted(map(str, tmp_path.rglob("*"))) == before


def test_generate_writes_only_what_its_name_says(run_cli, tmp_path):
    for name in ("m.png", "m", "m.hdf"):
        r = run_cli("generate", "--dataset", "mnist5k", "--method", "random", "--ipc", 1, "-o", tmp_path / name)
        assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
            f"error: -o {tmp_path / name}: a labelled set is an HDF5 file; name it with .h5 (e.g. m.h5)"]
        assert not (tmp_path / name).exists()


def test_a_users_mistake_writes_no_record(run_cli, official_file, tmp_path):
    (tmp_path / "herding.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("hello")
    cases = [((tmp_path / "herding.png",), "herding.png is not an upload (a .png file); pass an official"),
             ((tmp_path / "docs",), "docs is a folder but not an upload: it holds no res/ folder"),
             ((official_file, "--dataset", "cifar10"), "mnist5k.pt is named for mnist5k but --dataset says cifar10; "
                                                       "fix one"),
             # In a batch, before anything is scored: the good upload is not scored either.
             ((official_file, tmp_path / "herding.png"), "herding.png is not an upload")]
    for args, message in cases:
        r = run_cli("score", *args, "--epochs", 0, "--rounds", 1, "--quiet")
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and message in lines[0], r.stderr
        assert not (tmp_path / "results").exists()


def test_a_batch_on_an_unofficial_budget_says_so_in_its_summary(run_cli, official_file, tmp_path):
    other = tmp_path / "team-b.pt"
    other.write_bytes(official_file.read_bytes())
    r = run_cli("score", official_file, other, "--dataset", "mnist5k", "--epochs", 0, "--rounds", 1, "--quiet",
                "--no-sandbox")
    assert r.exit_code == 0, r.stderr
    banner, last = r.stdout.splitlines()[-2:]
    assert banner.startswith("*** NOT THE OFFICIAL BUDGET: 0 epochs, 1 round (recipe ")
    assert banner.endswith("these numbers are not leaderboard numbers ***")
    assert last.startswith("2 upload(s): 2 scored, 0 done before, 0 failed, 0 environment errors; 0 retried")


def test_ctrl_c_in_a_batch_says_what_was_recorded_and_how_to_resume(official_file, tmp_path):
    uploads = []
    for name in "abcde":
        uploads.append(tmp_path / f"team-{name}.pt")
        uploads[-1].write_bytes(official_file.read_bytes())
    argv = [sys.executable, "-m", "ddchallenge", "score", *map(str, uploads), "--dataset", "mnist5k", "--epochs", "20",
            "--rounds", "1", "--no-sandbox", "--device", "cpu", "--output", str(tmp_path / "results")]
    # SIGINT as a terminal delivers it, whatever launched the tests: a non-interactive shell starts background jobs
    # with SIGINT ignored, and Python keeps an inherited ignore.
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300  # a guard against a hang, not a timing assertion
        while not list((tmp_path / "results").glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    recorded = list((tmp_path / "results").glob("*.json"))
    assert proc.returncode == 130 and 1 <= len(recorded) < 5, (proc.returncode, err)
    assert "Aborted!" not in err and "Traceback" not in err, err
    assert f"interrupted: this run recorded {len(recorded)} scored and 0 failed of 5 uploads in " in err, err
    assert "run the same command again to resume: recorded uploads are skipped" in err


def test_a_folders_record_names_its_digest_and_one_round_is_singular(run_cli, official_file, tmp_path):
    (tmp_path / "team" / "res").mkdir(parents=True)
    (tmp_path / "team" / "res" / "mnist5k.pt").write_bytes(official_file.read_bytes())
    r = run_cli("score", tmp_path / "team", "--dataset", "mnist5k", "--epochs", 0, "--rounds", 1, "--quiet",
                "--no-sandbox")
    assert r.exit_code == 0, r.stderr
    assert "NO (0 epochs, 1 round)" in r.stdout and "1 rounds" not in r.stdout
    (record,) = (tmp_path / "results").glob("*.json")
    data = json.loads(record.read_text())
    assert data["submission_sha256"] == data["upload_sha256"] and len(data["upload_sha256"]) == 64


def test_a_sandboxed_step_shows_its_seconds_out_of_its_budget(capsys):
    """A new user's review: a Track 2 run showed one line and nothing for up to its whole budget (the sandboxed
    child's bars are off): the parent now shows the seconds spent, out of the budget."""
    import time

    from ddchallenge.progress import shown, ticking

    with shown(True), ticking("Track 2 run for mnist5k (sandboxed, 3 s budget)", 3):
        time.sleep(2.5)
    err = capsys.readouterr().err.replace("\r", "\n")
    assert re.search(r"Track 2 run for mnist5k \(sandboxed, 3 s budget\): +\d+%\|[^\n]*\| 2/3 ", err), err
    with shown(False), ticking("hidden", 3):
        time.sleep(1.2)
    assert capsys.readouterr().err == ""
