"""D4M prototypes, D3M class vectors, selection and the Track 2 interface,
through the CLI on a copy of the tiny model."""
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ddchallenge.diffusion.model import model_hash
from ddchallenge.fileio import sha256_file
from ddchallenge.generators.track2 import content_sha256
from ddchallenge.kmeans import kmeans
from ddchallenge.protocol import generation_seed
from ddchallenge.submission import load_submission

GEN = ["generate", "--dataset", "mnist5k", "--steps", 2, "--batch-size", 16]


@pytest.fixture(scope="module")
def coded_model(tiny_model, tmp_path_factory):
    """The tiny model's last checkpoint with d4m codebooks for IPC 2 and 3 and
    d3m vectors for K 2 (invert with --make-default: the folder's Track 2 method is d3m)."""
    from click.testing import CliRunner

    from ddchallenge.cli import cli

    folder = tmp_path_factory.mktemp("coded") / "m"
    shutil.copytree(tiny_model / "step-0000004", folder, ignore=shutil.ignore_patterns("training_state"))
    for args in (["prototypes", folder, "--ipc", 2, "--ipc", 3, "--device", "cpu"],
                 ["invert", folder, "--per-class", 2, "--steps", 3, "--batch-size", 8, "--device", "cpu",
                  "--make-default", "--match-steps", 0]):
        r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.stderr
    return folder


def _read(path):
    with h5py.File(path) as f:
        return f["images"][()], f["labels"][()], json.loads(f.attrs["config"])


def _meta(folder):
    return json.loads((folder / "ddchallenge.json").read_text())


def _keeping(model, folder, *tables):
    """A copy of `model` that keeps only `tables`: Track 2 counts a folder's tables together."""
    from ddchallenge.generators.track2 import change_settings

    shutil.copytree(model, folder)
    change_settings(folder, {}, drop_tables=tuple(sorted(set(_meta(folder)["codebooks"]) - set(tables))))
    return folder


def test_kmeans_finds_separated_clusters_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = (centres[:, None, :] + 0.1 * torch.randn(3, 50, 2, generator=g)).reshape(-1, 2)
    a, b = kmeans(points, 3, seed=1), kmeans(points, 3, seed=1)
    assert a.converged and torch.equal(a.centres, b.centres) and torch.equal(a.assignment, b.assignment)
    assert (torch.cdist(centres, a.centres).min(1).values < 0.1).all()  # every true centre found
    assert len(set(a.assignment.tolist())) == 3
    same = kmeans(torch.ones(5, 3), 3, seed=0)  # fewer distinct points than clusters: still k centres
    assert same.centres.shape == (3, 3) and same.converged


def test_fitted_prototypes_are_the_centres_matched_to_the_class_and_change_nothing_else(tiny_model, tmp_path, run_cli):
    """`prototypes --fit-steps N`: the same IPC rows per class, moved from the k-means centres by N matching
    steps (recorded, seeded: the same bytes twice), on the uint8 grid every matched image is on; the folder's
    generate settings stay as they were, and d4m makes its images from the fitted table."""
    from safetensors.torch import load_file

    folder = tmp_path / "m"
    shutil.copytree(tiny_model / "step-0000004", folder, ignore=shutil.ignore_patterns("training_state"))
    settings = _meta(folder)["generate"]
    table = folder / "codebooks" / "d4m-ipc2.safetensors"

    def make(*extra):
        r = run_cli("prototypes", folder, "--ipc", 2, "--device", "cpu", "--quiet", *extra)
        assert r.exit_code == 0, r.stderr
        return r.stdout, load_file(table)["centres"], _meta(folder)["codebooks"]["d4m-ipc2"]

    _, plain, plain_record = make()
    said, fitted, record = make("--fit-steps", 3)
    assert "fitted by 3 matching steps (loss " in said and "fit" not in plain_record
    assert (record["fit"]["steps_done"], record["fit"]["pool"], record["rows_per_class"]) == (
        3, "the class's training images", 2)
    assert fitted.shape == plain.shape == (10, 2, 1, 28, 28) and not torch.equal(fitted, plain)
    grid = (fitted + 1) * 127.5
    assert torch.allclose(grid, grid.round(), atol=1e-3) and fitted.min() >= -1 and fitted.max() <= 1
    assert make("--fit-steps", 3)[2]["sha256"] == record["sha256"]
    assert _meta(folder)["generate"] == settings
    r = run_cli(*GEN, "--method", "d4m", "--model", folder, "--ipc", 2, "-o", tmp_path / "x.h5")
    assert r.exit_code == 0, r.stderr
    assert _read(tmp_path / "x.h5")[2]["provenance"]["codebook"]["sha256"] == record["sha256"]


def test_d4m_counts_determinism_and_provenance(coded_model, tmp_path, run_cli):
    args = [*GEN, "--method", "d4m", "--model", coded_model, "--ipc", 3]
    for name, extra in (("a", []), ("b", []), ("c", ["--seed", 1])):
        r = run_cli(*args, *extra, "-o", tmp_path / f"{name}.h5")
        assert r.exit_code == 0, r.stderr
    (xa, ya, config), (xb, _, _), (xc, _, _) = (_read(tmp_path / f"{n}.h5") for n in "abc")
    assert xa.shape == (30, 1, 28, 28) and list(ya) == [k for k in range(10) for _ in range(3)]
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()
    assert not np.array_equal(xa, xc)
    book = config["provenance"]["codebook"]
    record = _meta(coded_model)["codebooks"]["d4m-ipc3"]
    assert book["sha256"] == record["sha256"] == sha256_file(coded_model / "codebooks" / "d4m-ipc3.safetensors")
    assert config["provenance"]["model"]["model_sha256"] == model_hash(coded_model)
    assert config["provenance"]["strength"] == 0.5
    # The model hash covers the codebook bytes themselves, not only their record.
    copy = tmp_path / "copy"
    shutil.copytree(coded_model, copy)
    (copy / "codebooks" / "d4m-ipc3.safetensors").write_bytes(b"x")
    assert model_hash(copy) != model_hash(coded_model)


def test_d4m_auto_ipc_takes_the_largest_stored_codebook_that_fits(coded_model, tmp_path, run_cli):
    r = run_cli(*GEN, "--method", "d4m", "--model", coded_model, "--ipc", "auto", "--budget", 120,
                "-o", tmp_path / "x.h5")
    assert r.exit_code == 0, r.stderr
    assert "IPC 3, 30 images" in r.stdout


def test_d3m_counts_determinism_and_provenance(coded_model, tmp_path, run_cli):
    args = [*GEN, "--method", "d3m", "--model", coded_model, "--ipc", 3]
    assert run_cli(*args, "-o", tmp_path / "a.h5").exit_code == 0
    assert run_cli(*args, "-o", tmp_path / "b.h5").exit_code == 0
    x, y, config = _read(tmp_path / "a.h5")
    assert x.shape == (30, 1, 28, 28) and list(y) == [k for k in range(10) for _ in range(3)]
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()
    record = _meta(coded_model)["codebooks"]["d3m-k2"]
    assert config["provenance"]["codebook"]["sha256"] == record["sha256"]
    assert config["provenance"]["model"]["model_sha256"] == model_hash(coded_model)


def test_d3m_vectors_start_at_the_class_embedding_and_are_trained(coded_model):
    from safetensors.torch import load_file

    from diffusers import UNet2DModel

    vectors = load_file(coded_model / "codebooks" / "d3m-k2.safetensors")["vectors"]
    table = UNet2DModel.from_pretrained(coded_model / "unet").class_embedding.weight.detach()
    assert vectors.shape == (10, 2, table.shape[1])
    moved = (vectors - table[:10, None, :]).norm(dim=-1)
    # Each started at its class's row and only moved by a few steps (3 here): some moved, none went far.
    assert (moved > 0).any() and (moved < 0.5 * table[:10].norm(dim=-1)[:, None]).all()


def test_selection_keeps_exactly_ipc(coded_model, tmp_path, run_cli, monkeypatch):
    from ddchallenge.generators import selection

    monkeypatch.setattr(selection, "SELECTION_EPOCHS", 1)
    out = tmp_path / "s.h5"
    r = run_cli(*GEN, "--method", "d4m", "--model", coded_model, "--ipc", 2, "--oversample", 2, "-o", out)
    assert r.exit_code == 0, r.stderr
    x, y, config = _read(out)
    assert x.shape == (20, 1, 28, 28) and list(y) == [k for k in range(10) for _ in range(2)]
    sel = config["provenance"]["selection"]
    assert (sel["candidates_per_class"], sel["kept_per_class"], config["oversample"]) == (4, 2, 2.0)
    r = run_cli("generate", "--dataset", "mnist5k", "--method", "random", "--ipc", 2, "--oversample", 1.5,
                "-o", tmp_path / "r.h5")
    assert r.exit_code == 0, r.stderr
    assert _read(tmp_path / "r.h5")[0].shape == (20, 1, 28, 28)


def test_matching_refines_the_kept_images_reproducibly(coded_model, tmp_path, run_cli, monkeypatch):
    from ddchallenge.generators import baselines, diffusion, matching

    monkeypatch.setattr(matching, "POOL_PER_CLASS", 3)
    loads = []
    for module, name in ((diffusion, "load_generator"), (baselines, "load_train")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name, **k: loads.append(name) or real(*a, **k))
    args = (*GEN, "--method", "d4m", "--model", coded_model, "--ipc", 2)
    for name, extra in (("plain", ()), ("a", ("--match-steps", 3)), ("b", ("--match-steps", 3))):
        r = run_cli(*args, *extra, "-o", tmp_path / f"{name}.h5")
        assert r.exit_code == 0, r.stderr
    plain, a, b = (_read(tmp_path / f"{n}.h5") for n in ("plain", "a", "b"))
    assert a[0].shape == (20, 1, 28, 28) and list(a[1]) == [k for k in range(10) for _ in range(2)]
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], plain[0])  # same seed, same bytes; it moved
    record = a[2]["provenance"]["matching"]
    assert (a[2]["match_steps"], record["steps"], record["steps_done"], record["pool_per_class"]) == (3, 3, 3, 3)
    # d4m's pool: its own IPC-2 prototypes redrawn (no other table read), named by their hash.
    assert (record["pool"]["source"], record["pool"]["per_class"]) == ("d4m prototypes redrawn", 3)
    assert record["pool"]["codebook"]["sha256"] == _meta(coded_model)["codebooks"]["d4m-ipc2"]["sha256"]
    assert a[2]["provenance"]["tables_read"] == {"d4m-ipc2": 2}
    assert loads == ["load_generator"] * 3  # one load per run: the pool reuses the method's model
    # The real-image baselines match against the training images.
    r = run_cli("generate", "--dataset", "mnist5k", "--method", "random", "--ipc", 1, "--match-steps", 1,
                "-o", tmp_path / "r.h5")
    assert r.exit_code == 0, r.stderr
    record = _read(tmp_path / "r.h5")[2]["provenance"]["matching"]
    assert (record["pool_per_class"], record["pool"]["source"]) == (400, "training images")  # mnist5k: 400 per class
    assert loads == ["load_generator"] * 3 + ["load_train"]


def test_matching_moves_class_means_toward_the_pool(monkeypatch):
    from ddchallenge.data import load_train, normalise
    from ddchallenge.evaluation.nets import reference_convnet
    from ddchallenge.evaluation import matching
    from ddchallenge.protocol import get_dataset

    monkeypatch.setattr(matching, "MATCH_BATCH", 16)
    spec = get_dataset("mnist5k")
    images, labels = load_train(spec)
    start = np.concatenate([images[labels == k][:1] for k in range(10)])  # one real image per class
    start_labels = np.arange(10)

    def gap(x):  # class-mean distance in the features of three fixed nets, no augmentation
        pool = normalise(np.concatenate([images[labels == k][:64] for k in range(10)]), spec)
        total = 0.0
        for s in range(3):
            torch.manual_seed(1000 + s)
            embed = reference_convnet(spec).features
            with torch.no_grad():
                means = embed(pool).flatten(1).view(10, 64, -1).mean(1)
                total += float(((means - embed(normalise(x, spec)).flatten(1)) ** 2).sum())
        return total

    out, record = matching.match(start, start_labels, images, labels, spec, 10, 0, torch.device("cpu"))
    assert out.dtype == np.uint8 and out.shape == start.shape and record["steps"] == 10
    assert gap(out) < 0.8 * gap(start)


def test_matching_augments_pool_and_kept_images_alike():
    """Siamese augmentation: a set that is its own whole pool has nothing to
    match under any draw (loss 0, pixels unchanged); with independent draws
    per image the two means would differ at every step."""
    from ddchallenge.data import load_train
    from ddchallenge.evaluation import matching
    from ddchallenge.protocol import get_dataset

    spec = get_dataset("mnist5k")
    images, labels = load_train(spec)
    kept = np.concatenate([images[labels == k][:2] for k in range(10)])
    kept_labels = np.repeat(np.arange(10), 2)
    out, record = matching.match(kept, kept_labels, kept, kept_labels, spec, 6, 0, torch.device("cpu"))
    assert np.array_equal(out, kept)
    assert record["loss_first_last"] == [0.0, 0.0]


def test_codebook_folder_scores_as_track2_submission(coded_model, run_cli, tmp_path):
    # IPC 3: the folder carries d4m's and d3m's tables (7 rows per class in all) and is refused as it is; kept to
    # d3m's 2 rows per class, it runs (a run may read no more rows than it makes).
    r = run_cli("score", coded_model, "--dataset", "mnist5k", "--ipc", 3, "--epochs", 1, "--rounds", 1, "--quiet",
                "--json", "-", "--budget", 600)
    assert r.exit_code == 1 and "tables (d3m-k2 2, d4m-ipc2 2, d4m-ipc3 3) store 7 rows per class" in r.stderr
    d3m = _keeping(coded_model, tmp_path / "d3m", "d3m-k2")
    r = run_cli("score", d3m, "--dataset", "mnist5k", "--ipc", 3, "--epochs", 1, "--rounds", 1, "--quiet", "--json", "-",
                "--budget", 600)
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    (d,) = result["datasets"]
    assert (d["method"], d["ipc"], d["images"]) == ("d3m", 3, 30) and result["sandbox"].startswith("no network")
    # The folder's generate section picks the method; d4m in process this time.
    folder = _keeping(coded_model, tmp_path / "d4m", "d4m-ipc3")
    meta = _meta(folder)
    meta["generate"] = {"method": "d4m", "settings": {"strength": 0.5}}
    (folder / "ddchallenge.json").write_text(json.dumps(meta))
    args = ("score", folder, "--dataset", "mnist5k", "--ipc", 3, "--epochs", 1, "--rounds", 1, "--quiet", "--json", "-",
            "--budget", 600)
    r = run_cli(*args, "--no-sandbox", "--output", "in-process")
    assert r.exit_code == 0, r.stderr
    in_process = json.loads(r.stdout)["datasets"][0]
    assert in_process["method"] == "d4m"
    # Where the folder was staged is no part of the set's identity: the same seed names the same images.
    r = run_cli(*args)
    assert r.exit_code == 0, r.stderr
    boxed = json.loads(r.stdout)["datasets"][0]
    assert (boxed["sha256"], boxed["accuracies"]) == (in_process["sha256"], in_process["accuracies"])
    # One Track 2 path: `generate --track 2` with the same (scoring) seed makes exactly the images the scorer made.
    r = run_cli("generate", "--dataset", "mnist5k", "--model", folder, "--ipc", 3, "--track", 2, "--device", "cpu",
                "--quiet", "-o", tmp_path / "local.h5")
    assert r.exit_code == 0, r.stderr
    assert f"generation seed {generation_seed(0)} (from scoring seed 0)" in r.stdout
    (local,) = load_submission(tmp_path / "local.h5", "mnist5k")
    assert content_sha256(local.images, local.labels) == boxed["sha256"]
    config = _read(tmp_path / "local.h5")[2]
    assert (config["scoring_seed"], config["seed"]) == (0, generation_seed(0))


def test_folder_without_generate_section_is_plain_diffusion(coded_model, tmp_path):
    from ddchallenge.generators.track2 import folder_method

    assert folder_method(coded_model) == ("d3m", {"per_class": 2, "oversample": 1.0, "match_steps": 0})
    meta = _meta(coded_model)
    del meta["generate"]
    (tmp_path / "ddchallenge.json").write_text(json.dumps(meta))
    assert folder_method(tmp_path) == ("diffusion", {})


@pytest.mark.parametrize("section, message", [
    ({"method": "gan", "settings": {}}, "names method 'gan'; Track 2 runs d3m, d4m, diffusion"),
    ({"method": "d4m", "settings": {"match_steps": 2.5}}, "generate.settings.match_steps must be a whole number from 0 to 100000, got 2.5"),
    ({"method": "d4m", "settings": {"steps": 20.5}}, "generate.settings.steps must be a whole number from 1 to 1000, got 20.5"),
    ({"method": "d4m", "settings": {"strength": True}}, "generate.settings.strength must be a number from 1e-06 to 1, got true"),
    ({"method": "diffusion", "settings": {"strength": 0.5}}, "generate.settings.strength does not apply to method diffusion"),
    (["d4m"], "ddchallenge.json: generate must be an object, got a list"),
])
def test_bad_folder_generate_section_is_refused(coded_model, tmp_path, section, message):
    from ddchallenge.diffusion.model import ModelError
    from ddchallenge.generators.track2 import folder_method

    meta = _meta(coded_model)
    meta["generate"] = section
    (tmp_path / "ddchallenge.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError) as caught:
        folder_method(tmp_path)
    assert message in str(caught.value)


def test_track2_folder_settings_reach_the_run(coded_model, tmp_path, monkeypatch):
    from ddchallenge import generators
    from ddchallenge.generators.track2 import run_track2

    seen = []

    def capture(config, output, force=False, started=None):
        seen.append(config)
        raise KeyboardInterrupt  # stop before anything is made

    monkeypatch.setattr(generators, "generate", capture)
    folder = _keeping(coded_model, tmp_path / "f", "d4m-ipc3")
    meta = _meta(folder)
    meta["generate"] = {"method": "d4m", "settings": {"strength": 0.3, "oversample": 2, "match_steps": 7}}
    (folder / "ddchallenge.json").write_text(json.dumps(meta))
    with pytest.raises(KeyboardInterrupt):
        run_track2(str(folder), "mnist5k", 3, 0, 600.0, "cpu", tmp_path)
    (config,) = seen
    assert (config.method, config.oversample, config.match_steps, config.options["strength"]) == ("d4m", 2.0, 7, 0.3)
    assert (config.seed, config.scoring_seed, config.track) == (generation_seed(0), 0, 2)


def _tampered(coded_model, tmp_path, ipc=2):
    folder = tmp_path / "t"
    shutil.copytree(coded_model, folder)
    with open(folder / "codebooks" / f"d4m-ipc{ipc}.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    return folder


def _missing(coded_model, tmp_path, ipc=2):
    folder = tmp_path / "t"
    shutil.copytree(coded_model, folder)
    (folder / "codebooks" / f"d4m-ipc{ipc}.safetensors").unlink()
    return folder


def _wrong_shape(coded_model, tmp_path, ipc=2):
    """A codebook with 9 classes, recorded with its true hash: only the shape check can catch it."""
    folder = tmp_path / "t"
    shutil.copytree(coded_model, folder)
    path = folder / "codebooks" / f"d4m-ipc{ipc}.safetensors"
    save_file({"centres": torch.zeros(9, ipc, 1, 28, 28)}, path)
    meta = _meta(folder)
    meta["codebooks"][f"d4m-ipc{ipc}"]["sha256"] = sha256_file(path)
    (folder / "ddchallenge.json").write_text(json.dumps(meta))
    return folder


def _wrong_space(coded_model, tmp_path, ipc=2):
    folder = tmp_path / "t"
    shutil.copytree(coded_model, folder)
    meta = _meta(folder)
    meta["codebooks"][f"d4m-ipc{ipc}"]["sample_shape"] = [4, 14, 14]
    (folder / "ddchallenge.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("method, extra, make, message", [
    ("d4m", ["--strength", 0], None, "--strength must be in (0, 1]"),
    ("d4m", ["--strength", 1.5], None, "--strength must be in (0, 1]"),
    ("d4m", ["--oversample", 0.5], None, "--oversample must be from 1 to 100"),
    ("d3m", ["--per-class", 0], None, "--per-class must be at least 1"),
    ("d4m", ["--ipc", 5], None, "has no d4m codebook for IPC 5 (stored: 2, 3); make it with `ddchallenge prototypes"),
    ("d3m", ["--per-class", 4, "--ipc", 4], None, "has no d3m vectors for K 4 (stored: 2); make them with `ddchallenge invert"),
    ("d3m", ["--per-class", 2, "--ipc", 1], None, "--per-class 2 reads 2 stored vectors per class, more than the IPC 1"),
    ("d4m", [], _tampered, "does not match the sha256 recorded in ddchallenge.json"),
    ("d4m", [], _missing, "the d4m-ipc2 codebook file codebooks/d4m-ipc2.safetensors is missing"),
    ("d4m", [], _wrong_shape, "holds a (9, 2, 1, 28, 28) tensor; this model needs (10, 2, 1, 28, 28)"),
    ("d4m", [], _wrong_space, "was made in a [4, 14, 14] space; this model samples [1, 28, 28]"),
    ("diffusion", ["--strength", 0.5], None, "--strength does not apply to --method diffusion"),
    ("d4m", ["--match-steps", -1], None, "--match-steps must be a whole number from 0 (no matching) to 100000"),
])
def test_bad_input_is_refused(coded_model, tmp_path, run_cli, method, extra, make, message):
    model = make(coded_model, tmp_path) if make else coded_model
    out = tmp_path / "x.h5"
    args = {"--method": method, "--model": model, "--ipc": 2}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value
    r = run_cli(*GEN, *[x for kv in args.items() for x in kv], "-o", out)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.exit_code in (1, 2) and len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


@pytest.mark.parametrize("args, message", [
    (["invert", "{m}", "--per-class", 0], "--per-class must be between 1 and 100"),
    (["invert", "{m}", "--per-class", 101], "--per-class must be between 1 and 100 (the largest IPC a Track 2 run"),
    (["prototypes", "{m}", "--ipc", 2, "--strength", 0], "--strength must be in (0, 1]"),
    (["prototypes", "{m}", "--ipc", 0], "--ipc must be between 1 and 100"),
    (["prototypes", "{m}", "--ipc", 101], "--ipc must be between 1 and 100 (the largest IPC a Track 2 run may output"),
    (["prototypes", "{m}", "--ipc", 2, "--oversample", 0, "--make-default"], "--oversample must be from 1 to 100"),
    (["prototypes", "{m}", "--ipc", 2, "--strength", 0.3], "--strength sets the folder's Track 2 settings; add "
     "--make-default"),
    (["invert", "{m}", "--per-class", 2, "--match-steps", 5], "--match-steps sets the folder's Track 2 settings"),
    (["invert", "{m}", "--per-class", 2, "--match-steps", -3, "--make-default"],
     "--match-steps must be a whole number from 0"),
    (["prototypes", "{m}/nowhere", "--ipc", 2], "is not a local model folder"),
    (["prototypes", "{m}", "--ipc", 2, "--fit-steps", -1], "--fit-steps must be a whole number from 0 (plain k-means "
     "centres) to 100000"),
    (["invert", "{m}/nowhere", "--per-class", 2], "is not a local model folder"),
])
def test_bad_codebook_commands_are_refused(coded_model, run_cli, args, message):
    before = (coded_model / "ddchallenge.json").read_bytes()
    r = run_cli(*[str(a).format(m=coded_model) for a in args])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.exit_code == 2 and len(errors) == 1 and message in errors[0], r.stderr  # each a bad argument
    assert (coded_model / "ddchallenge.json").read_bytes() == before
