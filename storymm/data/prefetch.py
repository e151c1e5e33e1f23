"""An ordered, bounded background map: load the next chunk(s) while the current one is consumed.

Why: the loader reads a chunk of shards at a time. Read synchronously, every chunk boundary makes
the training step wait for storage (tens of milliseconds per request on object storage, several
requests per shard). ``prefetch_map`` runs ``load`` on the next ``depth`` items in background
threads, so the consumer only waits when storage is slower than the step on average.

Guarantees:
- Order: results come out in the order of ``items``, whatever order the loads finish in, so the
  loader's batches (and hence training) are identical with and without prefetch.
- Bound: at most ``depth`` loads run or wait unconsumed at any time, plus the item the consumer holds:
  memory is ``(depth + 1)`` chunks at most. ``items`` is consumed lazily, ``depth`` ahead.
- Errors: a failed load re-raises its own exception (type kept, so callers' handling still works)
  in the consumer, at that item's turn, with a note naming the item.
- Shutdown: closing or abandoning the iterator cancels loads not yet started and waits for the
  running ones, so no thread outlives it. ``depth=0`` loads synchronously in the caller's thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

THREAD_PREFIX = "storymm-prefetch"


@dataclass
class PrefetchStats:
    """What one pass cost: how long the consumer waited, and the most memory held in loaded items."""

    items: int = 0
    wait_s: float = 0.0
    peak_items: int = 0
    peak_bytes: int = 0
    _held: int = 0
    _held_bytes: int = 0

    def summary(self) -> str:
        return (
            f"{self.items} chunks, consumer waited {self.wait_s:.2f} s, at most {self.peak_items} loaded "
            f"chunks ({self.peak_bytes / 2**20:.1f} MiB) held"
        )


def nbytes(value) -> int:
    """Bytes of the numpy arrays and tensors inside ``value`` (tuples, lists, dicts), for the memory report."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if hasattr(value, "element_size") and hasattr(value, "nelement"):  # torch.Tensor
        return value.element_size() * value.nelement()
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    return 0


def prefetch_map(
    load: Callable[[T], R],
    items: Iterable[T],
    depth: int,
    *,
    describe: Callable[[T], str] = repr,
    stats: PrefetchStats | None = None,
) -> Iterator[tuple[T, R]]:
    """Yield ``(item, load(item))`` in order, loading up to ``depth`` items ahead in background threads.

    ``describe(item)`` names an item in error notes; ``stats`` (optional) is filled in as the pass goes.
    """
    if depth < 0:
        raise ValueError(f"prefetch depth must be >= 0, got {depth}")
    stats = stats if stats is not None else PrefetchStats()
    if depth == 0:
        yield from _synchronous(load, items, describe, stats)
        return
    lock = threading.Lock()

    def tracked(item):
        result = load(item)
        size = nbytes(result)
        with lock:
            stats._held += 1
            stats._held_bytes += size
            stats.peak_items = max(stats.peak_items, stats._held)
            stats.peak_bytes = max(stats.peak_bytes, stats._held_bytes)
        return result, size

    source = iter(items)
    pending: deque[tuple[T, Future]] = deque()
    pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix=THREAD_PREFIX)
    try:

        def submit_next() -> None:
            for item in source:
                pending.append((item, pool.submit(tracked, item)))
                return

        for _ in range(depth):
            submit_next()
        while pending:
            item, future = pending.popleft()
            started = time.perf_counter()
            try:
                result, size = future.result()
            except BaseException as err:
                err.add_note(f"while loading {describe(item)} in the background (prefetch)")
                raise
            stats.wait_s += time.perf_counter() - started
            stats.items += 1
            submit_next()  # keep `depth` loads going while the consumer works on this one
            try:
                yield item, result
            finally:
                with lock:
                    stats._held -= 1
                    stats._held_bytes -= size
                del result
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _synchronous(load, items, describe, stats: PrefetchStats):
    for item in items:
        started = time.perf_counter()
        try:
            result = load(item)
        except BaseException as err:
            err.add_note(f"while loading {describe(item)}")
            raise
        stats.wait_s += time.perf_counter() - started
        stats.items += 1
        size = nbytes(result)
        stats.peak_items, stats.peak_bytes = 1, max(stats.peak_bytes, size)
        yield item, result
