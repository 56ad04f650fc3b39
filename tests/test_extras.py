"""Extra measures beyond the challenge score (ddchallenge.extras): their rows
in a result, read back as untrusted input; their own recipe hashes."""
import csv
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest

from ddchallenge.errors import RecordError
from ddchallenge.extras import ExtraScore, paired_standard_error, recipe_hash, standard_error
from ddchallenge.protocol import OFFICIAL
from ddchallenge.records import read_record
from ddchallenge.score import ScoreResult
from tests.test_records import KEY, make_record, write

SET = [0.40, 0.50, 0.60]  # make_record's cifar100 accuracies


def with_extras(*rows: ExtraScore) -> dict:
    record = make_record()
    record["extras"] = [json.loads(json.dumps(dataclasses.asdict(r))) for r in rows]
    return record


def arch_row(accs=(0.3, 0.35, 0.4), name="vgg11", recipe=None) -> ExtraScore:
    return ExtraScore.make(f"arch:{name}", "cifar100", recipe or dataclasses.asdict(OFFICIAL), [0, 1, 2], list(accs),
                           12.0)


def baseline_row(accs=(0.30, 0.32, 0.37), full=None) -> ExtraScore:
    mean = sum(accs) / 3
    derived = dict(ior=sum(SET) / 3 - mean, ior_se=standard_error(SET, list(accs)), full=full,
                   hlr=None if full is None else full - sum(SET) / 3,
                   ior_se_paired=paired_standard_error(SET, list(accs)))
    return ExtraScore.make("baseline:random", "cifar100", {**dataclasses.asdict(OFFICIAL), "baseline_seed": 0,
                                                           "ipc": 10}, [0, 1, 2], list(accs), 0.0, **derived)


def test_extra_hashes_are_their_own_and_the_challenge_hash_is_unchanged():
    assert OFFICIAL.hash() == "cf7db852c78adc7c"  # the challenge recipe's hash before extras existed
    recipe = dataclasses.asdict(OFFICIAL)
    hashes = {recipe_hash(m, recipe) for m in ("arch:convnet", "arch:vgg11", "baseline:random", "labels:soft")}
    assert len(hashes) == 4 and OFFICIAL.hash() not in hashes
    # eval_batch_size never changes a result, as for the challenge hash; any other setting does
    assert recipe_hash("arch:mlp", {**recipe, "eval_batch_size": 7}) == recipe_hash("arch:mlp", recipe)
    assert recipe_hash("arch:mlp", {**recipe, "epochs": 7}) != recipe_hash("arch:mlp", recipe)


def test_ior_standard_error_takes_the_rounds_as_the_pairs_they_are(tmp_path):
    """Round i of the set and of its baseline share seed i (init, batches,
    DSA), so IOR's standard error is that of the per-round differences: 0
    for a set against its own subset, where the independent-rounds formula
    reports the rounds' spread. The table shows the paired one; a record
    made before it existed still reads back, its s.e. marked unpaired."""
    from ddchallenge.report import extras_table

    assert paired_standard_error([0.2, 0.3, 0.4], [0.30, 0.32, 0.37]) == pytest.approx(0.0014333 ** 0.5, rel=1e-4)
    assert paired_standard_error(SET, SET) == 0.0 and standard_error(SET, SET) == pytest.approx(0.0816, abs=1e-4)
    assert paired_standard_error([0.5], [0.4]) is None and paired_standard_error(SET, SET[:2]) is None
    row = baseline_row(SET)  # the set's own rounds as its baseline: IOR 0 in every round
    assert (row.ior, row.ior_se_paired) == (0.0, 0.0)
    table = extras_table(ScoreResult.from_dict(read_record(write(tmp_path / "r.json", with_extras(row)))))
    assert "| +0.00 ± 0.00 " in table and "IOR % ± s.e." in table and "as pairs" in table
    old = with_extras(row)
    del old["extras"][0]["ior_se_paired"]
    table = extras_table(ScoreResult.from_dict(read_record(write(tmp_path / "old.json", old))))
    assert "| +0.00 ± 8.16 (unpaired) " in table


def test_a_record_with_extras_reads_back_and_an_older_one_without_them_too(tmp_path):
    record = with_extras(arch_row(), baseline_row(full=0.9))
    back = ScoreResult.from_dict(read_record(write(tmp_path / "r.json", record)))
    assert [e.measure for e in back.extras] == ["arch:vgg11", "baseline:random"]
    assert back.extras[1].ior == pytest.approx(0.5 - 0.33) and back.extras[1].hlr == pytest.approx(0.4)
    assert json.loads(back.to_json()) == record
    old = make_record()
    assert "extras" in old
    del old["extras"]
    assert ScoreResult.from_dict(read_record(write(tmp_path / "old.json", old))).extras == []


def _set(field, value, row=0):
    def change(r):
        r["extras"][row][field] = value
    return change


CRAFTED = [
    ("unknown measure", _set("measure", "arch:gpt5"), "extras[0].measure must be one of"),
    ("measure not text", _set("measure", ["arch:mlp"]), "extras[0].measure must be a text"),
    ("dataset not scored", _set("dataset", "mnist5k"), "extras[0].dataset must be a dataset of this record"),
    ("unknown field", _set("bonus", 1), "extras[0] has unknown field(s) bonus"),
    ("stale hash", _set("recipe_hash", "0" * 16), "extras[0].recipe_hash must be "),
    ("challenge hash", _set("recipe_hash", OFFICIAL.hash()), "extras[0].recipe_hash must be "),
    ("missing mean", lambda r: r["extras"][0].pop("mean"), "extras[0].mean is missing"),
    ("mean not of accs", _set("mean", 0.9), "extras[0].mean must be the mean of the accuracies"),
    ("NaN accuracy", lambda r: r["extras"][0]["accuracies"].__setitem__(1, float("nan")),
     "extras[0].accuracies[1] must be a finite number from 0 to 1, got nan"),
    ("too few accuracies", lambda r: r["extras"][0]["accuracies"].pop(), "extras[0].accuracies must be a list of 3"),
    ("shifted seeds", _set("seeds", [5, 6, 7]), "extras[0].seeds must be seed, seed + 1"),
    ("ior on an architecture", _set("ior", 0.1), "extras[0].ior must be null for arch:vgg11"),
    ("recipe not object", _set("recipe", "official"), "extras[0].recipe must be a JSON object"),
    ("recipe missing epochs", lambda r: r["extras"][0]["recipe"].pop("epochs"), "extras[0].recipe.epochs is missing"),
    ("recipe nested setting", lambda r: r["extras"][0]["recipe"].__setitem__("x", {"a": 1}),
     "extras[0].recipe.x must be a text of at most 200 characters"),
    ("recipe too many settings", lambda r: r["extras"][0]["recipe"].update({f"k{i}": 0 for i in range(33)}),
     "extras[0].recipe must hold at most 32 settings of its own"),
    ("forged ior", _set("ior", 0.5, row=1), "extras[1].ior must be "),
    ("ior infinite", _set("ior", float("inf"), row=1), "extras[1].ior must be a finite number"),
    ("forged ior_se", _set("ior_se", 0.0, row=1), "extras[1].ior_se must be "),
    ("forged paired se", _set("ior_se_paired", 0.0, row=1), "extras[1].ior_se_paired must be "),
    ("paired se on an architecture", _set("ior_se_paired", 0.1), "extras[0].ior_se_paired must be null for arch"),
    ("hlr without full", _set("full", None, row=1), "extras[1].hlr must be null"),
    ("forged hlr", _set("hlr", 0.01, row=1), "extras[1].hlr must be "),
    ("full above 1", _set("full", 1.5, row=1), "extras[1].full must be a finite number from 0 to 1"),
    ("extras not a list", lambda r: r.__setitem__("extras", {"a": 1}), "extras must be a list of 0 to 256"),
    ("too many extras", lambda r: r.__setitem__("extras", r["extras"] * 129), "extras must be a list of 0 to 256"),
    ("row not object", lambda r: r["extras"].__setitem__(0, 3), "extras[0] must be a JSON object"),
    # each row is the challenge's recipe as run plus the measure's own settings, once per measure and dataset
    ("other epochs than the score", lambda r: r["extras"][0]["recipe"].__setitem__("epochs", 10),
     "extras[0].recipe must be the record's recipe"),
    ("fewer rounds than the score", lambda r: (r["extras"][1]["recipe"].__setitem__("rounds", 2),
                                                r["extras"][1].update(seeds=[0, 1], accuracies=[0.3, 0.32])),
     "extras[1].recipe must be the record's recipe"),
    ("a row twice", lambda r: r["extras"].append(dict(r["extras"][0])),
     "extras[2].measure must appear once per dataset (cifar100 has two arch:vgg11 rows)"),
    ("architecture with settings", lambda r: r["extras"][0]["recipe"].__setitem__("ipc", 10),
     "extras[0].recipe of arch:vgg11 must hold the recipe's settings only, got ipc"),
    ("baseline without its seed", lambda r: r["extras"][1]["recipe"].pop("baseline_seed"),
     "extras[1].recipe of baseline:random must hold the recipe's settings and baseline_seed, ipc only, got ipc"),
    ("baseline of another IPC", lambda r: r["extras"][1]["recipe"].__setitem__("ipc", 20),
     "extras[1].recipe.ipc must be 10, the IPC of its dataset, got 20"),
    # a JSON integer has no size limit; no float holds 10**400 (it must be refused, never crash a conversion)
    ("huge integer mean", _set("mean", 10**400), "extras[0].mean must be a finite number from 0 to 1, got 1000"),
    ("huge integer ior", _set("ior", -10**400, row=1), "extras[1].ior must be a finite number from -1 to 1"),
    ("huge integer setting", lambda r: r["extras"][1]["recipe"].__setitem__("note", 10**400),
     "extras[1].recipe.note must be a finite number"),
    ("baseline seed not whole", lambda r: r["extras"][1]["recipe"].__setitem__("baseline_seed", 1.5),
     "extras[1].recipe.baseline_seed must be a whole number"),
]


@pytest.mark.parametrize("label,change,message", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_each_malformed_extra_makes_the_record_invalid_naming_the_row_and_field(tmp_path, label, change, message):
    record = with_extras(arch_row(), baseline_row(full=0.9))
    change(record)
    with pytest.raises(RecordError) as err:
        read_record(write(tmp_path / "r.json", record))
    assert message in str(err.value) and "r.json" in str(err.value)


def label_row(mode="teacher", **change) -> ExtraScore:
    from ddchallenge.extras import LOSS

    own = {"labels": mode, "temperature": 4.0, "loss": LOSS}
    if mode == "teacher":
        own.update(teacher_dataset="cifar100", teacher_recipe_hash="0123456789abcdef", teacher_epochs=50,
                   teacher_seed=0, teacher_weights_sha256="ab" * 32)
    own.update(change)
    own = {k: v for k, v in own.items() if v is not None}
    return ExtraScore.make(f"labels:{mode}", "cifar100", {**dataclasses.asdict(OFFICIAL), **own}, [0, 1, 2],
                           [0.4, 0.45, 0.5], 3.0)


@pytest.mark.parametrize("row, message", [
    (label_row(teacher_dataset="mnist5k"), "recipe.teacher_dataset must be 'cifar100', got 'mnist5k'"),
    (label_row(loss="cross entropy"), "recipe.loss must be 'kl(target"),
    (label_row(labels="soft"), "recipe.labels must be 'teacher', got 'soft'"),
    (label_row(temperature=0.0), "recipe.temperature must be a finite number from 0.1 to 100"),
    (label_row(teacher_seed=None), "of labels:teacher must hold the recipe's settings and labels, loss, teacher_"),
    (label_row("soft", teacher_seed=0), "of labels:soft must hold the recipe's settings and labels, loss, "
                                        "temperature only, got labels, loss, teacher_seed, temperature"),
    (label_row(teacher_recipe_hash=123456789), "recipe.teacher_recipe_hash must be a text"),
    (label_row(teacher_recipe_hash="XYZ"), "recipe.teacher_recipe_hash must be a recipe hash"),
    (label_row(teacher_weights_sha256="0"), "recipe.teacher_weights_sha256 must be a sha256"),
    (label_row(teacher_epochs=-1), "recipe.teacher_epochs must be a whole number"),
])
def test_a_label_row_holds_exactly_the_settings_it_is_written_with(tmp_path, row, message):
    good = with_extras(label_row(), label_row("soft"))
    assert [e["measure"] for e in read_record(write(tmp_path / "good.json", good))["extras"]] == \
        ["labels:teacher", "labels:soft"]
    with pytest.raises(RecordError) as err:
        read_record(write(tmp_path / "r.json", with_extras(row)))
    assert message in str(err.value), err.value


# ---------------------------------------------------------------- score --arch / --baseline through the CLI

FAST = ("--dataset", "mnist5k", "--epochs", 0, "--quiet", "--no-sandbox")  # the sandbox is tested elsewhere


@pytest.fixture
def small(tmp_path, official_file):
    """Kept small, since every round trains and tests: an IPC-1 mnist5k file
    and a reference test set of the first 50 real test images (--ref)."""
    import torch

    from ddchallenge.data import load_reference
    from ddchallenge.protocol import get_dataset

    ref = tmp_path / "ref"
    ref.mkdir()
    full = load_reference(get_dataset("mnist5k"))
    torch.save({"images_val": full["images_val"][:50].clone(), "labels_val": full["labels_val"][:50].clone()},
               ref / "mnist5k_test.pt")
    upload = tmp_path / "one" / "mnist5k.pt"
    upload.parent.mkdir()
    torch.save(torch.load(official_file)[::10].clone(), upload)
    return upload, ref


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    monkeypatch.setenv("DDCHALLENGE_DATA", str(root))
    return root


def test_arch_convnet_gives_the_challenge_accuracies_and_other_archs_their_own_rows(run_cli, small, tmp_path):
    upload, ref = small
    r = run_cli("score", upload, *FAST, "--ref", ref, "--rounds", 1, "--arch", "convnet", "--arch", "MLP", "--json",
                tmp_path / "r.json", "--output", tmp_path / "out")
    assert r.exit_code == 0, r.output
    record = read_record(tmp_path / "r.json")
    (challenge,) = record["datasets"]
    rows = {e["measure"]: e for e in record["extras"]}
    assert list(rows) == ["arch:convnet", "arch:mlp"]
    # the challenge's own network is not trained twice: its row is the challenge's rounds, with no seconds of its own
    assert rows["arch:convnet"]["accuracies"] == challenge["accuracies"] and rows["arch:convnet"]["seconds"] == 0
    assert rows["arch:mlp"]["seconds"] > 0
    assert rows["arch:convnet"]["recipe_hash"] != record["recipe_hash"] != rows["arch:mlp"]["recipe_hash"]
    # printed after the challenge table, with each dataset's mean over the architectures
    out = r.stdout
    assert out.index("accuracy %") < out.index("extra measures") < out.index("arch:mlp")
    pool = (rows["arch:convnet"]["mean"] + rows["arch:mlp"]["mean"]) / 2
    assert f"mnist5k: mean over 2 architectures {100 * pool:.2f} %" in out
    assert (tmp_path / "out").is_dir() and len(list((tmp_path / "out").glob("*.json"))) == 1


def test_unknown_architecture_is_one_line_and_records_nothing(run_cli, official_file, tmp_path):
    r = run_cli("score", official_file, *FAST, "--arch", "vit", "--output", tmp_path / "out")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["error: --arch: unknown architecture 'vit'; the pool: convnet, convnetbn, "
                                             "convnetd4, mlp, lenet, alexnet, vgg11, resnet18, or 'pool' for all of "
                                             "them"]
    assert not (tmp_path / "out").exists()


BAD_OPTIONS = [
    (("--baseline-seed", 3), "error: --baseline-seed is the seed of the --baseline subset: pass --baseline "
                              "random|herding with it"),
    (("--baseline", "kmeans"), "error: Invalid value for '--baseline': 'kmeans' is not one of 'random', 'herding'."),
    (("--baseline", "random", "--baseline-seed", -1), "error: Invalid value for '--baseline-seed'"),
    (("--arch", ""), "error: --arch: unknown architecture ''"),
    (("--arch", "pool", "--arch", "resnet"), "error: --arch: unknown architecture 'resnet'"),
]


@pytest.mark.parametrize("options,line", BAD_OPTIONS, ids=[" ".join(map(str, o)) for o, _ in BAD_OPTIONS])
def test_a_bad_extra_option_is_one_line_exit_2_and_records_nothing(run_cli, official_file, tmp_path, options, line):
    r = run_cli("score", official_file, *FAST, *options, "--output", tmp_path / "out")
    assert r.exit_code == 2 and r.stdout == ""
    (got,) = r.stderr.strip().splitlines()
    assert got.startswith(line)
    assert not (tmp_path / "out").exists()


def test_a_random_set_against_its_own_random_baseline_has_ior_zero_and_the_cache_is_reused(run_cli, tmp_path,
                                                                                          data_root, small,
                                                                                          monkeypatch):
    made = run_cli("generate", "--dataset", "mnist5k", "--method", "random", "--ipc", 1, "--seed", 3, "-o",
                   tmp_path / "set.h5", "--quiet")
    assert made.exit_code == 0, made.output
    args = ("score", tmp_path / "set.h5", *FAST, "--ref", small[1], "--rounds", 1, "--baseline", "random",
            "--baseline-seed", 3)
    r = run_cli(*args, "--json", tmp_path / "a.json", "--output", tmp_path / "a")
    assert r.exit_code == 0, r.output
    record = read_record(tmp_path / "a.json")
    (row,) = record["extras"]
    assert row["measure"] == "baseline:random" and row["ior"] == 0.0  # exactly: the same images, seeds and loop
    assert row["accuracies"] == record["datasets"][0]["accuracies"] and row["hlr"] is None and row["full"] is None
    assert row["recipe"]["baseline_seed"] == 3 and row["recipe"]["ipc"] == 1 and row["seconds"] > 0
    assert row["ior_se"] is None  # one round: no variance to estimate
    (cached,) = (data_root / "extras").glob("mnist5k-ipc1-random-*.json")
    # a second run reads the cache (0 s for the baseline); a full-data accuracy cached for the recipe adds HLR
    from ddchallenge.data import load_reference
    from ddchallenge.data.reference import digest_test_set
    from ddchallenge.measures import full_path, write_cache
    from ddchallenge.protocol import get_dataset

    spec, recipe = get_dataset("mnist5k"), dataclasses.replace(OFFICIAL, epochs=0, rounds=1)
    path, key = full_path(spec, recipe, 0, data_root, digest_test_set(load_reference(spec, small[1])))
    write_cache(path, key, [0.91], 1.0, made_on="cpu")
    # a full-data accuracy on another test set (the data root's, not --ref's) is never HLR's reference
    other, other_key = full_path(spec, recipe, 0, data_root, digest_test_set(load_reference(spec)))
    write_cache(other, other_key, [0.5], 1.0, made_on="cpu")
    r = run_cli(*args, "--json", tmp_path / "b.json", "--output", tmp_path / "b")
    (row2,) = read_record(tmp_path / "b.json")["extras"]
    assert row2["seconds"] == 0.0 and row2["accuracies"] == row["accuracies"]
    assert row2["full"] == pytest.approx(0.91) and row2["hlr"] == pytest.approx(0.91 - row["mean"])
    assert "baseline:random" in r.stdout and "+0.00" in r.stdout
    # the first results folder, run again: its record is reused (nothing trains) with the HLR the cache gives now
    # (a review found the HLR of when the record was made kept); with the entry gone, the HLR is kept, not cleared
    from ddchallenge.batch import record_key

    kept = tmp_path / "a" / f"{record_key('set.h5')}.json"
    for step in ("cached", "entry removed"):
        again = run_cli(*args, "--json", tmp_path / "again.json", "--output", tmp_path / "a")
        assert again.exit_code == 0, again.output
        for record_now in (read_record(kept), read_record(tmp_path / "again.json")):
            (row_now,) = record_now["extras"]
            assert record_now["seconds"] == record["seconds"] and row_now["accuracies"] == row["accuracies"], step
            assert row_now["full"] == pytest.approx(0.91) and row_now["hlr"] == pytest.approx(0.91 - row["mean"])
        path.unlink(missing_ok=True)
    # on a CPU the thread count changes the backward pass's float sums: another count is another entry, so the
    # set still has IOR 0 exactly against its own subset (a session-14 benchmark at 1 thread read a 2-thread entry)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1 if before > 1 else 2)
    try:
        run_cli(*args, "--json", tmp_path / "threads.json", "--output", tmp_path / "threads")
    finally:
        torch.set_num_threads(before)
    (row3,) = read_record(tmp_path / "threads.json")["extras"]
    assert row3["ior"] == 0.0 and row3["seconds"] > 0
    assert len(list((data_root / "extras").glob("mnist5k-ipc1-random-*.json"))) == 2
    # a data root whose cache cannot be written (extras/ is a file): a warning, and the upload still scored
    elsewhere = tmp_path / "data2"
    elsewhere.mkdir()
    (elsewhere / "extras").write_text("not a folder")
    monkeypatch.setenv("DDCHALLENGE_DATA", str(elsewhere))
    r = run_cli(*args, "--output", tmp_path / "c")
    assert r.exit_code == 0, r.output
    assert "warning: baseline not cached in" in r.stderr and "+0.00" in r.stdout
    assert len(list((tmp_path / "c").glob("*.json"))) == 1 and not list((tmp_path / "c").glob("*.failed.json"))


def test_a_reused_records_hlr_follows_the_cache_keeps_its_signature_and_rescores_on_unreadable_test_sets(
        run_cli, tmp_path, data_root, small, monkeypatch, caplog):
    """Signed records: a rerun without the key never rewrites one (it would
    strip the MAC); with the key it is rewritten and signed again. A test set
    that cannot be read on rerun is a warning and the record is kept; each
    test set is read once per batch, however many records reuse it."""
    import ddchallenge.measures
    from ddchallenge.batch import record_key
    from ddchallenge.data import load_reference
    from ddchallenge.data.reference import digest_test_set
    from ddchallenge.measures import full_path, write_cache
    from ddchallenge.protocol import get_dataset

    (tmp_path / "sets").mkdir()
    for seed in (1, 2):
        made = run_cli("generate", "--dataset", "mnist5k", "--method", "random", "--ipc", 1, "--seed", seed, "-o",
                       tmp_path / "sets" / f"s{seed}.h5", "--quiet")
        assert made.exit_code == 0, made.output
    key = tmp_path / "key"
    key.write_bytes(KEY)
    uploads = [tmp_path / "sets" / "s1.h5", tmp_path / "sets" / "s2.h5"]
    args = ("score", *uploads, *FAST, "--ref", small[1], "--rounds", 1, "--baseline", "random", "--output",
            tmp_path / "out")
    assert run_cli(*args, "--record-key", key).exit_code == 0
    files = [tmp_path / "out" / f"{record_key(u.name)}.json" for u in uploads]
    made = [f.read_bytes() for f in files]
    spec, recipe = get_dataset("mnist5k"), dataclasses.replace(OFFICIAL, epochs=0, rounds=1)
    path, cache_key = full_path(spec, recipe, 0, data_root, digest_test_set(load_reference(spec, small[1])))
    write_cache(path, cache_key, [0.91], 1.0, made_on="cpu")
    reads = []
    real = ddchallenge.data.reference.load_reference
    monkeypatch.setattr(ddchallenge.data.reference, "load_reference", lambda *a: reads.append(a) or real(*a))
    keyless = run_cli(*args)
    assert keyless.exit_code == 0 and "0 scored, 2 done before" in keyless.stdout, keyless.output
    assert [f.read_bytes() for f in files] == made and len(reads) == 1  # untouched; the test set read once
    assert keyless.stderr.count("no --record-key to sign it again; kept as recorded") == 2
    keyed = run_cli(*args, "--record-key", key)
    assert keyed.exit_code == 0 and "0 scored, 2 done before" in keyed.stdout, keyed.output
    for f in files:
        (row,) = read_record(f, KEY)["extras"]  # signed again, under the key
        assert row["full"] == pytest.approx(0.91)
    # a test set that cannot be read when the records are checked: which one they were scored on cannot be told,
    # so they are scored again (where scoring cannot read it either, that is an environment error: nothing recorded)
    for error in (PermissionError(13, "Permission denied"), ValueError("a cannot be empty")):
        def broken(*a, error=error):
            raise error
        monkeypatch.setattr(ddchallenge.data.reference, "load_reference", broken)
        r = run_cli(*args, "--record-key", key)
        assert r.exit_code == 0 and "2 scored, 0 done before" in r.stdout, r.output
        assert r.stderr.count(f"its test set cannot be read now ({error})") == 2, r.stderr


def test_every_setting_of_a_baseline_is_its_own_cache_entry(tmp_path, monkeypatch):
    """Dataset, method, IPC, subset seed, recipe, seeds, test set, device,
    CPU threads, torch and the batching of rounds: change any one, and the
    entry (file and key) is another, so no cached accuracy stands for
    another setting."""
    from ddchallenge.measures import baseline_cache, full_path
    from ddchallenge.protocol import get_dataset

    mnist, recipe = get_dataset("mnist5k"), dataclasses.asdict(OFFICIAL)
    base = dict(spec=mnist, method="random", settings={**recipe, "baseline_seed": 0, "ipc": 10}, seeds=[0, 1, 2],
                test="a" * 64, device_name="cpu", together=False, root=tmp_path, threads=1)
    variants = [{}, {"spec": get_dataset("mnist")}, {"method": "herding"},
                {"settings": {**recipe, "baseline_seed": 1, "ipc": 10}},
                {"settings": {**recipe, "baseline_seed": 0, "ipc": 11}},
                {"settings": {**recipe, "epochs": 999, "baseline_seed": 0, "ipc": 10}},
                {"seeds": [1, 2, 3]}, {"test": "b" * 64}, {"device_name": "cuda:0 (H100)"}, {"together": True},
                {"threads": 2}]
    made = [baseline_cache(**{**base, **v}) for v in variants]
    # the training store the subset is drawn from (a researcher's review: a store prepared again reused the old
    # baselines), and the ddchallenge whose generator and loop made them
    store = tmp_path / "mnist_train.h5"
    store.write_bytes(b"a store")
    made.append(baseline_cache(**{**base, "spec": get_dataset("mnist")}))
    store.write_bytes(b"a store prepared again")
    made.append(baseline_cache(**{**base, "spec": get_dataset("mnist")}))
    assert len({p for p, _ in made}) == len({json.dumps(k, sort_keys=True) for _, k in made}) == len(variants) + 2
    assert made[0][1]["store"] == "embedded"
    # a code review: the key held the package version, which no edit changes; it holds the code's own digest,
    # which an edit of the training loop changes
    import shutil

    from ddchallenge import measures

    assert made[0][1]["code"] == measures.code_identity() and len(made[0][1]["code"]) == 64
    package = tmp_path / "copy"
    shutil.copytree(Path(measures.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    assert measures.source_digest(package, measures.BASELINE_CODE) == measures.code_identity()
    with open(package / "evaluation" / "train.py", "a") as f:
        f.write("# an edit of the training loop\n")
    assert measures.source_digest(package, measures.BASELINE_CODE) != measures.code_identity()
    monkeypatch.setattr(measures, "code_identity", lambda: "0" * 64)
    assert baseline_cache(**base)[0] != made[0][0]
    assert all(p.parent == tmp_path / "extras" for p, _ in made)
    import torch

    assert made[0][1]["torch"] == torch.__version__ and made[0][1]["cpu"] == torch.backends.cpu.get_cpu_capability()
    # the test set's digest: its bytes, shapes and dtypes
    from ddchallenge.data.reference import digest_test_set

    ref = {"images_val": torch.zeros(4, 1, 2, 2), "labels_val": torch.arange(4)}
    pixel = {**ref, "images_val": ref["images_val"].clone().index_put_((torch.tensor([3]),), torch.tensor(1e-7))}
    digests = {digest_test_set(r) for r in (ref, pixel, {**ref, "labels_val": torch.tensor([0, 1, 3, 2])},
                                              {**ref, "images_val": ref["images_val"].double()},
                                              {**ref, "images_val": ref["images_val"].reshape(4, 1, 1, 4)})}
    assert len(digests) == 5 and digest_test_set({k: v.clone() for k, v in ref.items()}) in digests
    # the full-data reference: per recipe, seeds and test set, and never a baseline's file
    fulls = {full_path(mnist, OFFICIAL, s, tmp_path, t)[0] for s in (0, 1) for t in ("a" * 64, "b" * 64)}
    fulls.add(full_path(mnist, dataclasses.replace(OFFICIAL, epochs=5), 0, tmp_path, "a" * 64)[0])
    assert len(fulls) == 5 and not fulls & {p for p, _ in made}


BAD_CACHE = [
    ("not JSON", lambda d: "{"),
    ("NaN accuracy", lambda d: json.dumps({**d, "accuracies": [float("nan")]})),
    ("accuracy above 1", lambda d: json.dumps({**d, "accuracies": [1.5]})),
    ("bool accuracy", lambda d: json.dumps({**d, "accuracies": [True]})),
    ("too many rounds", lambda d: json.dumps({**d, "accuracies": [0.5, 0.5]})),
    ("another device", lambda d: json.dumps({**d, "key": {**d["key"], "device": "cuda:0"}})),
    ("another seed", lambda d: json.dumps({**d, "key": {**d["key"], "seeds": [1]}})),
    ("unknown field", lambda d: json.dumps({**d, "note": "trust me"})),
    ("a list", lambda d: "[]"),
    ("huge", lambda d: json.dumps({**d, "pad": "x" * 70_000})),
]


@pytest.mark.parametrize("label,bad", BAD_CACHE, ids=[b[0] for b in BAD_CACHE])
def test_a_bad_cache_entry_is_never_trusted(tmp_path, caplog, label, bad):
    from ddchallenge.measures import read_cache, write_cache

    key = {"measure": "baseline:random", "dataset": "mnist5k", "ipc": 10, "recipe_hash": "0" * 16, "seeds": [0],
           "device": "cpu"}
    path = tmp_path / "c.json"
    write_cache(path, key, [0.5], 2.0)
    assert read_cache(path, key, 1) == [0.5]
    path.write_text(bad(json.loads(path.read_text())))
    assert read_cache(path, key, 1) is None and "not used" in caplog.text


def test_a_cache_link_is_not_followed(tmp_path):
    from ddchallenge.measures import read_cache, write_cache

    key = {"k": 1}
    write_cache(tmp_path / "real.json", key, [0.5], 1.0)
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    assert read_cache(tmp_path / "link.json", key, 1) is None


def test_baseline_without_a_training_store_names_the_command_and_records_nothing(run_cli, tmp_path, data_root):
    import torch

    ref = tmp_path / "ref"
    ref.mkdir()
    torch.save({"images_val": torch.zeros(4, 3, 32, 32), "labels_val": torch.arange(4)}, ref / "cifar10_test.pt")
    torch.save(torch.zeros(10, 3, 32, 32), tmp_path / "cifar10.pt")
    r = run_cli("score", tmp_path / "cifar10.pt", "--ref", ref, "--epochs", 0, "--rounds", 1, "--quiet",
                "--baseline", "herding", "--no-sandbox", "--output", tmp_path / "out")
    assert r.exit_code == 1 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()[-1:]
    assert "--baseline herding needs the training images of cifar10" in line
    assert "`ddchallenge data prepare cifar10 --download`" in line
    assert not list((tmp_path / "out").glob("*.json"))


def test_baseline_without_a_training_store_stops_a_batch_once_before_any_upload_is_read(run_cli, tmp_path,
                                                                                        data_root):
    import torch

    for name in ("a", "b"):
        torch.save(torch.zeros(10, 3, 32, 32), tmp_path / f"{name}.pt")
    r = run_cli("score", tmp_path / "a.pt", tmp_path / "b.pt", "--dataset", "cifar10",
                "--baseline", "random", "--epochs", 0, "--rounds", 1, "--quiet", "--output", tmp_path / "out")
    assert r.exit_code == 1 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: --baseline random needs the training images of cifar10")
    assert not (tmp_path / "out").exists()


def test_baseline_without_a_training_store_stops_a_track2_run_before_its_generator_runs(run_cli, tmp_path,
                                                                                        data_root):
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "ddchallenge.json").write_text("{}")  # a broken generator: it would fail, but only once run
    r = run_cli("score", gen, "--budget", 5, "--dataset", "cifar10", "--baseline", "random", "--epochs", 0,
                "--rounds", 1, "--quiet", "--output", tmp_path / "out")
    assert r.exit_code == 1 and r.stdout == ""
    assert "running generator" not in r.stderr and "format must be" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --baseline random needs the training images of "
                                                        "cifar10")
    assert not list((tmp_path / "out").glob("*.json"))  # nothing recorded (the folder may not even exist)


def test_reference_full_without_a_training_store_names_the_command(run_cli, data_root):
    r = run_cli("reference", "full", "cifar10", "--epochs", 0, "--rounds", 1, "--quiet")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"error: a full-data reference needs the training images of cifar10 and {data_root / 'cifar10_train.h5'} "
        "does not exist; make it with `ddchallenge data prepare cifar10 --download`, or pass --root DIR where it "
        "was prepared"]
    assert not (data_root / "extras").exists()


def test_baseline_and_full_reference_read_the_training_store_and_cache_under_root(run_cli, tmp_path, monkeypatch,
                                                                                   data_root):
    from tests.test_data import use_checksums, write_mnist

    src, root = tmp_path / "src", tmp_path / "elsewhere"  # prepared outside the default data root
    raw, _ = write_mnist(src)
    use_checksums(monkeypatch, "mnist", raw, archives={p.name: p for p in raw.iterdir()})
    assert run_cli("data", "prepare", "mnist", "--root", root, "--source", src).exit_code == 0
    made = run_cli("generate", "--dataset", "mnist", "--method", "random", "--ipc", 1, "--root", root,
                   "-o", tmp_path / "s.h5", "--quiet")
    assert made.exit_code == 0, made.output
    args = ("score", tmp_path / "s.h5", "--ref", root, "--baseline", "random", "--epochs", 0, "--rounds", 1,
            "--quiet", "--json", "-", "--output", tmp_path / "out")
    without = run_cli(*args)
    assert without.exit_code == 1 and without.stderr.strip().endswith("or pass --root DIR where it was prepared")
    assert not (tmp_path / "out").exists()
    r = run_cli(*args, "--root", root)
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)["extras"]
    assert row["measure"] == "baseline:random" and row["ior"] is not None
    assert len(list((root / "extras").glob("mnist-ipc1-random-*.json"))) == 1 and not data_root.exists()
    full = run_cli("reference", "full", "mnist", "--ref", root, "--root", root, "--epochs", 0, "--rounds", 1,
                   "--quiet")
    assert full.exit_code == 0, full.output
    assert len(list((root / "extras").glob("mnist-full-*.json"))) == 1 and not data_root.exists()


def test_a_baseline_larger_than_a_class_is_refused_before_training_and_the_batch_goes_on(run_cli, tmp_path,
                                                                                         monkeypatch, data_root):
    """IPC 4 of a store with 3 training images per class: the command line asks
    for a baseline this upload cannot have. Refused before any training (it
    was found after the set had trained, and reported as the machine's
    failure), one line, not recorded; the batch's other upload is scored."""
    import torch

    import ddchallenge.score
    from tests.test_data import use_checksums, write_mnist

    src, root = tmp_path / "src", tmp_path / "root"
    raw, _ = write_mnist(src)
    use_checksums(monkeypatch, "mnist", raw, archives={p.name: p for p in raw.iterdir()})
    assert run_cli("data", "prepare", "mnist", "--root", root, "--source", src).exit_code == 0
    for name, ipc in (("big", 4), ("small", 1)):
        torch.save(torch.zeros(10 * ipc, 1, 28, 28), tmp_path / f"{name}.pt")
    trained = []
    real = ddchallenge.score.score_entry
    monkeypatch.setattr(ddchallenge.score, "score_entry", lambda e, *a, **k: trained.append(e.ipc) or real(e, *a, **k))
    args = ("--dataset", "mnist", "--ref", root, "--root", root, "--baseline", "random", "--epochs", 0, "--rounds", 1,
            "--quiet", "--no-sandbox", "--output", tmp_path / "out")
    one = run_cli("score", tmp_path / "big.pt", *args)
    assert one.exit_code == 2 and one.stdout == "" and trained == [], one.output
    assert one.stderr.strip().splitlines() == [
        "error: --baseline random draws 4 real training images per class (the upload's IPC for mnist) and the "
        "smallest class has 3; score this upload without --baseline"]
    assert not list((tmp_path / "out").glob("*.json")) if (tmp_path / "out").exists() else True
    both = run_cli("score", tmp_path / "big.pt", tmp_path / "small.pt", *args)
    assert both.exit_code == 2 and trained == [1], both.output
    assert [p.name.startswith("small") for p in (tmp_path / "out").glob("*.json")] == [True]


@pytest.mark.slow
def test_reference_full_on_mnist5k_is_cached_once_and_gives_hlr(run_cli, data_root, tmp_path):
    args = ("reference", "full", "mnist5k", "--epochs", 0, "--rounds", 1, "--quiet")
    first, again = run_cli(*args), run_cli(*args)
    assert first.exit_code == 0 and "cached in" in first.stdout and "already cached in" in again.stdout
    (cached,) = (data_root / "extras").glob("mnist5k-full-*.json")
    full = json.loads(cached.read_text())["accuracies"][0]
    run_cli("generate", "--dataset", "mnist5k", "--method", "random", "--ipc", 1, "-o", tmp_path / "s.h5", "--quiet")
    r = run_cli("score", tmp_path / "s.h5", *FAST, "--rounds", 1, "--baseline", "random", "--json", "-",
                "--output", tmp_path / "out")
    record = json.loads(r.stdout)
    (row,) = record["extras"]
    assert row["full"] == full and row["hlr"] == pytest.approx(full - record["datasets"][0]["mean"])


def test_a_huge_integer_anywhere_in_a_record_is_refused_and_the_rest_ranked(run_cli, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    for name, where in (("score", lambda r: r), ("seconds", lambda r: r["datasets"][0]),
                        ("seconds", lambda r: r["extras"][0])):
        record = with_extras(arch_row())
        where(record)[name] = 10**400
        write(folder / f"{len(list(folder.iterdir()))}.json", record)
    write(folder / "ok.json", make_record("bob.zip"))
    r = run_cli("leaderboard", folder, "--extras")
    assert r.exit_code == 0 and "bob.zip" in r.stdout
    assert r.stderr.count("must be a finite number") == 3 and "Traceback" not in r.stderr


def test_results_that_differ_in_extras_or_upload_bytes_are_two_entries_in_any_order(tmp_path):
    """The same images with other extra measures, or in another upload (a
    soft-label companion beside the same images), are other results: the
    board lists each, whichever order its records come in; the same record
    twice is listed once."""
    from ddchallenge.report import rank_records

    plain = make_record()
    arch = with_extras(arch_row())
    base = with_extras(baseline_row())
    companion = {**make_record(), "submission_sha256": "f" * 64}
    orders = [[plain, arch, base, companion, arch], [arch, companion, base, arch, plain]]
    boards = [rank_records(order) for order in orders]
    for board in boards:
        assert len(board.official) == 4 and board.duplicates == 1 and not board.refused
    # copies that differ where the identity does not look (an HLR brought up to date): the same one kept either way
    later = with_extras(baseline_row(full=0.9))
    kept = [[e.record["extras"][0]["full"] for e in rank_records(order).official] for order in ([base, later],
                                                                                                [later, base])]
    assert kept[0] == kept[1] and len(kept[0]) == 1
    assert [sorted((e.record["submission_sha256"], tuple(x["measure"] for x in e.record.get("extras", [])))
                   for e in b.official) for b in boards] == \
        [sorted([(plain["submission_sha256"], ()), (plain["submission_sha256"], ("arch:vgg11",)),
                 (plain["submission_sha256"], ("baseline:random",)), ("f" * 64, ())])] * 2


def test_leaderboard_shows_extra_columns_only_when_asked_and_csv_and_json_carry_them(run_cli, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    both = with_extras(arch_row(), arch_row((0.3, 0.4, 0.5), "mlp"), baseline_row(full=0.9))
    # the same measures on tinyimagenet, so that each column covers every dataset of the record
    both["extras"] += [{**r, "dataset": "tinyimagenet"} for r in both["extras"]]
    both["extras"][5].update(ior=0.3 - 0.33, ior_se=standard_error([0.2, 0.3, 0.4], [0.30, 0.32, 0.37]),
                             ior_se_paired=paired_standard_error([0.2, 0.3, 0.4], [0.30, 0.32, 0.37]), hlr=0.9 - 0.3)
    # IOR's standard error over the two datasets: that of the mean of two independent estimates
    se = math.sqrt(both["extras"][2]["ior_se_paired"] ** 2 + both["extras"][5]["ior_se_paired"] ** 2) / 2
    write(folder / "a.json", both)
    write(folder / "b.json", make_record("bob.zip"))
    plain = run_cli("leaderboard", folder)
    assert plain.exit_code == 0, plain.output
    assert "IOR" not in plain.stdout and "arch:" not in plain.stdout
    shown = run_cli("leaderboard", folder, "--extras")
    header = shown.stdout.splitlines()[0]
    assert header.index("score %") < header.index("arch:vgg11 %") < header.index("arch mean mlp+vgg11 %") \
        < header.index("IOR vs random %")
    # IOR averaged over cifar100 (50 - 33 %) and tinyimagenet (30 - 33 %), its standard error in its cell
    assert f"+7.00 ± {100 * se:.2f}" in shown.stdout and "s.e." not in header
    rows = list(csv.reader(run_cli("leaderboard", folder, "--format", "csv").stdout.splitlines()))
    assert rows[0][-7:] == ["arch:mlp %", "arch:vgg11 %", "arch mean mlp+vgg11 %", "HLR %", "IOR vs random %",
                            "IOR vs random s.e. %", "baseline:random %"]
    assert rows[1][-3:-1] == ["+7.00", f"{100 * se:.2f}"] and se > 0.01  # a number per cell
    assert rows[2][-7:] == ["-"] * 7  # bob has no extras
    board = json.loads(run_cli("leaderboard", folder, "--format", "json").stdout)
    (alice,) = [e for e in board["official"] if e["name"] == "alice.zip"]
    assert len(alice["extras"]) == 6 and alice["extra_columns"]["arch mean mlp+vgg11"] == pytest.approx(0.375)
    # the site, the same way: the columns only with --extras
    for flag, site in (("--extras", "with"), ("--include-unofficial", "without")):
        r = run_cli("leaderboard", folder, "--format", "html", "-o", tmp_path / site, "--no-sandbox", flag)
        assert r.exit_code == 0, r.output
    assert "arch mean mlp+vgg11 %" in (tmp_path / "with" / "index.html").read_text()
    assert "arch mean" not in (tmp_path / "without" / "index.html").read_text()
    # each upload's page lists its extra rows per dataset, apart from the rounds (a researcher's review: none were)
    (page,) = (tmp_path / "with" / "uploads").glob("alice*.html")
    shown = page.read_text()
    assert shown.count("<h3>Extra measures</h3>") == 2 and shown.count("<code>") >= 6
    assert ">baseline:random<" in shown and ">arch:vgg11<" in shown and "+17.00" in shown


def test_an_extra_column_never_holds_numbers_made_under_other_settings():
    """A leaderboard column is one measure under one set of its own settings:
    soft labels at T = 1 and T = 4, two teachers, or baselines from two
    subset seeds are columns of their own, and the mean over architectures
    is the pool mean only for the whole pool (else named by the
    architectures it averages); one architecture has no mean column."""
    from ddchallenge.extras import ARCHITECTURES
    from ddchallenge.report import extra_columns, leaderboard

    def base(seed):
        row = dataclasses.asdict(baseline_row())
        row["recipe"]["baseline_seed"] = seed
        return ExtraScore.make(**{k: row[k] for k in ("measure", "dataset", "recipe", "seeds", "accuracies",
                                                      "seconds", "ior", "ior_se", "full", "hlr")})

    def one(*rows):  # a record of cifar100 alone, so that a cifar100 row covers every dataset
        record = make_record(f"r{next(names)}.zip", {"cifar100": SET})
        record["extras"] = [json.loads(json.dumps(dataclasses.asdict(r))) for r in rows]
        return record

    names = iter(range(99))
    records = [one(label_row("soft", temperature=1.0)), one(label_row("soft")), one(label_row()),
               one(label_row(teacher_weights_sha256="cd" * 32)), one(base(0)), one(base(3)), one(arch_row()),
               one(arch_row(), arch_row(name="mlp")), one(*[arch_row(name=a) for a in ARCHITECTURES])]
    columns = [sorted(extra_columns(r)) for r in records]
    assert columns == [
        ["labels:soft T=1 %"], ["labels:soft T=4 %"], ["labels:teacher T=4 teacher abababab %"],
        ["labels:teacher T=4 teacher cdcdcdcd %"], ["IOR vs random %", "baseline:random %"],
        ["IOR vs random seed 3 %", "baseline:random seed 3 %"], ["arch:vgg11 %"],
        ["arch mean mlp+vgg11 %", "arch:mlp %", "arch:vgg11 %"],
        sorted([f"arch:{a} %" for a in ARCHITECTURES] + ["pool mean %"])]
    header = leaderboard(records, "csv").splitlines()[0]
    assert "labels:soft T=1 %,labels:soft T=4 %" in header and "pool mean %" in header


@pytest.mark.parametrize("fields, message", [
    ({"archs": ("MLP",)}, "archs must be a tuple of names from"),
    ({"archs": "mlp"}, "archs must be a tuple of names from"),
    ({"archs": ("mlp", "mlp")}, "archs names an architecture twice"),
    ({"baseline": "Random"}, "baseline must be one of random, herding"),
    ({"baseline": "random", "baseline_seed": -1}, "baseline_seed must be a whole number from 0"),
    ({"baseline_seed": 7}, "baseline_seed is the seed of the baseline subset: set baseline too"),
    ({"temperature": 5.0}, "temperature and teacher apply to labels"),
    ({"teacher": "/t", "temperature": 3.0}, "temperature and teacher apply to labels"),
    ({"labels": "Soft"}, "labels must be one of soft, teacher"),
    ({"labels": "soft", "temperature": float("nan")}, "--temperature must be a number from"),
    ({"labels": "soft", "temperature": 0}, "--temperature must be a number from"),
    ({"labels": "soft", "teacher": "/t"}, "labels 'soft' trains on the set's own soft labels"),
    ({"labels": "teacher"}, "labels 'teacher' needs teacher (a folder) and teacher_sha256"),
    ({"labels": "teacher", "teacher": "/t"}, "labels 'teacher' needs teacher (a folder) and teacher_sha256"),
])
def test_the_library_refuses_an_extras_request_the_cli_would_refuse(fields, message):
    """Built through the API, a request no run can honour (or one whose
    settings a run would ignore) is a UsageError at once: never a failed
    record of an upload after its training, never a setting dropped."""
    from ddchallenge.errors import UsageError
    from ddchallenge.extras import ExtrasRequest

    with pytest.raises(UsageError, match=re.escape(message)):
        ExtrasRequest(**fields)
    assert not ExtrasRequest() and ExtrasRequest(("mlp",), "random", 3)  # what the CLI builds still builds


def test_a_column_never_joins_two_temperatures_that_print_alike():
    """A researcher's review: T=4 and T=4.0000001 (other recipe hashes) shared the column `labels:soft T=4`."""
    from ddchallenge.extras import measure_label

    assert measure_label("labels:soft", {"temperature": 4.0}) == "labels:soft T=4"
    assert measure_label("labels:soft", {"temperature": 0.5}) == "labels:soft T=0.5"
    assert measure_label("labels:soft", {"temperature": 4.0000001}) == "labels:soft T=4.0000001"
