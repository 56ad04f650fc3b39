"""The challenge scoring program for Codabench / Codalab, built on ddchallenge.

    python evaluate.py INPUT OUTPUT [--epochs N] [--rounds N] [--device D]

INPUT/res/ holds the participant's files (<dataset>.pt), INPUT/ref/ the
reference test sets (<dataset>_test.pt). Every dataset with a reference set
must be in res/, and nothing else: this program scores Track 1 only, and a
res/ that is or holds a generator (a model folder, weights, a diffusers
config) is refused. Writes OUTPUT/scores.txt (`correct: <score>`),
OUTPUT/result.json and OUTPUT/detailed_results.html. With no options the
recipe is the official one; the options exist for local smoke runs.

Any invalid submission ends with a one-line reason on stderr and exit code 1,
which the platform shows to the participant. A failure of the scoring
machine itself (no way to sandbox the submission, out of disk or memory)
ends with exit code 2 and a line that says it is not the submission's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddchallenge.errors import DDChallengeError, EnvironmentFailure, SubmissionError, UsageError
from ddchallenge.fileio import atomic_write_bytes
from ddchallenge.isolation import SandboxUnavailable
from ddchallenge.protocol import OFFICIAL, UploadRules
from ddchallenge.report import score_html, score_table
from ddchallenge.score import score
from ddchallenge.upload import upload_kind


def run(input_dir: Path, output_dir: Path, epochs: int | None, rounds: int | None, device: str) -> float:
    res, ref = input_dir / "res", input_dir / "ref"
    if output_dir.exists() and not output_dir.is_dir():  # found before the training, not after it
        raise UsageError(f"{output_dir} is not a folder; OUTPUT is the folder scores.txt is written into")
    if not ref.is_dir() or not res.is_dir():
        raise SubmissionError(f"{input_dir} must hold res/ (the submission) and ref/ (reference test sets)")
    wanted = sorted(p.name[: -len("_test.pt")] for p in ref.glob("*_test.pt"))
    if not wanted:
        raise SubmissionError(f"{ref} holds no <dataset>_test.pt reference set")
    # Codabench scores Track 1 only: res/ holds images, and a generator anywhere in it is refused.
    upload_kind(res, track2=False)
    present = sorted(p.stem for p in res.glob("*.pt"))
    missing = [d for d in wanted if d not in present]
    if missing:
        raise SubmissionError(f"the submission is missing {', '.join(f'{d}.pt' for d in missing)}; "
                              f"upload a zip holding {', '.join(f'{d}.pt' for d in wanted)}")
    recipe = OFFICIAL.with_overrides(epochs=epochs, rounds=rounds)
    # The reference sets the organiser installed say which datasets are scored.
    result = score(res, UploadRules(tuple(wanted)), ref_dir=ref, recipe=recipe, device=device, progress=False)
    result.write(output_dir)
    atomic_write_bytes(output_dir / "detailed_results.html", score_html(result).encode())
    print(score_table(result))
    return result.score


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="ECCV 2024 Dataset Distillation Challenge scoring program")
    ap.add_argument("input", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--epochs", type=int, help="non-official: fewer epochs, for smoke runs")
    ap.add_argument("--rounds", type=int, help="non-official: other number of rounds")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    try:
        run(args.input, args.output, args.epochs, args.rounds, args.device)
    except SandboxUnavailable:  # its message offers --no-sandbox, which a scoring program never has
        print("error: the scoring machine cannot sandbox submissions (`unshare --net` is missing or not permitted); "
              "this is the host's failure, not the submission's", file=sys.stderr)
        return 2
    except EnvironmentFailure as exc:
        print(f"error: the scoring machine failed, not the submission: {exc}", file=sys.stderr)
        return 2
    except DDChallengeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file it could not read or write, found only when it tried
        print(f"error: could not read or write {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
