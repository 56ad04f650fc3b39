"""Differentiable Siamese Augmentation (DSA) exactly as the official evaluator
applies it, as batched tensor operations on the training device.

Single mode: for each batch ONE group of the strategy is drawn uniformly, then
applied with an independent draw per image. Each group is split in two steps,
`draw_params` (all random numbers, on the device, from an explicit generator)
and `apply_group` (pure tensor arithmetic), so that a test can feed the same
draws to a plain per-image reference. Nothing here reads a value back to the
host, so a training epoch never waits on the device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ddchallenge.errors import UsageError

GROUPS = ("color", "crop", "cutout", "flip", "scale", "rotate")

# The official ParamDiffAug constants.
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5
CROP_RATIO = 0.125
CUTOUT_RATIO = 0.5
FLIP_PROB = 0.5
SCALE_RATIO = 1.2
ROTATE_DEGREES = 15.0


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """'color_crop_...' -> ('color', 'crop', ...); 'none' -> ()."""
    if strategy.lower() in ("", "none"):
        return ()
    groups = tuple(strategy.split("_"))
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise UsageError(f"unknown DSA group(s) {unknown} in {strategy!r}; groups are {', '.join(GROUPS)}")
    return groups


def crop_shift(size: int) -> int:
    return int(size * CROP_RATIO + 0.5)


def cutout_side(size: int) -> int:
    return int(size * CUTOUT_RATIO + 0.5)


def draw_params(group: str, n: int, height: int, width: int, generator: torch.Generator) -> dict:
    """All random draws of one group for a batch of n images."""
    dev = generator.device

    def u():
        return torch.rand(n, device=dev, generator=generator)

    if group == "color":
        return {"brightness": u(), "saturation": u(), "contrast": u()}
    if group == "crop":
        sx, sy = crop_shift(height), crop_shift(width)
        return {
            "tx": torch.randint(-sx, sx + 1, (n,), device=dev, generator=generator),
            "ty": torch.randint(-sy, sy + 1, (n,), device=dev, generator=generator),
        }
    if group == "cutout":
        kx, ky = cutout_side(height), cutout_side(width)
        # An even side admits one more centre position, as in the official code.
        return {
            "ox": torch.randint(0, height + (1 - kx % 2), (n,), device=dev, generator=generator),
            "oy": torch.randint(0, width + (1 - ky % 2), (n,), device=dev, generator=generator),
        }
    if group == "flip":
        return {"u": u()}
    if group == "scale":
        lo = 1.0 / SCALE_RATIO
        return {"sx": u() * (SCALE_RATIO - lo) + lo, "sy": u() * (SCALE_RATIO - lo) + lo}
    if group == "rotate":
        return {"angle": (u() - 0.5) * 2 * ROTATE_DEGREES / 180 * math.pi}
    raise UsageError(f"unknown DSA group {group!r}; groups are {', '.join(GROUPS)}")


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def apply_group(group: str, x: torch.Tensor, p: dict) -> torch.Tensor:
    """Apply one group to a batch (N, C, H, W) with the draws from draw_params."""
    n, c, h, w = x.shape
    if group == "color":
        x = x + (p["brightness"].view(n, 1, 1, 1) - 0.5) * BRIGHTNESS
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (p["saturation"].view(n, 1, 1, 1) * SATURATION) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (p["contrast"].view(n, 1, 1, 1) + CONTRAST) + mean
    if group == "crop":
        # Output pixel (i, j) is input pixel (i + tx, j + ty), zero outside:
        # pad by the largest shift, then gather rows and columns per image.
        sx, sy = crop_shift(h), crop_shift(w)
        xp = F.pad(x, (sy, sy, sx, sx))
        rows = torch.arange(h, device=x.device) + sx + p["tx"].view(n, 1)
        cols = torch.arange(w, device=x.device) + sy + p["ty"].view(n, 1)
        xp = xp.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * sy))
        return xp.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))
    if group == "cutout":
        kx, ky = cutout_side(h), cutout_side(w)
        top = (p["ox"] - kx // 2).view(n, 1)
        left = (p["oy"] - ky // 2).view(n, 1)
        r = torch.arange(h, device=x.device).view(1, h)
        q = torch.arange(w, device=x.device).view(1, w)
        in_rows = (r >= top) & (r < top + kx)
        in_cols = (q >= left) & (q < left + ky)
        keep = ~(in_rows.view(n, h, 1) & in_cols.view(n, 1, w))
        return x * keep.view(n, 1, h, w).to(x.dtype)
    if group == "flip":
        return torch.where(p["u"].view(n, 1, 1, 1) < FLIP_PROB, x.flip(3), x)
    if group == "scale":
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = p["sx"]
        theta[:, 1, 1] = p["sy"]
        return _affine(x, theta)
    if group == "rotate":
        a = p["angle"].to(x.dtype)
        cos, sin = torch.cos(a), torch.sin(a)
        zero = torch.zeros_like(a)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        return _affine(x, theta)
    raise UsageError(f"unknown DSA group {group!r}; groups are {', '.join(GROUPS)}")


def augment(x: torch.Tensor, group: str, generator: torch.Generator) -> torch.Tensor:
    """Draw and apply one group to a batch."""
    return apply_group(group, x, draw_params(group, x.shape[0], x.shape[2], x.shape[3], generator))
