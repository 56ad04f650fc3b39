"""The reference recipes in submissions/: regenerated from scratch, the same
bytes (or pixels inside the recipe's tolerance), a score inside the band.
This is the check CI runs on every change.

The tolerance tests edit the recorded images of a freshly recorded copy of
the random recipe (no training): a pixel moved by one level there is a pixel
the regenerated set differs by, exactly as another CPU's rounding would."""
import gzip
import io
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ddchallenge.cli import cli
from ddchallenge.verify import (
    THREADS, encode_images, images_sha256, load_recipe, machine, packed_sha256, read_images, set_expect_values,
)

SUBMISSIONS = Path(__file__).resolve().parents[1] / "submissions"
RECIPES = sorted(SUBMISSIONS.glob("*.toml"))
RANDOM = SUBMISSIONS / "mnist5k-random.toml"
PIXELS = 100 * 28 * 28  # mnist5k at IPC 10


def test_the_shipped_recipes_are_mnist5k_random_herding_and_diffusion():
    assert [p.stem for p in RECIPES] == ["mnist5k-diffusion", "mnist5k-herding", "mnist5k-random"]


def test_every_shipped_recipe_records_its_images_beside_it():
    for path in RECIPES:
        recipe = load_recipe(path)
        assert recipe.images == f"{path.stem}.images.npy.gz"
        assert read_images(recipe).shape == (100, 1, 28, 28)  # checked against images_sha256 inside
    # Only the recipe that trains a model is given room for float rounding; selection copies pixels.
    assert load_recipe(SUBMISSIONS / "mnist5k-diffusion.toml").tolerance.pixels > 0
    assert load_recipe(RANDOM).tolerance.pixels == load_recipe(SUBMISSIONS / "mnist5k-herding.toml").tolerance.pixels == 0


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_regenerates_same_bytes_and_scores_in_band(run_cli, recipe):
    r = run_cli("verify", recipe, "--score", "--quiet", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"ok mnist5k-{recipe.stem.split('-')[1]}-ipc10: sha256 ") and "score" in r.stdout


def _errors(result) -> list[str]:
    """The error lines of a run (generation may log info lines beside them)."""
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def _without_recorded_values(text: str) -> str:
    """The recipe as a new one would be written: no [expect] values recorded yet."""
    return re.sub(r'(?m)^(sha256|images|images_sha256) = ".*"\n', "", text)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A copy of the random recipe with nothing recorded, then `verify --record`
    (the real CLI): (recipe path, the run's output)."""
    path = tmp_path_factory.mktemp("recipes") / "rand.toml"
    path.write_text(_without_recorded_values(RANDOM.read_text()))
    r = CliRunner().invoke(cli, ["verify", "--record", "--quiet", "--device", "cpu", str(path)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return path, r


def test_record_writes_the_hash_and_images_then_verify_is_exact(recorded, run_cli):
    path, r = recorded
    recipe = load_recipe(path)
    shipped = load_recipe(RANDOM)
    assert recipe.sha256 == shipped.sha256 and recipe.images_sha256 == shipped.images_sha256
    assert recipe.images == "rand.images.npy.gz" and (path.parent / recipe.images).is_file()
    assert r.stdout == f"recorded mnist5k-random-ipc10: sha256 {recipe.sha256}, images rand.images.npy.gz " \
                       f"(sha256 {recipe.images_sha256})\n"
    # Comments and the band are kept; the values sit in [expect].
    text = path.read_text()
    assert text.startswith("# The random baseline") and "[expect.score]" in text and "min = 0.77" in text
    assert text.index("[expect]\n") < text.index("sha256 = ") < text.index("[expect.score]")
    # The same images give the same file: recording twice changes nothing.
    before = (path.parent / recipe.images).read_bytes()
    assert run_cli("verify", "--record", "--quiet", path).exit_code == 0
    assert path.read_text() == text and (path.parent / recipe.images).read_bytes() == before
    r = run_cli("verify", "--quiet", "--strict", path)
    assert r.exit_code == 0 and r.stdout == f"ok mnist5k-random-ipc10: sha256 {recipe.sha256} (exact)\n"


def _variant(recorded, tmp_path, moves, tolerance=None, name="v") -> Path:
    """The recorded recipe with its images edited (flat index -> level change)
    and recorded again consistently: sha256 and images_sha256 of the edited
    images. Regenerating then differs from it by exactly `moves`."""
    path, _ = recorded
    recipe = load_recipe(path)
    images = read_images(recipe).copy()
    flat = images.reshape(-1)
    for index, delta in moves.items():
        flat[index] = flat[index] + delta if int(flat[index]) + delta <= 255 else flat[index] - delta
    out = tmp_path / f"{name}.toml"
    (tmp_path / f"{name}.images.npy.gz").write_bytes(encode_images(images))
    values = {"sha256": packed_sha256(images, recipe, tmp_path / "pack"), "images": f"{name}.images.npy.gz",
              "images_sha256": images_sha256(images)}
    text = set_expect_values(path.read_text(), values, out)
    if tolerance is not None:
        text += f"\n[expect.tolerance]\npixels = {tolerance[0]}\nlevels = {tolerance[1]}\n"
    out.write_text(text)
    return out


def test_three_pixels_one_level_apart_pass_by_default_and_fail_strict(recorded, tmp_path, run_cli):
    path = _variant(recorded, tmp_path, {0: 1, 1000: 1, 50_000: 1}, tolerance=(3, 1))
    r = run_cli("verify", "--quiet", path)
    assert r.exit_code == 0, r.output
    regenerated = load_recipe(recorded[0]).sha256
    assert r.stdout == (f"ok mnist5k-random-ipc10: sha256 {regenerated} differs from the recorded "
                        f"{load_recipe(path).sha256}, but 3 of {PIXELS:,} pixels (in 3 of 100 images) differ from the "
                        f"recorded images, by at most 1 grey level: inside the tolerance of 3 pixels by at most 1 level ({machine()})\n")
    r = run_cli("verify", "--quiet", "--strict", path)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.splitlines()[0].endswith(f"the recipe expects {load_recipe(path).sha256}; 3 of {PIXELS:,} pixels (in 3 of "
                                     f"100 images) differ from the recorded images, by at most 1 grey level (--strict "
                                     f"takes equal bytes only)")


@pytest.mark.parametrize("moves, tolerance, why", [
    ({0: 2}, (3, 1), f"1 of {PIXELS:,} pixels (in 1 of 100 images) differ from the recorded images, by at most 2 grey "
                     "levels, outside the recipe's tolerance of 3 pixels by at most 1 level"),
    ({0: 1, 1: 1, 2: 1, 3: 1}, (3, 1), f"4 of {PIXELS:,} pixels (in 1 of 100 images) differ from the recorded "
                                       "images, by at most 1 grey level, outside the recipe's tolerance of 3 pixels"),
    ({0: 1}, (5, 0), "by at most 1 grey level, outside the recipe's tolerance of 5 pixels by at most 0 levels"),
    ({40_000: 1}, None, "by at most 1 grey level, outside the recipe's tolerance of 0 pixels"),  # no tolerance: 0
])
def test_differences_outside_the_tolerance_fail_with_the_counts(recorded, tmp_path, run_cli, moves, tolerance, why):
    path = _variant(recorded, tmp_path, moves, tolerance)
    r = run_cli("verify", "--quiet", path)
    assert r.exit_code == 1 and r.stdout == "" and len(_errors(r)) == 1
    assert f"has sha256 {load_recipe(recorded[0]).sha256} ({machine()}), the recipe expects {load_recipe(path).sha256}" \
        in r.stderr
    assert why in r.stderr


def test_recorded_images_and_hash_that_disagree_fail_before_regenerating(recorded, tmp_path, run_cli, monkeypatch):
    import ddchallenge.verify as verify_module

    def no_regeneration(*args, **kwargs):
        raise AssertionError("regenerated although the recipe is inconsistent")

    monkeypatch.setattr(verify_module, "regenerate", no_regeneration)
    path = _variant(recorded, tmp_path, {0: 1}, (3, 1))
    text = path.read_text()
    # A hash that is not what the recorded images pack to (the images were rerecorded alone).
    (tmp_path / "hash.toml").write_text(text.replace(load_recipe(path).sha256, load_recipe(recorded[0]).sha256))
    # An images file swapped for another set's: its fingerprint is not the recorded one.
    (tmp_path / "swap.toml").write_text(text.replace('"v.images.npy.gz"', f'"{load_recipe(recorded[0]).images}"'))
    (tmp_path / load_recipe(recorded[0]).images).write_bytes(load_recipe(recorded[0]).images_path.read_bytes())
    for name, message in (("hash.toml", f"the recorded images v.images.npy.gz pack to sha256 {load_recipe(path).sha256}"
                                        f", but the recipe records {load_recipe(recorded[0]).sha256}"),
                          ("swap.toml", f"has images sha256 {load_recipe(recorded[0]).images_sha256}, the recipe "
                                        f"records {load_recipe(path).images_sha256}")):
        r = run_cli("verify", "--quiet", tmp_path / name)
        assert r.exit_code in (1, 2) and message in r.stderr, r.stderr
        assert f"ddchallenge verify --record {tmp_path / name}" in r.stderr


def _npy_gz(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return gzip.compress(buf.getvalue(), mtime=0)


@pytest.mark.parametrize("content, message", [
    (None, "are missing"),
    (b"not gzip at all", "is not a gzip file"),
    (gzip.compress(b"\x93NUMPY garbage", mtime=0), "is not a .npy array"),
    (_npy_gz(np.zeros((100, 1, 28, 28), np.float32)), "holds float32 (100, 1, 28, 28); mnist5k at IPC 10 needs uint8"),
    (_npy_gz(np.zeros((99, 1, 28, 28), np.uint8)), "holds uint8 (99, 1, 28, 28)"),
    (_npy_gz(np.array([{"a": 1}] * 3, dtype=object)), "is not a .npy array"),  # a pickle is never loaded
    (_npy_gz(np.zeros((100, 1, 28, 28), np.uint8)), "has images sha256 "),
])
def test_bad_recorded_images_are_refused_in_one_line(recorded, tmp_path, run_cli, content, message):
    path, _ = recorded
    recipe = tmp_path / "r.toml"
    recipe.write_text(path.read_text().replace(load_recipe(path).images, "r.images.npy.gz"))
    if content is not None:
        (tmp_path / "r.images.npy.gz").write_bytes(content)
    r = run_cli("verify", "--quiet", recipe)
    assert r.exit_code == 2 and message in r.stderr and len(_errors(r)) == 1, r.stderr


def test_a_decompression_bomb_is_cut_off_at_the_cap(recorded, tmp_path, run_cli, monkeypatch):
    import ddchallenge.verify as verify_module

    monkeypatch.setattr(verify_module, "MAX_REFERENCE_BYTES", 1 << 16)
    path, _ = recorded
    recipe = tmp_path / "r.toml"
    recipe.write_text(path.read_text().replace(load_recipe(path).images, "r.images.npy.gz"))
    (tmp_path / "r.images.npy.gz").write_bytes(gzip.compress(bytes(10 << 20)))
    r = run_cli("verify", "--quiet", recipe)
    assert r.exit_code == 2 and "holds more than 65,536 bytes decompressed" in r.stderr


@pytest.mark.parametrize("edit, message", [
    (('images = "rand.images.npy.gz"', 'images = "../rand.images.npy.gz"'), "must be a file name beside the recipe"),
    (('images = "rand.images.npy.gz"', 'images = "/tmp/rand.images.npy.gz"'), "must be a file name beside the recipe"),
    (('images = "rand.images.npy.gz"', 'images = "rand.npz"'), "ending in .images.npy.gz"),
    (('images = "rand.images.npy.gz"', "images = 3"), "must be a file name beside the recipe"),
    (("images_sha256 = ", "# images_sha256 = "), "images and images_sha256 go together"),
    (("images_sha256 = ", "image_sha256 = "), "[expect] has unknown key 'image_sha256'; allowed: images, images_sha256, "
                                              "score, sha256, tolerance"),
    (('sha256 = "', 'sha256 = "Z'), "sha256 must be 64 lowercase hex digits"),
    (("[expect.score]", "[expect.tolerance]\npixels = 3\nlevels = 2\n[expect.score]"), "levels must be 0 or 1, got 2"),
    (("[expect.score]", "[expect.tolerance]\npixels = true\n[expect.score]"), "pixels must be a whole number >= 0, got True"),
    (("[expect.score]", "[expect.tolerance]\npixels = -1\n[expect.score]"), "pixels must be a whole number >= 0, got -1"),
    (("[expect.score]", "[expect.tolerance]\npixel = 3\n[expect.score]"), "has unknown key 'pixel'"),
])
def test_malformed_recorded_values_are_refused(recorded, tmp_path, run_cli, edit, message):
    path, _ = recorded
    bad = tmp_path / "bad.toml"
    text = path.read_text()
    assert edit[0] in text
    bad.write_text(text.replace(edit[0], edit[1], 1))
    r = run_cli("verify", "--quiet", bad)
    assert r.exit_code == 2 and message in r.stderr, r.stderr


def test_a_tolerance_needs_recorded_images(tmp_path, run_cli):
    text = _without_recorded_values(RANDOM.read_text()).replace("[expect]\n", '[expect]\nsha256 = "' + "a" * 64 + '"\n')
    (tmp_path / "t.toml").write_text(text + "\n[expect.tolerance]\npixels = 3\n")
    r = run_cli("verify", "--quiet", tmp_path / "t.toml")
    assert r.exit_code == 2 and "[expect.tolerance] needs recorded images" in r.stderr


def test_without_recorded_images_a_hash_mismatch_names_both_hashes(recorded, run_cli, tmp_path):
    path, _ = recorded
    text = re.sub(r'(?m)^images(_sha256)? = ".*"\n', "", path.read_text())
    expected = load_recipe(path).sha256
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(expected, "f" * 64))
    r = run_cli("verify", bad)
    assert r.exit_code == 1
    assert f"has sha256 {expected} ({machine()}), the recipe expects {'f' * 64}; the recipe records no images" in r.stderr


def test_a_recipe_without_a_hash_asks_for_record(tmp_path, run_cli):
    (tmp_path / "n.toml").write_text(_without_recorded_values(RANDOM.read_text()))
    r = run_cli("verify", tmp_path / "n.toml")
    assert r.exit_code == 2 and "records no [expect] sha256; write it with `ddchallenge verify --record" in r.stderr
    r = run_cli("verify", "--record", "--strict", tmp_path / "n.toml")
    assert r.exit_code == 2 and "takes no --strict" in r.stderr


def test_score_outside_band_fails(run_cli, tmp_path):
    text = RANDOM.read_text().replace("epochs = 20", "epochs = 0").replace("rounds = 2", "rounds = 1")
    text = text.replace("min = 0.77", "min = 0.99").replace("max = 0.87", "max = 1.0")
    bad = tmp_path / "mnist5k-random.toml"  # beside its recorded images: a copy of them
    bad.write_text(text)
    (tmp_path / "mnist5k-random.images.npy.gz").write_bytes((SUBMISSIONS / "mnist5k-random.images.npy.gz").read_bytes())
    r = run_cli("verify", bad, "--score", "--quiet")
    assert r.exit_code == 1 and "is outside the band [0.99, 1.0] (0 epochs, 1 round, seed 0)" in r.stderr


def test_malformed_recipes(run_cli, tmp_path):
    (tmp_path / "a.toml").write_text("name = ")
    (tmp_path / "b.toml").write_text('name = "x"\ndataset = "mnist5k"\n')
    (tmp_path / "d.toml").write_text('name = "x"\ndataset = "mnist5k"\nmethod = "random"\nipc = 10\nseed = 0\nexpect = 3\n')
    for name, message in (("a.toml", "is not valid TOML"), ("b.toml", "lacks the key 'method'"),
                          ("c.toml", "recipe not found"), ("d.toml", "[expect] must be a table")):
        r = run_cli("verify", tmp_path / name)
        assert r.exit_code == 2 and message in r.stderr, r.stderr


DIFFUSION = SUBMISSIONS / "mnist5k-diffusion.toml"


@pytest.mark.parametrize("recipe, old, new, message", [
    # An organiser's review: each of these ran (a traceback, a silent conversion, or an hour of training first).
    (RANDOM, "ipc = 10", "ipc = inf", "ipc must be a whole number from 1 to 100, got inf"),
    (RANDOM, "ipc = 10", "ipc = true", "ipc must be a whole number from 1 to 100, got True"),
    (RANDOM, "ipc = 10", "ipc = 10.9", "ipc must be a whole number from 1 to 100, got 10.9"),
    (RANDOM, "seed = 0\n\n", "seed = 1e400\n\n", "seed must be a whole number from 0 to 2147483647, got inf"),
    (RANDOM, 'name = "mnist5k-random-ipc10"', "name = 12345", "name must be a non-empty string, got 12345"),
    (RANDOM, 'dataset = "mnist5k"', 'dataset = "nope"', "unknown dataset 'nope'"),
    (RANDOM, "seed = 0\n\n", 'seed = 0\n[options]\nmodel = "/etc"\n\n', "[options] model is not allowed"),
    (RANDOM, "seed = 0\n\n", 'seed = 0\n[options]\nteacher = "../../t"\n\n', "names a path outside"),
    (RANDOM, "seed = 0\n\n", "seed = 0\noptions = [[1]]\n\n", "[options] must be a table"),
    (RANDOM, "min = 0.77", "min = 77", "[expect.score] min must be a fraction from 0 to 1"),
    (RANDOM, "min = 0.77", "min = nan", "[expect.score] min must be a fraction from 0 to 1"),
    (RANDOM, "min = 0.77", "min = 0.9", "[expect.score] min 0.9 is above max 0.87"),
    (RANDOM, "epochs = 20", "epochs = inf", "[expect.score] epochs must be a whole number from 0 to 100000, got inf"),
    (RANDOM, "epochs = 20", "epochs = 1000000000", "[expect.score] epochs must be a whole number from 0 to 100000"),
    (RANDOM, "max = 0.87", "max = 0.87\nmean = 0.8", "[expect.score] has unknown key 'mean'"),
    (DIFFUSION, "steps = 300", 'steps = "300"', "[train] steps must be a whole number from 0 to 100,000, got '300'"),
    (DIFFUSION, "steps = 300", "steps = 100000000", "[train] steps must be a whole number from 0 to 100,000"),
    (DIFFUSION, "steps = 300", "steps = 300\nchannels = 5", "[train] channels must be a list of whole numbers"),
    (DIFFUSION, "steps = 300", 'steps = 300\nvae = "/tmp/vae"', "[train] vae must be a Hub id or a relative path"),
    (DIFFUSION, "steps = 300", "steps = 300\nlr = nan", "[train] lr must be a number >= 0, got nan"),
    # A code review: these were found only when the recipe ran (after the others had trained and scored), or, for
    # a TOML integer too large for a float, as a traceback.
    (DIFFUSION, "steps = 300", "steps = 300\nlr = 1" + "9" * 400, "[train] lr must be a number >= 0, got 1999"),
    (DIFFUSION, "steps = 300", "steps = 0", "[train] steps must be at least 1, got 0"),
    (DIFFUSION, 'preset = "tiny"', 'preset = "nope"', "[train] no training preset 'nope'"),
    (DIFFUSION, "steps = 300", "steps = 300\nchannels = [32]", "[train] channels and attention need one entry per level"),
    (RANDOM, "[expect.score]", "[unused]", "has no [expect.score] band to check; drop --score"),
])
def test_a_recipe_value_of_the_wrong_type_or_range_is_refused_before_anything_runs(run_cli, tmp_path, recipe, old,
                                                                                   new, message):
    text = recipe.read_text()
    assert old in text
    bad = tmp_path / recipe.name
    bad.write_text(text.replace(old, new, 1))
    r = run_cli("verify", "--score", bad)
    assert r.exit_code == 2 and _errors(r) == [line for line in r.stderr.splitlines() if line], r.stderr
    assert len(_errors(r)) == 1 and message in r.stderr, r.stderr


def test_every_recipe_is_read_before_any_runs_and_every_failure_is_listed(recorded, run_cli, tmp_path):
    """An organiser's review: the first failing recipe stopped the run, so CI reported one failure at a time."""
    path, _ = recorded
    expected = load_recipe(path).sha256
    (tmp_path / "bad.toml").write_text(re.sub(r'(?m)^images(_sha256)? = ".*"\n', "", path.read_text())
                                       .replace(expected, "f" * 64))
    (tmp_path / "typo.toml").write_text(path.read_text().replace("ipc = 10", "ipc = ten"))
    r = run_cli("verify", "--quiet", tmp_path / "bad.toml", tmp_path / "typo.toml")
    assert r.exit_code == 2 and "typo.toml is not valid TOML" in r.stderr and "FAILED" not in r.stderr  # nothing ran
    (tmp_path / "slow.toml").write_text(path.read_text().replace("[expect]", "[train]\nsteps = 0\n\n[expect]"))
    r = run_cli("verify", "--quiet", tmp_path / "bad.toml", tmp_path / "slow.toml")  # found before anything runs
    assert r.exit_code == 2 and "slow.toml: [train] steps must be at least 1" in r.stderr and "FAILED" not in r.stderr
    r = run_cli("verify", "--quiet", tmp_path / "bad.toml", path)
    assert r.exit_code == 1 and r.stdout.startswith(f"ok {load_recipe(path).name}: sha256 {expected} (exact)")
    assert r.stderr.count("FAILED") == 1 and f"FAILED {tmp_path / 'bad.toml'}: " in r.stderr
    assert _errors(r) == [f"error: 1 of 2 recipes failed: {tmp_path / 'bad.toml'}"]


# -- rewriting [expect] in place -----------------------------------------------------------------------------------

VALUES = {"sha256": "a" * 64, "images": "r.images.npy.gz", "images_sha256": "b" * 64}


@pytest.mark.parametrize("text, want", [
    # Keys present: replaced where they are, comments kept.
    ('name = "x"\n[expect]\n# hash\nsha256 = "old"  # note\nimages = "o.images.npy.gz"\nimages_sha256 = "o"\n'
     "[expect.score]\nmin = 0.1\n",
     f'name = "x"\n[expect]\n# hash\nsha256 = "{"a" * 64}"\nimages = "r.images.npy.gz"\nimages_sha256 = "{"b" * 64}"\n'
     "[expect.score]\nmin = 0.1\n"),
    # Keys missing: added after the one before, in order.
    ('[expect]\nsha256 = "old"\n\n[expect.score]\nmin = 0.1',
     f'[expect]\nsha256 = "{"a" * 64}"\nimages = "r.images.npy.gz"\nimages_sha256 = "{"b" * 64}"\n\n'
     "[expect.score]\nmin = 0.1\n"),
    # No [expect] table, only [expect.score]: one is made before it.
    ('name = "x"\n\n[expect.score]\nmin = 0.1\n',
     f'name = "x"\n\n[expect]\nsha256 = "{"a" * 64}"\nimages = "r.images.npy.gz"\nimages_sha256 = "{"b" * 64}"\n\n'
     "[expect.score]\nmin = 0.1\n"),
    # No [expect] at all: added at the end.
    ('name = "x"\n',
     f'name = "x"\n\n[expect]\nsha256 = "{"a" * 64}"\nimages = "r.images.npy.gz"\nimages_sha256 = "{"b" * 64}"\n'),
])
def test_set_expect_values_rewrites_only_the_values(text, want):
    assert set_expect_values(text, VALUES, Path("r.toml")) == want


def test_set_expect_values_refuses_what_it_cannot_rewrite():
    from ddchallenge.errors import UsageError

    with pytest.raises(UsageError, match="cannot rewrite its \\[expect\\] table"):
        set_expect_values('[expect]\nsha256 = """\nold"""\n', VALUES, Path("r.toml"))
    with pytest.raises(UsageError, match="cannot rewrite its \\[expect\\] table"):
        set_expect_values('[expect]\n"sha256" = "old"\n', VALUES, Path("r.toml"))


def test_a_failed_record_writes_nothing(recorded, tmp_path, run_cli):
    path, _ = recorded
    text = path.read_text().replace("[expect]\n", '[expect]\n"images" = "q.images.npy.gz"\n').replace(
        "images = ", "# images = ")
    bad = tmp_path / "q.toml"
    bad.write_text(text)
    r = run_cli("verify", "--record", "--quiet", bad)
    assert r.exit_code == 2 and "cannot rewrite its [expect] table" in r.stderr, r.stderr
    assert bad.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["q.toml"]


def test_record_with_score_writes_nothing_when_the_band_fails(tmp_path, run_cli):
    text = _without_recorded_values(RANDOM.read_text()).replace("epochs = 20", "epochs = 0")
    text = text.replace("rounds = 2", "rounds = 1").replace("min = 0.77", "min = 0.99").replace("max = 0.87", "max = 1.0")
    path = tmp_path / "s.toml"
    path.write_text(text)
    r = run_cli("verify", "--record", "--score", "--quiet", path)
    assert r.exit_code == 1 and "is outside the band [0.99, 1.0]" in r.stderr
    assert path.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]
    path.write_text(text.replace("min = 0.99", "min = 0.0"))
    r = run_cli("verify", "--record", "--score", "--quiet", path)
    assert r.exit_code == 0 and r.stdout.startswith(f"recorded mnist5k-random-ipc10: sha256 {load_recipe(RANDOM).sha256}, "
                                                    f"images s.images.npy.gz (sha256 {load_recipe(RANDOM).images_sha256}), "
                                                    "score ")


def test_regeneration_runs_on_the_pinned_threads_and_restores_them(recorded, run_cli, monkeypatch):
    """The thread count splits float sums: every machine regenerates with THREADS of them."""
    import torch

    import ddchallenge.generators as generators

    seen, real = [], generators.generate
    monkeypatch.setattr(generators, "generate", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if THREADS != 1 else 3)
        r = run_cli("verify", "--quiet", "--strict", recorded[0])
        assert r.exit_code == 0 and seen == [THREADS] and torch.get_num_threads() == (1 if THREADS != 1 else 3)
        assert machine() == f"{torch.backends.cpu.get_cpu_capability()} kernels, {THREADS} threads"
    finally:
        torch.set_num_threads(before)
