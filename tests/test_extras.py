"""Extra measures beyond the challenge score (ddchallenge.extras): their rows
in a result, read back as untrusted input; their own recipe hashes."""
import dataclasses
import json

import pytest

from ddchallenge.errors import RecordError
from ddchallenge.extras import ExtraScore, recipe_hash, standard_error
from ddchallenge.protocol import OFFICIAL
from ddchallenge.records import read_record
from ddchallenge.score import ScoreResult
from tests.test_records import make_record, write

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
                   hlr=None if full is None else full - sum(SET) / 3)
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
    ("hlr without full", _set("full", None, row=1), "extras[1].hlr must be null"),
    ("forged hlr", _set("hlr", 0.01, row=1), "extras[1].hlr must be "),
    ("full above 1", _set("full", 1.5, row=1), "extras[1].full must be a finite number from 0 to 1"),
    ("extras not a list", lambda r: r.__setitem__("extras", {"a": 1}), "extras must be a list of 0 to 256"),
    ("too many extras", lambda r: r.__setitem__("extras", r["extras"] * 129), "extras must be a list of 0 to 256"),
    ("row not object", lambda r: r["extras"].__setitem__(0, 3), "extras[0] must be a JSON object"),
]


@pytest.mark.parametrize("label,change,message", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_each_malformed_extra_makes_the_record_invalid_naming_the_row_and_field(tmp_path, label, change, message):
    record = with_extras(arch_row(), baseline_row(full=0.9))
    change(record)
    with pytest.raises(RecordError) as err:
        read_record(write(tmp_path / "r.json", record))
    assert message in str(err.value) and "r.json" in str(err.value)
