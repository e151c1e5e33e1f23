"""The loader's background prefetch: order, bound, error propagation, abandonment, and the loader's
batches being the same with and without it."""

from __future__ import annotations

import os
import random
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from storymm.data.loader import PreparedDataset, WindowLoader
from storymm.data.prefetch import THREAD_PREFIX, PrefetchStats, prefetch_map


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


class _Recorder:
    """A load function that sleeps a random while and records how many loads overlap."""

    def __init__(self, fail_at: int | None = None):
        self.lock = threading.Lock()
        self.running = self.max_running = 0
        self.started: list[int] = []
        self.fail_at = fail_at

    def __call__(self, item: int) -> np.ndarray:
        with self.lock:
            self.started.append(item)
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            time.sleep(random.Random(item).uniform(0.0, 0.02))
            if item == self.fail_at:
                raise FileNotFoundError(f"no such object: part-{item:05d}")
            return np.full(1000, item, dtype=np.uint8)
        finally:
            with self.lock:
                self.running -= 1


def test_results_come_in_order_and_match_synchronous_loading():
    for depth in (0, 1, 3):
        out = [(item, int(result[0])) for item, result in prefetch_map(_Recorder(), range(20), depth)]
        assert out == [(i, i) for i in range(20)], depth
    assert not _prefetch_threads()


def test_loads_are_bounded_and_items_pulled_lazily():
    pulled: list[int] = []

    def source():
        for item in range(30):
            pulled.append(item)
            yield item

    recorder, stats, depth = _Recorder(), PrefetchStats(), 2
    for item, _ in prefetch_map(recorder, source(), depth, stats=stats):
        assert len(pulled) <= item + 1 + depth  # never more than `depth` items ahead of the consumer
        time.sleep(0.005)
    assert recorder.max_running <= depth
    assert stats.items == 30 and 1 <= stats.peak_items <= depth + 1
    assert 1000 <= stats.peak_bytes <= (depth + 1) * 1000
    assert "MiB" in stats.summary()


def test_a_failed_load_reaches_the_consumer_at_its_turn_with_the_item_named():
    seen = []
    with pytest.raises(FileNotFoundError, match="part-00004") as info:
        for item, _ in prefetch_map(_Recorder(fail_at=4), range(10), 3, describe=lambda i: f"chunk #{i}"):
            seen.append(item)
    assert seen == [0, 1, 2, 3]
    assert any("chunk #4" in note for note in info.value.__notes__)
    assert not _prefetch_threads()
    with pytest.raises(FileNotFoundError) as sync_info:  # the synchronous path names it too
        list(prefetch_map(_Recorder(fail_at=1), range(3), 0, describe=lambda i: f"chunk #{i}"))
    assert any("chunk #1" in note for note in sync_info.value.__notes__)


def test_abandoning_the_iterator_stops_its_threads():
    recorder = _Recorder()
    iterator = prefetch_map(recorder, range(100), 4)
    for item, _ in iterator:
        if item == 2:
            break
    assert _prefetch_threads()  # loads of items 3.. are still held
    iterator.close()
    assert not _prefetch_threads()
    assert len(recorder.started) <= 3 + 4  # nothing was loaded beyond the bound

    # dropped without close(): collected, same result
    iterator = prefetch_map(_Recorder(), range(100), 2)
    next(iterator)
    del iterator
    assert not _prefetch_threads()


# ------------------------------------------------------------------------------- the loader


def _loader(dataset, prefetch: int, **kw) -> WindowLoader:
    args = dict(batch_size=8, context_frames=4, max_tokens=12, shuffle_buffer=30, prefetch_chunks=prefetch)
    args.update(kw)
    return WindowLoader(dataset, "train", **args)


def test_loader_batches_identical_with_and_without_prefetch(tiny_data_uri):
    dataset = PreparedDataset(tiny_data_uri)
    for kw in ({}, {"rank": 1, "world_size": 2}, {"equalize": False, "with_text": True}):
        plain, ahead = _loader(dataset, 0, shuffle_buffer=10, **kw), _loader(dataset, 3, shuffle_buffer=10, **kw)
        for loader in (plain, ahead):
            loader.set_epoch(3, start_window=40)  # resume mid-epoch (global windows)
        a, b = list(plain), list(ahead)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            for key in x:
                assert torch.equal(x[key], y[key]) if isinstance(x[key], torch.Tensor) else x[key] == y[key]
        assert ahead.prefetch_stats.items >= 3  # several chunks per epoch, so prefetch had work to do
        assert 1 <= ahead.prefetch_stats.peak_items <= 4 and ahead.prefetch_stats.peak_bytes > 0
    assert not _prefetch_threads()


def test_loader_abandoned_mid_epoch_leaves_no_threads(tiny_data_uri):
    loader = _loader(PreparedDataset(tiny_data_uri), 2)
    for index, _ in enumerate(loader):
        if index == 1:
            break
    assert not _prefetch_threads()


def test_loader_names_the_chunk_whose_shard_is_missing(tiny_data_uri, tmp_path):
    copy = str(tmp_path / "data")
    shutil.copytree(tiny_data_uri, copy)
    dataset = PreparedDataset(copy)
    loader = _loader(dataset, 2, shuffle=False, equalize=False)
    victim = dataset.shards("train")[-1]["path"]
    os.remove(os.path.join(copy, victim))
    with pytest.raises(Exception) as info:
        for _ in loader:
            pass
    assert any(victim in note for note in getattr(info.value, "__notes__", [])), info.value
    assert not _prefetch_threads()
