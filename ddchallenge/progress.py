"""Progress bars: one look for every step that can take more than a few
seconds, on stderr, each naming what it counts.

Bars are off unless a command turns them on (`shown`): importing the library
prints nothing, and a sandboxed child (a fresh process) never writes bars into
the stderr its parent reads back for error messages. The command line's
`--quiet` is the one switch; library functions that predate this take a
`progress` flag and pass it here.

    with shown(not quiet):
        for k in bar(range(classes), desc="k-means IPC 10", unit="class"):
            ...
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import time
from typing import Iterable, Iterator

from tqdm import tqdm

_SHOWN: contextvars.ContextVar[bool] = contextvars.ContextVar("ddchallenge_progress", default=False)


@contextlib.contextmanager
def shown(on: bool = True) -> Iterator[None]:
    """Show (or, with False, hide) the bars of everything run inside."""
    token = _SHOWN.set(bool(on))
    try:
        yield
    finally:
        _SHOWN.reset(token)


def is_shown() -> bool:
    return _SHOWN.get()


def bar(iterable: Iterable | None = None, *, desc: str, unit: str, total: float | None = None, initial: int = 0,
        show: bool | None = None, leave: bool | None = None) -> tqdm:
    """A bar over `iterable` (or `total` units, advanced with `.update(n)`),
    shown when `show` is True, or when None and inside `shown()`. A bar
    opened inside another one is cleared when it ends; an outer one stays
    as the record of what was done, unless `leave` is False (a step repeated
    many times in a row, such as a scoring round's epochs)."""
    on = is_shown() if show is None else show
    return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, disable=not on, file=sys.stderr,
                dynamic_ncols=True, leave=leave, mininterval=0.5)


class Fraction:
    """Moves a bar of whole units by fractional progress (the images of a
    batch part-way through its sampler steps), never past its total."""

    def __init__(self, progress: tqdm):
        self.bar, self.whole = progress, 0

    def to(self, done: float) -> None:
        target = int(done if self.bar.total is None else min(done, self.bar.total))
        if target > self.whole:
            self.bar.update(target - self.whole)
            self.whole = target


@contextlib.contextmanager
def ticking(desc: str, seconds: float) -> Iterator[None]:
    """A bar of the wall seconds spent inside, out of `seconds`, moved once a
    second: the progress of work that shows none of its own (a sandboxed
    child, whose bars are off)."""
    progress = bar(desc=desc, unit="s", total=round(seconds), leave=False)
    if progress.disable:
        yield
        return
    stop, start, moved = threading.Event(), time.monotonic(), Fraction(progress)

    def tick() -> None:
        while not stop.wait(1.0):
            moved.to(time.monotonic() - start)

    thread = threading.Thread(target=tick, name="ddchallenge-ticking", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        progress.close()


def plural(count: int, noun: str) -> str:
    """"1 epoch", "3 epochs": a count in words, as every message and page says it."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
