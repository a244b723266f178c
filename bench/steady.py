"""Steady-state rates: the one way every bench and bench/gpu_check.py times a stream of batches.

A rate timed from the first batches measures start-up, and a rate timed while a DataLoader's queue
drains measures the queue: with W workers and a prefetch factor P, up to W·P batches are decoded
before the consumer asks for them (torch.utils.data.DataLoader: ``prefetch_factor`` batches in
flight per worker). A 10-batch epoch read by 15 workers is decoded before its second batch is
taken, which is how a loader capped at 3,840 images/s was once reported at 86,591 (issue 19).

So ``Meter`` skips a warm-up of at least W·P batches plus a few (``loader_warmup``), then times
until it has seen at least ``min_batches`` batches **and** ``min_seconds`` of wall time, stopping
at ``max_batches`` or ``max_seconds`` so that a budget holds. On CUDA it synchronises the device at
both ends of the timed window (``sync``), so queued kernels are neither missed nor counted twice.

A meter wraps the iterable that is timed, so the same code serves a bench that pulls batches
itself (``Meter.run``) and a training loop that pulls them (``Meter.wrap``, as the end-to-end check
wraps the batches trainers/loop.py reads). A batch counts when the consumer asks for the next one:
its time then includes the consumer's work on it.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

T = TypeVar("T")
EXTRA_WARMUP = 3  # batches past the prefetch depth: worker start-up and the first kernels' autotuning


class NotSteady(RuntimeError):
    """The stream ended before the warm-up and ``min_batches`` were through: no steady figure."""


@dataclass(frozen=True)
class Window:
    """What one steady-state figure takes: ``warmup`` batches skipped, then at least ``min_batches``
    and ``min_seconds`` (wall seconds) timed, at most ``max_batches`` or ``max_seconds``."""

    warmup: int
    min_batches: int
    min_seconds: float
    max_batches: int
    max_seconds: float

    def __post_init__(self) -> None:
        if not (0 <= self.warmup and 1 <= self.min_batches <= self.max_batches
                and 0 <= self.min_seconds <= self.max_seconds):
            raise ValueError(f"inconsistent window {self}")

    @property
    def batches_needed(self) -> int:
        """Batches a source must be able to give for the window to close on its own terms."""
        return self.warmup + self.max_batches


@dataclass(frozen=True)
class Rate:
    """A measured window: ``items`` (e.g. images) in ``batches`` batches over ``seconds`` (wall),
    after ``warmup`` batches. ``capped``: the window stopped at its maximum before ``min_seconds``
    (it stays a steady figure, over fewer seconds than asked)."""

    items: int
    batches: int
    seconds: float
    warmup: int
    capped: bool

    @property
    def per_second(self) -> float:
        """items per second"""
        return self.items / self.seconds if self.seconds > 0 else float("inf")

    @property
    def batches_per_second(self) -> float:
        return self.batches / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "per_second": self.per_second}


def loader_warmup(workers: int, prefetch_factor: int | None, extra: int = EXTRA_WARMUP) -> int:
    """Batches to skip before timing a DataLoader: all it can hold in flight (workers ×
    prefetch_factor; none without workers) plus ``extra``."""
    return max(0, workers) * (prefetch_factor or 0) + extra


def cuda_sync() -> None:
    """torch.cuda.synchronize when CUDA is in use; nothing otherwise (torch imported lazily)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Meter:
    """Times one steady window over an iterable (module docstring). ``size(batch)`` gives a batch's
    items (default 1: a rate in batches); ``sync`` runs at both ends of the window; ``clock`` gives
    seconds. The result is ``rate`` after the iteration ended."""

    def __init__(self, window: Window, size: Callable[[Any], int] = lambda _: 1,
                 sync: Callable[[], None] = cuda_sync, clock: Callable[[], float] = time.perf_counter) -> None:
        self.window, self.size, self.sync, self.clock = window, size, sync, clock
        self.rate: Rate | None = None

    def wrap(self, source: Iterable[T]) -> Iterator[T]:
        """``source``'s items, until the window is complete (the source is then closed). Raises
        NotSteady when the source ends before ``warmup + min_batches`` items."""
        w = self.window
        it = iter(source)
        try:
            for i in range(w.warmup):
                try:
                    item = next(it)
                except StopIteration:
                    raise NotSteady(f"the source ended after {i} of {w.warmup} warm-up batches; give it at least "
                                    f"{w.batches_needed} batches") from None
                yield item
            self.sync()
            t0 = self.clock()
            batches = items = 0
            capped = False
            for item in it:
                yield item  # the consumer has finished this batch when it asks for the next
                batches += 1
                items += self.size(item)
                elapsed = self.clock() - t0
                if batches >= w.min_batches and elapsed >= w.min_seconds:
                    break
                if batches >= w.max_batches or elapsed >= w.max_seconds:
                    capped = True
                    break
            self.sync()
            seconds = self.clock() - t0
            if batches < w.min_batches and not capped:
                raise NotSteady(f"the source ended after {w.warmup} warm-up and {batches} timed batches, fewer than "
                                f"min_batches={w.min_batches}; give it at least {w.batches_needed} batches")
            self.rate = Rate(items=items, batches=batches, seconds=seconds, warmup=w.warmup, capped=capped)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def run(self, source: Iterable[Any]) -> Rate:
        """Pull ``source`` through the window and return the rate."""
        for _ in self.wrap(source):
            pass
        assert self.rate is not None
        return self.rate
