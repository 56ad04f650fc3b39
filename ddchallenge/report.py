"""Human-readable views of score results: the leaderboard-style table."""
from __future__ import annotations

import csv
import html
import io
import re

import torch
from tabulate import tabulate

from ddchallenge.data import denormalise
from ddchallenge.errors import UsageError
from ddchallenge.isolation import clean
from ddchallenge.score import ScoreResult
from ddchallenge.submission import DatasetEntry

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
    lines = [tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)]
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
                     tablefmt="html", disable_numparse=True)
    budget = "official budget" if result.official_budget else f"{NOT_OFFICIAL} (recipe {result.recipe_hash})"
    return (f"<html><body><h2>Score: {_pct(result.score)} %</h2><p>{budget}; device {result.device}; "
            f"ddchallenge {result.versions['ddchallenge']}</p>{table}</body></html>\n")


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def image_grid(entry: DatasetEntry, max_classes: int = 20, max_per_class: int = 10, fmt: str = "PNG") -> bytes:
    """An image grid (PNG or JPEG): one row per class (the first `max_classes`), up to
    `max_per_class` de-normalised images in each, blank where a class has fewer."""
    from PIL import Image
    from torchvision.utils import make_grid

    spec = entry.spec
    classes = min(spec.classes, max_classes)
    cols = min(entry.ipc, max_per_class)
    tiles = torch.zeros(classes * cols, spec.channels, spec.size, spec.size)
    for k in range(classes):
        members = torch.nonzero(entry.labels == k).flatten()[:cols]
        tiles[k * cols: k * cols + len(members)] = denormalise(entry.images[members], spec)
    if spec.size <= 32:  # small digits are hard to see at 1:1
        tiles = torch.nn.functional.interpolate(tiles, scale_factor=2, mode="nearest")
    grid = make_grid(tiles, nrow=cols, padding=2, pad_value=1.0)
    pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if spec.channels == 1 else pixels).save(buf, format=fmt)
    return buf.getvalue()


LEADERBOARD_FORMATS = ("table", "md", "csv", "html")


def leaderboard(results: list[dict], fmt: str = "table") -> str:
    """Rank score results (the JSON `score` writes) by challenge score.

    Columns are the union of the results' datasets; a result missing one shows
    '-' there and that dataset counts 0 in its score, as a missing file does in
    the challenge. Equal scores share a rank. Results made with a non-official
    budget are marked, since they do not compare with official ones."""
    if fmt not in LEADERBOARD_FORMATS:
        raise UsageError(f"unknown format {fmt!r}; formats: {', '.join(LEADERBOARD_FORMATS)}")
    datasets = sorted({d["dataset"] for r in results for d in r["datasets"]})
    scored = []
    for r in results:
        by_name = {d["dataset"]: d for d in r["datasets"]}
        total = sum(by_name[n]["mean"] if n in by_name else 0.0 for n in datasets) / len(datasets)
        scored.append((total, r, by_name))
    scored.sort(key=lambda t: -t[0])
    rows, rank = [], 0
    for i, (total, r, by_name) in enumerate(scored):
        if i == 0 or total != scored[i - 1][0]:
            rank = i + 1
        cells = [f"{_pct(by_name[n]['mean'])} ± {_pct(by_name[n]['std'])}" if n in by_name else "-" for n in datasets]
        ipcs = "/".join(str(by_name[n]["ipc"]) if n in by_name else "-" for n in datasets)
        # Name and method come from the upload: escaped for the format they are shown in.
        shown = [_escape(str(r.get("name") or r["submission"]), fmt), _escape(str(r.get("method") or "?"), fmt)]
        rows.append([rank, *shown, ipcs, *cells, _pct(total), "yes" if r["official_budget"] else "NO"])
    headers = ["rank", "submission", "method", "IPC", *[f"{n} %" for n in datasets], "score %", "official budget"]
    if fmt == "csv":
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([headers, *rows])
        return out.getvalue()
    return tabulate(rows, headers=headers, tablefmt={"table": "simple", "md": "github", "html": "html"}[fmt],
                    disable_numparse=True)


_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+!|~])")


def _escape(text: str, fmt: str) -> str:
    """Untrusted text for one cell: control characters escaped everywhere;
    markdown syntax and raw HTML neutralised in md (tabulate escapes html);
    a CSV cell never starts a spreadsheet formula."""
    text = clean(text)
    if fmt == "md":
        text = html.escape(_MARKDOWN.sub(r"\\\1", text), quote=False)
    elif fmt == "csv" and text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        text = "'" + text
    return text


def batch_table(outcomes) -> str:
    """The summary of a batch, one row per upload, names and reasons escaped."""
    rows = [[clean(o.name), o.status, "-" if o.score is None else _pct(o.score), o.reason or ""] for o in outcomes]
    return tabulate(rows, headers=["upload", "status", "score %", "reason"], tablefmt="simple", disable_numparse=True)
