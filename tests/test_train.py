import pytest
import torch

from ddchallenge.evaluation import train as train_module
from ddchallenge.errors import UsageError
from ddchallenge.protocol import OFFICIAL, get_dataset
from ddchallenge.evaluation.device import resolve_device
from ddchallenge.evaluation.train import RoundSeeds, accuracy, train_round


def test_official_recipe_constants():
    assert (OFFICIAL.passes, OFFICIAL.lr_drop_epoch, OFFICIAL.rounds, OFFICIAL.batch_size) == (1001, 501, 3, 256)
    assert (OFFICIAL.lr, OFFICIAL.momentum, OFFICIAL.weight_decay) == (0.01, 0.9, 5e-4)
    assert OFFICIAL.is_official
    assert not OFFICIAL.with_overrides(epochs=10).is_official
    assert OFFICIAL.with_overrides(eval_batch_size=7).is_official
    assert OFFICIAL.with_overrides(rounds=2).hash() != OFFICIAL.hash()


def test_lr_drop_makes_a_fresh_optimiser_after_the_drop_pass(monkeypatch):
    made, steps = [], []
    real_sgd = torch.optim.SGD

    class RecordingSGD(real_sgd):
        def __init__(self, params, lr, **kw):
            super().__init__(params, lr=lr, **kw)
            made.append((lr, kw["momentum"], kw["weight_decay"]))

        def step(self, closure=None):
            steps.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(train_module.torch.optim, "SGD", RecordingSGD)
    spec = get_dataset("mnist5k")
    recipe = OFFICIAL.with_overrides(epochs=6, width=4, batch_size=8)  # 7 passes, drop after pass 4
    train_round(spec, torch.randn(20, 1, 28, 28), torch.arange(20) // 2, recipe, 0, torch.device("cpu"), False)
    assert made == [(0.01, 0.9, 5e-4), (pytest.approx(0.001), 0.9, 5e-4)]
    batches = 3  # 20 images in batches of 8: 8, 8, 4
    assert steps == [0.01] * (5 * batches) + [pytest.approx(0.001)] * (2 * batches)


def test_same_seed_same_weights_other_seed_differs():
    spec = get_dataset("mnist5k")
    x, y = torch.randn(30, 1, 28, 28), torch.arange(30) // 3
    recipe = OFFICIAL.with_overrides(epochs=2, width=8)
    a, b, c = (train_round(spec, x, y, recipe, s, torch.device("cpu"), False) for s in (3, 3, 4))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_round_seeds_are_distinct_streams():
    s = RoundSeeds.from_seed(0)
    assert len({s.init, s.shuffle, s.augment, s.groups}) == 4
    assert RoundSeeds.from_seed(0) == s != RoundSeeds.from_seed(1)


def test_accuracy_counts_exactly():
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float()

    x = torch.tensor([0, 1, 2, 0, 1]).float().view(5, 1, 1, 1)
    assert accuracy(Fixed(), x, torch.tensor([0, 1, 2, 1, 1]), batch_size=2) == pytest.approx(0.8)


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_device("cuda")


def test_evaluation_is_one_package_and_diffusion_does_not_import_the_training_loop():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "ddchallenge"
    for old in ("train", "nets", "augment"):
        assert importlib.util.find_spec(f"ddchallenge.{old}") is None
    for path in (root / "diffusion").glob("*.py"):
        assert "ddchallenge.evaluation.train" not in path.read_text(), path
