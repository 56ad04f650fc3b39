"""Human-readable views of score results: the leaderboard-style table."""
from __future__ import annotations

from tabulate import tabulate

from ddchallenge.score import ScoreResult

NOT_OFFICIAL = "NOT THE OFFICIAL BUDGET"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def score_table(result: ScoreResult) -> str:
    official = "yes" if result.official_budget else f"NO ({result.recipe['epochs']} epochs, {result.recipe['rounds']} rounds)"
    rows = [
        [d.dataset, d.ipc, d.images, len(d.accuracies), f"{_pct(d.mean)} ± {_pct(d.std)}",
         " ".join(_pct(a) for a in d.accuracies), official, f"{d.seconds:.1f}", result.device]
        for d in result.datasets
    ]
    headers = ["dataset", "IPC", "images", "rounds", "accuracy %", "per round %", "official budget", "seconds", "device"]
    lines = [tabulate(rows, headers=headers, tablefmt="github")]
    if len(result.datasets) > 1:
        lines.append(f"challenge score (mean over datasets): {_pct(result.score)} %")
    if not result.official_budget:
        lines.append(f"*** {NOT_OFFICIAL}: recipe {result.recipe_hash}; these numbers are not leaderboard numbers ***")
    return "\n".join(lines)


def score_html(result: ScoreResult) -> str:
    """The detailed results page Codabench/Codalab show beside the score."""
    rows = [[d.dataset, d.ipc, d.images, f"{_pct(d.mean)} ± {_pct(d.std)}", " ".join(_pct(a) for a in d.accuracies),
             ", ".join(map(str, d.seeds)), f"{d.seconds:.1f}"] for d in result.datasets]
    table = tabulate(rows, headers=["dataset", "IPC", "images", "accuracy %", "per round %", "seeds", "seconds"],
                     tablefmt="html")
    budget = "official budget" if result.official_budget else f"{NOT_OFFICIAL} (recipe {result.recipe_hash})"
    return (f"<html><body><h2>Score: {_pct(result.score)} %</h2><p>{budget}; device {result.device}; "
            f"ddchallenge {result.versions['ddchallenge']}</p>{table}</body></html>\n")
