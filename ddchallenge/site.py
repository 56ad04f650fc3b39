"""The leaderboard as a static site an organiser can publish as it is:

    SITE/index.html                       the ranking: official budget first, others apart
    SITE/uploads/<name>-<hash>.html       one page per row: rounds, recipe, sandbox, provenance
    SITE/uploads/<name>-<hash>-<dataset>.png   its sample grid, when the upload can still be read

Plain HTML with an inline stylesheet: no script, no server, nothing fetched
from elsewhere (a Content-Security-Policy says so to the browser too).
Everything shown from a record is untrusted (names, methods and provenance
are upload bytes; records can be edited): it comes through
`report.load_leaderboard`, which checks and ranks records, and every text is
HTML-escaped here. File names are derived from names but never spell a
path: a safe readable part plus a hash of the row's identity, so they are
stable from one build to the next and distinct for distinct rows.

A sample grid is made from the upload the record names (its `submission`
path, relative to the folder the command runs in), read in the sandbox as
`score` reads it, and only when each dataset's bytes are the ones scored
(same sha256). Otherwise the page says why there is none.
"""
from __future__ import annotations

import base64
import hashlib
import html
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ddchallenge import __version__
from ddchallenge.errors import DDChallengeError
from ddchallenge.extras import measure_label
from ddchallenge.fileio import OutputMarker, check_output_folder, replace_folder
from ddchallenge.isolation import clean
from ddchallenge.progress import plural
from ddchallenge.protocol import UploadRules
from ddchallenge.report import (NOT_OFFICIAL, Entry, Leaderboard, _extra_cell, footer, image_grid, shown_columns,
                                track_label)
from ddchallenge.submission import bounded_provenance

GRID_CLASSES, GRID_PER_CLASS = 10, 10  # rows (first classes) and images per row of a sample grid
GENERATOR_META = '<meta name="generator" content="ddchallenge leaderboard">'
SITE_MARKER = OutputMarker("index.html", GENERATOR_META.encode())  # what every site holds: a folder --force may replace
MAX_SHOWN = 300  # characters of any one untrusted text shown on a page

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:75em;
padding:0 1em;color:#1d1d1f;background:#fff}
h1{font-size:1.6em;margin:0 0 .2em}h2{font-size:1.2em;margin:1.6em 0 .4em}h3{font-size:1.05em;margin:1.2em 0 .3em}
p.note{color:#555;margin:.2em 0 1em}
table{border-collapse:collapse;margin:.4em 0 1em}
th,td{padding:.3em .7em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
th{background:#f4f4f6;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.score{font-weight:700}
code{font-size:.9em;word-break:break-all}
section.unofficial{border-left:4px solid #c05621;padding-left:1em}
section.unofficial h2{color:#c05621}
p.counts{color:#333;border-top:1px solid #ddd;padding-top:.6em}
img.grid{image-rendering:pixelated;border:1px solid #ccc;max-width:100%}
a{color:#0b5cad}
""".strip()
# The one inline stylesheet is allowed by its hash; nothing else runs or loads but images beside the page.
CSP = (f"default-src 'none'; img-src 'self'; style-src 'sha256-{base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()}'; "
       "base-uri 'none'; form-action 'none'")


@dataclass(frozen=True)
class Row:
    """One ranked entry and where its page lies."""

    entry: Entry
    section: str  # "official" or "unofficial"
    page: str  # file name under uploads/


@dataclass(frozen=True)
class Site:
    """What `write_site` wrote."""

    folder: Path
    pages: int  # upload pages
    grids: int  # sample grid images
    board: Leaderboard
    # Why a page has no grid, one line per upload and dataset, for the organiser's log only: the published page
    # says no more than UNPUBLISHED_GRID, because a planted record's path would otherwise turn the site into a
    # listing of, and a file-existence oracle for, the organiser's machine.
    missing_grids: tuple[str, ...] = ()


def _e(text, limit: int | None = MAX_SHOWN) -> str:
    """Untrusted text for HTML: control characters shown escaped, length bounded, markup escaped."""
    return html.escape(clean(str(text), limit), quote=True)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def safe_stem(entry: Entry) -> str:
    """A file name stem for a row: letters, digits, `_` and `-` from its name
    (so no path, no dot file, no reserved character), plus a hash of the
    row's identity (exact name, per-dataset bytes, recipe, seed): stable
    across builds, distinct for distinct rows even when names look alike."""
    r = entry.record
    ident = "\0".join([r["name"], entry.recipe_hash, str(r["seed"]),
                       *sorted(f"{d['dataset']}:{d['sha256']}" for d in r["datasets"])])
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", r["name"]).strip("_-")[:48] or "upload"
    return f"{readable}-{hashlib.sha256(ident.encode(errors='surrogateescape')).hexdigest()[:12]}"


def rows(board: Leaderboard) -> list[Row]:
    """Every entry with its page name; should two rows still share a stem,
    the later one in ranking order gets -2, -3, ... (deterministic)."""
    out, taken = [], set()
    for section, entries in (("official", board.official), ("unofficial", board.unofficial)):
        for entry in entries:
            stem, n = safe_stem(entry), 1
            while stem.lower() in taken:  # lower: a case-insensitive file system must keep them apart too
                n += 1
                stem = f"{safe_stem(entry)}-{n}"
            taken.add(stem.lower())
            out.append(Row(entry, section, f"{stem}.html"))
    return out


# ---------------------------------------------------------------- sample grids

UNPUBLISHED_GRID = ("the upload the record names is not where it says with the bytes scored (the leaderboard's log "
                    "says why)")
TRACK2_GRID = "a Track 2 generator's images are made while it is scored and not kept"


def sample_grids(record: dict, sandbox: bool = True) -> dict[str, bytes | str]:
    """For each dataset of `record`: its sample grid (PNG bytes), or why
    there is none (one line, for the organiser: it may name their files).
    Made from the upload at the record's `submission` path, read under rules
    that match the record, and only from bytes whose sha256 is the one the
    record scored. A Track 2 record's upload (a generator) is not looked for."""
    from ddchallenge.upload import read_upload

    datasets = {d["dataset"]: d for d in record["datasets"]}
    where = record["submission"]

    def every(reason: str) -> dict[str, str]:
        return {name: reason for name in datasets}

    if (record.get("rules") or {}).get("track") == 2:
        return every(TRACK2_GRID)
    path = Path(where) if where and "\0" not in where else None
    if path is None or not os.path.lexists(path):
        return every(f"the upload is not at {where!r} any more (a grid is made from the upload the record names, "
                     "relative to the folder the leaderboard is built in)")
    ipcs = {d["ipc"] for d in datasets.values()}
    try:
        rules = UploadRules(tuple(datasets), ipcs.pop() if len(ipcs) == 1 else None)
        entries = read_upload(path, rules, sandbox)
    except DDChallengeError as exc:
        return every(f"the upload at {where!r} cannot be read as it was scored: {exc}")
    except Exception as exc:  # noqa: BLE001  a page is still written; the reason says what went wrong
        return every(f"the upload at {where!r} cannot be read: {type(exc).__name__}")
    out: dict[str, bytes | str] = every(f"the upload at {where!r} holds no such dataset now")
    for entry in entries:
        scored = datasets.get(entry.spec.name)
        if scored is None:
            continue
        if entry.sha256 != scored["sha256"]:
            out[entry.spec.name] = (f"the upload at {where!r} has changed since it was scored (sha256 "
                                    f"{entry.sha256[:12]}..., scored {scored['sha256'][:12]}...)")
            continue
        out[entry.spec.name] = image_grid(entry, GRID_CLASSES, GRID_PER_CLASS)
    return out


# ---------------------------------------------------------------- pages

def _page(title: str, body: str) -> str:
    return ("<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            "<meta name=\"referrer\" content=\"no-referrer\">\n" + GENERATOR_META + "\n"
            f"<title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _table(headers: list[tuple[str, str]], body_rows: list[list[tuple[str, str]]]) -> str:
    """headers and cells as (class, already-escaped html)."""
    head = "".join(f"<th{f' class={chr(34)}{c}{chr(34)}' if c else ''} scope=\"col\">{h}</th>" for c, h in headers)
    lines = ["<table>", f"<thead><tr>{head}</tr></thead>", "<tbody>"]
    for cells in body_rows:
        lines.append("<tr>" + "".join(f"<td{f' class={chr(34)}{c}{chr(34)}' if c else ''}>{v}</td>"
                                      for c, v in cells) + "</tr>")
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines)


def _ranking(rs: list[Row], datasets: list[str], columns: list[str] = ()) -> str:
    """The ranking table; `columns`: extra-measure columns after the rest (report.extra_columns)."""
    headers = [("num", "Rank"), ("", "Submission"), ("num", "Score %"),
               *[("num", f"{_e(n)} %") for n in datasets], ("", "Method"), ("num", "IPC"), ("", "Recipe"),
               *[("num", _e(c)) for c in columns]]
    body = []
    for row in rs:
        e = row.entry
        cells = [_pct(e.datasets[n].mean) + " ± " + _pct(e.datasets[n].std) if n in e.datasets else "-"
                 for n in datasets]
        ipc = "/".join(str(e.datasets[n].ipc) if n in e.datasets else "-" for n in datasets)
        body.append([("num rank", str(e.rank)), ("name", f"<a href=\"uploads/{row.page}\">{_e(e.name)}</a>"),
                     ("num score", _pct(e.score)), *[("num", c) for c in cells],
                     ("method", _e(e.method or "?")), ("num", ipc), ("", f"<code>{_e(e.recipe_hash[:12])}</code>"),
                     *[("num", _e(_extra_cell(c, e.extras))) for c in columns]])
    return _table(headers, body)


def index_html(board: Leaderboard, site_rows: list[Row], extras: bool = False) -> str:
    """`extras`: the extra measures' columns after the challenge score's (`leaderboard --extras`)."""
    columns = shown_columns(board.extras) if extras else []
    official = [r for r in site_rows if r.section == "official"]
    unofficial = [r for r in site_rows if r.section == "unofficial"]
    names = ", ".join(_e(n) for n in board.datasets)
    named = board.track is not None and (board.track[0] == 2 or board.other_track)  # as the footer names it
    parts = [
        f"<h1>Leaderboard{': ' + _e(track_label(board.track)) if named else ''}</h1>",
        f"<p class=\"note\">Score: the mean over the datasets ({names}) of each dataset's mean test accuracy over "
        "its training rounds, ± the standard deviation over rounds; a dataset an upload lacks counts 0. Equal "
        "scores share a rank. Each submission links to its rounds, recipe, sandbox and provenance.</p>",
        "<section id=\"official\" class=\"official\">",
        "<h2>Official budget</h2>",
        _ranking(official, board.datasets, columns) if official else "<p>No upload scored with the official budget.</p>",
        "</section>",
    ]
    if unofficial:
        parts += [
            "<section id=\"unofficial\" class=\"unofficial\">",
            f"<h2>{NOT_OFFICIAL.capitalize()}</h2>",
            "<p class=\"note\">Scored with other epochs or rounds than the official recipe: ranked apart, each "
            "recipe and set of datasets (and Track 1 IPCs) on its own (ranks start again at each), not comparable "
            "with the ranking above.</p>",
            _ranking(unofficial, board.datasets, columns),
            "</section>",
        ]
    parts.append(f"<p class=\"counts\" id=\"counts\">{_e(footer(board), None)}</p>")
    parts.append(f"<p class=\"note\">Made by ddchallenge {_e(__version__)}.</p>")
    return _page("Leaderboard", "\n".join(parts))


def upload_html(row: Row, grids: dict[str, str | None], why: dict[str, str]) -> str:
    """One row's page; `grids`: dataset -> image file name beside the page,
    `why`: dataset -> why there is no grid."""
    e, r = row.entry, row.entry.record
    section = "official budget" if row.section == "official" else NOT_OFFICIAL.lower()
    recipe = r["recipe"]
    facts = [
        ("Rank", f"{e.rank} ({_e(section)})"),
        ("Score", f"{_pct(e.score)} %"),
        ("Method", _e(e.method or "? (not recorded)")),
        ("Recipe hash", f"<code>{_e(e.recipe_hash)}</code>"),
        ("Recipe", _e(f"{plural(recipe['epochs'], 'epoch')}, {plural(recipe['rounds'], 'round')}")),
        ("Seed", _e(r["seed"])),
        ("Sandbox", _e(r["sandbox"])),
        ("Device", _e(r["device"])),
        ("Scored in", f"{r['seconds']:.1f} s"),
        ("Upload sha256", f"<code>{_e(r.get('upload_sha256') or r.get('submission_sha256') or '-')}</code>"),
        ("ddchallenge", _e(r["versions"].get("ddchallenge", "?"))),
    ]
    parts = [
        "<p><a href=\"../index.html\">← Leaderboard</a></p>",
        f"<h1>{_e(e.name)}</h1>",
        _table([("", "What"), ("", "Value")], [[("", k), ("", v)] for k, v in facts]),
    ]
    for d in r["datasets"]:
        name = d["dataset"]
        cell = e.datasets[name]
        parts.append(f"<section class=\"dataset\" id=\"{_e(name)}\">")
        parts.append(f"<h2>{_e(name)}: {_pct(cell.mean)} ± {_pct(cell.std)} %</h2>")
        parts.append(f"<p>IPC {cell.ipc}, {_e(d['images'])} images ({_e(d['kind'])} format), sha256 "
                     f"<code>{_e(d['sha256'])}</code></p>")
        parts.append("<h3>Rounds</h3>")
        parts.append(_table([("num", "Round"), ("num", "Seed"), ("num", "Test accuracy %")],
                            [[("num", str(i + 1)), ("num", _e(seed)), ("num", _pct(acc))]
                             for i, (seed, acc) in enumerate(zip(d["seeds"], cell.accuracies))]))
        extras = [x for x in r.get("extras") or [] if x["dataset"] == name]
        if extras:  # each its own recipe, never part of the score above (docs/evaluator.md)
            parts.append("<h3>Extra measures</h3>")
            parts.append(_table([("", "Measure"), ("", "Recipe hash"), ("num", "Accuracy % (rounds)"),
                                 ("num", "Mean ± std %"), ("num", "IOR %"), ("num", "HLR %")],
                                [[("", _e(measure_label(x["measure"], x["recipe"]))),
                                  ("", f"<code>{_e(x['recipe_hash'])}</code>"),
                                  ("num", " ".join(_pct(a) for a in x["accuracies"])),
                                  ("num", f"{_pct(x['mean'])} ± {_pct(x['std'])}"),
                                  ("num", "-" if x.get("ior") is None else f"{100 * x['ior']:+.2f}" + (
                                      "" if x.get("ior_se_paired") is None else f" ± {_pct(x['ior_se_paired'])}")),
                                  ("num", "-" if x.get("hlr") is None else f"{100 * x['hlr']:+.2f}")]
                                 for x in extras]))
        parts.append("<h3>Sample grid</h3>")
        if grids.get(name):
            parts.append(f"<p><img class=\"grid\" src=\"{html.escape(grids[name])}\" alt=\"{_e(name)} sample grid: "
                         f"first {GRID_CLASSES} classes, up to {GRID_PER_CLASS} images each, one row per class\"></p>")
        else:
            parts.append(f"<p class=\"nogrid\">No sample grid: {_e(why.get(name, 'not made'), 600)}.</p>")
        parts.append("<h3>Provenance</h3>")
        provenance = bounded_provenance(d.get("provenance"))
        if provenance:
            parts.append(_table([("", "Key"), ("", "Value")],
                                [[("", _e(k)), ("", f"<code>{_e(v, 2048)}</code>")] for k, v in provenance.items()]))
        else:
            parts.append("<p>None recorded: the upload carries no manifest or attributes for this file.</p>")
        parts.append("</section>")
    if r["warnings"]:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{_e(w)}</li>" for w in r["warnings"][:20]) + "</ul>")
    return _page(f"{_e(e.name)} · Leaderboard", "\n".join(parts))


def write_site(board: Leaderboard, folder: str | os.PathLike, force: bool = False, sandbox: bool = True,
               extras: bool = False) -> Site:
    """Write the site into `folder` (built beside it, renamed into place at
    the end: an interrupted build leaves the old folder or none). A folder
    that exists is replaced only with `force`."""
    folder = Path(folder)
    check_output_folder(folder, SITE_MARKER, force)
    site_rows = rows(board)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    grids_written, missing = 0, []
    try:
        staging.chmod(0o755)
        (staging / "uploads").mkdir()
        for row in site_rows:
            made = sample_grids(row.entry.record, sandbox)
            files, why = {}, {}
            for dataset, grid in made.items():
                if isinstance(grid, bytes):
                    files[dataset] = f"{row.page[:-5]}-{dataset}.png"
                    (staging / "uploads" / files[dataset]).write_bytes(grid)
                    grids_written += 1
                elif grid == TRACK2_GRID:
                    why[dataset] = grid
                else:
                    why[dataset] = UNPUBLISHED_GRID
                    missing.append(f"{row.entry.name}: {dataset}: no sample grid: {grid}")
            (staging / "uploads" / row.page).write_text(upload_html(row, files, why), encoding="utf-8")
        (staging / "index.html").write_text(index_html(board, site_rows, extras), encoding="utf-8")
        replace_folder(staging, folder, SITE_MARKER)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Site(folder, len(site_rows), grids_written, board, tuple(missing))
