"""The `ddchallenge` command: a thin click layer over the library.

Results go to stdout, progress and logs to stderr. Library errors become a
one-line message: exit 1 for invalid input or a failed run, 2 for usage.
"""
from __future__ import annotations

import logging
from pathlib import Path

import click

from ddchallenge import __version__, errors


class _OneLineError(click.ClickException):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class _Group(click.Group):
    """Turns the library's exceptions into one-line errors with exit codes."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except errors.UsageError as exc:
            raise _OneLineError(str(exc), 2) from None
        except errors.DDChallengeError as exc:
            raise _OneLineError(str(exc), 1) from None


class _StderrHandler(logging.Handler):
    """Library logs as 'warning: ...' lines on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"{record.levelname.lower()}: {record.getMessage()}", err=True)


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


device_option = click.option(
    "--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."
)


@cli.command()
@click.argument("submissions", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--dataset", help="Dataset of a single file whose name and shape do not tell it.")
@click.option("--ref", "ref_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder holding <dataset>_test.pt reference test sets (default: the data root).")
@click.option("--rounds", type=int, help="Training rounds per dataset (official: 3).")
@click.option("--epochs", type=int, help="Recipe epochs; the loop runs epochs + 1 passes (official: 1000).")
@click.option("--seed", type=int, default=0, show_default=True, help="Round r uses seed + r.")
@device_option
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              help="Write the JSON result here ('-': to stdout instead of the table).")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path),
              help="Write a Codalab-style scores.txt and result.json into this folder.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--no-sandbox", is_flag=True, help="Read the submission in this process (trusted files only).")
@click.option("--ipc", help="Track 2 generator folders: images per class, or 'auto' (default): the most that fit.")
@click.option("--budget", type=float, help="Track 2 generator folders: seconds allowed (default 600).")
def score(submissions, dataset, ref_dir, rounds, epochs, seed, device, json_path, output, quiet, no_sandbox, ipc,
          budget):
    """Score SUBMISSIONS with the official evaluation recipe.

    Each is an official <dataset>.pt file, a labelled .h5 set, a res/ folder
    or a submission .zip; or, for Track 2, a generator folder written by
    `ddchallenge train`, which is run (sandboxed, within --budget) to make
    the images first. Overriding --epochs or --rounds is allowed, but the
    result then says it is not the official budget. With several submissions
    (organisers: `score uploads/* --output results/`) each is scored in its
    own sandbox, a failure never stops the rest, results are written as each
    finishes and a rerun resumes; a summary table ends the run.
    """
    from ddchallenge.protocol import OFFICIAL
    from ddchallenge.report import score_table
    from ddchallenge.score import score as run_score

    recipe = OFFICIAL.with_overrides(epochs=epochs, rounds=rounds)
    options = dict(dataset=dataset, ref_dir=ref_dir, recipe=recipe, seed=seed, device=device,
                   progress=not quiet, sandbox=not no_sandbox)
    if ipc is not None or budget is not None:
        from ddchallenge.diffusion.model import is_generator

        if not all(is_generator(s) for s in submissions):
            raise errors.UsageError("--ipc and --budget apply to Track 2 generator folders only")
        if budget is not None and budget <= 0:
            raise errors.UsageError(f"--budget must be positive seconds, got {budget}")
        options.update({k: v for k, v in (("ipc", None if ipc is None else _ipc(ipc)), ("budget", budget))
                        if v is not None})
    if len(submissions) > 1:
        if output is None or json_path is not None:
            raise errors.UsageError("several submissions need --output DIR for their results (and no --json)")
        from tabulate import tabulate

        from ddchallenge.score import score_batch

        outcomes = score_batch(list(submissions), output, **options)
        rows = [[o.name, o.status, "-" if o.score is None else f"{100 * o.score:.2f}", o.reason or ""] for o in outcomes]
        click.echo(tabulate(rows, headers=["submission", "status", "score %", "reason"], tablefmt="simple",
                            disable_numparse=True))
        if any(o.reason for o in outcomes):
            raise click.exceptions.Exit(1)
        return
    result = run_score(submissions[0], **options)
    if output is not None:
        result.write(output)
    if json_path is not None and str(json_path) != "-":
        from ddchallenge.fileio import atomic_write_bytes

        atomic_write_bytes(json_path, result.to_json().encode())
    click.echo(result.to_json() if str(json_path) == "-" else score_table(result))


def _ipc(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise errors.UsageError(f"--ipc must be a whole number or 'auto', got {value!r}") from None


@cli.command()
@click.option("--dataset", required=True, help="Dataset to distil (see protocol.DATASETS).")
@click.option("--method", required=True, help="Generation method: random, herding, diffusion, d4m, d3m.")
@click.option("--ipc", required=True, help="Images per class, or 'auto': the most that fit --budget.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--track", type=click.Choice(["1", "2"]), help="1: IPC 10 on a Track 1 dataset; 2: enforce the budget.")
@click.option("--budget", type=float, help="Seconds allowed (Track 2 default: 600).")
@click.option("--root", type=click.Path(file_okay=False), help="Data root holding <dataset>_train.h5.")
@device_option
@click.option("--model", help="diffusion: model folder (from `ddchallenge train`) or Hugging Face Hub id[@revision].")
@click.option("--sampler", help="diffusion: dpm++ (default) or ddim.")
@click.option("--steps", type=int, help="diffusion: sampling steps (default 20).")
@click.option("--guidance", type=float, help="diffusion: classifier-free guidance scale, 1 = none (default 2).")
@click.option("--batch-size", type=int, help="diffusion: images per sampling batch (default 500).")
@click.option("--strength", type=float, help="d4m: how far each prototype is noised before denoising, in (0, 1] "
              "(default 0.5; 1 = pure noise).")
@click.option("--per-class", type=int, help="d3m: which stored set of K vectors per class (default: the folder's).")
@click.option("--oversample", type=float, default=1.0, show_default=True,
              help="Any method: make ceil(R x IPC) candidates per class and keep IPC by herding (R >= 1).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Labelled set (.h5).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def generate(dataset, method, ipc, seed, track, budget, root, device, model, sampler, steps, guidance, batch_size,
             strength, per_class, oversample, output, force):
    """Synthesise IPC labelled images per class into a labelled set."""
    from ddchallenge.generators import GenerateConfig, generate as run_generate

    given = dict(model=model, sampler=sampler, steps=steps, guidance=guidance, batch_size=batch_size,
                 strength=strength, per_class=per_class)
    config = GenerateConfig(dataset, method, _ipc(ipc), seed, track=int(track) if track else None, budget=budget,
                            device=device, root=root, options={k: v for k, v in given.items() if v is not None},
                            oversample=oversample)
    r = run_generate(config, output, force=force)
    click.echo(f"wrote {r.path}: {r.dataset}, {r.method}, IPC {r.ipc}, {r.images} images in {r.seconds:.1f} s "
               f"({r.images_per_second:.1f} images/s), seed {seed}")


preset_option = click.option("--preset", help="tiny, mnist5k, cifar10, cifar100, tinyimagenet (default: the dataset's).")
training_steps_option = click.option("--steps", type=int, help="Training steps (overrides the preset's).")


@cli.command("train")
@click.argument("dataset")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Model folder; checkpoints appear in it as step-NNNNNNN/.")
@preset_option
@training_steps_option
@click.option("--batch-size", type=int, help="Images per step (overrides the preset's).")
@click.option("--space", type=click.Choice(["pixel", "latent"]), help="Where the denoiser works (preset's default).")
@click.option("--vae", help="AutoencoderKL folder or Hub id (see `ddchallenge train-vae`); implies --space latent.")
@click.option("--checkpoint-every", type=int, help="Steps between checkpoints (overrides the preset's).")
@click.option("--seed", type=int, help="Seed of weights, data order and noise (default 0).")
@click.option("--root", type=click.Path(file_okay=False), help="Data root holding <dataset>_train.h5.")
@device_option
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in OUTPUT with its settings.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_command(dataset, output, preset, steps, batch_size, space, vae, checkpoint_every, seed, root, device,
                  resume, quiet):
    """Train a class-conditional diffusion generator on DATASET's training images."""
    from ddchallenge.diffusion.config import train_config
    from ddchallenge.diffusion.train import saved_config, train

    if vae is not None and space is None:
        space = "latent"  # a VAE only makes sense there
    given = dict(steps=steps, batch_size=batch_size, space=space, vae=vae, checkpoint_every=checkpoint_every,
                 seed=seed)
    if resume:
        config = saved_config(output, dataset, preset=preset, **given)
    else:
        config = train_config(dataset, preset, **given)
    r = train(config, output, device=device, root=root, resume=resume, progress=not quiet)
    click.echo(f"trained {dataset} to step {r.steps} ({r.images_per_second:.1f} images/s, last loss "
               f"{r.final_loss:.4f}); checkpoint {r.checkpoint}")


@cli.command("train-vae")
@click.argument("dataset")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True, help="VAE folder.")
@preset_option
@training_steps_option
@click.option("--seed", type=int, help="Seed (default 0).")
@click.option("--root", type=click.Path(file_okay=False), help="Data root holding <dataset>_train.h5.")
@device_option
@click.option("--force", is_flag=True, help="Replace OUTPUT if it is not empty.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_vae_command(dataset, output, preset, steps, seed, root, device, force, quiet):
    """Train an AutoencoderKL on DATASET for latent-space generators (`train --vae`)."""
    from ddchallenge.diffusion.config import vae_config
    from ddchallenge.diffusion.train import train_vae

    r = train_vae(vae_config(dataset, preset, steps=steps, seed=seed), output, device=device, root=root, force=force,
                  progress=not quiet)
    click.echo(f"wrote {r.output}: {r.steps} steps in {r.seconds:.0f} s, latent {'x'.join(map(str, r.latent_shape))}, "
               f"test reconstruction error {r.test_l1:.4f} (mean |pixel| in [0, 1])")


@cli.command("prototypes")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--ipc", "ipcs", type=int, multiple=True, required=True, help="Clusters per class; repeat for several.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the k-means++ draws.")
@click.option("--strength", type=float, help="Recorded for Track 2: d4m strength (default 0.5).")
@click.option("--oversample", type=float, default=1.0, show_default=True, help="Recorded for Track 2: selection R.")
@click.option("--root", type=click.Path(file_okay=False), help="Data root holding <dataset>_train.h5.")
@device_option
def prototypes_command(model, ipcs, seed, strength, oversample, root, device):
    """D4M: store k-means prototypes of every class in MODEL (a `train` folder) for `generate --method d4m`."""
    from ddchallenge.diffusion.prototypes import DEFAULT_STRENGTH, make_prototypes

    reports = make_prototypes(str(model), list(ipcs), seed=seed, device=device, root=root,
                              strength=DEFAULT_STRENGTH if strength is None else strength, oversample=oversample)
    for r in reports:
        click.echo(f"wrote {r.path}: IPC {r.ipc} prototypes, k-means {'converged' if r.converged else 'stopped'} "
                   f"in at most {r.iterations} iterations per class, {r.seconds:.1f} s")


@cli.command("invert")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--per-class", type=int, required=True, help="K: conditioning vectors learned per class.")
@click.option("--steps", type=int, default=300, show_default=True, help="Optimiser steps.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Training images per step.")
@click.option("--lr", type=float, default=5e-3, show_default=True, help="Adam learning rate of the vectors.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the grouping and the training draws.")
@click.option("--oversample", type=float, default=1.0, show_default=True, help="Recorded for Track 2: selection R.")
@click.option("--root", type=click.Path(file_okay=False), help="Data root holding <dataset>_train.h5.")
@device_option
def invert_command(model, per_class, steps, batch_size, lr, seed, oversample, root, device):
    """D3M: learn K class vectors per class with MODEL's denoiser frozen, for `generate --method d3m`."""
    from ddchallenge.diffusion.invert import invert

    r = invert(str(model), per_class, steps=steps, seed=seed, device=device, root=root, batch_size=batch_size,
               lr=lr, oversample=oversample)
    click.echo(f"wrote {r.path}: {r.per_class} vectors per class, {r.steps} steps, diffusion loss "
               f"{r.first_loss:.4f} -> {r.last_loss:.4f}, {r.seconds:.1f} s")


@cli.command()
@click.argument("sets", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--track", type=click.Choice(["1", "2"]), help="1: IPC 10 and both Track 1 datasets.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--input-normalised", is_flag=True, help="The sets hold normalised floats, not pixels.")
def pack(sets, output, track, force, input_normalised):
    """Pack labelled SETS into OUTPUT/res/, manifest.json and submission.zip."""
    from ddchallenge.pack import pack as run_pack

    manifest = run_pack(list(sets), output, track=int(track) if track else None, force=force,
                        input_normalised=input_normalised)
    for d in manifest["datasets"]:
        click.echo(f"{output / d['file']}: {d['dataset']}, IPC {d['ipc']}, {d['format']} format, sha256 {d['sha256']}")
    click.echo(f"{output / manifest['zip']['file']}: sha256 {manifest['zip']['sha256']}")


@cli.command()
@click.argument("submission", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="PNG file.")
@click.option("--dataset", help="Dataset of a file whose name and shape do not tell it.")
@click.option("--classes", type=click.IntRange(min=1), default=20, show_default=True, help="Rows (first classes).")
@click.option("--per-class", type=click.IntRange(min=1), default=10, show_default=True, help="Images per row.")
def show(submission, output, dataset, classes, per_class):
    """Write a PNG grid of a labelled set or submission file, one row per class."""
    from ddchallenge.fileio import atomic_write_bytes
    from ddchallenge.report import image_grid_png
    from ddchallenge.submission import load_submission

    entries = load_submission(submission, dataset)
    for entry in entries:
        # One grid per dataset: name them apart when there are several.
        target = output if len(entries) == 1 else output.with_name(f"{output.stem}_{entry.spec.name}{output.suffix}")
        atomic_write_bytes(target, image_grid_png(entry, classes, per_class))
        click.echo(f"wrote {target}: {entry.spec.name}, {min(classes, entry.spec.classes)} classes")


@cli.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--score", "with_score", is_flag=True, help="Also score and check the recipe's accuracy band.")
@device_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
def verify(recipes, with_score, device, quiet):
    """Regenerate and repack RECIPES from scratch; check bytes (and score)."""
    from ddchallenge.verify import verify as run_verify

    for path in recipes:
        v = run_verify(path, with_score=with_score, device=device, progress=not quiet)
        extra = f", score {100 * v.result.score:.2f} % in [{100 * v.recipe.band.min:.1f}, {100 * v.recipe.band.max:.1f}]" if v.result else ""
        click.echo(f"ok {v.recipe.name}: sha256 {v.sha256}{extra}")


@cli.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["table", "md", "csv", "html"]), default="table", show_default=True)
def leaderboard(results, fmt):
    """Rank score RESULTS (JSON files written by `score --json`)."""
    import json

    from ddchallenge.report import leaderboard as make_board

    loaded = []
    for path in results:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not all(k in data for k in ("datasets", "official_budget", "submission")):
                raise ValueError("not a score result")
            loaded.append(data)
        except (OSError, ValueError) as exc:
            raise errors.DDChallengeError(f"{path} is not a score result JSON written by `ddchallenge score --json` ({exc})") from None
    click.echo(make_board(loaded, fmt))


@cli.group()
def data() -> None:
    """List and prepare datasets (reference test sets and training stores)."""


root_option = click.option("--root", type=click.Path(file_okay=False, path_type=Path),
                           help="Data root (default: $DDCHALLENGE_DATA or ~/.cache/ddchallenge).")


@data.command("list")
@root_option
def data_list(root):
    """The known datasets, their shapes and constants, and which are prepared."""
    from tabulate import tabulate

    from ddchallenge.data.prepare import dataset_table

    rows = dataset_table(root)
    click.echo(tabulate([list(r.values()) for r in rows], headers=list(rows[0]), tablefmt="simple",
                        disable_numparse=True))


@data.command("prepare")
@click.argument("name")
@root_option
@click.option("--download", is_flag=True, help="Download the standard files (checked against their checksums).")
@click.option("--source", type=click.Path(file_okay=False, path_type=Path),
              help="Folder holding the standard files (default: ROOT/downloads).")
@click.option("--workers", type=click.IntRange(min=1), default=8, show_default=True, help="Image decoding threads.")
def data_prepare(name, root, download, source, workers):
    """Write NAME's reference test set, training store and metadata under the root."""
    from ddchallenge.data.prepare import prepare

    r = prepare(name, root, download=download, source_dir=source, workers=workers)
    if r.already:
        click.echo(f"{r.dataset} is already prepared in {r.root}; nothing to do")
    else:
        kept = " (kept the existing reference test file)" if r.kept_reference else ""
        click.echo(f"prepared {r.dataset} in {r.root}: {r.train} training and {r.test} test images{kept}")


def main() -> None:
    cli(prog_name="ddchallenge")
