"""`ddchallenge leaderboard RESULTS --format html -o SITE`: a static site to
publish as it is, built from records written here in the exact format a
batch writes (scoring would be too slow), read back and shown in a real
headless browser where one is installed."""
import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from ddchallenge import __version__
from ddchallenge.batch import BatchSettings, record_key
from ddchallenge.protocol import OFFICIAL, UploadRules
from ddchallenge.score import DatasetScore, ScoreResult, versions
from ddchallenge.site import TRACK2_GRID, UNPUBLISHED_GRID

UNOFFICIAL = OFFICIAL.with_overrides(epochs=2, rounds=1)
HOSTILE = '<script>alert("x")</script>&../../etc/passwd'


def write_record(out: Path, name: str, scores: dict, recipe=OFFICIAL, method="random", submission=None,
                 shas: dict | None = None, provenance=None, upload_sha="0" * 64, seed=0) -> Path:
    """A score record as `ddchallenge score` writes it into a results folder:
    the real ScoreResult, then the batch's fields (key, upload sha256, settings)."""
    datasets = []
    for dataset, accs in scores.items():
        accs = list(accs)[:recipe.rounds]
        ipc = 10
        classes = {"mnist5k": 10, "cifar100": 100, "tinyimagenet": 200}[dataset]
        datasets.append(DatasetScore(
            dataset=dataset, ipc=ipc, images=classes * ipc, kind="official", method=method,
            source=f"{submission or name}:{dataset}.pt", sha256=(shas or {}).get(dataset, "a" * 64),
            seeds=[seed + r for r in range(recipe.rounds)], accuracies=accs, mean=float(np.mean(accs)),
            std=float(np.std(accs)), seconds=1.5, provenance=provenance))
    result = ScoreResult(
        name=name, method=method, submission=str(submission or f"uploads/{name}"), submission_sha256=None,
        score=float(np.mean([d.mean for d in datasets])), datasets=datasets, official_budget=recipe.is_official,
        recipe=dataclasses.asdict(recipe), recipe_hash=recipe.hash(), seed=seed, device="cpu",
        sandbox="unshare: no network; rlimits", seconds=3.0, warnings=[], versions=versions())
    settings = BatchSettings(UploadRules(tuple(scores)), recipe, seed)
    key = record_key(name)
    record = {**dataclasses.asdict(result), "key": key, "upload_sha256": upload_sha, "settings": settings.fingerprint()}
    path = out / f"{key}.json"
    path.write_text(json.dumps(record, indent=2, sort_keys=True))
    return path


def write_failed(out: Path, name: str) -> None:
    key = record_key(name)
    (out / f"{key}.failed.json").write_text(json.dumps({
        "status": "failed", "name": name, "key": key, "submission": f"uploads/{name}", "reason": "broken",
        "upload_sha256": None, "settings": BatchSettings().fingerprint()}))


@pytest.fixture
def results(tmp_path, official_file):
    """A results folder: three official records (one with its upload still
    there, one with a hostile name and provenance), one unofficial, a
    failed one and a malformed one."""
    out = tmp_path / "results"
    out.mkdir()
    sha = hashlib.sha256(official_file.read_bytes()).hexdigest()
    write_record(out, "alice.pt", {"mnist5k": [0.91, 0.93, 0.95]}, submission=official_file, shas={"mnist5k": sha},
                 provenance={"method": "random", "seed": 3, "config": '{"ipc": 10}'}, upload_sha=sha)
    write_record(out, HOSTILE, {"mnist5k": [0.80, 0.80, 0.80]}, method='<img src=x onerror=alert(1)>',
                 provenance={"note": "</code><script>alert(2)</script>", "seed": 1})
    write_record(out, "bob", {"mnist5k": [0.70, 0.72, 0.74]}, method="herding")
    write_record(out, "carol-fast", {"mnist5k": [0.99]}, recipe=UNOFFICIAL)
    write_failed(out, "dave")
    (out / "zz-planted.json").write_text(json.dumps({"name": "mallory", "score": "99.9"}))
    return out


class _Text(HTMLParser):
    """The page as a reader's text (tags dropped), plus every attribute."""

    def __init__(self):
        super().__init__()
        self.text, self.attrs, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> _Text:
    p = _Text()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def build(run_cli, results, site, *extra):
    r = run_cli("leaderboard", results, "--format", "html", "-o", site, *extra)
    assert r.exit_code == 0, r.output
    return r


def test_site_is_standalone_ranked_and_escaped(run_cli, results, tmp_path):
    site = tmp_path / "site"
    r = build(run_cli, results, site, "--include-unofficial")
    assert "wrote" in r.stdout and "4 upload page(s), 1 sample grid(s)" in r.stdout
    assert r.stderr.count("refused:") == 1 and "zz-planted.json" in r.stderr
    index = (site / "index.html").read_text(encoding="utf-8")
    assert index.startswith("<!doctype html>") and '<meta charset="utf-8">' in index
    assert "<title>Leaderboard</title>" in index and "<style>" in index
    # Nothing is fetched or run: no script, no link, no external URL.
    page = parse(site / "index.html")
    assert {"script", "link", "iframe", "object"}.isdisjoint(page.tags)
    assert not [v for _, v in page.attrs if v and re.match(r"\s*(https?:|//|javascript:|data:)", v)]
    text = " ".join(" ".join(page.text).split())
    # The challenge score comes first, then the per-dataset mean ± std.
    assert "Rank Submission Score % mnist5k % Method IPC Recipe" in text
    assert f"1 alice.pt 93.00 93.00 ± 1.63 random 10 {OFFICIAL.hash()[:12]}" in text
    assert "3 bob 72.00 72.00 ± 1.63 herding" in text
    assert text.index("alice.pt") < text.index("etc/passwd") < text.index("bob")
    # Official and unofficial apart; the unofficial row is ranked 1 in its own section.
    official, unofficial = index.split('<section id="unofficial"', 1)
    assert "carol-fast" not in official and "1 carol-fast" in " ".join(" ".join(parse_text(unofficial)).split())
    assert "4 ranked" not in text and "3 ranked; 1 not the official budget (ranked apart); 1 failed; 1 refused" in text
    # Upload bytes are text, never markup.
    assert "<script>alert" not in index and "<img src=x" not in index
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;../../etc/passwd" in index
    files = sorted(p.relative_to(site).as_posix() for p in site.rglob("*"))
    assert all(re.fullmatch(r"index\.html|uploads|uploads/[A-Za-z0-9_-]+\.(html|png)", f) for f in files), files
    assert len([f for f in files if f.endswith(".html")]) == 5
    hostile_page = next(p for p in (site / "uploads").glob("*.html") if "etc_passwd" in p.name)
    body = hostile_page.read_text(encoding="utf-8")
    assert "<script>" not in body and "&lt;/code&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in body
    assert not list(tmp_path.glob("etc*")) and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def parse_text(fragment: str) -> list[str]:
    p = _Text()
    p.feed(fragment)
    return p.text


def test_upload_page_rounds_recipe_sandbox_provenance_and_grid(run_cli, results, tmp_path, official_file):
    site = tmp_path / "site"
    build(run_cli, results, site)
    (alice,) = [p for p in (site / "uploads").glob("alice_pt-*.html")]
    text = " ".join(" ".join(parse(alice).text).split())
    for shown in ["Rank 1 (official budget)", "Score 93.00 %", "Method random", f"Recipe hash {OFFICIAL.hash()}",
                  "Sandbox unshare: no network; rlimits", "Round Seed Test accuracy % 1 0 91.00 2 1 93.00 3 2 95.00",
                  "Provenance Key Value config {\"ipc\": 10} method random seed 3", f"ddchallenge {__version__}"]:
        assert shown in text, shown
    (img,) = [v for k, v in parse(alice).attrs if k == "src"]
    assert img == alice.name[:-5] + "-mnist5k.png" and (site / "uploads" / img).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(site / "uploads" / img).size[0] > 0
    # Where no grid can be made, the page says why.
    # Where no grid can be made, the page says there is none and the organiser's log says why.
    (bob,) = [p for p in (site / "uploads").glob("bob-*.html")]
    assert f"No sample grid: {UNPUBLISHED_GRID}." in " ".join(parse(bob).text)
    # Changed bytes at the recorded path: no grid from them.
    torch.save(torch.zeros(100, 1, 28, 28), official_file)
    r = build(run_cli, results, site, "--force")
    (alice,) = [p for p in (site / "uploads").glob("alice_pt-*.html")]
    said = " ".join(parse(alice).text)
    assert "has changed since it was scored" not in said and f"No sample grid: {UNPUBLISHED_GRID}." in said
    assert "has changed since it was scored" in r.stderr and "bob: mnist5k: no sample grid: the upload is not at " \
        "'uploads/bob' any more" in r.stderr and not list((site / "uploads").glob("*.png"))


def test_same_record_twice_one_row_and_lookalike_names_apart(run_cli, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    path = write_record(out, "alice", {"mnist5k": [0.5, 0.5, 0.5]})
    write_record(out, "\u0430lice", {"mnist5k": [0.5, 0.5, 0.5]})  # Cyrillic a
    write_record(out, "a l i c e", {"mnist5k": [0.4, 0.4, 0.4]})
    write_record(out, "a_l_i_c_e", {"mnist5k": [0.4, 0.4, 0.4]})
    (tmp_path / "copied").mkdir()  # a copy keeps its file name: under any other it is refused
    copy = tmp_path / "copied" / path.name
    shutil.copy(path, copy)
    site = tmp_path / "site"
    r = run_cli("leaderboard", out, copy, "--format", "html", "-o", site)
    assert r.exit_code == 0, r.output
    assert "4 ranked" in r.stdout and "1 given twice, listed once" in r.stdout
    text = " ".join(" ".join(parse(site / "index.html").text).split())
    assert "1 \\u0430lice" in text and "1 alice" in text
    pages = sorted(p.name for p in (site / "uploads").glob("*.html"))
    assert len(pages) == 4 and len({p.lower() for p in pages}) == 4
    hrefs = [v for k, v in parse(site / "index.html").attrs if k == "href"]
    assert sorted(h.removeprefix("uploads/") for h in hrefs) == pages


def test_html_needs_an_output_folder_and_keeps_an_existing_one(run_cli, results, tmp_path):
    r = run_cli("leaderboard", results, "--format", "html")
    assert r.exit_code == 2 and "pass -o FOLDER" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stdout == ""
    r = run_cli("leaderboard", results, "-o", tmp_path / "x")
    assert r.exit_code == 2 and "go with --format html" in r.stderr and not (tmp_path / "x").exists()
    site = tmp_path / "site"
    site.mkdir()
    (site / "precious.txt").write_text("x")
    for page in (None, "<!doctype html><title>my home page</title>"):  # any website has an index.html
        if page:
            (site / "index.html").write_text(page)
        for force in ((), ("--force",)):  # --force is suggested only where it would be accepted
            r = run_cli("leaderboard", results, "--format", "html", "-o", site, *force)
            assert r.exit_code == 2 and "is not one this command wrote (no index.html of its own)" in r.stderr
            assert "pass --force" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (site / "index.html").unlink()
    (tmp_path / "site.html").write_text("x")
    r = run_cli("leaderboard", results, "--format", "html", "-o", tmp_path / "site.html", "--force")
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        f"error: -o {tmp_path / 'site.html'}: {tmp_path / 'site.html'} is a file, not a folder; name a path in a "
        "folder"]
    assert sorted(p.name for p in site.iterdir()) == ["precious.txt"]  # --force replaces a site, not any folder
    (site / "precious.txt").rename(tmp_path / "precious.txt")
    site.rmdir()
    build(run_cli, results, site, "--no-sandbox")
    (site / "stale.txt").write_text("x")
    build(run_cli, results, site, "--force", "--no-sandbox")
    assert not (site / "stale.txt").exists() and (site / "index.html").is_file()
    before = sorted(p.name for p in results.iterdir())
    for inside in (results, results.parent):  # --force must never replace the records themselves
        r = run_cli("leaderboard", results, "--format", "html", "-o", inside, "--force")
        assert r.exit_code == 2 and "holds the records being ranked" in r.stderr
    assert sorted(p.name for p in results.iterdir()) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    write_failed(empty, "dave")
    r = run_cli("leaderboard", empty, "--format", "html", "-o", tmp_path / "s2")
    assert r.exit_code == 1 and "nothing to rank" in r.stderr and not (tmp_path / "s2").exists()


# ---------------------------------------------------------------- in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Written into a test-only copy of a page (the published page runs no script,
# and its policy forbids any): what a reader sees, as JSON in the DOM.
PROBE = """<script>
window.addEventListener("load", () => {
  const rows = s => [...document.querySelectorAll(s + " tbody tr")].map(
      tr => [...tr.cells].map(td => td.innerText.trim()));
  const out = {title: document.title, charset: document.characterSet,
    official: rows("#official"), unofficial: rows("#unofficial"),
    counts: (document.getElementById("counts") || {}).innerText || "",
    nogrid: [...document.querySelectorAll(".nogrid")].map(p => p.innerText),
    images: [...document.images].map(i => ({src: i.getAttribute("src"), complete: i.complete, width: i.naturalWidth})),
    visible: document.body.innerText};
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def in_browser(page: Path) -> dict:
    """Open a test copy of `page` (beside it, so relative links resolve as
    they do for the real one) in headless Chromium; return the probe's JSON."""
    html = page.read_text(encoding="utf-8")
    html = html.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';", 1)
    copy = page.with_name(f"probe-{page.name}")
    copy.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    try:
        done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                               f"--user-data-dir={page.parent / '.chromium'}", "--virtual-time-budget=5000",
                               "--dump-dom", copy.as_uri()], capture_output=True, text=True, timeout=90)
    finally:
        copy.unlink()
        shutil.rmtree(page.parent / ".chromium", ignore_errors=True)
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert found, f"no probe in the DOM (exit {done.returncode}): {done.stderr[-2000:]}"
    import html as html_module

    return json.loads(html_module.unescape(found.group(1)))


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
def test_site_in_headless_chromium(run_cli, results, tmp_path):
    site = tmp_path / "site"
    build(run_cli, results, site, "--include-unofficial", "--no-sandbox")  # the sandboxed read is tested above
    seen = in_browser(site / "index.html")
    assert seen["title"] == "Leaderboard" and seen["charset"] == "UTF-8"
    assert [row[:4] for row in seen["official"]] == [
        ["1", "alice.pt", "93.00", "93.00 ± 1.63"],
        ["2", HOSTILE, "80.00", "80.00 ± 0.00"],
        ["3", "bob", "72.00", "72.00 ± 1.63"]]
    assert seen["official"][1][4] == "<img src=x onerror=alert(1)>"  # shown as text, not run
    assert [row[:3] for row in seen["unofficial"]] == [["1", "carol-fast", "99.00"]]
    assert "1 failed; 1 refused" in seen["counts"] and "Not the official budget" in seen["visible"]
    (alice,) = list((site / "uploads").glob("alice_pt-*.html"))
    page = in_browser(alice)
    (img,) = page["images"]
    assert img["complete"] and img["width"] > 0 and img["src"].endswith("-mnist5k.png")
    assert "91.00" in page["visible"] and "Provenance" in page["visible"]
    (bob,) = list((site / "uploads").glob("bob-*.html"))
    page = in_browser(bob)
    assert page["images"] == [] and page["nogrid"][0] == f"No sample grid: {UNPUBLISHED_GRID}."


def test_a_record_naming_a_link_a_fifo_a_folder_or_a_generator_gets_no_grid(run_cli, tmp_path, official_file):
    """The path a record names is untrusted: a link or a FIFO is refused
    (without hanging), a folder is not listed, a generator is not run or
    looked for; the organiser's log says why and the published page says
    no more than that there is no grid (a planted record must not make the
    site a listing of, or a file-existence oracle for, their machine)."""
    import os

    from ddchallenge.diffusion.model import META_FILE

    out = tmp_path / "results"
    out.mkdir()
    sha = hashlib.sha256(official_file.read_bytes()).hexdigest()
    link = tmp_path / "link.pt"
    link.symlink_to(official_file)
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    generator = tmp_path / "generator"
    generator.mkdir()
    (generator / META_FILE).write_text("{}")
    private = tmp_path / "private"
    private.mkdir()
    (private / "secret-name.txt").write_text("x")
    for name, where in [("link", link), ("fifo", fifo), ("generator", generator), ("listing", private),
                        ("gone", tmp_path / "no-such-file.pt")]:
        write_record(out, name, {"mnist5k": [0.5, 0.5, 0.5]}, submission=where, shas={"mnist5k": sha})
    track2 = write_record(out, "track2", {"mnist5k": [0.5, 0.5, 0.5]}, submission=generator, shas={"mnist5k": sha})
    record = json.loads(track2.read_text())
    track2.write_text(json.dumps({**record, "rules": {"track": 2, "budget_seconds": 600.0}}))
    site = tmp_path / "site"
    r = build(run_cli, out, site, "--track", 1)
    said = {p.name.split("-")[0]: " ".join(" ".join(parse(p).text).split()) for p in (site / "uploads").glob("*.html")}
    assert sorted(said) == ["fifo", "generator", "gone", "link", "listing"]
    for name, why in [("link", "symbolic link"), ("fifo", "fifo.pt is a FIFO"), ("listing", "secret-name.txt"),
                      ("gone", "any more"), ("generator", "holds a generator or model")]:
        assert f"No sample grid: {UNPUBLISHED_GRID}." in said[name] and why not in said[name], name
        (line,) = [line for line in r.stderr.splitlines() if line.startswith(f"{name}: mnist5k: no sample grid: ")]
        assert why in line, line
    r = build(run_cli, out, site, "--track", 2, "--force")
    (page,) = (site / "uploads").glob("track2-*.html")
    assert f"No sample grid: {TRACK2_GRID}." in " ".join(" ".join(parse(page).text).split())
    assert "no sample grid" not in r.stderr and not list((site / "uploads").glob("*.png"))


def test_packed_zip_scored_then_published_shows_its_own_provenance(run_cli, tmp_path):
    """End to end: pack (the manifest goes inside the zip), score the zip
    alone in another folder, publish: the method, provenance and grid come
    from the zip's own bytes."""
    from ddchallenge.labelled import write_labelled_set

    rng = np.random.default_rng(0)
    write_labelled_set(tmp_path / "s.h5", rng.integers(0, 256, (100, 1, 28, 28), dtype=np.uint8),
                       np.repeat(np.arange(10), 10), dataset="mnist5k", ipc=10, method="test", seed=0, config={"k": 1})
    assert run_cli("pack", tmp_path / "s.h5", "-o", tmp_path / "sub").exit_code == 0
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    shutil.copy(tmp_path / "sub" / "submission.zip", uploads / "team.zip")  # no manifest beside it
    r = run_cli("score", "uploads/team.zip", "--dataset", "mnist5k", "--epochs", 0, "--rounds", 1, "--quiet",
                "--output", "results")
    assert r.exit_code == 0, r.output
    record = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    assert record["method"] == "test" and record["datasets"][0]["provenance"]["seed"] == 0
    build(run_cli, "results", "site", "--include-unofficial")
    (page,) = (tmp_path / "site" / "uploads").glob("team_zip-*.html")
    text = " ".join(" ".join(parse(page).text).split())
    assert "Method test" in text and "Provenance Key Value config {\"k\":1} dataset mnist5k" in text
    assert len(list((tmp_path / "site" / "uploads").glob("team_zip-*-mnist5k.png"))) == 1


def test_an_upload_page_counts_its_recipe_in_words():
    """An organiser's review: a one-round smoke board's pages said '1 epochs, 1 rounds'."""
    from test_records import make_record

    from ddchallenge.report import rank_records
    from ddchallenge.site import rows, upload_html

    recipe = OFFICIAL.with_overrides(epochs=1, rounds=1)
    (row,) = rows(rank_records([make_record("a.zip", {"mnist5k": [0.5]}, recipe)]))
    assert "<td>Recipe</td><td>1 epoch, 1 round</td>" in upload_html(row, {}, {})
    (row,) = rows(rank_records([make_record("a.zip", {"mnist5k": [0.5] * 3})]))
    assert "<td>Recipe</td><td>1000 epochs, 3 rounds</td>" in upload_html(row, {}, {})
