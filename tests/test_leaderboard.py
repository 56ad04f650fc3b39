import json

import pytest

from ddchallenge.report import leaderboard


def result(name, scores, official=True, method="random"):
    return {"name": name, "submission": f"{name}.zip", "method": method, "official_budget": official,
            "datasets": [{"dataset": d, "mean": m, "std": 0.01, "ipc": 10} for d, m in scores.items()]}


def test_ranking_ties_and_missing_datasets():
    rows = leaderboard([
        result("a", {"cifar100": 0.40, "tinyimagenet": 0.20}),
        result("b", {"cifar100": 0.30}),  # tinyimagenet missing: counts 0
        result("c", {"cifar100": 0.20, "tinyimagenet": 0.40}, method="herding"),
    ], "csv").splitlines()
    assert rows[0] == "rank,submission,method,IPC,cifar100 %,tinyimagenet %,score %,official budget"
    assert rows[1].startswith("1,a,random,10/10,40.00 ± 1.00,20.00 ± 1.00,30.00,yes")
    assert rows[2].startswith("1,c,herding,10/10,")
    assert rows[3] == "3,b,random,10/-,30.00 ± 1.00,-,15.00,yes"


@pytest.mark.parametrize("fmt, marker", [("table", "rank"), ("md", "|--"), ("html", "<table>")])
def test_formats(fmt, marker):
    assert marker in leaderboard([result("a", {"mnist5k": 0.8}, official=False)], fmt)


def test_cli_reads_score_json_and_refuses_other_files(run_cli, tmp_path):
    good, bad = tmp_path / "r.json", tmp_path / "x.json"
    good.write_text(json.dumps(result("a", {"mnist5k": 0.8}, official=False)))
    bad.write_text('{"hello": 1}')
    r = run_cli("leaderboard", good, "--format", "md")
    assert r.exit_code == 0 and "| 1 " in r.stdout and "NO" in r.stdout
    r = run_cli("leaderboard", good, bad)
    assert r.exit_code == 1 and "x.json is not a score result JSON" in r.stderr
    r = run_cli("leaderboard", good, "--format", "pdf")
    assert r.exit_code == 2
