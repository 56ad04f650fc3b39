"""Evaluator throughput: ddchallenge's trainer against a straightforward
re-implementation of the official training loop, at the same epoch budget.

The baseline does what the organisers' script does, in its style: a
DataLoader over a TensorDataset (shuffle, batch 256), DSA that builds affine
matrices per image in Python and reads the group with `.item()`, and per-step
host syncs for the running loss and accuracy (`loss.item()`, argmax in numpy).
Both loops train on the same schedule of DSA groups (see official_style_round).

    python bench/evaluator_speed.py --shape cifar100 --epochs 2 --repeats 3 --rounds 3 --whole
    python bench/evaluator_speed.py --shape tinyimagenet --epochs 0 --repeats 3 --rounds 2
    python bench/evaluator_speed.py --full          # GPU: full protocol, both datasets

Prints a markdown table for docs/benchmarks.md: milliseconds per epoch
(medians) of the official-style loop, of ddchallenge training one round at a
time, and of ddchallenge training --rounds rounds together (per round), each
speed-up against the official-style loop; with --whole, the seconds of the
whole `ddchallenge score` command (sandbox, loading, training, testing) and
of the official-style loop run as a program of its own, same budget.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ddchallenge.evaluation.device import resolve_device
from ddchallenge.evaluation.nets import reference_convnet
from ddchallenge.evaluation.train import RoundSeeds, train_round, train_rounds
from ddchallenge.protocol import OFFICIAL, get_dataset


# --- the baseline: official-style loop ---------------------------------------

GROUPS = ["color", "crop", "cutout", "flip", "scale", "rotate"]


def _official_dsa(x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    g = GROUPS[choice.item()]  # host sync per batch, as the official code's randint(...).item()
    n, dev = x.shape[0], x.device
    if g == "color":
        x = x + (torch.rand(n, 1, 1, 1, device=dev) - 0.5)
        m = x.mean(dim=1, keepdim=True)
        x = (x - m) * (torch.rand(n, 1, 1, 1, device=dev) * 2.0) + m
        m = x.mean(dim=[1, 2, 3], keepdim=True)
        return (x - m) * (torch.rand(n, 1, 1, 1, device=dev) + 0.5) + m
    if g == "crop":
        s = int(x.size(2) * 0.125 + 0.5)
        tx = torch.randint(-s, s + 1, size=[n, 1, 1], device=dev)
        ty = torch.randint(-s, s + 1, size=[n, 1, 1], device=dev)
        gb, gx, gy = torch.meshgrid(torch.arange(n, device=dev), torch.arange(x.size(2), device=dev),
                                    torch.arange(x.size(3), device=dev), indexing="ij")
        gx = torch.clamp(gx + tx + 1, 0, x.size(2) + 1)
        gy = torch.clamp(gy + ty + 1, 0, x.size(3) + 1)
        xp = F.pad(x, [1, 1, 1, 1])
        return xp.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)
    if g == "cutout":
        k = int(x.size(2) * 0.5 + 0.5)
        ox = torch.randint(0, x.size(2) + (1 - k % 2), size=[n, 1, 1], device=dev)
        oy = torch.randint(0, x.size(3) + (1 - k % 2), size=[n, 1, 1], device=dev)
        gb, gx, gy = torch.meshgrid(torch.arange(n, device=dev), torch.arange(k, device=dev),
                                    torch.arange(k, device=dev), indexing="ij")
        gx = torch.clamp(gx + ox - k // 2, min=0, max=x.size(2) - 1)
        gy = torch.clamp(gy + oy - k // 2, min=0, max=x.size(3) - 1)
        mask = torch.ones(n, x.size(2), x.size(3), dtype=x.dtype, device=dev)
        mask[gb, gx, gy] = 0
        return x * mask.unsqueeze(1)
    if g == "flip":
        return torch.where(torch.rand(n, 1, 1, 1, device=dev) < 0.5, x.flip(3), x)
    if g == "scale":
        sx = torch.rand(n) * (1.2 - 1 / 1.2) + 1 / 1.2
        sy = torch.rand(n) * (1.2 - 1 / 1.2) + 1 / 1.2
        theta = torch.tensor([[[sx[i], 0, 0], [0, sy[i], 0]] for i in range(n)], dtype=torch.float)
    else:
        a = (torch.rand(n) - 0.5) * 2 * 15 / 180 * float(np.pi)
        theta = torch.tensor([[[torch.cos(a[i]), torch.sin(-a[i]), 0], [torch.sin(a[i]), torch.cos(a[i]), 0]]
                              for i in range(n)], dtype=torch.float)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False).to(dev)
    return F.grid_sample(x, grid, align_corners=False)


def official_style_round(spec, images, labels, epochs: int, device, seed: int = 0, return_net: bool = False):
    """The official loop, except that the DSA group of each batch comes from
    the same schedule as ddchallenge's (the same generator, seeded the same):
    the groups differ in cost, so both loops must train on the same ones for
    the comparison to measure the loop and not the draw."""
    group_gen = torch.Generator().manual_seed(RoundSeeds.from_seed(seed).groups)
    batches = -(-images.shape[0] // 256)
    net = reference_convnet(spec).to(device)
    loader = DataLoader(TensorDataset(images.to(device), labels.to(device)), batch_size=256, shuffle=True,
                        num_workers=0)
    lr = 0.01
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    for ep in range(epochs + 1):
        loss_avg, acc_avg, num = 0.0, 0, 0
        choice = torch.randint(len(GROUPS), (batches,), generator=group_gen)
        for b, (img, lab) in enumerate(loader):
            img = _official_dsa(img, choice[b])
            out = net(img)
            loss = F.cross_entropy(out, lab)
            loss_avg += loss.item() * lab.shape[0]
            acc_avg += np.sum(np.argmax(out.cpu().data.numpy(), axis=-1) == lab.cpu().data.numpy())
            num += lab.shape[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ep == epochs // 2 + 1:
            lr *= 0.1
            opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    return net if return_net else None


# --- measurement -------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_epoch(fn, epochs: int, repeats: int, device) -> list[float]:
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t) / (epochs + 1))
    return times


def _where(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def official_style_accuracy(net, x, y) -> float:
    """The official test pass: batches of 256, argmax in numpy."""
    net.eval()
    correct = 0
    with torch.no_grad():
        for img, lab in DataLoader(TensorDataset(x, y), batch_size=256, shuffle=False):
            out = net(img.to(next(net.parameters()).device))
            correct += int(np.sum(np.argmax(out.cpu().numpy(), axis=-1) == lab.numpy()))
    return correct / len(y)


def official_program(submission: str, ref: str, shape: str, epochs: int, rounds: int, device) -> None:
    """The official evaluation as a program of its own (a child process of
    --whole): load the files, train `rounds` official-style rounds, test."""
    spec = get_dataset(shape)
    x = torch.load(submission, weights_only=True)
    y = torch.arange(x.shape[0]) // (x.shape[0] // spec.classes)
    test = torch.load(ref, weights_only=True)
    accs = []
    for r in range(rounds):
        net = official_style_round(spec, x, y, epochs, device, seed=r, return_net=True)
        accs.append(official_style_accuracy(net, test["images_val"], test["labels_val"]))
    print(f"mean accuracy {np.mean(accs):.4f}")


def whole_commands(spec, epochs: int, rounds: int, device) -> tuple[float, float]:
    """Seconds of the whole `ddchallenge score` command (sandboxed, as a user
    runs it) and of the official-style program, on the same random
    submission and random reference test set (10,000 images)."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = spec.classes * 10
        sub, ref = tmp / f"{spec.name}.pt", tmp / "ref" / spec.reference_file
        ref.parent.mkdir()
        torch.save(torch.randn(n, *spec.image_shape), sub)
        torch.save({"images_val": torch.randn(10_000, *spec.image_shape),
                    "labels_val": torch.arange(10_000) % spec.classes}, ref)
        times = []
        for cmd in ([sys.executable, "-m", "ddchallenge", "score", str(sub), "--dataset", spec.name, "--ref",
                     str(ref.parent), "--epochs", str(epochs), "--rounds", str(rounds), "--device", str(device),
                     "--quiet", "--output", str(tmp / "results")],
                    [sys.executable, __file__, "--official-program", str(sub), str(ref), "--shape", spec.name,
                     "--epochs", str(epochs), "--rounds", str(rounds), "--device", str(device)]):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, cwd=tmp)
            times.append(time.perf_counter() - t)
    return times[0], times[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["mnist5k", "cifar100", "tinyimagenet"], default="cifar100")
    ap.add_argument("--epochs", type=int, default=2, help="recipe epochs per run (runs epochs + 1 passes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="rounds trained together (0: skip that measurement)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--whole", action="store_true",
                    help="also time the whole `ddchallenge score` command and the official-style program")
    ap.add_argument("--full", action="store_true", help="time the full official protocol for both datasets")
    ap.add_argument("--official-program", nargs=2, metavar=("SUBMISSION", "REF"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = resolve_device(args.device)
    if args.official_program:
        official_program(*args.official_program, args.shape, args.epochs, args.rounds, device)
        return
    where = _where(device)

    if args.full:
        total = 0.0
        for name in ("cifar100", "tinyimagenet"):
            spec = get_dataset(name)
            x, y = torch.randn(spec.classes * 10, *spec.image_shape), torch.arange(spec.classes * 10) // 10
            t = time.perf_counter()
            for r in range(OFFICIAL.rounds):
                train_round(spec, x, y, OFFICIAL, r, device, progress=False)
            _sync(device)
            dt = time.perf_counter() - t
            total += dt
            print(f"| {name} | full official protocol (1001 epochs x 3 rounds) | {dt:.1f} s | {where} |")
        print(f"| both | challenge score | {total:.1f} s | {where} |")
        return

    spec = get_dataset(args.shape)
    n = spec.classes * 10
    x, y = torch.randn(n, *spec.image_shape), torch.arange(n) // 10
    recipe = OFFICIAL.with_overrides(epochs=args.epochs)
    torch.manual_seed(0)
    # One untimed pass of each first: kernel selection and allocator warm-up
    # would otherwise be charged to whichever loop runs first.
    train_round(spec, x, y, OFFICIAL.with_overrides(epochs=0), 0, device, progress=False)
    official_style_round(spec, x, y, 0, device)
    seeds = list(range(args.rounds))
    arms = {
        "base": lambda: official_style_round(spec, x, y, args.epochs, device),
        "ours": lambda: train_round(spec, x, y, recipe, 0, device, progress=False),
    }
    if args.rounds:
        train_rounds(spec, x, y, OFFICIAL.with_overrides(epochs=0), seeds, device, progress=False)
        arms["together"] = lambda: train_rounds(spec, x, y, recipe, seeds, device, progress=False)
    # The arms alternate (base, ours, together, base, ...) so that load from
    # other work on the machine falls on all of them alike.
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(args.repeats):
        for k, fn in arms.items():
            times[k] += seconds_per_epoch(fn, args.epochs, 1, device)
    mb, mo = (statistics.median(times[k]) * 1e3 for k in ("base", "ours"))
    cells = [f"{args.shape} {tuple(x.shape)}", where, f"{mb:.0f}", f"{mo:.0f}", f"{mb / mo:.2f}x"]
    if args.rounds:
        mt = statistics.median(times["together"]) * 1e3 / args.rounds
        cells += [f"{mt:.0f} ({args.rounds} together)", f"{mb / mt:.2f}x"]
    else:
        cells += ["-", "-"]
    cells.append(f"{args.epochs + 1} passes x {args.repeats} runs")
    if args.whole:
        ddc, off = whole_commands(spec, args.epochs, max(args.rounds, 1), device)
        cells.append(f"{off:.1f} / {ddc:.1f} s = {off / ddc:.2f}x ({max(args.rounds, 1)} rounds)")
    print("| input | device | official-style ms/epoch | ddchallenge ms/epoch (alone) | speed-up | "
          "ddchallenge ms per round-epoch (together) | speed-up | runs |" + (" whole command: official-style / "
                                                                              "ddchallenge score |" if args.whole else ""))
    print("|---" * (len(cells)) + "|")
    print("| " + " | ".join(cells) + " |")
    print("per run, ms/epoch (together: per round-epoch): " + "; ".join(
        f"{k} " + " ".join(f"{t * 1e3 / (args.rounds if k == 'together' else 1):.0f}" for t in v)
        for k, v in times.items()))


if __name__ == "__main__":
    main()
