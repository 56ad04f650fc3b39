"""Distribution matching (`--match-steps N`): after a method (and selection)
has made its IPC images per class, move their pixels so that, in the
features of freshly initialised reference ConvNets, each class's mean
matches the mean of a larger pool of the same class (Zhao & Bilen, "Dataset
Condensation with Distribution Matching", WACV 2023).

The pool is what the method knows of the class (`register(..., pool=...)`),
made by the model during the run (Track 2's table rule, protocol.TABLE_RULE):
for diffusion and d3m, up to POOL_PER_CLASS of the generator's own
class-conditional samples without guidance (guidance narrows a class to its
modes; the pool should show its spread); for d4m, its own IPC prototypes
redrawn with fresh noise (generators/d4m.py); so Track 2 generation reads no
training data and no stored table beyond the set's own. For the real-image
baselines, the class's training images. Under a budget the pool is sampled
slot by slot until its share of the time left is spent (sized by
measurement), and matching is anytime: the images are valid after every
step, and at the deadline it keeps what it has and records the steps done.

The step itself is evaluation/matching.py's.

Why: a generator's images are each a plausible but typical sample, so at
small IPC the set under-represents the class's spread, which is what the
evaluation ConvNet learns from; matching the class mean in many random
feature spaces pulls the set toward covering it. Measured on mnist5k
(docs/benchmarks.md, official recipe, IPC 10): it lifts diffusion and d3m
above random real images; against the unguided samples it lowered d4m,
whose prototype-based images cover the real modes better than that pool.
(The 95.0 % rows that matched d4m against a finer stored codebook are no
longer allowed: that codebook was a quarter of the training set.)
"""
from __future__ import annotations

from ddchallenge.protocol import stream_seed

POOL_PER_CLASS = 100  # generated pool images per class: 10x IPC 10
MATCHING_RESERVE = 0.3  # share of a Track 2 budget kept back from the method for the pool and the matching
POOL_SHARE = 0.4  # of the time left after the method (and selection), the most the pool may take


def pool_seed(seed: int) -> int:
    """The seed a generator's pool is sampled with: its own stream, not the images' noise."""
    return stream_seed(seed, "pool")
