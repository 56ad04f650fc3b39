"""Hostile generator folders and generators where images are due, crafted
here from the tiny trained model.

Track 1 (no --budget): an upload that is or holds a generator is refused in
one line on every path (a file, a res/ folder, a zip, a batch, the Codabench
program), whatever dummy files sit beside it. Track 2 (--budget): every
problem in a folder's JSON is one line naming the file and the field, never
a bare exception type, and nothing in a folder makes diffusers look a name
up on the Hub."""
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from ddchallenge.batch import record_key
from ddchallenge.data import save_reference
from ddchallenge.diffusion.folder import MAX_JSON_DEPTH, ModelError
from ddchallenge.isolation import isolation
from ddchallenge.protocol import get_dataset

FAST = ("--epochs", 0, "--rounds", 1, "--quiet")
PROGRAM = Path(__file__).resolve().parents[1] / "evaluator" / "evaluate.py"
REFUSED = "generators are scored only in a Track 2 run, with --budget SECONDS"
sandboxed = pytest.mark.skipif(isolation() is None, reason="unshare --net is not permitted on this machine")


@pytest.fixture
def checkpoint(tiny_model, tmp_path):
    """A copy of the tiny model's last checkpoint, as a participant uploads it."""
    folder = tmp_path / "gen"
    shutil.copytree(tiny_model / "step-0000004", folder, ignore=shutil.ignore_patterns("training_state"))
    return folder


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def failed_reason(out, name):
    return json.loads((out / f"{record_key(name)}.failed.json").read_text())["reason"]


def _one_line(r):
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


# ---------------------------------------------------------------- Track 1 refuses generators

def _generator_uploads(checkpoint, official_file, root):
    """Every shape a generator takes where images are due, each with a valid
    mnist5k.pt (or dummy .pt files) beside it to satisfy presence checks."""
    root.mkdir()
    ups = {}
    # The report's case: a res/ folder holding a tiny generator and dummy .pt files.
    ups["res-generator"] = root / "res-generator"
    shutil.copytree(checkpoint, ups["res-generator"] / "res")
    torch.save(torch.zeros(3), ups["res-generator"] / "res" / "mnist5k.pt")
    # A generator nested under res/ beside a valid set.
    ups["nested"] = root / "nested"
    shutil.copytree(checkpoint, ups["nested"] / "res" / "model")
    shutil.copy(official_file, ups["nested"] / "res" / "mnist5k.pt")
    # A training output (step-* checkpoints) beside res/.
    ups["beside"] = root / "beside"
    (ups["beside"] / "res").mkdir(parents=True)
    shutil.copy(official_file, ups["beside"] / "res" / "mnist5k.pt")
    shutil.copytree(checkpoint, ups["beside"] / "run" / "step-0000004")
    (ups["beside"] / "run" / "step-0000004" / "ddchallenge.json").unlink()  # the checkpoint name alone tells
    # Bare diffusers parts, no ddchallenge.json.
    ups["diffusers"] = root / "diffusers"
    shutil.copytree(checkpoint / "unet", ups["diffusers"] / "unet")
    shutil.copy(official_file, ups["diffusers"] / "mnist5k.pt")
    # A zip holding a generator folder beside the set.
    ups["zipped.zip"] = root / "zipped.zip"
    with zipfile.ZipFile(ups["zipped.zip"], "w") as z:
        z.write(official_file, "mnist5k.pt")
        for p in sorted(checkpoint.rglob("*")):
            if p.is_file():
                z.write(p, f"gen/{p.relative_to(checkpoint).as_posix()}")
    return ups


@sandboxed
def test_track1_batch_refuses_every_generator_shape(run_cli, checkpoint, official_file, tmp_path):
    ups = _generator_uploads(checkpoint, official_file, tmp_path / "uploads")
    good = tmp_path / "uploads" / "good"
    (good / "res").mkdir(parents=True)
    shutil.copy(official_file, good / "res" / "mnist5k.pt")
    out = tmp_path / "results"
    r = run_cli("score", *ups.values(), good, "--dataset", "mnist5k", *FAST, "--output", out)
    assert r.exit_code == 1
    assert (out / f"{record_key('good')}.json").exists()
    expected = {"res-generator": "res/ddchallenge.json: a ddchallenge generator's description",
                "nested": "res/model/ddchallenge.json: a ddchallenge generator's description",
                "beside": "run/step-0000004: a training checkpoint",
                "diffusers": "unet/config.json: a diffusers config",
                "zipped.zip": "gen/ddchallenge.json: a ddchallenge generator's description"}
    for name, found in expected.items():
        reason = failed_reason(out, name)
        assert f"holds a generator or model ({found})" in reason and REFUSED in reason, (name, reason)
        assert not (out / f"{record_key(name)}.json").exists()


def test_track1_refuses_generators_without_the_sandbox_and_alone(run_cli, checkpoint, official_file, tiny_model,
                                                                   tmp_path):
    ups = _generator_uploads(checkpoint, official_file, tmp_path / "uploads")
    for name in ("res-generator", "zipped.zip"):
        r = run_cli("score", ups[name], "--dataset", "mnist5k", *FAST, "--no-sandbox", "--output", tmp_path / name)
        assert r.exit_code == 1 and REFUSED in _one_line(r)
    # A generator folder is Track 2 only: without --budget it is not run. Alone, the command line's mistake (one
    # line, exit 2, no record); in a batch of several, the upload's failure, recorded.
    for folder in (tiny_model, checkpoint):
        r = run_cli("score", folder, "--dataset", "mnist5k", *FAST, "--output", tmp_path / "r-alone")
        assert r.exit_code == 2 and _one_line(r) == (f"error: {folder} is a generator folder: it is scored by running "
                                                     "it, in a Track 2 run with --budget SECONDS (the challenge's: 600)")
        assert not (tmp_path / "r-alone").exists()
    r = run_cli("score", checkpoint, official_file, "--dataset", "mnist5k", *FAST, "--output", tmp_path / "r-two")
    assert r.exit_code == 1 and REFUSED in failed_reason(tmp_path / "r-two", checkpoint.name)
    assert not (tmp_path / "r-two" / f"{record_key(checkpoint.name)}.json").exists()


def _evaluator_input(tmp_path):
    inp = tmp_path / "input"
    (inp / "res").mkdir(parents=True)
    save_reference(get_dataset("mnist5k"), inp / "ref" / "mnist5k_test.pt")
    return inp


@pytest.mark.parametrize("layout", ["generator-and-dummies", "nested"])
def test_codabench_program_refuses_a_generator_in_res(checkpoint, official_file, tmp_path, layout):
    inp, out = _evaluator_input(tmp_path), tmp_path / "output"
    res = inp / "res"
    if layout == "generator-and-dummies":  # the report's case: scored at IPC 100 before
        shutil.copytree(checkpoint, res, dirs_exist_ok=True)
        torch.save(torch.zeros(1), res / "mnist5k.pt")
        torch.save(torch.zeros(1), res / "cifar100.pt")
    else:  # a valid set, and a generator folder deep inside res/
        shutil.copy(official_file, res / "mnist5k.pt")
        shutil.copytree(checkpoint, res / "deep" / "er" / "gen")
    proc = subprocess.run([sys.executable, str(PROGRAM), str(inp), str(out), "--epochs", "0", "--rounds", "1",
                           "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 1 and not out.exists(), proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "this competition scores images: upload mnist5k.pt" in lines[0], proc.stderr
    assert "holds a generator or model (" in lines[0]


# ---------------------------------------------------------------- Track 2: every problem is one line

def _meta(change):
    return lambda folder: _edit_json(folder / "ddchallenge.json", change)


def _unet(change):
    return lambda folder: _edit_json(folder / "unet" / "config.json", change)


def _write(rel, text):
    return lambda folder: (folder / rel).write_text(text)


def _set(key, value):
    def change(d):
        d[key] = value
    return change


def _settings(**settings):
    return _set("generate", {"method": "diffusion", "settings": settings})


def _deep(depth):
    return lambda d: d.update(extra=json.loads("[" * depth + "]" * depth))


# name -> (how the folder is broken, what the one-line refusal says)
FOLDER_CASES = {
    "method-list": (_meta(_set("generate", {"method": ["d4m"], "settings": {}})),
                    "ddchallenge.json: generate.method must be a method name, got a list"),
    "settings-pairs": (_meta(_set("generate", {"method": "diffusion", "settings": [["steps", 5]]})),
                       "ddchallenge.json: generate.settings must be an object, got a list"),
    "generate-list": (_meta(_set("generate", ["d3m", {"per_class": 2}])),
                      "ddchallenge.json: generate must be an object, got a list"),
    "settings-null": (_meta(_set("generate", {"method": "d3m", "settings": None})),
                      "ddchallenge.json: generate.settings must be an object, got null"),
    "latent-shape-int": (_meta(lambda d: d.update(space="latent", latent_shape=4)),
                         "ddchallenge.json: latent_shape must be a list of 3 whole numbers"),
    "image-shape-float": (_meta(_set("image_shape", [1.0, 28.0, 28.0])),
                          "ddchallenge.json: image_shape must be a list of 3 whole numbers from 1 to 1024"),
    "classes-bool": (_meta(_set("classes", True)), "ddchallenge.json: classes must be a whole number"),
    "deep-config": (_meta(_deep(MAX_JSON_DEPTH + 5)), f"ddchallenge.json is nested deeper than {MAX_JSON_DEPTH}"),
    "recursion": (_write("ddchallenge.json", "[" * 100_000 + "]" * 100_000),
                  f"ddchallenge.json is nested deeper than {MAX_JSON_DEPTH}"),
    "meta-nan": (_write("ddchallenge.json", '{"format": "ddchallenge-diffusion", "latent_scale": NaN}'),
                 "ddchallenge.json is not valid JSON (NaN is not a number JSON allows)"),
    "codebooks-list": (_meta(_set("codebooks", ["d4m-ipc10"])), "ddchallenge.json: codebooks must be an object"),
    "batch-huge": (_meta(_settings(batch_size=10**9)),
                   "ddchallenge.json: generate.settings.batch_size must be a whole number from 1 to 1000"),
    "steps-huge": (_meta(_settings(steps=10**7)), "generate.settings.steps must be a whole number from 1 to 1000"),
    "oversample-huge": (_meta(_settings(oversample=1e300)), "generate.settings.oversample must be a number from 1"),
    "head-dim-0": (_unet(_set("attention_head_dim", 0)),
                   "unet/config.json: attention_head_dim must be a whole number from 1 to 32 or null, got 0"),
    "head-dim-negative": (_unet(_set("attention_head_dim", -8)), "attention_head_dim must be a whole number"),
    "head-dim-huge": (_unet(_set("attention_head_dim", 10**12)), "attention_head_dim must be a whole number"),
    "channels-huge": (_unet(_set("block_out_channels", [16, 1 << 20])),
                      "unet/config.json: block_out_channels must be a list of 1 to 6 whole numbers from 1 to 2048"),
    "layers-huge": (_unet(_set("layers_per_block", 10**6)),
                    "unet/config.json: layers_per_block must be a whole number"),
    "too-many-parameters": (_unet(lambda d: d.update(block_out_channels=[2048] * 6, layers_per_block=8,
                                                     down_block_types=["DownBlock2D"] * 6,
                                                     up_block_types=["UpBlock2D"] * 6)),
                            "M parameters, more than 600 M"),
    "groups-indivisible": (_unet(_set("norm_num_groups", 7)), "norm_num_groups (7) must divide every entry"),
    "exotic-embedding": (_unet(_set("time_embedding_type", "fourier")),
                         "unet/config.json: time_embedding_type must be \"positional\""),
    "unet-config-hub-name": (_write("unet/config.json", json.dumps("hf-internal-testing/tiny-stable-diffusion-torch")),
                             "unet/config.json must hold a JSON object, not a string"),
    "unet-config-list": (_write("unet/config.json", "[1, 2]"), "unet/config.json must hold a JSON object, not a list"),
    "unet-config-huge": (_write("unet/config.json", "{" + " " * (2 << 20) + "}"),
                         "unet/config.json is 2097154 bytes, more than the 1048576"),
    "weights-mismatch": (_unet(lambda d: d.update(block_out_channels=[32, 32], norm_num_groups=16)),
                         "diffusion_pytorch_model.safetensors does not hold the weights"),
    "scheduler-string": (_write("scheduler/scheduler_config.json", '"google/ddpm-cifar10-32"'),
                         "scheduler_config.json must hold a JSON object, not a string"),
    "scheduler-huge-schedule": (lambda f: _edit_json(f / "scheduler" / "scheduler_config.json",
                                                     _set("num_train_timesteps", 10**9)),
                                "scheduler_config.json: num_train_timesteps must be a whole number from 1 to 10000"),
    "scheduler-file-huge": (_write("scheduler/scheduler_config.json", "{" + " " * (2 << 20) + "}"),
                            "scheduler_config.json is 2097154 bytes"),
}


def _broken(checkpoint, root, names):
    root.mkdir(exist_ok=True)
    folders = []
    for name in names:
        folder = root / name
        shutil.copytree(checkpoint, folder)
        FOLDER_CASES[name][0](folder)
        folders.append(folder)
    return folders


def _check_reason(name, reason):
    assert FOLDER_CASES[name][1] in reason, (name, reason)
    assert "reading the upload failed" not in reason and "Error:" not in reason, (name, reason)
    assert "\n" not in reason


def test_every_folder_problem_is_one_line_without_the_sandbox(run_cli, checkpoint, tmp_path):
    names = sorted(FOLDER_CASES)
    folders = _broken(checkpoint, tmp_path / "uploads", names)
    out = tmp_path / "results"
    r = run_cli("score", *folders, "--dataset", "mnist5k", "--budget", 60, "--ipc", 1, *FAST, "--no-sandbox",
                "--output", out)
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    for name in names:
        _check_reason(name, failed_reason(out, name))


@sandboxed
def test_folder_problems_are_one_line_in_the_sandbox(run_cli, checkpoint, tmp_path):
    names = ["settings-pairs", "recursion", "unet-config-hub-name"]  # each costs a sandboxed child
    folders = _broken(checkpoint, tmp_path / "uploads", names)
    out = tmp_path / "results"
    r = run_cli("score", *folders, "--dataset", "mnist5k", "--budget", 60, "--ipc", 1, *FAST, "--output", out)
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    for name in names:
        _check_reason(name, failed_reason(out, name))


@pytest.mark.parametrize("name", ["generate-list", "settings-null", "image-shape-float", "head-dim-huge",
                                  "unet-config-hub-name", "scheduler-huge-schedule"])
def test_generate_with_a_broken_model_is_one_line(run_cli, checkpoint, tmp_path, name):
    (folder,) = _broken(checkpoint, tmp_path / "models", [name])
    method = "d3m" if name in ("generate-list", "settings-null") else "diffusion"
    out = tmp_path / "set.h5"
    r = run_cli("generate", "--dataset", "mnist5k", "--method", method, "--model", folder, "--ipc", 1, "--steps", 2,
                "--device", "cpu", "-o", out)
    assert r.exit_code == 1 and not out.exists()
    _check_reason(name, _one_line(r))


@pytest.mark.parametrize("command", [("prototypes", "--ipc", 1), ("invert", "--per-class", 1, "--steps", 1)])
def test_prototypes_and_invert_refuse_a_hub_name_as_config(run_cli, checkpoint, tmp_path, command):
    (folder,) = _broken(checkpoint, tmp_path / "models", ["unet-config-hub-name"])
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    r = run_cli(command[0], folder, *command[1:], "--device", "cpu", "--quiet")
    assert r.exit_code == 1
    _check_reason("unet-config-hub-name", _one_line(r))
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # nothing written


def test_a_vae_config_is_checked_before_diffusers_sees_it(tmp_path):
    """A VAE folder (inside a latent generator, or --vae) whose config is a
    Hub name, a list or out of bounds is refused before any load."""
    from ddchallenge.diffusion.model import load_vae

    vae = tmp_path / "vae"
    vae.mkdir()
    cases = {json.dumps("stabilityai/sd-vae-ft-mse"): "config.json must hold a JSON object, not a string",
             "[]": "config.json must hold a JSON object, not a list",
             json.dumps({"block_out_channels": [0]}): "block_out_channels must be a list of 1 to 6 whole numbers",
             json.dumps({"latent_channels": 10**9}): "latent_channels must be a whole number from 1 to 16",
             json.dumps({"scaling_factor": 0}): "scaling_factor must be a number from 1e-06",
             json.dumps({"norm_num_groups": 0}): "norm_num_groups must be a whole number from 1"}
    for text, message in cases.items():
        (vae / "config.json").write_text(text)
        with pytest.raises(ModelError) as caught:
            load_vae(str(vae))
        assert message in str(caught.value), (text, str(caught.value))
    (vae / "config.json").write_text(json.dumps({"block_out_channels": [16, 16], "down_block_types": [
        "DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 16}))
    with pytest.raises(ModelError, match="has no diffusion_pytorch_model.safetensors"):
        load_vae(str(vae))


def test_a_json_integer_past_any_float_is_refused_in_one_line_not_an_overflow():
    """JSON integers have no size limit and no float holds 10**400: every
    number a generator folder's JSON gives is refused by its range, never
    converted (math.isfinite raised OverflowError)."""
    from ddchallenge.diffusion.folder import ModelError, _number_list, check_meta, number

    with pytest.raises(ModelError, match="x must be a number from 0 to 1, got 1000"):
        number("f.json", "x", 10**400, 0.0, 1.0)
    with pytest.raises(ModelError, match="xs must be null or a list of at most 4 finite numbers"):
        _number_list("f.json", "xs", [0.5, -10**400], 4)
    meta = {"format": "ddchallenge-diffusion", "dataset": "mnist5k", "classes": 10, "image_shape": [1, 28, 28],
            "space": "pixel", "latent_scale": 10**400}
    with pytest.raises(ModelError, match="latent_scale must be a positive number"):
        check_meta(meta, "ddchallenge.json", "ddchallenge-diffusion", ("pixel", "latent"))
