"""k-means in torch (so it runs on the GPU when there is one): k-means++
seeding, then Lloyd iterations until no point changes cluster.

Determinism: every random choice (the k-means++ draws) comes from a CPU
generator seeded by the caller, and the Lloyd steps are deterministic, so the
same seed and device give the same centres.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ddchallenge.errors import UsageError

MAX_ITERATIONS = 300  # Lloyd's algorithm converges in tens of steps on image sets; this only bounds a pathology


@dataclass(frozen=True)
class KMeansResult:
    centres: torch.Tensor  # (k, D) float32, on the input's device
    assignment: torch.Tensor  # (N,) int64: the cluster of each point
    iterations: int  # Lloyd steps run
    converged: bool  # True: the last step changed no assignment
    inertia: float  # sum of squared distances of the points to their centres


def _squared_distances(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    # |x|^2 - 2 x.c + |c|^2, clamped: rounding can make it slightly negative.
    return ((x * x).sum(1, keepdim=True) - 2 * x @ centres.T + (centres * centres).sum(1)).clamp_min_(0)


def _plus_plus(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ (Arthur & Vassilvitskii 2007): each new centre is a point drawn
    with probability proportional to its squared distance to the nearest
    centre so far."""
    n = len(x)
    first = int(torch.randint(n, (1,), generator=g))
    centres = [x[first]]
    nearest = _squared_distances(x, x[first:first + 1]).squeeze(1)
    for _ in range(1, k):
        weights = nearest.double().cpu()
        if float(weights.sum()) <= 0:  # fewer distinct points than k: any point will do
            pick = int(torch.randint(n, (1,), generator=g))
        else:
            pick = int(torch.multinomial(weights, 1, generator=g))
        centres.append(x[pick])
        nearest = torch.minimum(nearest, _squared_distances(x, x[pick:pick + 1]).squeeze(1))
    return torch.stack(centres)


def kmeans(points: torch.Tensor, k: int, seed: int, max_iterations: int = MAX_ITERATIONS) -> KMeansResult:
    """Cluster `points` (N, ...) into `k` clusters; points are flattened."""
    x = points.reshape(len(points), -1).float()
    if not 1 <= k <= len(x):
        raise UsageError(f"k-means needs 1 <= k <= the number of points; got k {k} for {len(x)} points")
    g = torch.Generator().manual_seed(seed)
    centres = _plus_plus(x, k, g)
    assignment = None
    converged = False
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        dist = _squared_distances(x, centres)
        new = dist.argmin(1)
        if assignment is not None and torch.equal(new, assignment):
            converged = True
            break
        assignment = new
        counts = torch.bincount(assignment, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assignment, x)
        centres = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:
            # An empty cluster takes the point farthest from its own centre,
            # the standard repair; deterministic (argmax), one point each.
            far = dist.gather(1, assignment[:, None]).squeeze(1)
            for c in empty:
                j = int(far.argmax())
                centres[c] = x[j]
                far[j] = -1
    inertia = float(_squared_distances(x, centres).gather(1, assignment[:, None]).sum())
    return KMeansResult(centres, assignment, iterations, converged, inertia)
