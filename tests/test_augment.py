"""Each DSA group against a plain per-image reference written from the
protocol's definitions, fed the same random draws."""
import math
from collections import Counter

import pytest
import torch

from ddchallenge.evaluation import train as train_module
from ddchallenge.evaluation.augment import GROUPS, apply_group, draw_params, parse_strategy
from ddchallenge.errors import UsageError
from ddchallenge.protocol import OFFICIAL, get_dataset


def batch(n=5, c=3, size=12, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def draws(group, x, seed=1):
    return draw_params(group, x.shape[0], x.shape[2], x.shape[3], torch.Generator().manual_seed(seed))


def ref_color(img, b, s, c):
    img = img + (b - 0.5) * 1.0
    m = img.mean(dim=0, keepdim=True)  # mean over channels, per pixel
    img = (img - m) * (s * 2.0) + m
    m = img.mean()  # mean over C, H, W
    return (img - m) * (c + 0.5) + m


def ref_crop(img, tx, ty):
    c, h, w = img.shape
    out = torch.zeros_like(img)
    for i in range(h):
        for j in range(w):
            si, sj = i + tx, j + ty
            if 0 <= si < h and 0 <= sj < w:
                out[:, i, j] = img[:, si, sj]
    return out


def ref_cutout(img, ox, oy):
    c, h, w = img.shape
    k = int(h * 0.5 + 0.5)
    out = img.clone()
    for i in range(h):
        for j in range(w):
            if ox - k // 2 <= i < ox - k // 2 + k and oy - k // 2 <= j < oy - k // 2 + k:
                out[:, i, j] = 0
    return out


def ref_affine(img, a, b, d, e):
    """Output pixel sampled at theta @ (x, y, 1) with theta = [[a, b, 0], [d, e, 0]],
    align_corners=False coordinates, bilinear, zeros outside."""
    c, h, w = img.shape
    out = torch.zeros_like(img)
    for i in range(h):
        for j in range(w):
            xn, yn = (2 * j + 1) / w - 1, (2 * i + 1) / h - 1
            xs, ys = a * xn + b * yn, d * xn + e * yn
            px, py = ((xs + 1) * w - 1) / 2, ((ys + 1) * h - 1) / 2
            x0, y0 = math.floor(px), math.floor(py)
            val = torch.zeros(c, dtype=torch.float64)
            for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
                for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
                    if 0 <= yy < h and 0 <= xx < w:
                        val += wy * wx * img[:, yy, xx].double()
            out[:, i, j] = val.float()
    return out


def test_color_matches_per_image_reference():
    x = batch()
    p = draws("color", x)
    got = apply_group("color", x, p)
    for n in range(x.shape[0]):
        want = ref_color(x[n], p["brightness"][n], p["saturation"][n], p["contrast"][n])
        torch.testing.assert_close(got[n], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size, shift", [(32, 4), (64, 8), (12, 2), (28, 4)])
def test_crop_shift_range_and_per_image_reference(size, shift):
    x = batch(n=6, size=size)
    p = draws("crop", x)
    got = apply_group("crop", x, p)
    for n in range(x.shape[0]):
        torch.testing.assert_close(got[n], ref_crop(x[n], int(p["tx"][n]), int(p["ty"][n])), rtol=0, atol=0)
    many = draw_params("crop", 4000, size, size, torch.Generator().manual_seed(3))
    assert set(many["tx"].tolist()) == set(range(-shift, shift + 1)) == set(many["ty"].tolist())


@pytest.mark.parametrize("size", [32, 12, 10, 28])
def test_cutout_offsets_and_per_image_reference(size):
    x = batch(n=6, size=size)
    p = draws("cutout", x)
    got = apply_group("cutout", x, p)
    for n in range(x.shape[0]):
        torch.testing.assert_close(got[n], ref_cutout(x[n], int(p["ox"][n]), int(p["oy"][n])), rtol=0, atol=0)
    k = int(size * 0.5 + 0.5)
    many = draw_params("cutout", 4000, size, size, torch.Generator().manual_seed(3))
    # An even side admits H + 1 centre positions, an odd side H.
    assert set(many["ox"].tolist()) == set(range(size + (1 - k % 2)))


def test_cutout_square_side_is_half_the_image():
    x = torch.ones(1, 1, 32, 32)
    out = apply_group("cutout", x, {"ox": torch.tensor([16]), "oy": torch.tensor([16])})
    assert int((out == 0).sum()) == 16 * 16
    assert torch.equal(out[0, 0, 8:24, 8:24], torch.zeros(16, 16))


def test_flip_per_image():
    x = batch(n=8)
    p = {"u": torch.tensor([0.1, 0.9, 0.49, 0.5, 0.0, 0.7, 0.2, 0.99])}
    got = apply_group("flip", x, p)
    for n in range(8):
        want = x[n].flip(2) if p["u"][n] < 0.5 else x[n]
        assert torch.equal(got[n], want)


def test_scale_matches_per_image_reference_and_range():
    x = batch(n=4, size=10)
    p = draws("scale", x)
    got = apply_group("scale", x, p)
    for n in range(4):
        want = ref_affine(x[n], float(p["sx"][n]), 0.0, 0.0, float(p["sy"][n]))
        torch.testing.assert_close(got[n], want, rtol=1e-4, atol=1e-5)
    many = draw_params("scale", 10000, 32, 32, torch.Generator().manual_seed(3))
    for key in ("sx", "sy"):
        assert 1 / 1.2 <= float(many[key].min()) < 0.84 and 1.19 < float(many[key].max()) <= 1.2
    assert not torch.equal(many["sx"], many["sy"])


def test_rotate_matches_per_image_reference_and_range():
    x = batch(n=4, size=10)
    p = draws("rotate", x)
    got = apply_group("rotate", x, p)
    for n in range(4):
        a = float(p["angle"][n])
        want = ref_affine(x[n], math.cos(a), -math.sin(a), math.sin(a), math.cos(a))
        torch.testing.assert_close(got[n], want, rtol=1e-4, atol=1e-5)
    many = draw_params("rotate", 10000, 32, 32, torch.Generator().manual_seed(3))["angle"] * 180 / math.pi
    assert -15 <= float(many.min()) < -14.9 and 14.9 < float(many.max()) <= 15


def test_identity_affine_is_exact_with_align_corners_false():
    x = batch(n=2, size=9)
    out = apply_group("scale", x, {"sx": torch.ones(2), "sy": torch.ones(2)})
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


def test_draws_are_independent_per_image_and_reproducible():
    x = batch(n=64)
    for group in GROUPS:
        a, b = draws(group, x, seed=5), draws(group, x, seed=5)
        assert all(torch.equal(a[k], b[k]) for k in a)
        first = next(iter(a.values()))
        assert len(set(first.tolist())) > 1, group


def test_strategy_parsing():
    assert parse_strategy(OFFICIAL.dsa_strategy) == ("color", "crop", "cutout", "flip", "scale", "rotate")
    assert parse_strategy("none") == ()
    with pytest.raises(UsageError, match="unknown DSA group"):
        parse_strategy("color_blur")


def test_single_mode_one_group_per_whole_batch_uniform(monkeypatch):
    """The trainer draws ONE group per batch and applies it to the whole batch;
    over many batches every group is drawn about equally often."""
    calls = []
    real = train_module.augment

    def spy(xb, group, generator):
        calls.append((group, xb.shape[0]))
        return real(xb, group, generator)

    monkeypatch.setattr(train_module, "augment", spy)
    spec = get_dataset("mnist5k")
    images = torch.randn(20, 1, 28, 28)
    labels = torch.arange(20) // 2
    recipe = OFFICIAL.with_overrides(epochs=599, batch_size=10, width=4)
    train_module.train_round(spec, images, labels, recipe, seed=0, device=torch.device("cpu"), progress=False)
    assert len(calls) == 600 * 2
    assert {n for _, n in calls} == {10}
    counts = Counter(g for g, _ in calls)
    assert set(counts) == set(GROUPS)
    assert all(150 <= c <= 250 for c in counts.values()), counts
