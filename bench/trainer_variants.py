"""The candidate trainer settings of issue 24, each a way to train a
dataset's rounds, for the benchmarks that time them (gpu_profile.py) and
A/B their accuracies (fidelity.py) against the landed path.

  alone         train_round per seed: the landed scorer (the A arm)
  together      train_rounds, all seeds as one batched model
  rounds-graph  train_rounds(compile=True): torch.compile in "reduce-overhead"
                mode on CUDA, i.e. the batched step in CUDA graphs
  compiled      train_round per seed with the network wrapped in
                torch.compile (default mode)
  nondet        train_round per seed with cuDNN free to choose
                non-deterministic, autotuned kernels

Only `alone` and `together` are paths of the library's `round_accuracies`;
the others patch the trainer here so that they can be measured before any
becomes a default (a default changes only after its A/B, docs/benchmarks.md).
"""
from __future__ import annotations

import contextlib

import torch

import ddchallenge.evaluation.train as train_mod

VARIANTS = ("alone", "together", "rounds-graph", "compiled", "nondet")
TOGETHER = ("together", "rounds-graph")  # the variants that train their seeds as one batched model


@contextlib.contextmanager
def _nondeterministic_cudnn():
    """training_numerics makes cuDNN deterministic on entry: undo that inside it."""
    original = train_mod.training_numerics

    @contextlib.contextmanager
    def free(device):
        with original(device):
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
            yield

    train_mod.training_numerics = free
    try:
        yield
    finally:
        train_mod.training_numerics = original


@contextlib.contextmanager
def _compiled_net():
    original = train_mod.reference_convnet
    train_mod.reference_convnet = lambda *a, **k: torch.compile(original(*a, **k))
    try:
        yield
    finally:
        train_mod.reference_convnet = original


def train(variant: str, spec, x, y, recipe, seeds, device) -> list[torch.nn.Module]:
    """The trained networks of `seeds` (eval mode), trained the `variant` way."""
    if variant == "together":
        return train_mod.train_rounds(spec, x, y, recipe, seeds, device, progress=False)
    if variant == "rounds-graph":
        return train_mod.train_rounds(spec, x, y, recipe, seeds, device, progress=False, compile=True)
    patch = {"alone": contextlib.nullcontext, "compiled": _compiled_net, "nondet": _nondeterministic_cudnn}[variant]
    with patch():
        return [train_mod.train_round(spec, x, y, recipe, s, device, progress=False) for s in seeds]
