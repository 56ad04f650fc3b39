"""The diffusion generator end to end on mnist5k with tiny diffusers models:
train, checkpoint, resume, sample, refuse."""
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddchallenge.diffusion.config import train_config, vae_config
from ddchallenge.diffusion.train import BatchOrder, train, train_vae
from ddchallenge.errors import UsageError

TINY = dict(steps=4, checkpoint_every=2)  # the conftest tiny_model


def _state(folder):
    return load_file(folder / "training_state" / "unet.safetensors"), load_file(
        folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_train_writes_complete_checkpoints(tiny_training):
    tiny_model, _, written = tiny_training
    assert sorted(p.name for p in tiny_model.iterdir()) == ["step-0000002", "step-0000004"]
    # Track 2 runs a trained folder as diffusion with matching (the validation view's choice); conftest then set
    # the tests' copies to plain diffusion through `settings`' library call.
    assert written == {c: {"method": "diffusion", "settings": {"match_steps": 300}} for c in ("step-0000002",
                                                                                          "step-0000004")}
    ckpt = tiny_model / "step-0000004"
    meta = json.loads((ckpt / "ddchallenge.json").read_text())
    assert (meta["dataset"], meta["classes"], meta["image_shape"], meta["step"]) == ("mnist5k", 10, [1, 28, 28], 4)
    assert meta["train_config"]["preset"] == "tiny"
    assert meta["generate"] == {"method": "diffusion", "settings": {"match_steps": 0}}
    assert (ckpt / "samples.png").read_bytes()[:4] == b"\x89PNG"
    raw, ema = _state(ckpt)
    assert raw.keys() == ema.keys()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # EMA weights differ from the raw ones


def test_resume_ends_where_uninterrupted_run_ends(tmp_path, tiny_model, monkeypatch):
    config = train_config("mnist5k", "tiny", **TINY)
    out = tmp_path / "interrupted"
    train(config, out, device="cpu", progress=False, stop_after=2)
    assert [p.name for p in out.iterdir()] == ["step-0000002"]
    # A crash while saving step 4 leaves step 2 whole and a half-written folder behind.
    import ddchallenge.report

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")
    monkeypatch.setattr(ddchallenge.report, "image_grid", crash)
    with pytest.raises(KeyboardInterrupt):
        train(config, out, device="cpu", progress=False, resume=True)
    assert sorted(p.name for p in out.iterdir()) == [".tmp-step-0000004", "step-0000002"]
    monkeypatch.undo()
    report = train(config, out, device="cpu", progress=False, resume=True)
    assert report.resumed_from == 2 and report.steps == 4
    assert sorted(p.name for p in out.iterdir()) == ["step-0000002", "step-0000004"]
    for resumed, straight in zip(_state(out / "step-0000004"), _state(tiny_model / "step-0000004")):
        assert resumed.keys() == straight.keys()
        assert all(torch.equal(resumed[k], straight[k]) for k in resumed)
    opt = (out / "step-0000004" / "training_state" / "optimizer.pt").read_bytes()
    assert opt == (tiny_model / "step-0000004" / "training_state" / "optimizer.pt").read_bytes()
    # A checkpoint whose description is broken is a one-line error that says how to go on.
    from ddchallenge.diffusion.folder import ModelError

    broken = tmp_path / "broken" / "step-0000002"
    shutil.copytree(out / "step-0000002", broken)
    for text, said in [('{"step": 2}', "does not describe a training checkpoint"),
                       ('{"step": 2, "train_config": {"dataset": "mnist5k"}}', "does not describe a training"),
                       ("[" * 100_000 + "]" * 100_000, "nested deeper than")]:
        (broken / "ddchallenge.json").write_text(text)
        with pytest.raises(ModelError, match=said):
            train(config, broken.parent, device="cpu", progress=False, resume=True)


def test_batch_order_is_a_function_of_the_step():
    order = BatchOrder(10, 4, seed=3)
    steps = [order(s) for s in range(5)]  # 20 positions = two epochs of 10
    assert sorted(np.concatenate(steps[:2] + [steps[2][:2]])) == list(range(10))
    assert np.array_equal(BatchOrder(10, 4, seed=3)(4), steps[4])  # no history needed


def test_generate_exact_counts_and_determinism(tiny_model, tmp_path, run_cli):
    args = ["generate", "--dataset", "mnist5k", "--method", "diffusion", "--model", tiny_model, "--ipc", 3,
            "--steps", 2, "--batch-size", 7]
    r = run_cli(*args, "-o", tmp_path / "a.h5")
    assert r.exit_code == 0, r.stderr
    assert "IPC 3, 30 images" in r.stdout
    assert run_cli(*args, "-o", tmp_path / "b.h5").exit_code == 0
    assert run_cli(*args, "--seed", 1, "-o", tmp_path / "c.h5").exit_code == 0
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b, h5py.File(tmp_path / "c.h5") as c:
        assert a["images"].shape == (30, 1, 28, 28) and a["images"].dtype == np.uint8
        assert list(a["labels"][()]) == [k for k in range(10) for _ in range(3)]
        assert np.array_equal(a["images"][()], b["images"][()])
        assert not np.array_equal(a["images"][()], c["images"][()])
        config = json.loads(a.attrs["config"])
    provenance = config["provenance"]
    assert provenance["model"]["step"] == 4 and len(provenance["model"]["model_sha256"]) == 64
    assert provenance["sampling"] == {"sampler": "dpm++", "steps": 2, "guidance": 2.0, "batch_size": 7}
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()


def test_ddim_and_unguided_sampling(tiny_model, tmp_path, run_cli):
    for extra in (["--sampler", "ddim"], ["--guidance", 1]):
        r = run_cli("generate", "--dataset", "mnist5k", "--method", "diffusion", "--model", tiny_model / "step-0000002",
                    "--ipc", 1, "--steps", 2, *extra, "-o", tmp_path / f"{extra[0]}.h5")
        assert r.exit_code == 0, r.stderr


def test_budget_and_auto_ipc(tiny_model, tmp_path, run_cli):
    out = tmp_path / "slow.h5"
    r = run_cli("generate", "--dataset", "mnist5k", "--method", "diffusion", "--model", tiny_model, "--ipc", 200,
                "--steps", 50, "--batch-size", 10, "--budget", 0.5, "-o", out)
    assert r.exit_code == 1 and "budget" in r.stderr and not out.exists()
    r = run_cli("generate", "--dataset", "mnist5k", "--method", "diffusion", "--model", tiny_model, "--ipc", "auto",
                "--steps", 2, "--batch-size", 20, "--budget", 20, "-o", out)  # loading alone took 5 s on a busy CPU
    assert r.exit_code == 0, r.stderr
    picked = int(r.stderr.split("made IPC ")[1].split()[0])
    assert f"IPC {picked}, {10 * picked} images" in r.stdout
    with h5py.File(out) as f:
        assert f.attrs["ipc"] == picked and f["images"].shape[0] == 10 * picked


@pytest.mark.parametrize("changes, message", [
    ({"--sampler": "euler"}, "unknown sampler 'euler'; samplers: dpm++, ddim"),
    ({"--guidance": 50}, "--guidance must be between 0 (unconditional) and 20"),
    ({"--steps": 0}, "--steps must be between 1 and 1000"),
    ({"--dataset": "cifar10"}, "was trained for mnist5k (10 classes of 1x28x28); cifar10 has 10 classes of 3x32x32"),
    ({"--method": "random"}, "--model does not apply to --method random"),
    # A model trained on all of mnist5k has seen the images mnist5k-val validates on.
    ({"--dataset": "mnist5k-val"}, "was trained on mnist5k, not on mnist5k-val, so it may have seen the images "
                                   "mnist5k-val validates on; train the generator you tune with `ddchallenge train "
                                   "mnist5k-val`"),
    ({"--ipc": "many"}, "--ipc must be a whole number or 'auto'"),
    ({"--ipc": "auto"}, "--ipc auto needs a budget"),
])
def test_generate_refusals(tiny_model, tmp_path, run_cli, changes, message):
    args = {"--dataset": "mnist5k", "--method": "diffusion", "--ipc": 1, "--model": tiny_model, **changes}
    out = tmp_path / "x.h5"
    r = run_cli("generate", *[x for kv in args.items() for x in kv], "-o", out)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.exit_code in (1, 2) and len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_broken_model_folders(tiny_model, tmp_path, run_cli):
    def gen(model):
        return run_cli("generate", "--dataset", "mnist5k", "--method", "diffusion", "--model", model, "--ipc", 1,
                       "-o", tmp_path / "x.h5")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model / "step-0000004", broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    r = gen(broken)
    assert r.exit_code == 1 and "diffusion_pytorch_model.safetensors is not a readable safetensors file" in r.stderr
    shutil.rmtree(broken / "unet")
    assert "is missing its unet/ folder" in gen(broken).stderr
    (broken / "ddchallenge.json").unlink()
    assert "is not a ddchallenge diffusion model: ddchallenge.json is missing" in gen(broken).stderr
    # a model argument that names nothing is the command line's mistake: exit 2, as `settings` and `score` give
    r = gen(tmp_path / "nowhere")
    assert r.exit_code == 2 and "neither an existing folder nor a Hugging Face Hub id" in r.stderr
    (tmp_path / "weights.safetensors").write_bytes(b"")
    r = gen(tmp_path / "weights.safetensors")
    assert r.exit_code == 2 and "weights.safetensors is a file; pass the folder that holds it" in r.stderr


def test_train_refusals(tiny_model, tmp_path, run_cli):
    r = run_cli("train", "mnist5k", "--preset", "tiny", "-o", tiny_model)
    assert r.exit_code == 2 and "is not empty; pass --resume" in r.stderr
    r = run_cli("train", "mnist5k", "--resume", "--steps", 9, "-o", tiny_model)
    assert r.exit_code == 2 and "was trained with steps 4, not 9" in r.stderr
    r = run_cli("train", "mnist5k", "--resume", "-o", tmp_path / "empty")
    assert r.exit_code == 2 and "nothing to resume" in r.stderr
    shutil.copytree(tiny_model, tmp_path / "done")  # finished: --resume trains nothing and says so (no "nan" loss)
    r = run_cli("train", "mnist5k", "--resume", "-o", tmp_path / "done", "--quiet")
    assert r.exit_code == 0 and r.stdout.startswith(f"{tmp_path / 'done'} is already trained to its last step (4); "
                                                    "nothing to train") and "nan" not in r.stdout, r.output
    r = run_cli("train", "mnist5k", "--preset", "huge", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "no training preset 'huge'; presets: tiny, mnist5k" in r.stderr
    r = run_cli("train", "mnist5k", "--space", "latent", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "--space latent needs --vae" in r.stderr
    assert not (tmp_path / "x").exists()


def test_a_run_stopped_in_its_first_save_starts_again_without_resume(tmp_path, run_cli):
    """A new user's review: a run killed while writing its first checkpoint left only `.tmp-step-*`; without
    --resume it was "not empty", with it "nothing to resume", and only deleting the folder by hand got out."""
    out = tmp_path / "m"
    (out / ".tmp-step-0000002" / "unet").mkdir(parents=True)
    r = run_cli("train", "mnist5k", "--preset", "tiny", "--steps", 2, "-o", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["step-0000002"]
    (tmp_path / "other").mkdir()  # a folder holding anything else is still refused, and left as it is
    (tmp_path / "other" / ".tmp-step-0000002").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    r = run_cli("train", "mnist5k", "--preset", "tiny", "--steps", 2, "-o", tmp_path / "other", "--quiet")
    assert r.exit_code == 2 and "is not empty; pass --resume" in r.stderr
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == [".tmp-step-0000002", "notes.txt"]


def test_latent_space_with_a_trained_vae(tmp_path, run_cli):
    r = run_cli("train-vae", "mnist5k", "--preset", "tiny", "-o", tmp_path / "vae", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert "latent 4x14x14" in r.stdout
    r = run_cli("train", "mnist5k", "--preset", "tiny", "--steps", 2, "--vae", tmp_path / "vae",
                "-o", tmp_path / "m", "--quiet")
    assert r.exit_code == 0, r.stderr
    ckpt = tmp_path / "m" / "step-0000002"
    meta = json.loads((ckpt / "ddchallenge.json").read_text())
    assert meta["latent_shape"] == [4, 14, 14] and (ckpt / "vae" / "config.json").is_file()
    assert meta["vae"]["source"] == str((tmp_path / "vae").resolve())
    shutil.rmtree(tmp_path / "vae")  # the checkpoint carries its own copy
    r = run_cli("prototypes", ckpt, "--ipc", 1, "--fit-steps", 2)  # centres of latents are not images to match
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.exit_code == 2 and errors == [f"error: --fit-steps moves pixels; {ckpt} works in a VAE's latent space, "
                                           "where its centres are not images: leave out --fit-steps"], r.stderr
    assert not (ckpt / "codebooks").exists()
    r = run_cli("generate", "--dataset", "mnist5k", "--method", "diffusion", "--model", tmp_path / "m", "--ipc", 2,
                "--steps", 2, "-o", tmp_path / "x.h5")
    assert r.exit_code == 0, r.stderr
    with h5py.File(tmp_path / "x.h5") as f:
        assert f["images"].shape == (20, 1, 28, 28)


def test_vae_latent_that_does_not_fit_the_unet(tmp_path):
    train_vae(vae_config("mnist5k", "tiny", channels=(16, 16, 16), steps=1), tmp_path / "vae", device="cpu",
              progress=False)  # 28 -> 7x7 latents
    with pytest.raises(UsageError, match="needs a size divisible by 2; the latent is 7x7"):
        train(train_config("mnist5k", "tiny", space="latent", vae=str(tmp_path / "vae")), tmp_path / "m",
              device="cpu", progress=False)


def test_hub_id_from_the_local_cache(tiny_model, tmp_path, run_cli, monkeypatch):
    """A Hub id goes through huggingface-hub's real cache lookup (offline, so
    nothing is downloaded) and its revision is recorded."""
    from huggingface_hub import constants

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-mnist5k"
    shutil.copytree(tiny_model / "step-0000004", repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    r = run_cli("generate", "--dataset", "mnist5k", "--method", "diffusion", "--model", "someone/tiny-mnist5k",
                "--ipc", 1, "--steps", 2, "-o", tmp_path / "x.h5")
    assert r.exit_code == 0, r.stderr
    with h5py.File(tmp_path / "x.h5") as f:
        model = json.loads(f.attrs["config"])["provenance"]["model"]
    assert (model["hub_id"], model["revision"], model["step"]) == ("someone/tiny-mnist5k", revision, 4)
    r = run_cli("generate", "--dataset", "mnist5k", "--method", "diffusion", "--model", "someone/other",
                "--ipc", 1, "-o", tmp_path / "y.h5")
    assert r.exit_code == 1 and "someone/other is not in the local Hugging Face cache" in r.stderr
