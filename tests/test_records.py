"""Score records read back as untrusted input: crafted records refused field
by field, the organiser's MAC, and a batch rerun that sets a planted record
aside and scores the upload again."""
import copy
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from ddchallenge.batch import ResultsLock, record_key
from ddchallenge.data.reference import DATA_ENV, embedded_reference, digest_test_set
from ddchallenge.errors import RecordError, ResultsBusyError, UsageError
from ddchallenge.fileio import atomic_path
from ddchallenge.protocol import OFFICIAL, get_dataset
from ddchallenge.records import check_mac, key_id, load_key, read_record, sign
from ddchallenge.score import DatasetScore, ScoreResult

FAST = ("--dataset", "mnist5k", "--epochs", 0, "--rounds", 1, "--quiet")
KEY = b"organiser-secret-key-0123456789"


@functools.cache
def built_in_test_set(dataset: str) -> str:
    """The `test_sha256` a record scored here holds: mnist5k's built-in test
    set's (the only one this machine has), any sha256 for the others."""
    if dataset == "mnist5k":
        return digest_test_set(embedded_reference(get_dataset(dataset)))
    return hashlib.sha256(dataset.encode()).hexdigest()


def make_record(name="alice.zip", accs=None, recipe=OFFICIAL, seed=0, method="d4m") -> dict:
    """A whole, self-consistent score result as `score --json` writes it."""
    import numpy as np

    accs = accs or {"cifar100": [0.40, 0.50, 0.60], "tinyimagenet": [0.20, 0.30, 0.40]}
    classes = {"cifar100": 100, "tinyimagenet": 200, "mnist5k": 10, "cifar10": 10}
    datasets = [DatasetScore(d, 10, 10 * classes[d], "official", method, f"res/{d}.pt",
                             hashlib.sha256(f"{name}{d}".encode()).hexdigest(), [seed + r for r in range(len(a))],
                             a, float(np.mean(a)), float(np.std(a)), 1.5, test_sha256=built_in_test_set(d))
                for d, a in accs.items()]
    result = ScoreResult(name, method, name, hashlib.sha256(name.encode()).hexdigest(),
                         float(np.mean([d.mean for d in datasets])), datasets, recipe.is_official,
                         dataclasses.asdict(recipe), recipe.hash(), seed, "cpu", "unshare", 3.0, [], {"ddchallenge": "1"})
    return json.loads(result.to_json())


def write(path, data, **kw):
    path.write_text(data if isinstance(data, str) else json.dumps(data, **kw))
    return path


def forged(r):
    # 99.90 % everywhere, numbers consistent, but "official budget: yes" on a recipe hash nobody recomputed
    for d in r["datasets"]:
        d["accuracies"], d["mean"], d["std"] = [0.999] * 3, 0.999, 0.0
    r["score"], r["recipe_hash"] = 0.999, "forged"


def unofficial_claims_official(r):
    r["recipe"]["epochs"] = 2
    r["recipe_hash"] = dataclasses.replace(OFFICIAL, epochs=2).hash()  # the right hash, the wrong flag


def setter(field, value, dataset=None):
    def change(r):
        (r["datasets"][dataset] if dataset is not None else r)[field] = value
    return change


def deleter(field, dataset=None):
    def change(r):
        del (r["datasets"][dataset] if dataset is not None else r)[field]
    return change


CRAFTED = [
    ("forged 99.90 %", forged, "recipe_hash must be " + OFFICIAL.hash()),
    ("string score", setter("score", "0.45"), "score must be a finite number from 0 to 1, got '0.45'"),
    ("NaN score", setter("score", float("nan")), "score must be a finite number from 0 to 1, got nan"),
    ("NaN mean", setter("mean", float("nan"), 0), "datasets[0].mean must be a finite number from 0 to 1, got nan"),
    ("inf score", setter("score", float("inf")), "score must be a finite number from 0 to 1, got inf"),
    ("7.5 score", setter("score", 7.5), "score must be a finite number from 0 to 1, got 7.5"),
    ("-5 accuracy", lambda r: r["datasets"][1]["accuracies"].__setitem__(2, -5),
     "datasets[1].accuracies[2] must be a finite number from 0 to 1, got -5"),
    ("true score", setter("score", True), "score must be a finite number from 0 to 1, got True"),
    ("true accuracy", lambda r: r["datasets"][0]["accuracies"].__setitem__(0, True),
     "datasets[0].accuracies[0] must be a finite number"),
    ("missing std", deleter("std", 0), "datasets[0].std is missing"),
    ("missing ipc", deleter("ipc", 1), "datasets[1].ipc is missing"),
    ("true ipc", setter("ipc", True, 0), "datasets[0].ipc must be a whole number from 1 to 10000, got True"),
    ("null mean", setter("mean", None, 0), "datasets[0].mean must be a finite number from 0 to 1, got None"),
    ("string mean", setter("mean", "0.5", 0), "datasets[0].mean must be a finite number from 0 to 1, got '0.5'"),
    ("datasets a string", setter("datasets", "cifar100"), "datasets must be a list of 1 to 12 items"),
    ("datasets empty", setter("datasets", []), "datasets must be a list of 1 to 12 items, got []"),
    ("official_budget a string", setter("official_budget", "false"),
     "official_budget must be true or false (a JSON boolean), got 'false'"),
    ("official flag on another recipe", unofficial_claims_official,
     "official_budget must be false for the recorded recipe settings, got True"),
    ("official recipe flagged unofficial", setter("official_budget", False),
     "official_budget must be true for the recorded recipe settings, got False"),
    ("mean is not the accuracies'", setter("mean", 0.9, 0), "datasets[0].mean must be the mean of the accuracies"),
    ("std is not the accuracies'", setter("std", 0.0, 0), "datasets[0].std must be the population std"),
    ("score is not the means'", setter("score", 0.9), "score must be the mean of the dataset means"),
    ("unknown dataset", setter("dataset", "imagenet", 0), "datasets[0].dataset must be a known dataset"),
    ("a dataset twice", lambda r: r["datasets"].__setitem__(1, copy.deepcopy(r["datasets"][0])),
     "datasets must name each dataset once"),
    ("images do not match ipc", setter("images", 5, 0), "datasets[0].images must be 1000 (100 classes at IPC 10)"),
    ("seeds not seed + r", setter("seeds", [5, 6, 7], 0), "datasets[0].seeds must be seed, seed + 1"),
    ("rounds not the recipe's", lambda r: r["datasets"][0].update(accuracies=[0.5], seeds=[0], mean=0.5, std=0.0),
     "datasets[0].seeds must be a list of 3 to 3 items"),
    ("recipe setting unknown", lambda r: r["recipe"].update(teacher="resnet"), "recipe has unknown setting(s) teacher"),
    ("recipe epochs a string", lambda r: r["recipe"].update(epochs="1000"),
     "recipe.epochs must be a whole number from 0 to 100000, got '1000'"),
    ("recipe missing", deleter("recipe"), "recipe is missing"),
    ("name a number", setter("name", 7), "name must be a non-empty text"),
    ("name empty", setter("name", ""), "name must be a non-empty text"),
    ("method not text", setter("method", ["d4m"]), "method must be a text of at most 64 characters or null"),
    ("seed negative", setter("seed", -1), "seed must be a whole number from 0 to 2147483647, got -1"),
    ("sha256 not hex", setter("sha256", "x" * 64, 0), "datasets[0].sha256 must be a sha256"),
    ("provenance not an object", setter("provenance", ["x"], 0), "datasets[0].provenance must be a JSON object"),
    ("versions not text", lambda r: r.update(versions={"torch": 2}), "versions.torch must be a text"),
    # NaN and infinities where no field check reads a number: a batch's settings, a field of a later version
    ("NaN in settings", lambda r: r.update(settings={"seed": float("nan"), "recipe_hash": OFFICIAL.hash()}),
     "settings.seed is nan; a record holds no NaN or infinity"),
    # the settings the leaderboard reads back as numbers (a record's track): an int no float holds, a text flag
    ("budget past any float", lambda r: r.update(settings={"budget": 10 ** 400, "recipe_hash": OFFICIAL.hash()}),
     "settings.budget must be a finite number from 0 to 604800"),
    ("budget NaN", lambda r: r.update(settings={"budget": float("nan"), "recipe_hash": OFFICIAL.hash()}),
     "settings.budget must be a finite number from 0 to 604800, got nan"),
    ("mixed a text", lambda r: r.update(settings={"budget": 600, "mixed": "yes", "recipe_hash": OFFICIAL.hash()}),
     "settings.mixed must be true or false (a JSON boolean), got 'yes'"),
    # JSON's escapes spell lone surrogates, which no page, CSV or hash encodes: in any text, key or value
    ("lone surrogate in the name", setter("name", "\ud800x"), "name holds a lone surrogate ('\\ud800x')"),
    ("lone surrogate in a key", setter("later", {"\udfff": 1}), "later holds a lone surrogate"),
    ("lone surrogate deep", lambda r: r["datasets"][1].update(provenance={"note": "\udbff"}),
     "datasets[1].provenance.note holds a lone surrogate"),
    ("-inf deep in settings", lambda r: r.update(settings={"rules": {"ipc": [1, float("-inf")]},
                                                             "recipe_hash": OFFICIAL.hash()}),
     "settings.rules.ipc[1] is -inf; a record holds no NaN"),
    ("inf in an unknown field", setter("later", {"x": float("inf")}), "later.x is inf; a record holds no NaN"),
    ("NaN in provenance", lambda r: r["datasets"][0].update(provenance={"strength": float("nan")}),
     "datasets[0].provenance.strength must be a finite number"),
]


@pytest.mark.parametrize("label, change, message", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_each_crafted_record_is_refused_naming_file_and_field(tmp_path, label, change, message):
    data = make_record()
    change(data)
    path = write(tmp_path / "crafted.json", data)
    with pytest.raises(RecordError) as err:
        read_record(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value) and "\n" not in str(err.value)


def test_a_whole_record_reads_back_and_its_unknown_fields_are_allowed(tmp_path):
    data = make_record()
    data["datasets"][0]["provenance"] = {"method": "d4m", "seed": 3}
    assert read_record(write(tmp_path / "r.json", data)) == data
    unofficial = make_record(recipe=dataclasses.replace(OFFICIAL, epochs=2, rounds=2),
                             accs={"mnist5k": [0.5, 0.7]}, seed=4)
    assert read_record(write(tmp_path / "u.json", unofficial))["official_budget"] is False


@pytest.mark.parametrize("content, message", [
    ('{"score": 1.0, "datasets": [', "is not valid JSON"),
    ("[1, 2]", "the record must be a JSON object"),
    ("[" * 100_000 + "]" * 100_000, "is nested deeper than 16 levels"),
    (b"\xff\xfe{}", "is not valid JSON"),
])
def test_files_that_are_not_records_are_refused(tmp_path, content, message):
    path = tmp_path / "x.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(RecordError, match=message):
        read_record(path)


def test_links_special_files_and_huge_files_are_not_read(tmp_path):
    real = write(tmp_path / "real.json", make_record())
    (tmp_path / "link.json").symlink_to(real)
    with pytest.raises(RecordError, match="links are not followed"):
        read_record(tmp_path / "link.json")
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(RecordError, match="is not a plain file"):
        read_record(tmp_path / "fifo.json")  # opened without blocking, never read
    with open(tmp_path / "huge.json", "wb") as fh:
        fh.truncate(17 << 20)  # sparse: no disk used
    with pytest.raises(RecordError, match="is 17825792 bytes, more than the 16777216 allowed"):
        read_record(tmp_path / "huge.json")


def test_a_failed_records_settings_are_checked_as_a_score_records_are(tmp_path):
    """The leaderboard tells a failed record's track by its settings: an
    int no float holds there is refused on reading, never met by float()."""
    failed = {"status": "failed", "name": "a.pt", "submission": "a.pt", "reason": "x", "key": record_key("a.pt"),
              "upload_sha256": None, "settings": {"budget": 10 ** 400}}
    path = write(tmp_path / f"{record_key('a.pt')}.failed.json", failed)
    with pytest.raises(RecordError, match="settings.budget must be a finite number from 0 to 604800"):
        read_record(path)
    failed["settings"] = {"budget": 600, "mixed": True}
    assert read_record(write(path, failed))["settings"]["mixed"] is True


def test_a_record_never_lands_in_the_file_a_link_names(tmp_path):
    """A results folder may be writable by others, who can rename and
    replace its entries between the writer's steps (a review's race: the
    temporary file, and then the private folder holding it, swapped for a
    link to a folder whose `r.json` links to the record key). The record
    still lands under its own name, a plain file; the key is untouched."""
    key = write(tmp_path / "key", "SECRET")
    key.chmod(0o600)
    out, evil = tmp_path / "results", tmp_path / "attacker"
    out.mkdir()
    evil.mkdir()
    (evil / "r.json").symlink_to(key)
    (out / "r.json").symlink_to(key)  # a link planted at the record's own name is replaced, not followed
    with atomic_path(out / "r.json") as tmp:
        private = Path(os.path.realpath(tmp.parent))
        assert private.parent == out and stat.S_IMODE(private.stat().st_mode) == 0o700
        private.rename(out / "moved")  # the race, won by the attacker
        private.symlink_to(evil)
        tmp.write_text("{}")
    assert key.read_text() == "SECRET" and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not (out / "r.json").is_symlink() and (out / "r.json").read_text() == "{}"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((out / "r.json").stat().st_mode) == 0o666 & ~umask  # as any new file
    assert sorted(p.name for p in out.iterdir()) == sorted([private.name, "moved", "r.json"])  # theirs left alone
    with pytest.raises(KeyboardInterrupt), atomic_path(out / "s.json") as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == sorted([private.name, "moved", "r.json"])  # nothing of s.json


def test_mac_covers_every_field_and_needs_the_key(tmp_path):
    signed = sign(make_record(), KEY)
    assert read_record(write(tmp_path / "s.json", signed, indent=2), KEY) == signed  # layout is not signed
    check_mac(signed, None, "s.json")  # without a key nothing is asked
    for change in (lambda r: r.update(name="mallory.zip"), lambda r: r["datasets"][0]["accuracies"].append(0.1),
                   lambda r: r["recipe"].update(rounds=3.0)):
        tampered = copy.deepcopy(signed)
        change(tampered)
        with pytest.raises(RecordError, match="does not match the organiser's record key"):
            check_mac(tampered, KEY, "t.json")
    with pytest.raises(RecordError, match="extra is nan; a record holds no NaN or infinity"):  # where no check looks
        read_record(write(tmp_path / "n.json", {**signed, "extra": float("nan")}), KEY)
    with pytest.raises(RecordError, match="holds a value a signed record cannot"):  # checked in memory: still refused
        check_mac({**signed, "extra": float("nan")}, KEY, "n.json")
    with pytest.raises(RecordError, match="not signed with the organiser's record key"):
        read_record(write(tmp_path / "u.json", make_record()), KEY)
    with pytest.raises(RecordError, match="does not match"):
        read_record(tmp_path / "s.json", b"another-key-of-sufficient-length")


def test_record_key_file_is_checked_and_kept_outside_the_results(tmp_path):
    (tmp_path / "results").mkdir()
    good = tmp_path / "key"
    good.write_bytes(KEY + b"\n")
    assert load_key(good, [tmp_path / "results"]) == KEY
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    inside = tmp_path / "results" / "key"
    inside.write_bytes(KEY)
    for path, message in ((short, "holds 3 bytes; a key is 16 to 4096 bytes"), (tmp_path / "none", "must be a file"),
                          (inside, "lies inside the results folder")):
        with pytest.raises(UsageError, match=message):
            load_key(path, [tmp_path / "results"])


# --- the batch's rerun reads its records through the schema -------------------------------------------------------


def score_once(run_cli, upload, out, *extra):
    r = run_cli("score", upload, *FAST, "--output", out, *extra)
    assert r.exit_code == 0, r.output
    path = out / f"{record_key(upload.name)}.json"
    return path, json.loads(path.read_text())


def plant(path, data, change):
    data = copy.deepcopy(data)
    change(data)
    path.write_text(json.dumps(data))


def test_planted_records_with_the_uploads_true_sha256_are_set_aside_and_rescored(run_cli, official_file, tmp_path):
    out, broken = tmp_path / "results", tmp_path / "broken.pt"
    broken.write_bytes(b"not a tensor")
    r = run_cli("score", official_file, broken, *FAST, "--output", out)
    assert r.exit_code == 1 and " scored " in r.stdout and " failed " in r.stdout, r.output
    record = out / f"{record_key(official_file.name)}.json"
    data = json.loads(record.read_text())
    assert data["upload_sha256"] == hashlib.sha256(official_file.read_bytes()).hexdigest()
    # A string score: the rerun sets it aside, scores again, and its table shows numbers only.
    plant(record, data, setter("score", "99.90"))
    r = run_cli("score", official_file, broken, *FAST, "--output", out)
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output  # the failure was recorded before
    assert f"warning: {record}: score must be a finite number from 0 to 1, got '99.90'; set aside as " \
           f"{record.name}.rejected-1, scoring mnist5k.pt again" in r.stderr
    rows = dict(line.split(None, 2)[:2] for line in r.stdout.splitlines()[2:4])
    assert rows == {"mnist5k.pt": "scored", "broken.pt": "done"}, r.stdout  # "done before": the failure is trusted
    assert "99.9" not in r.stdout and json.loads(record.read_text())["score"] == data["score"]
    assert json.loads((out / f"{record.name}.rejected-1").read_text())["score"] == "99.90"  # kept as it was


def test_a_record_names_its_test_set_and_a_new_test_set_scores_again(run_cli, official_file, tmp_path, monkeypatch):
    """The data root's test set replaced between two runs (a re-prepared
    dataset, another DDCHALLENGE_DATA): the records of the first are not
    reused by the second, and the leaderboard never ranks the two together."""
    spec = get_dataset("mnist5k")
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv(DATA_ENV, str(root))
    first, second = tmp_path / "first", tmp_path / "second"
    _, before = score_once(run_cli, official_file, first)
    assert before["datasets"][0]["test_sha256"] == digest_test_set(embedded_reference(spec))
    shutil.copytree(first, second)
    r = run_cli("score", official_file, *FAST, "--output", second)
    assert r.exit_code == 0 and "already scored with the same bytes and settings" in r.stderr, r.output  # reused

    moved = embedded_reference(spec)
    moved["labels_val"] = (moved["labels_val"] + 1) % 10  # another test set: every label moved by one
    torch.save(moved, root / spec.reference_file)
    r = run_cli("score", official_file, *FAST, "--output", second)
    assert r.exit_code == 0 and "already scored" not in r.stderr, r.output
    after = json.loads((second / f"{record_key(official_file.name)}.json").read_text())
    assert after["datasets"][0]["test_sha256"] == digest_test_set(moved) != before["datasets"][0]["test_sha256"]
    assert after["score"] != before["score"]
    board = run_cli("leaderboard", first, second)
    assert board.exit_code == 2 and "scored on different test sets (mnist5k: 2 (" in board.stderr, board.output
    assert len(board.stderr.strip().splitlines()) == 1 and "Traceback" not in board.output


def test_a_record_whose_test_set_cannot_be_read_is_scored_again_not_the_batch_stopped(tmp_path, caplog):
    """A review: an unsigned record edited to name a validation view, read
    back under --ref (which a view's test set refuses), stopped the whole
    batch with that refusal. It is one record that cannot show its test set."""
    from ddchallenge.batch import BatchSettings, _same_tests

    record = make_record("a.pt", {"mnist5k": [0.5, 0.5, 0.5]})
    assert _same_tests(record, BatchSettings(), None, {})
    record["datasets"][0]["dataset"] = "mnist5k-val"
    assert not _same_tests(record, BatchSettings(), str(tmp_path), {})
    assert "a.pt: its test set cannot be read now (--ref names a folder of test sets" in caplog.text


def test_a_rerun_under_a_mistaken_option_keeps_the_earlier_score(run_cli, official_file, tmp_path):
    """A new user's review: `--ipc 3` by mistake on a rerun replaced a good
    record with a failed one. Scoring that one upload, the mistake is the
    command line's: one line, exit 2, the record untouched. In a batch the
    rules are the organiser's: the failure is recorded and the earlier
    score kept as `<record>.superseded-1`, which the leaderboard never
    reads and renaming it back restores."""
    out = tmp_path / "results"
    assert run_cli("score", official_file, *FAST, "--output", out).exit_code == 0
    record = out / f"{record_key(official_file.name)}.json"
    made = record.read_bytes()
    r = run_cli("score", official_file, *FAST, "--output", out, "--ipc", 3)
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        f"error: {official_file} holds 100 mnist5k images; the rules allow IPC 3, i.e. 30 images of 10 classes"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [record.name]
    assert record.read_bytes() == made
    other = tmp_path / "other" / official_file.name  # a folder upload holding the same file
    other.parent.mkdir()
    other.write_bytes(official_file.read_bytes())
    r = run_cli("score", official_file, tmp_path / "other", *FAST, "--output", out, "--ipc", 3)
    assert r.exit_code == 1 and "the rules allow IPC 3" in r.stderr, r.output
    assert f"kept the earlier record {record.name} (made from other bytes or settings) as {record.name}.superseded-1" \
        in r.stderr
    assert (out / f"{record.name}.superseded-1").read_bytes() == made and not record.exists()
    assert (out / record.name.replace(".json", ".failed.json")).exists()
    # scored again under the first settings: the failure is superseded in turn, and nothing is ever deleted
    assert run_cli("score", official_file, *FAST, "--output", out).exit_code == 0
    assert sorted(p.name.split(".", 1)[1] for p in out.iterdir()
                  if not p.name.startswith(".") and p.name.startswith(record.name.split(".")[0])) == \
        ["failed.json.superseded-1", "json", "json.superseded-1"]


RERUN = [forged, setter("score", "0.999"), setter("score", float("nan")), setter("score", float("inf")), setter("score", True),
         setter("official_budget", "true"), deleter("std", 0), deleter("ipc", 0), setter("datasets", "mnist5k"),
         setter("name", "other.pt"), setter("seed", 3), lambda r: r.update(status="failed")]


def test_every_crafted_record_on_rerun_is_set_aside_and_the_upload_is_scored_again(official_file, tmp_path, caplog):
    """The rerun's reading of records (`triage`), without the scoring that follows: each variant is set aside."""
    from ddchallenge.batch import BatchSettings, Pending, triage
    from ddchallenge.protocol import UploadRules
    from ddchallenge.score import upload_name

    settings = BatchSettings(UploadRules(("mnist5k",)), OFFICIAL.with_overrides(epochs=0, rounds=1))
    out = tmp_path / "results"
    out.mkdir()
    name = upload_name(official_file)
    record = out / f"{record_key(name)}.json"
    data = make_record(name, {"mnist5k": [0.5]}, settings.recipe, method=None)
    data.update(key=record_key(name), upload_sha256=hashlib.sha256(official_file.read_bytes()).hexdigest(),
                settings=settings.fingerprint())
    record.write_text(json.dumps(data))
    assert triage(official_file, name, out, settings).status == "done before"  # the whole record is trusted
    for n, change in enumerate(RERUN, start=1):
        plant(record, data, change)
        assert isinstance(triage(official_file, name, out, settings), Pending)
        assert (out / f"{record.name}.rejected-{n}").exists() and not record.exists()
        assert caplog.records[-1].getMessage().endswith(f"set aside as {record.name}.rejected-{n}, scoring {name} again")
    # A failed record planted for an upload that scores is refused the same way.
    failed = out / f"{record_key(name)}.failed.json"
    failed.write_text(json.dumps({"status": "failed", "name": name, "key": record_key(name), "submission": name,
                                  "reason": 7, "upload_sha256": data["upload_sha256"], "settings": data["settings"]}))
    assert isinstance(triage(official_file, name, out, settings), Pending)
    assert "reason must be a text" in caplog.records[-1].getMessage() and (out / f"{failed.name}.rejected-1").exists()



def test_a_rerun_under_another_key_or_none_stops_before_it_sets_aside_or_writes(run_cli, official_file, tmp_path):
    """An organiser's review: a rerun given another key file (or a key made
    afresh with the README's command) set every signed record aside and
    scored the whole folder again; one without the key wrote unsigned
    records beside signed ones, which `leaderboard --record-key` refuses.
    Both stop before anything is read, set aside or written; reusing
    records needs no key."""
    from ddchallenge.batch import BatchSettings
    from ddchallenge.protocol import UploadRules
    from ddchallenge.score import upload_name

    settings = BatchSettings(UploadRules(("mnist5k",)), OFFICIAL.with_overrides(epochs=0, rounds=1))
    out, name = tmp_path / "results", upload_name(official_file)
    out.mkdir()
    data = make_record(name, {"mnist5k": [0.5]}, settings.recipe, method=None)
    data.update(key=record_key(name), upload_sha256=hashlib.sha256(official_file.read_bytes()).hexdigest(),
                settings=settings.fingerprint())
    write(out / f"{record_key(name)}.json", sign(data, KEY))
    (tmp_path / "key").write_bytes(KEY)
    (tmp_path / "other-key").write_bytes(b"a key made afresh by mistake 0123")
    second = tmp_path / "second.pt"
    second.write_bytes(official_file.read_bytes())
    listing = sorted(p.name for p in out.iterdir())
    r = run_cli("score", official_file, second, *FAST, "--output", out, "--record-key", tmp_path / "other-key")
    file = f"{record_key(name)}.json"
    assert r.exit_code == 2 and r.stderr == (
        f"error: the 1 signed record(s) in {out} name another key than this --record-key ({file}: key id "
        f"{key_id(KEY)}): pass the key they were signed with (under this one every record would be set aside and its "
        "upload scored again), move away any that are not the organiser's, or give this batch a new --output\n"), \
        r.output
    r = run_cli("score", official_file, second, *FAST, "--output", out)
    assert r.exit_code == 2 and r.stderr == (
        f"error: {out} holds 1 record(s) signed with a record key ({file}), and this batch has none: the 1 upload(s) "
        "it would score would be recorded unsigned, which `leaderboard --record-key` refuses; pass --record-key FILE "
        "(or set $DDCHALLENGE_RECORD_KEY), or move away any that are not the organiser's\n"), r.output
    assert sorted(p.name for p in out.iterdir()) == listing  # nothing set aside, nothing written
    for key in ((), ("--record-key", tmp_path / "key")):  # reused: no key needed, and the right one works
        r = run_cli("score", official_file, *FAST, "--output", out, *key)
        assert r.exit_code == 0 and "already scored with the same bytes and settings" in r.stderr, r.output
    assert sorted(p.name for p in out.iterdir()) == listing
    # A record planted under another key, beside one signed with this key, stops nothing: it is set aside alone.
    from ddchallenge.batch import check_signing

    write(out / "planted.json", sign(make_record("planted.pt", {"mnist5k": [0.9]}, settings.recipe), b"x" * 16))
    assert check_signing(out, KEY) == [file, "planted.json"]

def test_batch_table_shows_numbers_only():
    from ddchallenge.batch import BatchOutcome
    from ddchallenge.report import batch_table

    rows = batch_table([BatchOutcome(f"u{i}", "scored", s, None, None)
                        for i, s in enumerate(["0.99", float("nan"), float("inf"), True, None, 0.5])])
    assert [line.split()[2] for line in rows.splitlines()[2:]] == ["-", "-", "-", "-", "-", "50.00"]


def test_with_a_key_only_signed_records_are_trusted(run_cli, official_file, tmp_path):
    out, key = tmp_path / "results", tmp_path / "organiser.key"
    key.write_bytes(KEY)
    record, data = score_once(run_cli, official_file, out, "--record-key", key)
    assert len(data["mac"]) == 64
    r = run_cli("score", official_file, *FAST, "--output", out, "--record-key", key)
    assert r.exit_code == 0 and "already scored" in r.stderr
    # A forgery whose numbers all agree passes the schema; only the MAC tells it apart.
    def consistent_forgery(r):
        d = r["datasets"][0]
        d["accuracies"], d["mean"], d["std"], r["score"] = [0.999], 0.999, 0.0, 0.999
    plant(record, data, consistent_forgery)
    r = run_cli("score", official_file, *FAST, "--output", out, "--record-key", key)
    assert r.exit_code == 0 and "does not match the organiser's record key" in r.stderr, r.output
    assert f"set aside as {record.name}.rejected-1" in r.stderr and json.loads(record.read_text())["score"] == data["score"]
    # The leaderboard with the key refuses unsigned records (and the set-aside one is no record at all).
    (tmp_path / "copied").mkdir()  # under the file name its batch gave it (any other is refused, signed or not)
    unsigned = write(tmp_path / "copied" / record.name, {k: v for k, v in data.items() if k != "mac"})
    board = run_cli("leaderboard", out, unsigned, "--record-key", key, "--include-unofficial")
    assert board.exit_code == 0 and board.stderr == f"refused: {unsigned}: not signed with the organiser's record " \
        "key (no mac field); records made without --record-key, or planted\n"
    assert "1 not the official budget (ranked apart); 0 failed; 1 refused" in board.stdout
    # Without the key the unsigned copy is the same upload's record: listed once.
    board = run_cli("leaderboard", out, unsigned, "--include-unofficial")
    assert board.exit_code == 0 and "0 refused; 1 given twice, listed once" in board.stdout
    env = run_cli("score", official_file, *FAST, "--output", out, "--record-key", out / "k")
    assert env.exit_code == 2 and "--record-key" in env.stderr


def test_two_batches_cannot_write_one_results_folder(run_cli, official_file, tmp_path):
    out = tmp_path / "results"
    with ResultsLock(out):
        r = run_cli("score", official_file, *FAST, "--output", out)
        assert r.exit_code == 1 and r.stderr.count("\n") == 1
        assert f"error: another batch (pid {os.getpid()} on " in r.stderr and "is writing" in r.stderr \
            and "give this one another --output" in r.stderr
        with pytest.raises(ResultsBusyError):
            ResultsLock(out)
    assert not out.exists()  # the lock's own folder, empty, is gone with it
    score_once(run_cli, official_file, out)
    assert sorted(p.name for p in out.iterdir()) == [f"{record_key('mnist5k.pt')}.json"]  # no lock left behind
    (out / ".lock").symlink_to(tmp_path / "elsewhere")
    r = run_cli("score", official_file, *FAST, "--output", out)
    assert r.exit_code == 1 and "cannot lock the results folder" in r.stderr and not (tmp_path / "elsewhere").exists()


def test_a_record_saved_with_a_byte_order_mark_reads_as_it_was(tmp_path):
    plain = write(tmp_path / "plain.json", make_record())
    marked = tmp_path / "marked.json"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())  # what some editors save
    assert read_record(marked) == read_record(plain)
