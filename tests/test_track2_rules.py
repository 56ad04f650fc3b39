"""Track 2's rules, enforced: a generator may not carry a dataset (the table
rule), generation reads no training data, its random streams never equal an
evaluation round's, and prototypes/invert add tables without rewriting what
the folder runs. Through the CLI on copies of the tiny model."""
import json
import shutil

import h5py
import pytest
import torch
from safetensors.torch import save_file

from ddchallenge.fileio import sha256_file
from ddchallenge.protocol import STREAMS, generation_seed, stream_seed

GEN = ["generate", "--dataset", "mnist5k", "--steps", 2, "--batch-size", 16, "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def d4m_folder(tiny_model, tmp_path_factory):
    """The tiny model's last checkpoint with a d4m IPC-2 codebook, d4m made its Track 2 method."""
    from click.testing import CliRunner

    from ddchallenge.cli import cli

    folder = tmp_path_factory.mktemp("rules") / "m"
    shutil.copytree(tiny_model / "step-0000004", folder, ignore=shutil.ignore_patterns("training_state"))
    r = CliRunner().invoke(cli, ["prototypes", str(folder), "--ipc", "2", "--device", "cpu", "--make-default",
                                 "--match-steps", "0", "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    return folder


def _meta(folder):
    return json.loads((folder / "ddchallenge.json").read_text())


def _copy(folder, tmp_path, name="c"):
    out = tmp_path / name
    shutil.copytree(folder, out)
    return out


def _errors(r):
    return [line for line in r.stderr.splitlines() if line.startswith("error: ")]


def _replace_table(folder, name, tensor, **record):
    """Write a table file and record its true hash (and any `record` fields): only the rule's checks can catch it."""
    path = folder / "codebooks" / f"{name}.safetensors"
    save_file({"centres": tensor}, path)
    meta = _meta(folder)
    meta["codebooks"][name].update({"sha256": sha256_file(path), "bytes": path.stat().st_size, **record})
    (folder / "ddchallenge.json").write_text(json.dumps(meta))


def test_a_folder_with_more_rows_per_class_than_the_run_outputs_is_refused(d4m_folder, tmp_path, run_cli):
    """IPC + 1 centres per class: refused by `score --budget` (before the folder runs, nothing generated) and
    by `generate --track 2`, in one line naming the table and the rule; `prototypes --ipc 101` cannot make one."""
    folder = _copy(d4m_folder, tmp_path)
    r = run_cli("prototypes", folder, "--ipc", 3, "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.stderr
    r = run_cli("score", folder, "--dataset", "mnist5k", "--ipc", 2, "--budget", 600, "--epochs", 1, "--rounds", 1,
                "--quiet", "--no-sandbox")
    (error,) = _errors(r)
    assert r.exit_code == 1 and "tables (d4m-ipc2 2, d4m-ipc3 3) store 5 rows per class, but this run outputs " \
        "IPC 2" in error, r.stderr
    assert "may read at most 2 stored rows per class (a generator may not carry a dataset)" in error
    out = tmp_path / "x.h5"
    r = run_cli("generate", "--dataset", "mnist5k", "--model", folder, "--ipc", 2, "--track", 2, "--quiet", "-o", out)
    (error,) = _errors(r)
    assert r.exit_code == 1 and "store 5 rows per class" in error and not out.exists()
    # Without a fixed IPC a run may output up to protocol.MAX_IPC (100): tables of 5 rows in all pass the check.
    from ddchallenge.errors import UploadRuleError
    from ddchallenge.generators.track2 import check_folder_tables
    check_folder_tables(folder, "auto")
    # The rows are counted over the folder, not per table (names are free): tables each within the limit that
    # together hold more rows per class than the run may output are refused as one.
    meta = _meta(folder)
    for i in range(20):
        shutil.copy(folder / "codebooks" / "d4m-ipc3.safetensors", folder / "codebooks" / f"copy{i}.safetensors")
        meta["codebooks"][f"copy{i}"] = {**meta["codebooks"]["d4m-ipc3"], "file": f"codebooks/copy{i}.safetensors"}
    (folder / "ddchallenge.json").write_text(json.dumps(meta))
    with pytest.raises(UploadRuleError, match=r"store 65 rows per class, but this run outputs IPC 10"):
        check_folder_tables(folder, 10)
    check_folder_tables(folder, "auto")  # 65 <= 100
    for i in range(20, 32):
        shutil.copy(folder / "codebooks" / "d4m-ipc3.safetensors", folder / "codebooks" / f"copy{i}.safetensors")
        meta["codebooks"][f"copy{i}"] = {**meta["codebooks"]["d4m-ipc3"], "file": f"codebooks/copy{i}.safetensors"}
    (folder / "ddchallenge.json").write_text(json.dumps(meta))
    with pytest.raises(UploadRuleError, match=r"store 101 rows per class, but this run outputs at most IPC 100"):
        check_folder_tables(folder, "auto")
    r = run_cli("prototypes", folder, "--ipc", 101, "--device", "cpu")
    assert r.exit_code == 2 and "--ipc must be between 1 and 100" in _errors(r)[0]


@pytest.mark.parametrize("break_it, message", [
    (lambda f: _replace_table(f, "d4m-ipc2", torch.zeros(10, 2, 1, 28, 28, dtype=torch.float64)),
     "tables are float32, this one is 'F64'"),
    (lambda f: _replace_table(f, "d4m-ipc2", torch.zeros(10, 3, 1, 28, 28)),
     "table d4m-ipc2 declares 2 rows per class but its file holds 3"),
    (lambda f: _replace_table(f, "d4m-ipc2", torch.zeros(10, 2, 1, 28, 28), bytes=12),
     "table d4m-ipc2 declares 12 bytes but its file has"),
    (lambda f: (f / "codebooks" / "spare.safetensors").write_bytes(b"data"),
     "codebooks/spare.safetensors is not declared in ddchallenge.json"),
    (lambda f: _record(f, file="unet/diffusion_pytorch_model.safetensors"), "points outside codebooks/"),
    (lambda f: _record(f, rows_per_class="2"), "declares '2' rows per class"),
    (lambda f: (f / "codebooks" / "d4m-ipc2.safetensors").write_bytes(b"\xff" * 64), "bad header length"),
    (lambda f: _nested_header(f / "codebooks" / "d4m-ipc2.safetensors"), "unreadable header"),
])
def test_declared_tables_are_checked_before_the_run(d4m_folder, tmp_path, run_cli, break_it, message):
    folder = _copy(d4m_folder, tmp_path)
    break_it(folder)
    out = tmp_path / "x.h5"
    r = run_cli("generate", "--dataset", "mnist5k", "--model", folder, "--ipc", 2, "--track", 2, "--quiet", "-o", out)
    errors = _errors(r)
    assert r.exit_code == 1 and len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_a_file_generation_never_reads_is_ignored_among_the_tables_as_the_sandbox_ignores_it(d4m_folder, tmp_path,
                                                                                              run_cli):
    """A sandboxed run's copy of the folder leaves out names generation never
    reads (`*.pt` among them), so an undeclared codebooks/leftover.pt passed
    there but was refused by the same run in-process; both now ignore it,
    while an undeclared .safetensors (above) is refused by both."""
    folder = _copy(d4m_folder, tmp_path)
    (folder / "codebooks" / "leftover.pt").write_bytes(b"never read")
    out = tmp_path / "x.h5"
    r = run_cli("generate", "--dataset", "mnist5k", "--model", folder, "--ipc", 2, "--track", 2, "--device", "cpu",
                "--quiet", "-o", out)
    assert r.exit_code == 0 and out.exists(), r.output


def _nested_header(path):
    """A header that nests 100,000 lists: json.loads would recurse past Python's limit."""
    header = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(len(header).to_bytes(8, "little") + header)


def _record(folder, **fields):
    meta = _meta(folder)
    meta["codebooks"]["d4m-ipc2"].update(fields)
    (folder / "ddchallenge.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("tensor, message", [
    (torch.zeros(10, 2, 1, 28, 28, dtype=torch.float64), "codebook d4m-ipc2 is float64; tables are float32"),
    (torch.full((10, 2, 1, 28, 28), float("nan")), "codebook d4m-ipc2 holds non-finite values"),
    (torch.full((10, 2, 1, 28, 28), float("inf")), "codebook d4m-ipc2 holds non-finite values"),
])
def test_the_one_table_loader_refuses_other_dtypes_and_non_finite_values(d4m_folder, tmp_path, run_cli, tensor,
                                                                         message):
    """Outside Track 2 too (`generate --method d4m`): the loader every method uses checks what it reads."""
    folder = _copy(d4m_folder, tmp_path)
    _replace_table(folder, "d4m-ipc2", tensor)
    out = tmp_path / "x.h5"
    r = run_cli(*GEN, "--method", "d4m", "--model", folder, "--ipc", 2, "-o", out)
    errors = _errors(r)
    assert r.exit_code == 1 and len(errors) == 1 and message in errors[0], r.stderr
    assert not out.exists()


def test_prototypes_and_invert_add_tables_without_rewriting_the_generate_settings(d4m_folder, tmp_path, run_cli):
    folder = _copy(d4m_folder, tmp_path)
    section = _meta(folder)["generate"]
    assert section == {"method": "d4m", "settings": {"strength": 0.5, "oversample": 1.0, "match_steps": 0}}
    for args in (["prototypes", folder, "--ipc", 1], ["invert", folder, "--per-class", 1, "--steps", 1,
                                                      "--batch-size", 4]):
        r = run_cli(*args, "--device", "cpu", "--quiet")
        assert r.exit_code == 0, r.stderr
        assert _meta(folder)["generate"] == section
    books = _meta(folder)["codebooks"]
    assert {n: (b["rows_per_class"], b["classes"], b["dtype"]) for n, b in books.items()} == {
        "d4m-ipc1": (1, 10, "float32"), "d4m-ipc2": (2, 10, "float32"), "d3m-k1": (1, 10, "float32")}
    assert books["d3m-k1"]["purpose"].startswith("d3m class vectors") and books["d4m-ipc1"]["purpose"].startswith("d4m")
    r = run_cli("prototypes", folder, "--ipc", 1, "--make-default", "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert _meta(folder)["generate"] == {"method": "d4m", "settings": {"strength": 0.5, "oversample": 1.0,
                                                                       "match_steps": 300}}  # the default
    r = run_cli("prototypes", folder, "--ipc", 1, "--match-steps", 4, "--make-default", "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert _meta(folder)["generate"] == {"method": "d4m", "settings": {"strength": 0.5, "oversample": 1.0,
                                                                       "match_steps": 4}}


def test_settings_shows_and_changes_what_the_folder_runs_and_refuses_bad_values_writing_nothing(d4m_folder, tmp_path,
                                                                                                 run_cli, monkeypatch):
    folder = _copy(d4m_folder, tmp_path)
    r = run_cli("settings", folder)
    assert r.exit_code == 0 and r.stdout == (f"{folder / 'ddchallenge.json'}: runs d4m under Track 2 with match_steps "
                                             "0, oversample 1.0, strength 0.5; defaults: batch_size 500, guidance "
                                             "2.0, pool_strength 0.5, sampler dpm++, steps 20; tables: d4m-ipc2 (2 "
                                             "per class)\n"), r.output
    r = run_cli("settings", folder, "--match-steps", 7, "--guidance", 1.5)
    assert r.exit_code == 0, r.output
    assert _meta(folder)["generate"] == {"method": "d4m", "settings": {"strength": 0.5, "oversample": 1.0,
                                                                       "match_steps": 7, "guidance": 1.5}}
    r = run_cli("settings", folder, "--unset", "guidance", "--unset", "match-steps")  # back to the defaults
    assert r.exit_code == 0 and r.stdout.endswith("with oversample 1.0, strength 0.5; defaults: batch_size 500, "
                                                  "guidance 2.0, match_steps 0, pool_strength 0.5, sampler dpm++, "
                                                  "steps 20; tables: d4m-ipc2 (2 per class)\n"), r.output
    assert _meta(folder)["generate"] == {"method": "d4m", "settings": {"strength": 0.5, "oversample": 1.0}}
    run_cli("settings", folder, "--match-steps", 7, "--guidance", 1.5)
    before = (folder / "ddchallenge.json").read_bytes()
    for args, message in [
            (["--unset", "guidanse"], "--unset guidanse: not a setting; it takes strength, pool-strength, sampler, "),
            (["--pool-strength", 1.5], "--pool-strength must be a number from 1e-06 to 1, got 1.5"),
            (["--unset", "guidance", "--guidance", 3], "--guidance and --unset guidance contradict each other"),
            (["--match-steps", 10**6], "--match-steps must be a whole number from 0 to"),
            (["--strength", 0], "--strength must be a number from"),
            (["--sampler", "euler"], "--sampler must be one of"),
            (["--guidance", "nan"], "Invalid value for '--guidance': 'nan' is not a finite number"),
            (["--batch-size", 0], "--batch-size must be a whole number from 1 to"),
            (["--drop-table", "d4m-ipc3"], "--drop-table d4m-ipc3: "),
            # A new user's review: an --unset that changed nothing said nothing, exit 0.
            (["--unset", "sampler"], f"--unset sampler: {folder} does not set it (the method's default runs); "
                                     "nothing to unset"),
            (["--drop-table", "d4m-ipc2", "--drop-table", "d4m-ipc"], "--drop-table d4m-ipc: ")]:
        r = run_cli("settings", folder, *args)
        errors = _errors(r)
        assert r.exit_code == 2 and len(errors) == 1 and message in errors[0], (args, r.output)
        assert (folder / "ddchallenge.json").read_bytes() == before
    r = run_cli("settings", tmp_path / "no-such-folder", "--match-steps", 1)
    assert r.exit_code == 2 and _errors(r) == [f"error: {tmp_path / 'no-such-folder'} is not a folder; pass a "
                                               "generator folder (`ddchallenge train` makes one)"], r.output
    (tmp_path / "empty").mkdir()
    r = run_cli("settings", tmp_path / "empty")
    assert r.exit_code == 2 and _errors(r) == [f"error: {tmp_path / 'empty'} is not a ddchallenge diffusion model: it "
                                               "holds neither ddchallenge.json nor a step-* checkpoint; pass a folder "
                                               "written by `ddchallenge train` (or one of its step-* checkpoints)"], \
        r.output
    meta = _meta(folder)
    meta["generate"] = {"method": "diffusion", "settings": {}}
    (folder / "ddchallenge.json").write_text(json.dumps(meta))
    for option in ("--strength", "--pool-strength"):
        r = run_cli("settings", folder, option, 0.4)
        assert r.exit_code == 2 and f"{option} does not apply to method diffusion" in _errors(r)[0], r.output
    r = run_cli("settings", folder, "--match-steps", 3, "--steps", 2)
    assert r.exit_code == 0 and r.stdout.endswith("runs diffusion under Track 2 with match_steps 3, steps 2; defaults: "
                                                  "batch_size 500, guidance 2.0, oversample 1.0, sampler dpm++; "
                                                  "tables: d4m-ipc2 (2 per class)\n"), r.output
    monkeypatch.setattr("ddchallenge.generators.matching.POOL_PER_CLASS", 3)
    r = run_cli("generate", "--track", "2", "--model", folder, "--dataset", "mnist5k", "--ipc", 2, "--device", "cpu",
                "--quiet", "-o", tmp_path / "g.h5")
    assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "g.h5") as f:
        config = json.loads(f.attrs["config"])
    assert (config["method"], config["match_steps"], config["provenance"]["matching"]["steps_done"]) == ("diffusion", 3, 3)
    assert config["provenance"]["sampling"]["steps"] == 2
    r = run_cli("settings", folder, "--match-steps", 0)  # the README's way back to plain diffusion
    assert r.exit_code == 0 and _meta(folder)["generate"] == {"method": "diffusion", "settings": {"match_steps": 0,
                                                                                                  "steps": 2}}
    # A declaration pointing outside codebooks/ (a folder from elsewhere is untrusted) deletes nothing.
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    meta = _meta(folder)
    (folder / "ddchallenge.json").write_text(json.dumps(
        {**meta, "codebooks": {**meta["codebooks"], "evil": {"file": "codebooks/../../victim.txt"}}}))
    r = run_cli("settings", folder, "--drop-table", "evil")
    assert r.exit_code != 0 and "codebook evil points outside codebooks/; refused" in _errors(r)[0], r.output
    assert victim.read_text() == "keep me" and "evil" in _meta(folder)["codebooks"]
    (folder / "ddchallenge.json").write_text(json.dumps(meta))
    # A table the folder's runs do not need is dropped, declaration and file: the table rule counts every one.
    r = run_cli("settings", folder, "--drop-table", "d4m-ipc2")
    assert r.exit_code == 0 and r.stdout.endswith("; tables: none\n"), r.output
    assert _meta(folder)["codebooks"] == {} and not list((folder / "codebooks").iterdir())


@pytest.mark.parametrize("extra, message", [
    (["--match-steps", 0], "--match-steps: under --track 2 the folder's own settings run (its ddchallenge.json); drop "
     "--match-steps, or change it with `ddchallenge settings"),
    (["--oversample", 1], "--oversample: under --track 2 the folder's own settings run"),
    (["--guidance", 3], "drop --guidance, or change it with `ddchallenge settings"),
    (["--per-class", 2], "drop --per-class, or the folder's table decides it"),
    (["--root", "."], "--root: Track 2 generation reads no training data; drop --root"),
    (["--budget", "nan"], "Invalid value for '--budget': 'nan' is not a finite number"),
])
def test_track2_generate_refuses_what_the_folder_decides(d4m_folder, tmp_path, run_cli, extra, message):
    out = tmp_path / "g.h5"
    r = run_cli("generate", "--track", 2, "--model", d4m_folder, "--dataset", "mnist5k", "--ipc", 2, *extra, "-o", out)
    errors = _errors(r)
    assert r.exit_code == 2 and len(errors) == 1 and message in errors[0], r.output
    assert not out.exists()


@pytest.mark.parametrize("method", ["diffusion", "d4m", "d3m"])
def test_every_generator_method_runs_the_track2_path_without_training_data(d4m_folder, tmp_path, monkeypatch,
                                                                          method):
    """Every reader of training images raises; each method (with selection and matching, whose pools the
    model makes) still makes its set through the one Track 2 path."""
    import ddchallenge.data
    import ddchallenge.data.mnist5k
    import ddchallenge.data.reference
    import ddchallenge.diffusion.encode
    from ddchallenge.generators import baselines, selection
    from ddchallenge.generators.track2 import run_folder

    folder = _copy(d4m_folder, tmp_path)
    if method == "d3m":  # its vectors replace the prototypes: a folder's tables count together (2 rows per class)
        from ddchallenge.diffusion.invert import invert
        from ddchallenge.generators.track2 import change_settings
        change_settings(folder, {}, drop_tables=("d4m-ipc2",))
        invert(str(folder), 2, steps=1, batch_size=4, device="cpu")
    meta = _meta(folder)
    meta["generate"] = {"method": method, "settings": {"steps": 2, "batch_size": 16, "oversample": 1.5,
                                                       "match_steps": 2}}
    (folder / "ddchallenge.json").write_text(json.dumps(meta))

    def forbidden(*args, **kwargs):
        raise AssertionError("Track 2 generation read training data")

    for module, name in ((ddchallenge.data, "load_train"), (ddchallenge.data.reference, "load_train"),
                         (ddchallenge.data.mnist5k, "load"), (baselines, "load_train"),
                         (ddchallenge.diffusion.encode, "encode_training")):
        monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setattr(selection, "SELECTION_EPOCHS", 1)
    monkeypatch.setattr("ddchallenge.generators.matching.POOL_PER_CLASS", 3)
    report = run_folder(folder, "mnist5k", 2, 0, 600.0, "cpu", tmp_path / "set.h5")
    assert (report.method, report.ipc, report.images) == (method, 2, 20)
    with h5py.File(tmp_path / "set.h5") as f:
        config = json.loads(f.attrs["config"])
    assert config["provenance"]["matching"]["steps_done"] == 2
    assert set(config["provenance"]["tables_read"].values()) <= {2}


def test_no_generation_stream_equals_an_evaluation_round(d4m_folder, tmp_path, monkeypatch):
    """Every seed a Track 2 run draws from (sampling, pool, selection's network, matching) is tagged and
    derived from the scoring seed; none equals the seeds of evaluation rounds 0-2 of that scoring seed."""
    from ddchallenge import protocol
    from ddchallenge.diffusion import sample
    from ddchallenge.evaluation import matching as steps, train
    from ddchallenge.evaluation.train import RoundSeeds
    from ddchallenge.generators import matching, selection
    from ddchallenge.generators.track2 import run_folder

    drawn, trained = [], []

    def recording(*args):
        drawn.append(protocol.stream_seed(*args))
        return drawn[-1]

    for module in (sample, matching, steps, selection):
        monkeypatch.setattr(module, "stream_seed", recording)
    real_round = train.train_round
    monkeypatch.setattr(train, "train_round", lambda spec, x, y, recipe, seed, *a, **k: trained.append(seed)
                        or real_round(spec, x, y, recipe, seed, *a, **k))
    monkeypatch.setattr(selection, "SELECTION_EPOCHS", 1)
    monkeypatch.setattr(matching, "POOL_PER_CLASS", 3)
    folder = _copy(d4m_folder, tmp_path)
    meta = _meta(folder)
    meta["generate"]["settings"].update(steps=2, batch_size=16, oversample=1.5, match_steps=2)
    (folder / "ddchallenge.json").write_text(json.dumps(meta))
    run_folder(folder, "mnist5k", 2, 0, 600.0, "cpu", tmp_path / "set.h5")
    assert len(drawn) > 60 and len(trained) == 1  # 30 candidates, 30 pool images, 2 x 3 matching draws; selection
    rounds = {0, 1, 2} | {s for r in range(3) for s in vars(RoundSeeds.from_seed(r)).values()}
    selection_streams = set(trained) | set(vars(RoundSeeds.from_seed(trained[0])).values())
    assert not rounds & set(drawn) and not rounds & selection_streams


def test_streams_are_tagged_and_distinct():
    seeds = [stream_seed(seed, stream, a, b) for seed in range(3) for stream in STREAMS for a in range(10)
             for b in range(20)]
    seeds += [stream_seed(seed, stream, a) for seed in range(3) for stream in STREAMS for a in range(20)]
    assert len(set(seeds)) == len(seeds)  # (seed, k, i) of one stream never equals another's
    assert stream_seed(0, "pool", 3) != stream_seed(0, "pool", 3, 0)  # SeedSequence pads short entropy with zeros
    assert generation_seed(0) != 0 and generation_seed(0) == generation_seed(0) != generation_seed(1)
    with pytest.raises(ValueError, match="unknown random stream"):
        stream_seed(0, "noise")


def test_pool_strength_redraws_the_d4m_pool_from_further_noise_and_leaves_the_set_before_matching(
        d4m_folder, tmp_path, run_cli, monkeypatch):
    """The folder's pool_strength (`settings --pool-strength`) noises the prototypes further for matching's pool
    only: the pool's record says which strength drew it, the pool's images change, the set made before matching
    does not; unset, the pool follows the set's strength (the bytes of folders made before the setting)."""
    from ddchallenge.generators import GenerationRequest
    from ddchallenge.generators.d4m import d4m, prototype_pool
    from ddchallenge.protocol import get_dataset

    folder = _copy(d4m_folder, tmp_path)
    monkeypatch.setattr("ddchallenge.generators.matching.POOL_PER_CLASS", 3)
    made = {}
    for pool_strength in (None, 0.9):
        req = GenerationRequest(get_dataset("mnist5k"), 2, seed=5, device="cpu", root=None, deadline=None, keep=2,
                                options={"model": str(folder), "strength": 0.5, "pool_strength": pool_strength,
                                         "steps": 2, "batch_size": 16})
        images, _, _ = d4m(req)
        pool, pool_labels, record = prototype_pool(req)
        made[pool_strength] = images, pool, record
        assert pool.shape == (30, 1, 28, 28) and list(pool_labels) == [k for k in range(10) for _ in range(3)]
    assert (made[None][2]["strength"], made[0.9][2]["strength"]) == (0.5, 0.9)
    assert (made[None][0] == made[0.9][0]).all() and not (made[None][1] == made[0.9][1]).all()

    run_cli("settings", folder, "--match-steps", 2, "--pool-strength", 0.9)
    assert _meta(folder)["generate"]["settings"]["pool_strength"] == 0.9
    r = run_cli("generate", "--track", "2", "--model", folder, "--dataset", "mnist5k", "--ipc", 2, "--device", "cpu",
                "--quiet", "-o", tmp_path / "g.h5")
    assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "g.h5") as f:
        matching = json.loads(f.attrs["config"])["provenance"]["matching"]
    assert (matching["steps_done"], matching["pool"]["strength"], matching["pool"]["per_class"]) == (2, 0.9, 3)
    out = tmp_path / "x.h5"
    for args, message in [(["--pool-strength", 0.7], "--pool-strength shapes the matching pool: add --match-steps N, "
                                                     "or drop --pool-strength"),
                          (["--match-steps", 1, "--pool-strength", 0], "--pool-strength must be in (0, 1]")]:
        r = run_cli(*GEN, "--method", "d4m", "--model", folder, "--ipc", 2, *args, "-o", out)
        assert r.exit_code == 2 and len(_errors(r)) == 1 and message in _errors(r)[0], r.output
        assert not out.exists()
    r = run_cli(*GEN, "--method", "diffusion", "--model", folder, "--ipc", 2, "--match-steps", 1, "--pool-strength",
                0.7, "-o", out)
    assert r.exit_code == 2 and "--pool-strength does not apply to --method diffusion" in _errors(r)[0], r.output


def test_matching_cut_by_the_deadline_keeps_a_valid_set_and_records_the_steps_done(tmp_path):
    from ddchallenge.generators import GenerateConfig, generate
    from ddchallenge.labelled import read_labelled_set

    out = tmp_path / "m.h5"
    report = generate(GenerateConfig("mnist5k", "random", 1, track=2, budget=8.0, match_steps=100_000), out)
    assert report.seconds <= 8.0 and report.images == 10
    with h5py.File(out) as f:
        record = json.loads(f.attrs["config"])["provenance"]["matching"]
    assert record["steps"] == 100_000 and 0 < record["steps_done"] < 100_000 and record["stopped_by_deadline"]
    assert read_labelled_set(out).images.shape == (10, 1, 28, 28)
    assert set(report.phases) >= {"making", "pool", "matching", "writing"}


def test_a_generator_too_slow_for_the_budget_is_recorded_as_over_budget_and_retried_with_more(d4m_folder, tmp_path,
                                                                                              run_cli):
    """Not a failure that looks like the team's: the record and the summary say 'over budget' with where the
    budget went; the same budget trusts the record, a larger one scores the upload again."""
    a, b = _copy(d4m_folder, tmp_path, "a"), _copy(d4m_folder, tmp_path, "b")
    args = ("score", a, b, "--dataset", "mnist5k", "--epochs", 1, "--rounds", 1, "--quiet", "--output", tmp_path / "r")
    r = run_cli(*args, "--budget", 3)
    assert r.exit_code == 1
    assert "2 over budget" in r.stdout and "scored again when the batch runs with a larger --budget" in r.stdout
    (failed,) = (tmp_path / "r").glob("a-*.failed.json")
    record = json.loads(failed.read_text())
    assert record["over_budget"] is True and "where the 3 s budget went: starting" in record["reason"]
    r = run_cli(*args, "--budget", 3)
    assert "2 done before" in r.stdout and "over budget" not in r.stdout.splitlines()[-1]
    r = run_cli(*args, "--budget", 3.5)
    assert "2 over budget" in r.stdout  # tried again, not taken from the record


def test_a_mixed_batch_gives_its_generators_the_budget_and_scores_the_rest_as_track1(d4m_folder, official_file,
                                                                                      tmp_path, run_cli):
    folder = _copy(d4m_folder, tmp_path, "gen")
    meta = _meta(folder)
    meta["generate"]["settings"].update(steps=2, batch_size=16)
    (folder / "ddchallenge.json").write_text(json.dumps(meta))
    args = ("score", folder, official_file, "--dataset", "mnist5k", "--epochs", 1, "--rounds", 1, "--quiet",
            "--budget", 600)
    # (Without --mixed the file fails alone and the generator is scored: test_hostile.)
    r = run_cli(*args, "--mixed", "--output", tmp_path / "mixed")
    assert r.exit_code == 0 and "2 scored" in r.stdout, r.stdout + r.stderr
    records = {r["name"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "mixed").glob("*.json"))}
    assert (records["gen"]["rules"]["track"], records["gen"]["rules"]["budget_seconds"]) == (2, 600)
    assert records["mnist5k.pt"]["rules"] == {"track": 1, "datasets": ["mnist5k"], "ipc": None}
    assert records["gen"]["settings"]["mixed"] is True
    r = run_cli("score", official_file, "--mixed", "--quiet")
    assert r.exit_code == 2 and "--mixed gives the generator folders of a batch a Track 2 budget" in _errors(r)[0]


def test_track2_generate_times_its_budget_from_the_command_start_as_the_scorer_does(d4m_folder, tmp_path, monkeypatch,
                                                                                   run_cli):
    """The scorer's budget includes its sandboxed child's start-up; `generate
    --track 2` started its clock only when the folder began to run, so a
    local run had that much more time than the scorer gives. It now counts
    from the command's start: time spent before the run is the budget's."""
    import time

    import ddchallenge.generators.track2 as track2

    seen = {}
    real_folder_method, real_run_folder = track2.folder_method, track2.run_folder

    def slow_folder_method(model):
        time.sleep(0.5)  # stands for the work a command does before the run: imports, reading the folder
        return real_folder_method(model)

    def run_folder(*args, started=None, **kwargs):
        seen["started"], seen["called"] = started, time.monotonic()
        return real_run_folder(*args, started=started, **kwargs)

    monkeypatch.setattr(track2, "folder_method", slow_folder_method)
    monkeypatch.setattr(track2, "run_folder", run_folder)
    before = time.monotonic()
    r = run_cli("generate", "--track", "2", "--model", _copy(d4m_folder, tmp_path), "--dataset", "mnist5k", "--ipc",
                2, "--device", "cpu", "--quiet", "-o", tmp_path / "g.h5")
    assert r.exit_code == 0, r.output
    assert before <= seen["started"] <= seen["called"] - 0.5, seen


def test_the_rows_a_run_read_are_counted_over_its_tables_together():
    """An attacker's review: after a run each table it read was held to the IPC on its own, so a method that read
    two tables of k rows each would have read 2k rows per class and passed."""
    from ddchallenge.errors import UploadRuleError
    from ddchallenge.protocol import check_tables_read

    check_tables_read({"d4m-ipc10": 10}, 10, "run")
    check_tables_read({"d4m-ipc4": 4, "d3m-k6": 6}, 10, "run")
    with pytest.raises(UploadRuleError, match=r"^run: the run read 12 stored rows per class \(table d3m-k6 6, "
                                              r"d4m-ipc6 6\) and made only IPC 10; "):
        check_tables_read({"d4m-ipc6": 6, "d3m-k6": 6}, 10, "run")
    with pytest.raises(UploadRuleError, match="read 11 stored rows per class"):
        check_tables_read({"d4m-ipc11": 11}, 10, "run")
