"""`ddchallenge leaderboard`: records read as untrusted input, each malformed
one refused in a line, the rest ranked deterministically."""
import csv
import dataclasses
import functools
import json

import pytest

from ddchallenge.protocol import OFFICIAL
from ddchallenge.records import record_key, sign
from ddchallenge.report import display_name, leaderboard, load_leaderboard
from test_records import KEY, make_record, write


def rec(name, scores, official=True, method="random", rounds=3):
    """A valid record whose dataset means are `scores` (each round the same)."""
    recipe = OFFICIAL if official else dataclasses.replace(OFFICIAL, epochs=2)
    return make_record(name, {d: [m] * rounds for d, m in scores.items()}, recipe, method=method)


def folder(tmp_path, records):
    out = tmp_path / "results"
    out.mkdir(exist_ok=True)
    for i, r in enumerate(records):
        write(out / f"{i:02d}.json", r)
    return out


def test_ranking_ties_and_missing_datasets(tmp_path):
    out = folder(tmp_path, [rec("b", {"cifar100": 0.30}),  # tinyimagenet missing: counts 0
                            rec("c", {"cifar100": 0.20, "tinyimagenet": 0.40}, method="herding"),
                            rec("a", {"cifar100": 0.40, "tinyimagenet": 0.20})])
    board = load_leaderboard([out])
    assert [(e.rank, e.name, round(e.score, 6)) for e in board.official] == [(1, "a", 0.3), (1, "c", 0.3),
                                                                            (3, "b", 0.15)]
    assert board.datasets == ["cifar100", "tinyimagenet"] and board.official[1].method == "herding"
    cell = board.official[0].datasets["cifar100"]
    assert (cell.ipc, cell.accuracies) == (10, (0.4, 0.4, 0.4)) and (cell.mean, cell.std) == pytest.approx((0.4, 0))
    rows = leaderboard(board, "csv").splitlines()
    # csv: one number per cell, the standard deviation beside its mean
    assert rows == ["rank,submission,method,IPC,cifar100 %,cifar100 std %,tinyimagenet %,tinyimagenet std %,score %,"
                    "official budget",
                    "1,a,random,10/10,40.00,0.00,20.00,0.00,30.00,yes",
                    "1,c,herding,10/10,20.00,0.00,40.00,0.00,30.00,yes",
                    "3,b,random,10/-,30.00,0.00,-,-,15.00,yes"]
    assert "40.00 ± 0.00" in leaderboard(board, "table")


@pytest.mark.parametrize("fmt, marker", [("table", "rank"), ("md", "|--"), ("html", "<table>")])
def test_formats(tmp_path, fmt, marker):
    text = leaderboard(load_leaderboard([folder(tmp_path, [rec("a", {"mnist5k": 0.8})])]), fmt)
    assert marker in text and text.splitlines()[-1].endswith("1 ranked; 0 failed; 0 refused" + "</p>" * (fmt == "html"))


def crafted(name, change):
    r = rec(name, {"cifar100": 0.5})
    change(r)
    return r


def test_cli_refuses_each_malformed_record_in_one_line_and_ranks_the_rest(run_cli, tmp_path):
    d = lambda r: r["datasets"][0]  # noqa: E731
    bad = {
        "nan-mean": lambda r: d(r).update(mean=float("nan")),
        "inf-score": lambda r: r.update(score=float("inf")),
        "seven-and-a-half": lambda r: r.update(score=7.5),
        "minus-five": lambda r: d(r).update(accuracies=[-5, -5, -5], mean=-5),
        "true": lambda r: r.update(score=True),
        "no-std": lambda r: d(r).pop("std"),
        "no-ipc": lambda r: d(r).pop("ipc"),
        "null-mean": lambda r: d(r).update(mean=None),
        "string-mean": lambda r: d(r).update(mean="0.9"),
        "datasets-string": lambda r: r.update(datasets="cifar100"),
        "datasets-empty": lambda r: r.update(datasets=[]),
        "official-string": lambda r: r.update(official_budget="false"),
        "forged": lambda r: (d(r).update(accuracies=[0.999] * 3, mean=0.999), r.update(score=0.999,
                                                                                      recipe_hash="forged")),
        # an unknown field nested deep enough that sorting or signing the record would recurse past the limit
        "deep": lambda r: r.update(x="@deep@"),  # nested 500 deep below, in the file
        "deep-17": lambda r: r.update(x=functools.reduce(lambda inner, _: [inner], range(15), [])),  # 1 + 16 lists
    }
    records = [rec("seventy", {"cifar100": 0.70}), rec("ninety", {"cifar100": 0.90})]
    records += [crafted(name, change) for name, change in bad.items()]
    out = folder(tmp_path, records)
    (out / "99.json").write_text("{not json")
    deep = out / "15.json"
    deep.write_text(deep.read_text().replace('"@deep@"', "[" * 500 + "]" * 500))
    r = run_cli("leaderboard", out)
    assert r.exit_code == 0 and "Traceback" not in r.output
    refused = r.stderr.splitlines()
    assert len(refused) == len(bad) + 1 and all(line.startswith(f"refused: {out}/") for line in refused), r.stderr
    assert f"refused: {out}/02.json: datasets[0].mean must be a finite number from 0 to 1, got nan" in refused
    assert f"refused: {out}/13.json: official_budget must be true or false (a JSON boolean), got 'false'" in refused
    assert f"refused: {out}/15.json: is nested deeper than 16 levels" in refused
    assert f"refused: {out}/16.json: is nested deeper than 16 levels" in refused
    assert f"refused: {out}/14.json: recipe_hash must be {OFFICIAL.hash()}, the hash of the recorded recipe " \
        "settings, got 'forged'" in refused
    lines = r.stdout.splitlines()
    assert [line.split()[:2] for line in lines[2:4]] == [["1", "ninety"], ["2", "seventy"]] and lines[4] == ""
    assert lines[5] == f"2 ranked; 0 failed; {len(bad) + 1} refused"


def test_unofficial_budgets_are_never_ranked_among_official_ones(run_cli, tmp_path):
    out = folder(tmp_path, [rec("fast", {"cifar100": 0.99}, official=False), rec("slow", {"cifar100": 0.50})])
    r = run_cli("leaderboard", out)
    assert r.exit_code == 0 and "fast" not in r.stdout and r.stdout.splitlines()[2].split()[:2] == ["1", "slow"]
    assert r.stdout.splitlines()[-1] == ("1 ranked; 1 not the official budget left out (--include-unofficial shows "
                                         "them); 0 failed; 0 refused")
    r = run_cli("leaderboard", out, "--include-unofficial")
    lines = r.stdout.splitlines()
    assert r.exit_code == 0 and lines[2].split()[:2] == ["1", "slow"] and lines[3] == ""
    assert lines[4] == ("NOT THE OFFICIAL BUDGET: ranked apart, each recipe and set of datasets (and Track 1 IPCs) on "
                        "its own, not comparable with the ranking above")
    assert lines[8].split()[:2] == ["1", "fast"] and lines[8].endswith("NO (2 epochs, 3 rounds)")
    assert lines[-1] == "1 ranked; 1 not the official budget (ranked apart); 0 failed; 0 refused"
    # An unofficial record on other datasets changes no official score, shown or not.
    write(out / "02.json", rec("mnist", {"mnist5k": 0.9}, official=False))
    for include in (False, True):
        board = load_leaderboard([out], include)
        assert [(e.name, e.score) for e in board.official] == [("slow", pytest.approx(0.5))]
    # ... and is ranked apart from one on another dataset (a dataset it lacks would count 0)
    assert board.datasets == ["cifar100", "mnist5k"] and [e.rank for e in board.unofficial] == [1, 1]
    r = run_cli("leaderboard", out / "00.json")  # nothing official to rank: an error saying why
    assert r.exit_code == 1 and r.stderr == ("error: nothing to rank: 0 ranked; 1 not the official budget left out "
                                             "(--include-unofficial shows them); 0 failed; 0 refused\n")


def test_each_unofficial_recipe_is_ranked_on_its_own(run_cli, tmp_path):
    """One epoch is no rival of 300: non-official records are ranked within
    their recipe (ranks start at 1 in each, the longer recipe first), and
    each row says which budget it had."""
    def short(name, score, epochs, rounds=3):
        return make_record(name, {"cifar100": [score] * rounds},
                           dataclasses.replace(OFFICIAL, epochs=epochs, rounds=rounds))

    out = folder(tmp_path, [short("one-epoch", 0.9, 1), short("long-a", 0.5, 300), short("long-b", 0.6, 300),
                            short("one-epoch-2", 0.2, 1, rounds=1)])
    board = load_leaderboard([out], include_unofficial=True)
    assert [(e.rank, e.name) for e in board.unofficial] == [(1, "long-b"), (2, "long-a"), (1, "one-epoch"),
                                                            (1, "one-epoch-2")]
    rows = list(csv.reader(leaderboard(board, "csv").splitlines()))[1:]
    assert [row[-1] for row in rows] == ["NO (300 epochs, 3 rounds)"] * 2 + ["NO (1 epoch, 3 rounds)",
                                                                                          "NO (1 epoch, 1 round)"]


def test_look_alike_names_are_told_apart(run_cli, tmp_path):
    out = folder(tmp_path, [rec("alice", {"cifar100": 0.5}), rec("\u0430lice", {"cifar100": 0.6}),
                            rec("\\u0430lice", {"cifar100": 0.4}), rec("bob\u202e", {"cifar100": 0.3})])
    r = run_cli("leaderboard", out, "--format", "csv")
    names = [line.split(",")[1] for line in r.stdout.splitlines()[1:]]
    assert r.exit_code == 0 and names == ["\\u0430lice", "alice", "\\\\u0430lice", "bob\\u202e"]
    assert r.stderr == "4 ranked; 0 failed; 0 refused\n"
    # Names that differ only past what a table shows stay apart.
    long = [display_name("x" * 300 + end) for end in "ab"]
    assert long[0][:203] == long[1][:203] == "x" * 200 + "..." and long[0] != long[1] and len(long[0]) == 220


def test_a_record_given_twice_is_listed_once_and_failed_records_are_counted(run_cli, tmp_path):
    one = rec("team.zip", {"cifar100": 0.5})
    out = folder(tmp_path, [one, one, rec("other.zip", {"cifar100": 0.4})])
    write(out / f"{record_key('broken.zip')}.failed.json", {"status": "failed", "name": "broken.zip",
                                                            "key": record_key("broken.zip"), "submission": "broken.zip",
                                  "reason": "not a zip", "upload_sha256": None, "settings": {}})
    r = run_cli("leaderboard", out, out / "00.json", "--format", "md")
    assert r.exit_code == 0 and r.stdout.count("team.zip") == 1, r.output
    assert r.stdout.splitlines()[-1] == "2 ranked; 1 failed; 0 refused; 2 given twice, listed once"
    # The same name and bytes under another recipe is another row (a section of its own here).
    r = run_cli("leaderboard", out, write(tmp_path / "u.json", rec("team.zip", {"cifar100": 0.5}, official=False)),
                "--include-unofficial")
    assert r.exit_code == 0 and r.stdout.count("team.zip") == 2


def test_method_comes_from_the_records_own_provenance(tmp_path):
    mixed = rec("m", {"cifar100": 0.5, "tinyimagenet": 0.5}, method=None)
    mixed["datasets"][0]["method"], mixed["datasets"][1]["method"] = "d4m", "d4m"
    other = rec("o", {"cifar100": 0.4, "tinyimagenet": 0.4}, method=None)
    other["datasets"][0]["method"] = "d3m"
    board = load_leaderboard([folder(tmp_path, [mixed, other, rec("x", {"cifar100": 0.3}, method="<b>d\u0434m")])])
    assert [(e.name, e.method) for e in board.official] == [("m", "d4m"), ("o", None), ("x", "<b>d\\u0434m")]
    assert "&lt;b&gt;" in leaderboard(board, "html") and "<b>" not in leaderboard(board, "html")


def test_with_the_organisers_key_only_signed_records_are_ranked(run_cli, tmp_path):
    key = tmp_path / "organiser.key"
    key.write_bytes(KEY)
    out = folder(tmp_path, [sign(rec("signed", {"cifar100": 0.5}), KEY), rec("planted", {"cifar100": 0.99})])
    r = run_cli("leaderboard", out, "--record-key", key)
    assert r.exit_code == 0 and "planted" not in r.stdout and r.stdout.splitlines()[2].split()[:2] == ["1", "signed"]
    assert r.stderr == (f"refused: {out}/01.json: not signed with the organiser's record key (no mac field); records "
                        "made without --record-key, or planted\n")
    r = run_cli("leaderboard", out, "--record-key", out / "00.json")
    assert r.exit_code == 2 and "lies inside the results folder" in r.stderr


def test_cli_errors(run_cli, tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_cli("leaderboard", tmp_path / "empty")
    assert r.exit_code == 1 and r.stderr == f"error: no score results in {tmp_path / 'empty'}\n"
    r = run_cli("leaderboard", write(tmp_path / "x.json", '{"hello": 1}'))
    assert r.exit_code == 1 and r.stderr.splitlines() == [  # one line: the error names the first refusal
        f"error: nothing to rank: 0 ranked; 0 failed; 1 refused (first refused: {tmp_path}/x.json: name is missing)"]
    key = write(tmp_path / "key", "k" * 32)
    r = run_cli("leaderboard", tmp_path / "empty", "--record-key", tmp_path / "no-key")  # the key is checked first
    assert r.exit_code == 2 and r.stderr.splitlines() == [
        f"error: --record-key {tmp_path / 'no-key'}: must be a file of 16 to 4096 bytes (e.g. `head -c 32 "
        "/dev/urandom | base64 > KEYFILE`)"]
    assert run_cli("leaderboard", tmp_path / "empty", "--record-key", key).exit_code == 1
    r = run_cli("leaderboard", tmp_path / "x.json", tmp_path / "nothere")  # a mistyped path: one line, exit 2
    assert r.exit_code == 2 and r.stderr == (f"error: not found: {tmp_path / 'nothere'}; pass records (.json) or "
                                             "results folders\n")
    r = run_cli("leaderboard", tmp_path / "x.json", "--format", "pdf")
    assert r.exit_code == 2
    assert json.loads((tmp_path / "x.json").read_text()) == {"hello": 1}  # nothing written, nothing moved


def track2(record, budget=600.0):
    return {**record, "rules": {"track": 2, "datasets": ["cifar100"], "ipc": None, "budget_seconds": budget,
                                "table_rule": "Track 2"}}


def test_results_of_both_tracks_are_never_ranked_together(run_cli, tmp_path):
    """An organiser's review: README's Track 2 batch wrote into the Track 1
    batch's ./results (and a --mixed batch writes both into one folder), and
    the leaderboard ranked generators among image uploads, a generator
    scored on one dataset at half its score. One track per board; Track 2
    under different budgets does not compare either."""
    t1 = [rec("images.zip", {"cifar100": 0.5, "tinyimagenet": 0.3}), {**rec("old.zip", {"cifar100": 0.4}),
                                                                     "rules": {"track": 1}}]
    out = folder(tmp_path, [*t1, track2(rec("gen", {"cifar100": 0.6}))])
    write(out / f"{record_key('slow')}.failed.json", {"status": "failed", "name": "slow", "key": record_key("slow"),
                                                      "submission": "slow", "reason": "r",
                                  "upload_sha256": None, "settings": {"budget": 600.0}})
    r = run_cli("leaderboard", out, "--format", "md")
    assert r.exit_code == 2 and r.stderr == ("error: these records hold Track 1 and Track 2 (600 s per dataset) results, "
                                             "which are never ranked together: pass --track 1 or --track 2 (one board "
                                             "per track)\n"), r.output
    r = run_cli("leaderboard", out, "--track", 1)
    assert r.exit_code == 0 and [line.split()[1] for line in r.stdout.splitlines()[2:4]] == ["images.zip", "old.zip"]
    assert r.stdout.splitlines()[-1] == "Track 1: 2 ranked; 0 failed; 0 refused; 1 of the other track left out"
    r = run_cli("leaderboard", out, "--track", 2, "--format", "json")
    board = json.loads(r.stdout)
    assert [(e["name"], e["score"]) for e in board["official"]] == [("gen", 0.6)] and board["datasets"] == ["cifar100"]
    assert board["track"] == "Track 2 (600 s per dataset)" and r.stderr == (
        "Track 2 (600 s per dataset): 1 ranked; 1 failed; 0 refused; 2 of the other track left out\n")  # its failure
    r = run_cli("leaderboard", out, "--track", 2, "--format", "html", "-o", tmp_path / "site", "--no-sandbox")
    assert r.exit_code == 0 and "<h1>Leaderboard: Track 2 (600 s per dataset)</h1>" in \
        (tmp_path / "site" / "index.html").read_text() and "images.zip" not in r.stdout, r.output
    # Track 2 under another budget: refused, even asked for by track
    write(out / "09.json", track2(rec("gen-long", {"cifar100": 0.7}), 1200))
    r = run_cli("leaderboard", out, "--track", 2)
    assert r.exit_code == 2 and "Track 2 results run under different budgets (600, 1200 s per dataset)" in r.stderr
    # a rules field that is not one is refused like any malformed field, and ranks nowhere
    write(out / "09.json", {**rec("liar", {"cifar100": 0.9}), "rules": {"track": 3}})
    r = run_cli("leaderboard", out, "--track", 1)
    assert r.exit_code == 0 and f"refused: {out}/09.json: rules.track must be a whole number from 1 to 2, got 3" in \
        r.stderr and "liar" not in r.stdout


def test_a_single_file_of_another_dataset_or_ipc_never_ranks_among_the_batchs_uploads(run_cli, tmp_path):
    """An organiser's review: in `score uploads/*` a single .h5 file is
    scored on its own dataset at up to IPC 100. Ranked with the zips, an
    IPC-100 set came first, and a set of an easy dataset added a column that
    every other upload counted as 0, its score above all of theirs. Results
    that do not compare are refused together; --ipc and --dataset pick."""
    zips = [rec("a.zip", {"cifar100": 0.40, "tinyimagenet": 0.18}), rec("b.zip", {"cifar100": 0.30})]
    big = make_record("big.h5", {"cifar100": [0.55] * 3}, OFFICIAL)
    big["datasets"][0].update(ipc=100, images=10_000)
    easy = rec("easy.h5", {"cifar10": 0.70})
    out = folder(tmp_path, [*zips, big])
    r = run_cli("leaderboard", out)
    assert r.exit_code == 2 and r.stderr == ("error: these records hold Track 1 results at different IPC (cifar100 at IPC "
                                             "10, 100), which are never ranked together: pass --ipc N to rank those "
                                             "at IPC N\n"), r.output
    r = run_cli("leaderboard", out, "--ipc", 10)
    assert r.exit_code == 0 and [line.split()[1] for line in r.stdout.splitlines()[2:4]] == ["a.zip", "b.zip"]
    assert r.stdout.splitlines()[-1] == "2 ranked; 0 failed; 0 refused; 1 on other datasets or at another IPC left out"
    (out / "02.json").unlink()
    write(out / "03.json", easy)
    r = run_cli("leaderboard", out)
    assert r.exit_code == 2 and r.stderr == ("error: these records were scored on datasets (cifar10, cifar100, "
                                             "tinyimagenet) that no one record holds all of, which are never ranked "
                                             "together: pass --dataset NAME for each dataset of the board (records on "
                                             "others are left out)\n"), r.output
    board = load_leaderboard([out], datasets=("cifar100", "tinyimagenet"))
    assert [(e.name, round(e.score, 6)) for e in board.official] == [("a.zip", 0.29), ("b.zip", 0.15)]
    assert board.datasets == ["cifar100", "tinyimagenet"] and board.other_rules == 1


def test_a_record_is_read_only_from_the_file_its_batch_kept_it_in(tmp_path):
    """An attacker's review: a signed record set aside as superseded, copied back under any *.json name, was
    ranked #1 beside the upload's current record; a copy under a second name was counted as given twice."""
    name, out = "team.h5", tmp_path / "results"
    out.mkdir()
    key = record_key(name)
    current = sign({**rec(name, {"mnist5k": 0.5}), "key": key}, KEY)
    earlier = sign({**rec(name, {"mnist5k": 0.9}), "key": key}, KEY)
    write(out / f"{key}.json", current)
    write(out / f"{key}.json.superseded-1", earlier)  # as a batch keeps it: never read
    write(out / "zz-anything.json", earlier)  # put back under another name
    write(out / "copy.json", current)
    other = "other.h5"
    write(out / f"{record_key(other)}.json", sign({**rec(other, {"mnist5k": 0.7}), "key": "other-0123456789ab"}, KEY))
    board = load_leaderboard([out], key=KEY)
    assert [(e.name, round(e.score, 6)) for e in board.official] == [(name, 0.5)]
    assert board.duplicates == 0
    refused = {p.rpartition("/")[2]: why for p, why in board.refused}
    assert sorted(refused) == ["copy.json", f"{record_key(other)}.json", "zz-anything.json"]
    assert refused["zz-anything.json"].endswith(
        f"zz-anything.json: a record of 'team.h5' is kept in {key}.json with the key of its name, and this file is "
        "not that (a copy, or a record set aside and renamed); not read")
    assert "a record of 'other.h5' is kept in other-0123456789ab.json" in refused[f"{record_key(other)}.json"]


def test_scores_within_1e9_of_each_other_share_a_rank_across_any_rounding_line(tmp_path):
    """An organiser's review: 0.8000000004999 and 0.8000000005001 (2e-13 apart) were ranked 1 and 2, because
    rounding to 9 places put them on either side of a grid line."""
    out = folder(tmp_path, [rec("tie-b", {"cifar100": 0.8000000005001}), rec("tie-a", {"cifar100": 0.8000000004999}),
                            rec("third", {"cifar100": 0.7999999})])
    board = load_leaderboard([out], datasets=("cifar100",))
    assert [(e.rank, e.name) for e in board.official] == [(1, "tie-a"), (1, "tie-b"), (3, "third")]


def test_unofficial_results_at_other_ipcs_are_ranked_apart(tmp_path):
    """An organiser's review: in the non-official section an IPC-50 result ranked above an IPC-1 result of the
    same recipe, a comparison the official section refuses."""
    def at(name, score, ipc):
        r = make_record(name, {"mnist5k": [score] * 3}, dataclasses.replace(OFFICIAL, epochs=2))
        r["datasets"][0].update(ipc=ipc, images=10 * ipc)
        return r

    out = folder(tmp_path, [at("ipc50", 0.97, 50), at("ipc1-a", 0.60, 1), at("ipc1-b", 0.70, 1)])
    board = load_leaderboard([out], include_unofficial=True)
    assert [(e.rank, e.name) for e in board.unofficial] == [(1, "ipc1-b"), (2, "ipc1-a"), (1, "ipc50")]

    # A code review: a Track 2 generator makes as many images as fit its budget; its results at IPC 47 and 52 are
    # ranked against each other, as in the official section.
    def generator(name, score, ipc):
        return {**at(name, score, ipc), "rules": {"track": 2, "datasets": ["mnist5k"], "ipc": None,
                                                  "budget_seconds": 600.0, "table_rule": "Track 2"}}

    (tmp_path / "t2").mkdir()
    out = folder(tmp_path / "t2", [generator("gen-47", 0.95, 47), generator("gen-52", 0.96, 52)])
    board = load_leaderboard([out], include_unofficial=True)
    assert [(e.rank, e.name) for e in board.unofficial] == [(1, "gen-52"), (2, "gen-47")]


def test_a_results_folder_named_through_a_link_is_ranked(run_cli, tmp_path):
    """An organiser's review: `leaderboard rec-link` (a link to the results folder) ranked nothing; the
    command line's own folder is followed, a link inside it is still refused."""
    out = folder(tmp_path, [rec("a", {"cifar100": 0.4, "tinyimagenet": 0.2})])
    (out / "planted.json").symlink_to(out / "00.json")
    (tmp_path / "link").symlink_to(out)
    r = run_cli("leaderboard", tmp_path / "link", "--format", "md")
    assert r.exit_code == 0 and r.stdout.splitlines()[2].split()[:4] == ["|", "1", "|", "a"]
    assert r.stdout.splitlines()[-1] == "1 ranked; 0 failed; 1 refused" and "planted.json: is a symbolic link" in r.stderr
