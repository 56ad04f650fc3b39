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
@click.argument("submission", type=click.Path(path_type=Path))
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
def score(submission, dataset, ref_dir, rounds, epochs, seed, device, json_path, output, quiet):
    """Score SUBMISSION with the official evaluation recipe.

    SUBMISSION is an official <dataset>.pt file, a labelled .h5 set, a res/
    folder or a submission .zip. Overriding --epochs or --rounds is allowed,
    but the result then says it is not the official budget.
    """
    from ddchallenge.protocol import OFFICIAL
    from ddchallenge.report import score_table
    from ddchallenge.score import score as run_score

    recipe = OFFICIAL.with_overrides(epochs=epochs, rounds=rounds)
    result = run_score(submission, dataset=dataset, ref_dir=ref_dir, recipe=recipe, seed=seed,
                       device=device, progress=not quiet)
    if output is not None:
        result.write(output)
    if json_path is not None and str(json_path) != "-":
        from ddchallenge.fileio import atomic_write_bytes

        atomic_write_bytes(json_path, result.to_json().encode())
    click.echo(result.to_json() if str(json_path) == "-" else score_table(result))


def main() -> None:
    cli(prog_name="ddchallenge")
