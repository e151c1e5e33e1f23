"""An ordered, bounded background map: load the next chunk(s) while the current one is consumed.

Why: the loader reads a chunk of shards at a time. Read synchronously, every chunk boundary makes
the training step wait for storage (tens of milliseconds per request on object storage, several
requests per shard). ``prefetch_map`` runs ``load`` on the next ``depth`` items in background
threads, so the consumer only waits when storage is slower than the step on average.

Guarantees:
- Order: results come out in the order of ``items``, whatever order the loads finish in, so the
  loader's batches (and hence training) are identical with and without prefetch.
- Bound: at most ``depth`` loads run or wait unconsumed at any time, plus what the consumer holds:
  memory is ``(depth + 1)`` chunks at most when it holds one at a time. ``items`` is consumed
  lazily, ``depth`` ahead. A consumer that keeps several results (the loader with several
  partitions per rank) passes ``consumer_releases=True`` and calls ``stats.release`` for each one
  it drops, so the statistics still count what is really held.
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
from dataclasses import dataclass, field
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
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def hold(self, size: int) -> None:
        """A loaded item (``size`` bytes) is now held, by the prefetch or by the consumer."""
        with self._lock:
            self._held += 1
            self._held_bytes += size
            self.peak_items = max(self.peak_items, self._held)
            self.peak_bytes = max(self.peak_bytes, self._held_bytes)

    def release(self, size: int) -> None:
        """The consumer dropped an item of ``size`` bytes."""
        with self._lock:
            self._held -= 1
            self._held_bytes -= size

    def new_pass(self) -> None:
        """Start counting a new pass: waits and items from zero, peaks from what is held now."""
        with self._lock:
            self.items, self.wait_s = 0, 0.0
            self.peak_items, self.peak_bytes = self._held, self._held_bytes

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
    consumer_releases: bool = False,
) -> Prefetcher:
    """Yield ``(item, load(item))`` in order, loading up to ``depth`` items ahead in background threads.

    The first ``depth`` loads start at once, before the first ``next()``: a caller can start reading
    early (the next epoch while this one trains, the validation split before it is due).
    ``describe(item)`` names an item in error notes; ``stats`` (optional) is filled in as the pass goes.
    A result counts as held until the consumer asks for the next one, or with ``consumer_releases``
    until it calls ``stats.release(nbytes(result))``.
    """
    if depth < 0:
        raise ValueError(f"prefetch depth must be >= 0, got {depth}")
    return Prefetcher(load, items, depth, describe, stats if stats is not None else PrefetchStats(), consumer_releases)


def _load_tracked(load, stats: PrefetchStats, item):
    result = load(item)
    size = nbytes(result)
    stats.hold(size)
    return result, size


class Prefetcher(Iterator):
    """The iterator :func:`prefetch_map` returns; ``close()`` (or dropping it) cancels what has not
    started and waits for the running loads."""

    def __init__(self, load, items, depth: int, describe, stats: PrefetchStats, consumer_releases: bool):
        self.load, self.source, self.depth, self.describe = load, iter(items), depth, describe
        self.stats, self.consumer_releases = stats, consumer_releases
        self.pending: deque[tuple[object, Future]] = deque()
        self.held_size: int | None = None  # the result the consumer holds, released at its next request
        self.pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix=THREAD_PREFIX) if depth else None
        for _ in range(depth):
            self._submit_next()

    def _submit_next(self) -> None:
        for item in self.source:  # the task holds no reference to self, so a dropped iterator is collected
            self.pending.append((item, self.pool.submit(_load_tracked, self.load, self.stats, item)))
            return

    def _release_held(self) -> None:
        if self.held_size is not None:
            self.stats.release(self.held_size)
            self.held_size = None

    def __next__(self):
        self._release_held()
        if self.pool is None:
            return self._next_synchronous()
        if not self.pending:
            self.close()
            raise StopIteration
        item, future = self.pending.popleft()
        started = time.perf_counter()
        try:
            result, size = future.result()
        except BaseException as err:
            err.add_note(f"while loading {self.describe(item)} in the background (prefetch)")
            self.close()
            raise
        self.stats.wait_s += time.perf_counter() - started
        self.stats.items += 1
        self._submit_next()  # keep `depth` loads going while the consumer works on this one
        if not self.consumer_releases:
            self.held_size = size
        return item, result

    def _next_synchronous(self):
        item = next(self.source)  # StopIteration ends the pass
        started = time.perf_counter()
        try:
            result = self.load(item)
        except BaseException as err:
            err.add_note(f"while loading {self.describe(item)}")
            raise
        self.stats.wait_s += time.perf_counter() - started
        self.stats.items += 1
        size = nbytes(result)
        self.stats.hold(size)
        if not self.consumer_releases:
            self.held_size = size
        return item, result

    def close(self) -> None:
        self._release_held()
        pool, self.pool = getattr(self, "pool", None), None
        if pool is None:
            return
        for _, future in self.pending:
            future.cancel()
        self.pending.clear()
        # collected by a garbage collection that one of its own threads ran: it cannot wait for itself
        inside = threading.current_thread().name.startswith(THREAD_PREFIX)
        pool.shutdown(wait=not inside, cancel_futures=True)
        self.source = iter(())

    def __del__(self):
        self.close()
