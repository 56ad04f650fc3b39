"""The challenge scoring program for Codabench / Codalab, built on ddchallenge.

    python evaluate.py INPUT OUTPUT [--container-network] [--epochs N] [--rounds N] [--device D]

INPUT/res/ holds the participant's files (<dataset>.pt), INPUT/ref/ the
reference test sets (<dataset>_test.pt). Every dataset with a reference set
must be in res/, and nothing else: this program scores Track 1 only, and a
res/ that is or holds a generator (a model folder, weights, a diffusers
config) is refused. Writes OUTPUT/scores.txt (`correct: <score>`),
OUTPUT/result.json and OUTPUT/detailed_results.html. With no options the
recipe is the official one; --epochs and --rounds exist for local smoke runs.

The upload is read in a sandboxed child process without network. Codabench's
default workers start the scoring container without the capability a network
namespace needs; there `--container-network` (which the shipped `metadata`
passes) lets the child share the container's network, with the other limits
the container allows (as `nobody` where it may switch user), and
result.json's `sandbox` says which. Without it such a machine scores nothing.

Codabench marks a submission Failed when no scores.txt is written, and shows
the program's stderr to the team in the submission's scoring logs. An invalid
submission ends with one line there, saying what was found and what to
upload, exit code 1, and nothing in OUTPUT. A failure of the scoring machine
or of the competition's own data (no way to sandbox, a wrong ref/, out of disk
or memory) ends with exit code 2 and a line that says it is not the
submission's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddchallenge import isolation
from ddchallenge.errors import DDChallengeError, EnvironmentFailure, SubmissionError, UploadRuleError, UsageError
from ddchallenge.fileio import atomic_write_bytes
from ddchallenge.isolation import SandboxUnavailable, clean
from ddchallenge.protocol import DATASETS, OFFICIAL, UploadRules
from ddchallenge.report import score_html, score_table
from ddchallenge.score import score
from ddchallenge.submission import visible_files
from ddchallenge.upload import generator_inside

SHOWN = 8  # names of what res/ holds, in a refusal


def reference_sets(ref: Path) -> list[str]:
    """The datasets the competition scores: one per <dataset>_test.pt in ref/.
    Anything wrong here is the organiser's, not the team's."""
    if not ref.is_dir():
        raise EnvironmentFailure(f"{ref} is missing: the competition's reference data must hold <dataset>_test.pt files")
    names = sorted(p.name[: -len("_test.pt")] for p in ref.glob("*_test.pt"))
    if not names:
        raise EnvironmentFailure(f"{ref} holds no <dataset>_test.pt reference set; fix the competition's reference data")
    for name in names:
        spec = DATASETS.get(name)
        if spec is None or spec.name != name or spec.validation_of is not None:
            raise EnvironmentFailure(f"{ref} holds {clean(name, 80)}_test.pt, which names no dataset this program "
                                     f"scores ({', '.join(n for n, s in DATASETS.items() if s.validation_of is None)})"
                                     "; fix the competition's reference data")
    return names


def check_res(res: Path, wanted: list[str]) -> None:
    """Refuse, in the team's terms, a res/ that holds a generator or lacks a
    dataset file, naming what it does hold."""
    upload = " and ".join(f"{d}.pt" for d in wanted)
    found = generator_inside(res)  # also bounds what res/ holds before it is listed
    if found:
        raise UploadRuleError(f"the submission holds a generator or model ({clean(found, 200)}); this competition "
                              f"scores images: upload {upload}, the images your method made")
    held = visible_files(res)
    missing = [d for d in wanted if not (res / f"{d}.pt").is_file()]
    if missing:
        shown = ", ".join(clean(p.name, 80) + ("/" if p.is_dir() else "") for p in held[:SHOWN])
        shown = (shown + (", ..." if len(held) > SHOWN else "")) if held else "nothing"
        folder = " (zip the files themselves, not the folder that holds them)" if any(p.is_dir() for p in held) else ""
        raise SubmissionError(f"the submission is missing {', '.join(f'{d}.pt' for d in missing)}; it holds {shown}"
                              f"{folder}; upload a zip holding {upload} at its top level")


def run(input_dir: Path, output_dir: Path, epochs: int | None, rounds: int | None, device: str) -> float:
    res, ref = input_dir / "res", input_dir / "ref"
    if output_dir.exists() and not output_dir.is_dir():  # found before the training, not after it
        raise UsageError(f"{output_dir} is not a folder; OUTPUT is the folder scores.txt is written into")
    wanted = reference_sets(ref)
    if not res.is_dir():
        raise EnvironmentFailure(f"{res} is missing: the platform puts the submission there")
    check_res(res, wanted)
    recipe = OFFICIAL.with_overrides(epochs=epochs, rounds=rounds)
    # The reference sets the organiser installed say which datasets are scored; the team can pass no option.
    result = score(res, UploadRules(tuple(wanted), option_hints=False), ref_dir=ref, recipe=recipe, device=device,
                   progress=False)
    result.write(output_dir)
    atomic_write_bytes(output_dir / "detailed_results.html", score_html(result).encode())
    print(score_table(result))
    return result.score


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="ECCV 2024 Dataset Distillation Challenge scoring program")
    ap.add_argument("input", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--container-network", action="store_true",
                    help="where no network namespace can be made (Codabench's default workers), let the sandboxed "
                         "child share this container's network; result.json's sandbox says what held")
    ap.add_argument("--epochs", type=int, help="non-official: fewer epochs, for smoke runs")
    ap.add_argument("--rounds", type=int, help="non-official: other number of rounds")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    if args.container_network:
        isolation.share_network()
    try:
        run(args.input, args.output, args.epochs, args.rounds, args.device)
    except SandboxUnavailable:  # its message offers --no-sandbox, which a scoring program never has
        if args.container_network:  # even the last candidate failed: its probe imports ddchallenge from /
            print("error: the scoring machine cannot start the sandboxed child: `python -c 'import ddchallenge'` "
                  "fails from /; this is the host's failure, not the submission's; install ddchallenge in the "
                  "scoring image", file=sys.stderr)
            return 2
        print("error: the scoring machine cannot sandbox submissions (`unshare --net` is missing or not permitted); "
              "this is the host's failure, not the submission's; on a worker that cannot make a network namespace "
              "(Codabench's default), pass --container-network in the metadata's command", file=sys.stderr)
        return 2
    except EnvironmentFailure as exc:
        print(f"error: the scoring machine failed, not the submission: {exc}", file=sys.stderr)
        return 2
    except DDChallengeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the upload's reading failures are SubmissionErrors: this is the machine's disk
        print(f"error: the scoring machine failed, not the submission: could not read or write "
              f"{exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
