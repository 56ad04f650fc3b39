"""Every command in README.md and docs/*.md works as written.

Each documented command (```bash/sh/console blocks, indented code blocks,
and inline `ddchallenge ...` spans) is accounted for: run for real here
(RUN, cheap), run by the slow test (RUN_SLOW: minutes on two CPU cores), or
listed in NOT_RUN with why (network, a GPU or cluster, hours of training, a
prepared real dataset). Every `ddchallenge` command is parsed by the real
click CLI, so an option that does not exist, a value of the wrong type, a
missing required option or a subcommand that is not there fails here; a
`python bench/...` line may use only options its script defines. Where the
docs write a placeholder (MODEL_DIR, K, N, ...) PLACEHOLDERS says what
stands in for it, and an optional `[--opt v]` is parsed as given.
"""
from __future__ import annotations

import ast
import configparser
import glob
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ddchallenge.cli import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCED = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SHELLS = {"bash", "sh", "console", "shell"}
STARTS = ("ddchallenge ", "python ", "python3 ", "pip ", "ray ", ".venv/bin/")
INLINE = re.compile(r"`(ddchallenge [a-z][^`]*)`")

# What stands in for a placeholder the docs write, when a command is parsed.
PLACEHOLDERS = {"MODEL_DIR": "model", "K": "10", "N": "10", "S": "0.5", "G": "2", "RESULTS": "results",
                "UPLOADS...": "uploads", "local|auto|HOST:PORT": "local", "HEAD:6379": "head-node:6379",
                "DATASET": "mnist5k"}

# Run for real by test_cheap_commands_run_as_written, in this order, in one empty folder ($DDCHALLENGE_DATA
# inside it). A copy of random.h5 stands in for herding.h5 (herding itself takes ~15 s on two CPU cores and
# runs in the slow test).
RUN = [
    "ddchallenge data list",
    "ddchallenge generate --dataset mnist5k --method random --ipc 10 -o random.h5",
    "ddchallenge pack herding.h5 -o herding-submission",
    "ddchallenge show herding.h5 -o herding.png",
]

# Run for real by the slow test, in this order, in one folder where `mnist5k-model` is the tiny trained model
# (the mnist5k preset trains ~30 min): each is minutes on two CPU cores.
RUN_SLOW = [
    "ddchallenge generate --dataset mnist5k --method herding --ipc 10 --seed 0 -o herding.h5",
    "ddchallenge generate --dataset mnist5k --method herding --ipc 10 -o herding.h5",
    "ddchallenge score herding.h5 --epochs 100 --rounds 1 --json result.json",
    "ddchallenge generate --dataset mnist5k --method random --ipc 50 --seed 0 -o random.h5",
    "ddchallenge generate --dataset mnist5k --method diffusion --model mnist5k-model --ipc 10 -o diffusion.h5",
    "ddchallenge prototypes mnist5k-model --ipc 10",
    "ddchallenge generate --dataset mnist5k --method d4m --model mnist5k-model --ipc 10 -o d4m.h5",
    "ddchallenge invert mnist5k-model --per-class 10 --steps 300",
    "ddchallenge generate --dataset mnist5k --method d3m --model mnist5k-model --ipc 10 --oversample 3 -o d3m.h5",
    "ddchallenge generate --dataset mnist5k --method d4m --model mnist5k-model --ipc 10 --match-steps 300 -o dm.h5",
    "ddchallenge prototypes mnist5k-model --ipc 10 --match-steps 300 --make-default",
    "ddchallenge settings mnist5k-model",
    "ddchallenge settings mnist5k-model --drop-table d3m-k10",
    "ddchallenge generate --dataset mnist5k --model mnist5k-model --ipc 10 --track 2 -o track2.h5",
]

OFFICIAL_SCORE = "the official recipe: 3 x 1001 passes, about 10 minutes per IPC-10 mnist5k set on 2 CPU cores"
NEEDS_RECORDS = "ranks official records only: needs an official score first (" + OFFICIAL_SCORE + ")"
MODEL = "needs a model trained for ~30 min (the mnist5k preset), at the benchmark machine's /work path"
NOT_RUN = {
    "ddchallenge prototypes mnist5k-model --ipc 10 --fit-steps 1000 --strength 0.3 --make-default": "long: ~20 "
        "min of fitting on 2 CPU cores (--fit-steps runs in tests/test_methods.py)",
    # network: installs and downloads
    "python3 -m venv .venv": "makes a virtualenv for the install lines that follow (network)",
    "pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu": "network",
    "pip install torch==2.14.1 torchvision==0.29.1 -e .": "network (the torch pins are checked against tox.ini)",
    "python3 -m pip install tox>=4.11": "network",
    "python3 -m tox -e tests": "the whole test suite (~10 min; the env name is checked against tox.ini)",
    "pip install -e .[cluster]": "network (the extra is checked against setup.cfg)",
    "ddchallenge data prepare cifar100 --download": "network: downloads CIFAR-100",
    "ddchallenge data prepare tinyimagenet --source ~/datasets": "needs Tiny-ImageNet's 250 MB in ~/datasets",
    # a prepared real dataset (network) or a model trained on one (hours)
    "ddchallenge generate --dataset cifar100 --method random --ipc 20 --budget 600 -o c100.h5": "needs cifar100 "
        "prepared (network)",
    "ddchallenge generate --dataset cifar100 --model c100-model --ipc auto --track 2 -o c100.h5": "needs a model "
        "trained on cifar100 (hours)",
    "ddchallenge score cifar100.pt --ref reference_data/": "needs the organisers' cifar100_test.pt; " + OFFICIAL_SCORE,
    "ddchallenge train-vae tinyimagenet -o tiny-vae": "hours on Tiny-ImageNet (network to prepare it)",
    "ddchallenge train tinyimagenet --vae tiny-vae -o tiny-model": "hours on Tiny-ImageNet",
    # long: training and the official recipe
    "ddchallenge train mnist5k -o mnist5k-model": "long: ~30 min (the slow test uses the tiny trained model)",
    "ddchallenge train mnist5k -o mnist5k-model --resume": "long: resumes the 30 min training",
    "ddchallenge train mnist5k -o /work/mnist5k-model": "long: ~30 min",
    "ddchallenge train mnist5k-val -o mnist5k-val-model": "long: ~30 min on the validation view",
    "ddchallenge pack random.h5 -o submission": "the main job's: packs random.h5 for its official score; pack runs "
        "here on herding.h5",
    "ddchallenge score submission --dataset mnist5k": OFFICIAL_SCORE,
    "ddchallenge score herding-submission --dataset mnist5k": OFFICIAL_SCORE,
    "ddchallenge score random.h5 --json random.json": OFFICIAL_SCORE,
    "ddchallenge score herding.h5 --json herding.json": OFFICIAL_SCORE,
    "ddchallenge score random.h5 --dataset mnist5k --rounds 1": "one round of the official recipe at IPC 50 "
        "(~15 min)",
    "ddchallenge score s05g1.h5 s03g2.h5 s04g15.h5 s05g2.h5 --dataset mnist5k": OFFICIAL_SCORE + ", four sets",
    "ddchallenge score /tmp/m/d3m-M300.h5 --dataset mnist5k": OFFICIAL_SCORE,
    "ddchallenge score d4m-m300.h5 --dataset mnist5k": OFFICIAL_SCORE,
    "ddchallenge verify submissions/*.toml --score": "regenerates every reference submission and scores each "
        "with " + OFFICIAL_SCORE,
    "ddchallenge leaderboard results/ --format md": NEEDS_RECORDS,
    "ddchallenge leaderboard results/ --format html -o site/": NEEDS_RECORDS,
    # measures beyond the challenge score: each trains more networks than the official score does
    "ddchallenge score herding.h5 --baseline random --arch pool": OFFICIAL_SCORE + ", for the set, its baseline "
        "and each network of the pool",
    "ddchallenge score set.h5 --dataset mnist5k --baseline random --arch pool": OFFICIAL_SCORE + ", for the set, "
        "its baseline and each network of the pool",
    "ddchallenge reference full mnist5k": "long: the official recipe on the whole training set",
    "ddchallenge reference full DATASET": "long: the official recipe on the whole training set",
    "ddchallenge leaderboard results/ --extras": NEEDS_RECORDS,
    "ddchallenge teacher mnist5k -o teacher": "long: trains a teacher network on the training set",
    "ddchallenge teacher mnist5k -o /work/runs/t2p/teacher-mnist5k": "long: trains a teacher network on the "
        "training set (a benchmark's)",
    "ddchallenge score herding.h5 --dataset mnist5k --seed 10 --arch pool --epochs 20 --rounds 1": "the whole pool "
        "for 21 passes: ~3 min on two CPU cores (a benchmark's timing)",
    "ddchallenge score herding.h5 --teacher teacher --temperature 4": "needs the teacher; " + OFFICIAL_SCORE,
    "ddchallenge generate --dataset mnist5k --method herding --ipc 10 --soft-labels teacher --teacher teacher -o "
    "soft.h5": "needs the teacher (long); tests/test_soft_labels.py runs --soft-labels teacher",
    "ddchallenge score soft.h5 --labels soft": OFFICIAL_SCORE + "; tests/test_soft_labels.py runs --labels soft",
    "ddchallenge data prepare DATASET --download": "network",
    # the organiser's batches: official scores of many uploads, a cluster
    "ddchallenge score uploads/* --output results/": "an organiser's batch: " + OFFICIAL_SCORE + " per upload",
    "ddchallenge score generators/* --budget 600 --dataset cifar100 --output track2/": "Track 2 batch: 600 s per "
        "generator, then " + OFFICIAL_SCORE,
    "ddchallenge leaderboard track2/ --format md": NEEDS_RECORDS,
    "ddchallenge score uploads/* --output results/ --cluster local": "starts Ray on this machine (the [cluster] "
        "extra), then official scores; tests/test_cluster.py runs a small batch",
    "ddchallenge score uploads/* --output results/ --cluster head-node:6379": "needs a Ray cluster",
    "ddchallenge score uploads/* --output results/ --cluster HEAD:6379": "needs a Ray cluster",
    "ddchallenge score uploads/* --output results/ --cluster auto": "needs a Ray cluster",
    "ray start --head --port 6379": "starts a Ray cluster",
    "ray start --address HEAD:6379": "joins a Ray cluster",
    # Track 2 on a generator folder: runs for up to the 600 s budget, then the official recipe
    "ddchallenge score MODEL_DIR --budget 600": "runs a generator for up to 600 s, then " + OFFICIAL_SCORE,
    "ddchallenge score MODEL_DIR --dataset mnist5k [--ipc N] --budget 600": "runs a generator for up to 600 s, "
        "then " + OFFICIAL_SCORE,
    # the benchmarks: a model trained for 30 min at /work/mnist5k-model, hours of scoring
    "ddchallenge generate --dataset mnist5k --method d4m --model /work/mnist5k-model --ipc 10 --strength S "
    "--guidance G --seed 0 -o sSgG.h5": MODEL,
    "ddchallenge prototypes /work/mnist5k-model --ipc 100": MODEL,
    "ddchallenge invert /work/mnist5k-model --per-class 10 --steps 300 --lr 0.05": MODEL,
    "ddchallenge generate --dataset mnist5k --method d4m --model /work/mnist5k-model --ipc 10 --seed 0 "
    "--match-steps 300 -o d4m-m300.h5": MODEL,
    "ddchallenge generate --dataset mnist5k --method d4m --model /work/mnist5k-model --ipc 50 --seed 0 -o d4m.h5":
        MODEL,
    # docs/generator.md's templates (MODEL_DIR): the same commands on mnist5k-model run in the slow test
    "ddchallenge prototypes MODEL_DIR --ipc 10 [--ipc 50] [--seed 0] [--fit-steps 0] [--make-default "
    "[--strength 0.5] [--oversample 1] [--match-steps 300]]": "a template; prototypes (with and without "
        "--make-default) runs in the slow test, --fit-steps in tests/test_methods.py",
    "ddchallenge generate --dataset mnist5k --method d4m --model MODEL_DIR --ipc 10 [--strength 0.5] -o d4m.h5":
        "a template; d4m runs in the slow test",
    "ddchallenge invert MODEL_DIR --per-class K [--steps 300] [--batch-size 64] [--seed 0]": "a template; invert "
        "runs in the slow test",
    "ddchallenge generate --dataset mnist5k --method d3m --model MODEL_DIR --ipc 10 [--per-class K] -o d3m.h5":
        "a template; d3m runs in the slow test",
    "ddchallenge generate --dataset mnist5k --method diffusion --model MODEL_DIR --ipc 10 --match-steps 300 -o dm.h5":
        "a template; matching runs in the slow test",
    "ddchallenge invert MODEL_DIR --per-class 10 --match-steps 300 --make-default": "a template; prototypes "
        "--match-steps --make-default runs in the slow test",
    "ddchallenge settings FOLDER --drop-table NAME": "a template; --drop-table runs in the slow test (and "
    "tests/test_track2_rules.py)",
    "ddchallenge settings MODEL_DIR": "a template; settings runs in the slow test (and tests/test_track2_rules.py)",
    "ddchallenge settings MODEL_DIR --match-steps 300": "a template; settings --match-steps runs in "
        "tests/test_track2_rules.py",
    "ddchallenge settings MODEL_DIR --match-steps 0": "a template; settings --match-steps 0 runs in "
        "tests/test_track2_rules.py",
    # inline mentions of a command in prose (parsed: the command and its options exist)
    "ddchallenge train": "a mention",
    "ddchallenge train-vae": "a mention",
    "ddchallenge score": "a mention",
    "ddchallenge generate --method diffusion": "a mention",
    "ddchallenge data prepare tinyimagenet": "needs Tiny-ImageNet's files",
    "ddchallenge score UPLOADS... --cluster local|auto|HOST:PORT": "needs a Ray cluster",
    "ddchallenge leaderboard RESULTS": NEEDS_RECORDS,
    # bench scripts: each is minutes to hours of measurement
    "python bench/evaluator_speed.py": "a benchmark (minutes to hours); its options are checked",
    "python bench/cpu_memory.py": "a benchmark (minutes); its options are checked",
    "python bench/fidelity.py": "a benchmark (hours); its options are checked",
    "python bench/gpu_profile.py": "a benchmark on a GPU (minutes); its options are checked",
    "python bench/prepare_speed.py": "a benchmark; needs Tiny-ImageNet's files; its options are checked",
    "python bench/sandbox_overhead.py": "a benchmark (minutes); its options are checked",
    "python bench/diffusion_quality.py": "a benchmark (trains a model: hours); its options are checked",
    "python bench/generation_speed.py": "a benchmark (minutes); its options are checked",
    "python bench/cluster_overhead.py": "a benchmark on Ray (minutes); its options are checked",
    "python bench/track2_quality.py": "a benchmark (hours, on a trained model); its options are checked",
    "python bench/track2_protocol.py": "a benchmark (hours, on a trained model); its options are checked",
    "python bench/fit_probe.py": "a benchmark (an hour, on a trained model); its options are checked",
    "ddchallenge train mnist5k-val -o /work/models/mnist5k-val": "long: ~30 min on the validation view",
    "ddchallenge score FOLDER --budget 600 --ipc K": "a Track 2 run and an official score: ~20 min on 2 CPU cores "
        "at IPC 10",
}


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    words: tuple[str, ...]  # the command as a shell splits it, comments dropped, .venv/bin/ dropped
    inline: bool  # an inline `ddchallenge ...` mention in prose: may leave out required options

    @property
    def key(self) -> str:
        if self.words[0] == "python" and self.words[1].startswith("bench/"):
            return " ".join(self.words[:2])  # a benchmark is listed once, its options checked line by line
        return " ".join(self.words)


def _commands_in(line: str, where: str, inline: bool = False) -> list[Command]:
    words = shlex.split(line, comments=True)
    out, current = [], []
    for w in [*words, "&&"]:
        if w != "&&":
            current.append(w.removeprefix(".venv/bin/"))
        elif current:
            out.append(Command(where, tuple(current), inline))
            current = []
    return out


def _blocks(text: str):
    """(line number, command text) of every command line in shell and indented code blocks."""
    fenced_lines = set()
    for m in FENCED.finditer(text):
        first = text[:m.start(2)].count("\n") + 1
        fenced_lines.update(range(first - 1, first + m.group(2).count("\n") + 1))
        if m.group(1) in SHELLS:
            yield from _joined([(first + i, line) for i, line in enumerate(m.group(2).splitlines())])
    indented = [(i + 1, line) for i, line in enumerate(text.splitlines())
                if i + 1 not in fenced_lines and line.startswith("    ")]
    yield from _joined([(n, line) for n, line in indented if line.strip()], indented_only=True)


def _joined(lines, indented_only=False):
    """Lines that start a command, each joined with its `\\` continuations."""
    i = 0
    while i < len(lines):
        n, line = lines[i]
        text = line.strip().removeprefix("$ ")
        i += 1
        if not text.startswith(STARTS):
            continue
        while text.endswith("\\") and i < len(lines):
            text = text[:-1] + " " + lines[i][1].strip()
            i += 1
        yield n, text


def documented_commands() -> list[Command]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        name = doc.relative_to(ROOT)
        for n, line in _blocks(text):
            found += _commands_in(line, f"{name}:{n}")
        for m in INLINE.finditer(text):
            found += _commands_in(m.group(1), f"{name}:{text[:m.start()].count(chr(10)) + 1}", inline=True)
    return found


# Inline spans that mention a command with one of its options, not a full invocation.
MENTIONS = {"ddchallenge generate --method diffusion"}


def _substituted(words: tuple[str, ...]) -> list[str]:
    out = []
    for w in words:
        w = w.strip("[]") if w.startswith("[") or w.endswith("]") else w
        out.append(PLACEHOLDERS.get(w, w))
    return out


def _parse(command: Command) -> None:
    """Parse a `ddchallenge` command with the real CLI's options and types,
    running nothing: raises click's error for what is wrong."""
    args = _substituted(command.words[1:])
    group, name = cli, args.pop(0)
    while isinstance(group.get_command(None, name), click.Group):
        group, name = group.get_command(None, name), args.pop(0)
    sub = group.get_command(None, name)
    if sub is None:
        raise click.UsageError(f"no such command {name!r}")
    expanded = []
    for a in args:  # the README's one glob that names files of this repository
        expanded += sorted(glob.glob(a, root_dir=ROOT)) if a == "submissions/*.toml" else [a]
    try:
        sub.make_context(name, expanded)
    except click.MissingParameter:
        if not (command.inline and (not args or command.key in MENTIONS)):  # a mention names the command only
            raise


def _bench_options(script: Path) -> set[str]:
    """The --options a bench script's argparse defines (read, not run: each imports torch)."""
    found = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            found.update(a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-"))
    return found


def test_every_documented_command_is_run_or_says_why_not():
    commands = documented_commands()
    keys = {c.key for c in commands}
    assert len(commands) > 60, "the extraction found too few commands"
    listed = [*RUN, *RUN_SLOW, *NOT_RUN]
    assert len(listed) == len(set(listed)), "a command is listed twice"
    unaccounted = sorted({f"{c.where}: {c.key}" for c in commands if c.key not in listed})
    assert not unaccounted, "documented commands neither run nor listed in NOT_RUN with why:\n" + "\n".join(unaccounted)
    stale = sorted(set(listed) - keys)
    assert not stale, "listed commands no doc shows any more:\n" + "\n".join(stale)


def test_every_documented_command_parses():
    problems = []
    for c in documented_commands():
        try:
            if c.words[0] == "ddchallenge":
                _parse(c)
            elif c.key.startswith("python bench/"):
                script = ROOT / c.words[1]
                options = _bench_options(script) if script.is_file() else set()
                unknown = [w for w in c.words[2:] if w.startswith("--") and w not in options]
                if not script.is_file() or unknown:
                    problems.append(f"{c.where}: {c.key}: no such script or option {unknown}")
        except click.ClickException as exc:
            problems.append(f"{c.where}: {' '.join(c.words)}: {exc.format_message()}")
    assert not problems, "\n".join(problems)


def test_install_lines_match_the_project():
    """What the install and test lines name exists: torch pins, the extra, the tox env."""
    readme = (ROOT / "README.md").read_text()
    tox = configparser.ConfigParser()
    tox.read(ROOT / "tox.ini")
    pins = tox["testenv:tests"]["deps"].split()
    for pin in pins:
        assert readme.count(pin) == 2, pin  # the CPU-wheel line and the main job's
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert "cluster" in setup["options.extras_require"]
    assert "testenv:tests" in tox


def test_cheap_commands_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DDCHALLENGE_DATA", str(tmp_path / "data-root"))
    documented = {c.key for c in documented_commands()}
    for command in RUN:
        assert command in documented, command
        if "herding.h5" in command and not (tmp_path / "herding.h5").exists():
            shutil.copy(tmp_path / "random.h5", tmp_path / "herding.h5")  # the stand-in (see RUN)
        r = CliRunner().invoke(cli, shlex.split(command)[1:] + (["--quiet"] if " generate " in f" {command}" else []))
        assert r.exit_code == 0, (command, r.output)
    # What the README says `pack` writes.
    for part in ("res/mnist5k.pt", "res/manifest.json", "manifest.json", "submission.zip"):
        assert (tmp_path / "herding-submission" / part).is_file(), part
    assert (tmp_path / "herding.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_slow_commands_run_as_written(tmp_path, monkeypatch, tiny_model):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model / "step-0000004", tmp_path / "mnist5k-model")
    documented = {c.key for c in documented_commands()}
    for command in RUN_SLOW:
        assert command in documented, command
        words = shlex.split(command)
        if "-o" in words:  # two docs write the same file name: each runs as if it were the first
            (tmp_path / words[words.index("-o") + 1]).unlink(missing_ok=True)
        r = CliRunner().invoke(cli, [*words[1:], "--quiet"])
        assert r.exit_code == 0, (command, r.output)
    assert (tmp_path / "result.json").is_file() and (tmp_path / "track2.h5").is_file()
