"""Human-readable views of score results: the leaderboard-style table."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import html
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tabulate import tabulate

from ddchallenge.data import denormalise
from ddchallenge.errors import RecordError, UsageError
from ddchallenge.isolation import clean
from ddchallenge.progress import plural
from ddchallenge.records import canonical, check_record, is_failed, read_record
from ddchallenge.score import ScoreResult
from ddchallenge.submission import DatasetEntry

NOT_OFFICIAL = "NOT THE OFFICIAL BUDGET"
TIE = 1e-9  # scores this close rank together


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def budget_cell(recipe: dict, official: bool) -> str:
    """"yes", or "NO (E epochs, R rounds)": which budget, wherever a non-official one is shown."""
    if official:
        return "yes"
    rounds, epochs = recipe["rounds"], recipe["epochs"]
    return f"NO ({plural(epochs, 'epoch')}, {plural(rounds, 'round')})"


def not_official_line(result: ScoreResult) -> str:
    """What a result of another recipe says wherever it is shown, as loudly."""
    return f"*** {NOT_OFFICIAL}: recipe {result.recipe_hash}; these numbers are not leaderboard numbers ***"


def score_table(result: ScoreResult) -> str:
    official = budget_cell(result.recipe, result.official_budget)
    rows = [
        [d.dataset, d.ipc, d.images, len(d.accuracies), f"{_pct(d.mean)} ± {_pct(d.std)}",
         " ".join(_pct(a) for a in d.accuracies), official, f"{d.seconds:.1f}", result.device]
        for d in result.datasets
    ]
    headers = ["dataset", "IPC", "images", "rounds", "accuracy % ± std", "per round %", "official budget", "seconds",
               "device"]
    lines = [tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)]
    if len(result.datasets) > 1:
        lines.append(f"challenge score (mean over datasets): {_pct(result.score)} %")
    if not result.official_budget:
        lines.append(not_official_line(result))
    if result.extras:
        lines += ["", extras_table(result)]
    return "\n".join(lines)


def _signed(x: float | None, se: float | None = None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.2f}" + ("" if se is None else f" ± {_pct(se)}")


def _ior_cell(e) -> str:
    """IOR ± the standard error of its paired rounds; a record made before
    that was recorded shows the independent-rounds one, marked so."""
    if e.ior_se_paired is not None or e.ior_se is None:
        return _signed(e.ior, e.ior_se_paired)
    return _signed(e.ior, e.ior_se) + " (unpaired)"


def extras_table(result: ScoreResult) -> str:
    """The extra measures (ddchallenge.extras) after the challenge score:
    one row each, then each dataset's mean over the architectures asked."""
    from ddchallenge.extras import measure_label

    rows = [[e.dataset, measure_label(e.measure, e.recipe), f"{_pct(e.mean)} ± {_pct(e.std)}",
             " ".join(_pct(a) for a in e.accuracies),
             _ior_cell(e), _signed(e.hlr), e.recipe_hash, f"{e.seconds:.1f}"] for e in result.extras]
    lines = ["extra measures (each its own recipe hash; never part of the challenge score):",
             tabulate(rows, headers=["dataset", "measure", "accuracy % ± std", "per round %", "IOR % ± s.e.", "HLR %",
                                     "recipe", "seconds"], tablefmt="github", disable_numparse=True)]
    if any(e.ior_se_paired is not None or e.ior_se is not None for e in result.extras):
        lines.append("IOR's s.e.: over the rounds as pairs (the set's and the baseline's round i share seed i)")
    from ddchallenge.extras import ARCH_PREFIX

    for name, mean in arch_means(result.extras).items():
        count = sum(e.dataset == name and e.measure.startswith(ARCH_PREFIX) for e in result.extras)
        if count > 1:  # the mean of one architecture is that architecture's row
            lines.append(f"{name}: mean over {count} architectures {_pct(mean)} %")
    return "\n".join(lines)


def arch_means(extras) -> dict[str, float]:
    """Per dataset, the mean accuracy over the architecture rows (rows as
    ExtraScore objects or record dicts); datasets without one are left out."""
    from ddchallenge.extras import ARCH_PREFIX

    by: dict[str, list[float]] = {}
    for e in extras:
        measure, dataset, mean = (e["measure"], e["dataset"], e["mean"]) if isinstance(e, dict) else \
            (e.measure, e.dataset, e.mean)
        if measure.startswith(ARCH_PREFIX):
            by.setdefault(dataset, []).append(float(mean))
    return {d: math.fsum(v) / len(v) for d, v in by.items()}


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


LEADERBOARD_FORMATS = ("table", "md", "csv", "html", "json")


@dataclass(frozen=True)
class DatasetCell:
    """One dataset's numbers in a leaderboard row (fractions in [0, 1])."""

    ipc: int
    mean: float
    std: float
    accuracies: tuple[float, ...]  # one per round


@dataclass(frozen=True)
class Entry:
    """One ranked record. Text fields marked display-safe hold only printable
    ASCII (anything else escaped as `\\u0430`, a backslash as `\\\\`), so that
    look-alike names can be told apart; `record` is the raw record, checked
    by `records.read_record` but still untrusted text: escape it for display."""

    rank: int  # 1-based within its section; equal scores share a rank
    name: str  # display-safe upload name
    score: float  # mean over its section's datasets of each dataset's mean (a dataset it lacks counts 0)
    datasets: dict[str, DatasetCell]  # the datasets it was scored on, by name
    method: str | None  # display-safe generating method from the upload's own provenance, None if unrecorded
    recipe_hash: str  # recomputed from the recorded recipe settings
    official: bool  # scored with the official budget (recomputed)
    path: str  # the record file it was read from
    record: dict  # the raw record
    # Summaries of its extra measures (`extra_columns`): column name -> fraction; shown only when asked
    extras: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Leaderboard:
    """Records ranked by `load_leaderboard`: score descending, ties by name."""

    official: list[Entry]
    unofficial: list[Entry]  # non-official budgets, ranked apart; empty unless include_unofficial
    refused: list[tuple[str, str]]  # (file, reason) of each record that is not a valid (signed) record
    failed: int  # valid failed-upload records (a batch's .failed.json)
    datasets: list[str]  # the board's dataset columns: the union over its entries, sorted
    duplicates: int = 0  # records given more than once (same name, upload, recipe and seed), listed once
    unofficial_left_out: int = 0  # unofficial records not shown (include_unofficial False)
    extras: list[str] = dataclasses.field(default_factory=list)  # extra-measure columns: the union over entries
    track: tuple[int, float | None] | None = None  # (track, Track 2 budget) of every ranked record (`record_track`)
    other_track: int = 0  # score records of the other track, left out (`track` asked)
    other_rules: int = 0  # score records on other datasets or at another IPC, left out (`datasets`, `ipc` asked)


def display_name(text: str, limit: int = 200) -> str:
    """Untrusted text as printable ASCII: non-ASCII and control characters
    escaped (`\\u0430lice` is not `alice`), a backslash doubled so that no
    name can spell another's escape; past `limit` characters cut, with a hash
    of the whole text, so that names differing only at the end stay apart."""
    shown = text.encode("unicode_escape", errors="backslashreplace").decode("ascii")
    if len(shown) <= limit:
        return shown
    return f"{shown[:limit]}...#{hashlib.sha256(text.encode(errors='surrogatepass')).hexdigest()[:16]}"


def record_files(paths: list[str | os.PathLike]) -> list[Path]:
    """The record files `paths` name: files as given, folders' `*.json` in
    name order. A folder the command line names is followed if it is a link
    (the organiser's own argument); a link inside it is not (its reader
    refuses it)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.name.endswith(".json"))
        else:
            files.append(path)
    return files


def record_track(record: dict) -> tuple[int, float | None] | None:
    """The track a checked record was scored under, with its Track 2 budget
    in seconds per dataset: `(1, None)` or `(2, 600.0)`. From the result's
    `rules`, else (older results, failed records) the batch's settings;
    None for a failed record of a `--mixed` batch, whose track is not
    recorded. Results of different tracks, or of Track 2 under different
    budgets, do not compare: a board ranks one of them."""
    rules = record.get("rules")
    if isinstance(rules, dict) and rules.get("track") in (1, 2):  # checked by records.read_record
        return (2, float(rules["budget_seconds"])) if rules["track"] == 2 else (1, None)
    settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    budget = settings.get("budget")  # checked by records.read_record: null or seconds
    if budget is None or not budget > 0:
        return 1, None
    return None if settings.get("mixed") is True and is_failed(record) else (2, float(budget))


def track_label(track: tuple[int, float | None]) -> str:
    return "Track 1" if track[0] == 1 else f"Track 2 ({track[1]:g} s per dataset)"


def load_leaderboard(paths: list[str | os.PathLike], include_unofficial: bool = False,
                     key: bytes | None = None, track: int | None = None, datasets: tuple[str, ...] | None = None,
                     ipc: int | None = None) -> Leaderboard:
    """Read score records (files, or folders of them) as untrusted input and
    rank them. Each record that is not valid (see `records.read_record`;
    with `key`, also one not signed under it) is refused with its reason,
    never ranked; failed-upload records are counted; a record given twice
    (same name, upload bytes, recipe, seed and extra measures) is listed
    once; non-official budgets are ranked apart, and only with
    `include_unofficial`. Results of both tracks are never ranked together:
    UsageError unless `track` (1 or 2) says which to rank; the other's are
    counted as left out (`record_track`). Nor are results that do not
    compare (`_comparable`): `datasets` and `ipc` pick the ones to rank."""
    refused, read = [], []
    for path in record_files(paths):
        try:
            read.append((str(path), read_record(path, key)))
        except RecordError as exc:
            refused.append((str(path), str(exc)))
    return _board(read, refused, include_unofficial, track, datasets, ipc)


def rank_records(records: list[dict], include_unofficial: bool = True) -> Leaderboard:
    """`load_leaderboard` for records already in memory (named `record 1`,
    `record 2`, ... in reasons); each is checked the same way."""
    refused, read = [], []
    for i, data in enumerate(records, start=1):
        where = f"record {i}"
        try:
            read.append((where, check_record(data, where)))
        except RecordError as exc:
            refused.append((where, str(exc)))
    return _board(read, refused, include_unofficial)


def _one_track(read: list[tuple[str, dict]], track: int | None) -> tuple[list[tuple[str, dict]], int,
                                                                          tuple[int, float | None] | None]:
    """The records of one track (`track`, or the only one there is), how many
    score records of the other were left out, and the track ranked.
    UsageError where the results span both tracks and `track` is None, or
    Track 2 results were run under different budgets."""
    scored = {record_track(r) for _, r in read if not is_failed(r)}
    if track is None and len({t[0] for t in scored}) > 1:
        raise UsageError(f"these records hold {' and '.join(sorted({track_label(t) for t in scored}))} results, which "
                         "are never ranked together: pass --track 1 or --track 2 (one board per track)")
    if track is not None:
        kept = [(p, r) for p, r in read if (record_track(r) or (track,))[0] == track]
        other = sum(not is_failed(r) for _, r in read) - sum(not is_failed(r) for _, r in kept)
        read, scored = kept, {t for t in scored if t[0] == track}
    else:
        other = 0
    if len(scored) > 1:
        budgets = sorted(t[1] for t in scored)
        shown = ", ".join(f"{b:g}" for b in budgets)
        raise UsageError(f"these records hold Track 2 results run under different budgets ({shown} s per dataset), "
                         "which are never ranked together: rank each budget's records apart (give each batch its own "
                         "--output)")
    return read, other, next(iter(scored), None)


def _comparable(read: list[tuple[str, dict]], track: tuple[int, float | None] | None,
                datasets: tuple[str, ...] | None, ipc: int | None) -> tuple[list[tuple[str, dict]], int]:
    """The records of one board whose official ranking compares, and how many score records
    `datasets` (the board's datasets: records on any other are left out) and
    `ipc` (records at another IPC are left out) left out. UsageError where
    the rest do not compare: a dataset at two IPCs in Track 1 (where the
    rules fix the IPC; a Track 2 generator makes as many as fit its budget),
    or datasets that no one record holds all of (a set of one dataset among
    uploads of two). A dataset a record lacks counts 0, so otherwise a
    single file of an easy dataset, or at IPC 100, in an organiser's batch
    would change every score of the board and rank above all of them."""
    def fits(r: dict) -> bool:
        held = {d["dataset"]: d["ipc"] for d in r["datasets"]}
        return (datasets is None or set(held) <= set(datasets)) and (ipc is None or set(held.values()) == {ipc})

    kept = [(p, r) for p, r in read if is_failed(r) or fits(r)]
    # The official ranking; the non-official budgets' section is not comparable by its nature, and says so.
    _check_comparable([r for _, r in kept if not is_failed(r) and r["official_budget"]], track, datasets)
    _check_same_tests([r for _, r in kept if not is_failed(r)])
    return kept, len(read) - len(kept)


def _check_same_tests(scored: list[dict]) -> None:
    """UsageError where records were scored on different test sets of one
    dataset (their `test_sha256`): accuracies on two test sets never rank
    against each other. A record older than the field says nothing, and is
    not held against the others."""
    tests: dict[str, set[str]] = {}
    for r in scored:
        for d in r["datasets"]:
            if d.get("test_sha256") is not None:
                tests.setdefault(d["dataset"], set()).add(d["test_sha256"])
    mixed = sorted(n for n, v in tests.items() if len(v) > 1)
    if mixed:
        shown = "; ".join(f"{n}: {len(tests[n])} ({', '.join(sorted(t[:12] for t in tests[n]))})" for n in mixed)
        raise UsageError(f"these records were scored on different test sets ({shown}: datasets[].test_sha256), which "
                         "are never ranked together: score them again against one test set (one --ref folder or "
                         "data root)")


def _check_comparable(scored: list[dict], track: tuple[int, float | None] | None,
                      datasets: tuple[str, ...] | None) -> None:
    if track is not None and track[0] == 1:
        ipcs: dict[str, set[int]] = {}
        for r in scored:
            for d in r["datasets"]:
                ipcs.setdefault(d["dataset"], set()).add(d["ipc"])
        mixed = {n: sorted(v) for n, v in sorted(ipcs.items()) if len(v) > 1}
        if mixed:
            shown = "; ".join(f"{n} at IPC {', '.join(map(str, v))}" for n, v in mixed.items())
            raise UsageError(f"these records hold Track 1 results at different IPC ({shown}), which are never ranked "
                             "together: pass --ipc N to rank those at IPC N")
    union = {d["dataset"] for r in scored for d in r["datasets"]}
    if datasets is None and scored and not any({d["dataset"] for d in r["datasets"]} >= union for r in scored):
        raise UsageError(f"these records were scored on datasets ({', '.join(sorted(union))}) that no one record holds "
                         "all of, which are never ranked together: pass --dataset NAME for each dataset of the board "
                         "(records on others are left out)")


def _board(read: list[tuple[str, dict]], refused: list[tuple[str, str]], include_unofficial: bool,
           track: int | None = None, datasets: tuple[str, ...] | None = None, ipc: int | None = None) -> Leaderboard:
    read, other_track, ranked_track = _one_track(read, track)
    read, other_rules = _comparable(read, ranked_track, datasets, ipc)
    failed, seen, kept, duplicates = 0, set(), [], 0
    # Of records given twice, the one kept is the first by content (then file name), never by argument order:
    # two copies may differ where the identity does not look (an HLR brought up to date, the device).
    for path, data in sorted(read, key=lambda pair: (canonical(pair[1]), pair[0])):
        if is_failed(data):
            failed += 1
            continue
        # Identity of a result: who, which bytes (per dataset, and the upload's: a soft-label companion is part of
        # it), under which recipe and seed, with which extra measures. Results that differ in any of these are
        # entries of their own. (Not the test sets: records on two are refused together, and a copy older than
        # `test_sha256` is the same result.)
        ident = (data["name"], tuple(sorted((d["dataset"], d["sha256"]) for d in data["datasets"])),
                 data.get("submission_sha256"), data["recipe_hash"], data["seed"],
                 tuple(sorted((e["measure"], e["dataset"], e["recipe_hash"]) for e in data.get("extras", []))))
        if ident in seen:
            duplicates += 1
            continue
        seen.add(ident)
        kept.append((path, data))
    official = _rank([(p, r) for p, r in kept if r["official_budget"]], datasets)
    unofficial = [(p, r) for p, r in kept if not r["official_budget"]]
    apart = _rank_by_recipe(unofficial, datasets) if include_unofficial else []
    columns = sorted(datasets) if datasets and (official or apart) else \
        sorted({n for e in official + apart for n in e.datasets})
    return Leaderboard(official, apart, refused, failed, columns,
                       duplicates, 0 if include_unofficial else len(unofficial),
                       _extra_order({c for e in official + apart for c in e.extras}), ranked_track, other_track,
                       other_rules)


def _method(record: dict) -> str | None:
    """The method the upload's own provenance records: the result's, else the
    one every dataset records."""
    if isinstance(record.get("method"), str):
        return record["method"]
    methods = {d.get("method") for d in record["datasets"]}
    method = methods.pop() if len(methods) == 1 else None
    return method if isinstance(method, str) else None


def _rank_by_recipe(kept: list[tuple[str, dict]], board: tuple[str, ...] | None = None) -> list[Entry]:
    """Non-official records, each recipe ranked on its own (1 epoch against
    300 compares nothing), and within it each set of datasets (a dataset a
    record lacks would count 0) and, in Track 1, of IPCs (IPC 1 against IPC
    50 compares nothing either; a Track 2 generator makes as many as fit
    its budget, and is ranked against the others as in the official
    section): the recipes by epochs, then rounds, most first, then by hash;
    ranks start at 1 in each group."""
    groups: dict[tuple, list[tuple[str, dict]]] = {}
    for path, r in kept:
        by_ipc = (record_track(r) or (1, None))[0] == 1
        held = tuple(sorted((d["dataset"], d["ipc"] if by_ipc else None) for d in r["datasets"]))
        groups.setdefault((r["recipe_hash"], held), []).append((path, r))

    def order(key: tuple):
        recipe = groups[key][0][1]["recipe"]
        return -recipe["epochs"], -recipe["rounds"], key
    return [e for key in sorted(groups, key=order) for e in _rank(groups[key], board)]


def _rank(kept: list[tuple[str, dict]], board: tuple[str, ...] | None = None) -> list[Entry]:
    """One section ranked; its scores are means over the section's datasets
    (`board`, the organiser's, else those its records hold; an unofficial
    record never changes an official score)."""
    datasets = sorted(board) if board else sorted({d["dataset"] for _, r in kept for d in r["datasets"]})
    rows = []
    for path, r in kept:
        cells = {d["dataset"]: DatasetCell(d["ipc"], float(d["mean"]), float(d["std"]),
                                           tuple(float(a) for a in d["accuracies"])) for d in r["datasets"]}
        total = math.fsum(cells[n].mean if n in cells else 0.0 for n in datasets) / len(datasets)
        method = _method(r)
        rows.append(Entry(0, display_name(r["name"]), total, cells, None if method is None else display_name(method),
                          r["recipe_hash"], r["official_budget"], str(path), r, extra_columns(r)))
    # Scores are finite (refused otherwise), so this order is total. Scores within TIE of the one before tie
    # (the same accuracies summed in another order differ in the last bits; rounding to a grid would split
    # two such scores that straddle a grid line): a tie shares its rank and is listed by name, then by file.
    rows.sort(key=lambda e: -e.score)
    ties: list[list[Entry]] = []
    for e in rows:
        if ties and ties[-1][-1].score - e.score <= TIE:
            ties[-1].append(e)
        else:
            ties.append([e])
    ranked = []
    for tie in ties:
        rank = len(ranked) + 1
        ranked += [dataclasses.replace(e, rank=rank) for e in sorted(tie, key=lambda e: (e.record["name"], e.path))]
    return ranked


def leaderboard(board: Leaderboard | list[dict], fmt: str = "table", extras: bool = False) -> str:
    """The board as text: official entries ranked; unofficial ones (when
    loaded) in a section of their own; a footer line counting what was left
    out (in csv, no footer: `footer` gives it). A list of records is ranked
    first (`rank_records`); one that is not valid raises RecordError.
    The extra measures' columns (`extra_columns`) follow the challenge
    score's with `extras`, and always in csv and json, which carry
    everything; json is one object (`board_json`)."""
    if fmt not in LEADERBOARD_FORMATS:
        raise UsageError(f"unknown format {fmt!r}; formats: {', '.join(LEADERBOARD_FORMATS)}")
    if not isinstance(board, Leaderboard):
        board = rank_records(board)
        if board.refused:
            raise RecordError(board.refused[0][1])
    if fmt == "json":
        return json.dumps(board_json(board), indent=2, sort_keys=True)
    # csv carries every column, each number in a cell of its own (a standard deviation or error too); the other
    # formats show IOR's standard error in its IOR cell
    columns = board.extras if fmt == "csv" else shown_columns(board.extras) if extras else []
    datasets = [h for n in board.datasets for h in ((f"{n} %", f"{n} std %") if fmt == "csv" else (f"{n} %",))]
    headers = ["rank", "submission", "method", "IPC", *datasets, "score %", "official budget", *columns]
    sections = [_rows(board.official, board.datasets, fmt, columns)]
    if board.unofficial:
        sections.append(_rows(board.unofficial, board.datasets, fmt, columns))
    if fmt == "csv":
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([headers, *[row for rows in sections for row in rows]])
        return out.getvalue()
    style = {"table": "simple", "md": "github", "html": "html"}[fmt]
    parts = []
    if board.official or not board.unofficial:
        parts.append(tabulate(sections[0], headers=headers, tablefmt=style, disable_numparse=True))
    if board.unofficial:
        title = f"{NOT_OFFICIAL}: ranked apart, each recipe and set of datasets (and Track 1 IPCs) on its own, " + (
            "not comparable with the ranking above" if board.official else "not comparable with official results")
        parts += [f"<h3>{title}</h3>" if fmt == "html" else f"{chr(10) * bool(parts)}{'### ' * (fmt == 'md')}{title}\n",
                  tabulate(sections[1], headers=headers, tablefmt=style, disable_numparse=True)]
    parts.append(f"<p>{html.escape(footer(board))}</p>" if fmt == "html" else f"\n{footer(board)}")
    return "\n".join(parts)


def footer(board: Leaderboard) -> str:
    """One line counting what the board shows and what it left out (naming
    the track where it is not plainly Track 1)."""
    named = board.track is not None and (board.track[0] == 2 or board.other_track)
    parts = [f"{track_label(board.track) + ': ' if named else ''}{len(board.official)} ranked"]
    if board.unofficial:
        parts.append(f"{len(board.unofficial)} not the official budget (ranked apart)")
    if board.unofficial_left_out:
        parts.append(f"{board.unofficial_left_out} not the official budget left out (--include-unofficial shows them)")
    parts += [f"{board.failed} failed", f"{len(board.refused)} refused"]
    if board.duplicates:
        parts.append(f"{board.duplicates} given twice, listed once")
    if board.other_track:
        parts.append(f"{board.other_track} of the other track left out")
    if board.other_rules:
        parts.append(f"{board.other_rules} on other datasets or at another IPC left out")
    return "; ".join(parts)


def _rows(entries: list[Entry], datasets: list[str], fmt: str, columns: list[str] = ()) -> list[list]:
    rows = []
    for e in entries:
        cells = [cell for n in datasets for cell in _dataset_cells(e.datasets.get(n), fmt)]
        ipcs = "/".join(str(e.datasets[n].ipc) if n in e.datasets else "-" for n in datasets)
        # Name and method are already printable ASCII; escaped again for the format they are shown in.
        shown = [_escape(e.name, fmt), _escape(e.method or "?", fmt)]
        extra = [_extra_cell(c, e.extras, with_error=fmt != "csv") for c in columns]
        rows.append([e.rank, *shown, ipcs, *cells, _pct(e.score), budget_cell(e.record["recipe"], e.official), *extra])
    return rows


def _dataset_cells(cell, fmt: str) -> list[str]:
    """A dataset's cells: "mean ± std" in one, or in csv the two numbers apart; "-" where the entry has none."""
    if fmt == "csv":
        return ["-", "-"] if cell is None else [_pct(cell.mean), _pct(cell.std)]
    return ["-" if cell is None else f"{_pct(cell.mean)} ± {_pct(cell.std)}"]


SE = " s.e. %"  # "IOR vs random s.e. %": the standard error of "IOR vs random %"


def shown_columns(columns: list[str]) -> list[str]:
    """The extra columns a table shows: IOR's standard error goes in its IOR cell, not a column of its own."""
    return [c for c in columns if not c.endswith(SE)]


def _extra_cell(column: str, extras: dict[str, float], with_error: bool = True) -> str:
    """An extra column's cell of an entry's `extras`: IOR and HLR signed
    (IOR with its standard error, where recorded and `with_error`),
    accuracies plain, "-" where a record lacks it."""
    value = extras.get(column)
    if value is None:
        return "-"
    if not column.startswith(("IOR", "HLR")) or column.endswith(SE):
        return _pct(value)
    se = extras.get(column.removesuffix(" %") + SE) if with_error and column.startswith("IOR") else None
    return _signed(value, se)


POOL_MEAN = "pool mean %"
ARCH_MEAN = "arch mean"  # "arch mean mlp+vgg11 %": the mean over a part of the pool, named by its architectures


def extra_columns(record: dict) -> dict[str, float]:
    """One number per extra measure of a (checked) record, averaged over
    its datasets like the challenge score, and only where every dataset of
    the record has that measure (else the number would not compare):
    "<measure> %" (mean accuracy), for a baseline "IOR vs <name> %", its
    paired standard error "IOR vs <name> s.e. %" and "HLR %", and the mean
    over two or more architectures: "pool mean %" for
    the whole pool, else "arch mean <a>+<b> %". A column is named by the
    measure and the own settings that change its numbers
    (`extras.measure_label`: T, the teacher, a baseline's subset seed), so
    that no column holds numbers made under other settings."""
    from ddchallenge.extras import ARCH_PREFIX, ARCHITECTURES, BASELINE_PREFIX, is_baseline, measure_label

    datasets = {d["dataset"] for d in record["datasets"]}
    by: dict[str, dict[str, float]] = {}  # column -> dataset -> value: one value per dataset, whatever the rows
    for row in record.get("extras") or []:
        label, d = measure_label(row["measure"], row["recipe"]), row["dataset"]
        by.setdefault(f"{label} %", {})[d] = float(row["mean"])
        if is_baseline(row["measure"]):
            ior = f"IOR vs {label[len(BASELINE_PREFIX):]}"
            by.setdefault(f"{ior} %", {})[d] = float(row["ior"])
            if row.get("ior_se_paired") is not None:  # older records have only the unpaired one: no column
                by.setdefault(ior + SE, {})[d] = float(row["ior_se_paired"])
            if row.get("hlr") is not None:  # full - the set's mean: the same whichever baseline carries it
                by.setdefault("HLR %", {})[d] = float(row["hlr"])
    # a mean over datasets; the standard error of that mean from the datasets' own (independent test sets)
    out = {c: (math.sqrt(math.fsum(x * x for x in v.values())) if c.endswith(SE) else math.fsum(v.values())) / len(v)
           for c, v in by.items() if set(v) == datasets}
    archs = {c[len(ARCH_PREFIX):-2]: v for c, v in out.items() if c.startswith(ARCH_PREFIX)}
    if len(archs) > 1:  # the mean of one architecture is its own column
        names = [a for a in ARCHITECTURES if a in archs]
        column = POOL_MEAN if len(names) == len(ARCHITECTURES) else f"{ARCH_MEAN} {'+'.join(names)} %"
        out[column] = math.fsum(archs.values()) / len(archs)
    return out


def _extra_order(columns: set[str]) -> list[str]:
    """Architectures (then their means), baselines and IOR/HLR, other measures: each group by name."""
    def group(c: str) -> int:
        return 0 if c.startswith("arch:") else 1 if c == POOL_MEAN or c.startswith(ARCH_MEAN) else \
            2 if c.startswith(("baseline:", "IOR", "HLR")) else 3
    return sorted(columns, key=lambda c: (group(c), c))


def board_json(board: Leaderboard) -> dict:
    """Everything the board knows, for machines: each entry's rank, name,
    method, score, datasets, recipe, extra columns and extra rows as recorded
    (checked by records.read_record; text fields still untrusted). Numbers
    are fractions, as the score is: a column's key drops the " %" of its
    display name."""
    def fraction_key(column: str) -> str:
        return column.removesuffix(" %")

    def entry(e: Entry) -> dict:
        return {"rank": e.rank, "name": e.name, "method": e.method, "score": e.score, "official": e.official,
                "recipe_hash": e.recipe_hash, "record": e.path,
                "datasets": {n: dataclasses.asdict(c) for n, c in e.datasets.items()},
                "extra_columns": {fraction_key(c): v for c, v in e.extras.items()},
                "extras": e.record.get("extras") or []}
    return {"official": [entry(e) for e in board.official], "unofficial": [entry(e) for e in board.unofficial],
            "datasets": board.datasets, "extra_columns": [fraction_key(c) for c in board.extras],
            "footer": footer(board),
            "track": None if board.track is None else track_label(board.track)}


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
    rows = [[clean(o.name), o.status, _score_cell(o.score), o.reason or ""] for o in outcomes]
    return tabulate(rows, headers=["upload", "status", "score %", "reason"], tablefmt="simple", disable_numparse=True)


def _score_cell(score) -> str:
    # Records are checked before they are trusted; a table still never shows (or crashes on) anything but a number.
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return "-"
    return _pct(score)
