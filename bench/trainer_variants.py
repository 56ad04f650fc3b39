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
  pool-reshape  train_round per seed with each 2x2 average pooling written
                as a reshape and a mean: the pooling backward was the
                largest kernel of a GPU pass (session 11's profile), and a
                mean's backward is a broadcast
  channels-last train_round per seed with the network and its input in
                channels-last memory: the profile's third cost was cuDNN's
                layout transposes around each convolution
  bf16          train_round per seed under bfloat16 autocast (weights and
                the optimiser stay float32): an opt-in candidate only,
                never a default (issue 24), its fidelity beside its speed

Only `alone` and `together` are paths of the library's `round_accuracies`;
the others patch the trainer here so that they can be measured before any
becomes a default (a default changes only after its A/B, docs/benchmarks.md).
"""
from __future__ import annotations

import contextlib

import torch

import ddchallenge.evaluation.train as train_mod

VARIANTS = ("alone", "together", "rounds-graph", "compiled", "nondet", "pool-reshape", "channels-last", "bf16")
TOGETHER = ("together", "rounds-graph")  # the variants that train their seeds as one batched model


def _patched_numerics(inner):
    """training_numerics patched to also enter `inner(device)`, inside its own settings, for the block."""
    @contextlib.contextmanager
    def patch():
        original = train_mod.training_numerics

        @contextlib.contextmanager
        def numerics(device):
            with original(device), inner(device):
                yield

        train_mod.training_numerics = numerics
        try:
            yield
        finally:
            train_mod.training_numerics = original
    return patch


@contextlib.contextmanager
def _free_cudnn(device):
    """training_numerics makes cuDNN deterministic on entry (and restores it on exit): undo that inside it."""
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    yield


class _ReshapePool(torch.nn.Module):
    """AvgPool2d(2, 2) as a reshape and a mean (the same values, summed in another order)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x[:, :, : h // 2 * 2, : w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).mean((3, 5))


def _patched_net(change):
    """reference_convnet patched to return `change(net)` for the block."""
    @contextlib.contextmanager
    def patch():
        original = train_mod.reference_convnet
        train_mod.reference_convnet = lambda *a, **k: change(original(*a, **k))
        try:
            yield
        finally:
            train_mod.reference_convnet = original
    return patch


def _reshape_pools(net: torch.nn.Module) -> torch.nn.Module:
    for i, layer in enumerate(net.features):
        if isinstance(layer, torch.nn.AvgPool2d):
            assert layer.kernel_size == layer.stride == 2, layer
            net.features[i] = _ReshapePool()
    return net


def _channels_last(net: torch.nn.Module) -> torch.nn.Module:
    net = net.to(memory_format=torch.channels_last)
    net.register_forward_pre_hook(lambda _, args: (args[0].contiguous(memory_format=torch.channels_last),))
    return net


def train(variant: str, spec, x, y, recipe, seeds, device) -> list[torch.nn.Module]:
    """The trained networks of `seeds` (eval mode), trained the `variant` way."""
    if variant == "together":
        return train_mod.train_rounds(spec, x, y, recipe, seeds, device, progress=False)
    if variant == "rounds-graph":
        return train_mod.train_rounds(spec, x, y, recipe, seeds, device, progress=False, compile=True)
    patch = {"alone": contextlib.nullcontext, "compiled": _patched_net(torch.compile),
             "nondet": _patched_numerics(_free_cudnn), "pool-reshape": _patched_net(_reshape_pools),
             "channels-last": _patched_net(_channels_last),
             "bf16": _patched_numerics(lambda device: torch.autocast(device.type, dtype=torch.bfloat16))}[variant]
    with patch():
        return [train_mod.train_round(spec, x, y, recipe, s, device, progress=False) for s in seeds]
