"""The reference recipes in submissions/: regenerated from scratch, the same
bytes, a score inside the band. This is the check CI runs on every change."""
from pathlib import Path

import pytest

RECIPES = sorted((Path(__file__).resolve().parents[1] / "submissions").glob("*.toml"))


def test_the_shipped_recipes_are_mnist5k_random_and_herding():
    assert [p.stem for p in RECIPES] == ["mnist5k-diffusion", "mnist5k-herding", "mnist5k-random"]


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_regenerates_same_bytes_and_scores_in_band(run_cli, recipe):
    r = run_cli("verify", recipe, "--score", "--quiet", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"ok mnist5k-{recipe.stem.split('-')[1]}-ipc10: sha256 ") and "score" in r.stdout


def test_hash_mismatch_names_both_hashes(run_cli, tmp_path):
    text = RECIPES[-1].read_text()
    expected = text.split('sha256 = "')[1].split('"')[0]
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(expected, "f" * 64))
    r = run_cli("verify", bad)
    assert r.exit_code == 1
    assert f"has sha256 {expected}, the recipe expects {'f' * 64}" in r.stderr


def test_score_outside_band_fails(run_cli, tmp_path):
    text = RECIPES[-1].read_text().replace("epochs = 20", "epochs = 0").replace("rounds = 2", "rounds = 1")
    text = text.replace("min = 0.77", "min = 0.99").replace("max = 0.87", "max = 1.0")
    bad = tmp_path / "band.toml"
    bad.write_text(text)
    r = run_cli("verify", bad, "--score", "--quiet")
    assert r.exit_code == 1 and "is outside the band [0.99, 1.0] (0 epochs, 1 rounds, seed 0)" in r.stderr


def test_malformed_recipes(run_cli, tmp_path):
    (tmp_path / "a.toml").write_text("name = ")
    (tmp_path / "b.toml").write_text('name = "x"\ndataset = "mnist5k"\n')
    for name, message in (("a.toml", "is not valid TOML"), ("b.toml", "lacks the key 'expect'"), ("c.toml", "recipe not found")):
        r = run_cli("verify", tmp_path / name)
        assert r.exit_code == 2 and message in r.stderr
