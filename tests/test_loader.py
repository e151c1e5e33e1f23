"""The streaming loader on real shards: shapes, windows, a global order independent of the world size
(also with canonical partitions, each rank then reading its share), equal steps, every window once in
evaluation, resume, reading the next pass ahead."""

from __future__ import annotations

import os
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from storymm.data.loader import DatasetError, PreparedDataset, WindowLoader, windows_of


@pytest.fixture(scope="module")
def dataset(tiny_data_uri):
    return PreparedDataset(tiny_data_uri)


def _loader(dataset, split="train", **kw):
    args = dict(batch_size=8, context_frames=4, max_tokens=12, shuffle_buffer=30)
    args.update(kw)
    return WindowLoader(dataset, split, **args)


def test_batch_shapes_and_values(dataset):
    batch = next(iter(_loader(dataset)))
    h, w = dataset.height, dataset.width
    assert batch["frames"].shape == (8, 4, 3, h, w) and batch["frames"].dtype == torch.float32
    assert batch["tokens"].shape == (8, 4, 12) and batch["tokens"].dtype == torch.int64
    assert batch["target_frame"].shape == (8, 3, h, w)
    assert batch["target_tokens"].shape == (8, 12)
    assert 0.0 <= batch["frames"].min() and batch["frames"].max() <= 1.0
    info = dataset.manifest["tokenizer"]
    assert (batch["target_tokens"][:, 0] == info["bos_id"]).all()
    # truncated sentences still end with [SEP]
    assert ((batch["target_tokens"] == info["eos_id"]).sum(dim=1) == 1).all()


def test_windows_are_consecutive_frames_of_one_story(dataset):
    loader = _loader(dataset, with_text=True, with_ids=True, shuffle=False, equalize=False, batch_size=1000)
    batch = next(iter(loader))
    frames = {}
    for shard in dataset.shards("train"):
        table = dataset.read_shard(shard, ["story_id", "sentences"]).to_pylist()
        frames.update({row["story_id"]: row["sentences"] for row in table})
    for story_id, inputs, target in zip(batch["story_ids"], batch["input_sentences"], batch["target_sentences"]):
        sentences = frames[story_id]
        starts = [i for i in range(len(sentences) - 4) if sentences[i : i + 4] == inputs]
        assert any(sentences[i + 4] == target for i in starts)
    for (story_id, start), target in zip(batch["window_ids"], batch["target_sentences"]):
        assert frames[story_id][start + 4] == target


def _global_steps(dataset, world: int, global_batch: int, epoch: int, start_window: int = 0, **kw) -> list[list]:
    """Per global step, the window ids of all ranks' batches in rank order (rank 0's slice first)."""
    loaders = [
        _loader(dataset, rank=r, world_size=world, batch_size=global_batch // world, with_ids=True, **kw)
        for r in range(world)
    ]
    for loader in loaders:
        loader.set_epoch(epoch, start_window=start_window)
    per_rank = [[batch["window_ids"] for batch in loader] for loader in loaders]
    assert len({len(batches) for batches in per_rank}) == 1, "ranks ran different numbers of steps"
    assert all(len(loader) == len(per_rank[0]) for loader in loaders)
    return [sum(step, []) for step in zip(*per_rank)]


def test_global_window_order_does_not_depend_on_world_size(dataset):
    """The windows of each global step, and their order, are the same on 1, 2 or 3 ranks for the same
    global batch; a rank reads only what its slices need; no window repeats within the epoch."""
    reference = _global_steps(dataset, 1, 12, epoch=2)
    windows = [w for step in reference for w in step]
    total = sum(windows_of(n, 4, "all") for s in dataset.shards("train") for n in s["frame_counts"])
    assert len(reference) == total // 12 and len(windows) == len(set(windows)) == len(reference) * 12
    for world in (2, 3):
        assert _global_steps(dataset, world, 12, epoch=2) == reference
    # resuming mid-epoch on another world size continues with exactly the next global step
    assert _global_steps(dataset, 3, 12, epoch=2, start_window=5 * 12) == reference[5:]
    assert _global_steps(dataset, 2, 12, epoch=2, start_window=7 * 12) == reference[7:]
    assert _global_steps(dataset, 1, 12, epoch=3) != reference


def test_evaluation_yields_every_window_once_across_ranks(dataset):
    total = sum(windows_of(n, 4, "all") for s in dataset.shards("train") for n in s["frame_counts"])
    for shuffle in (False, True):
        seen = []
        for rank in range(3):
            loader = _loader(dataset, rank=rank, world_size=3, equalize=False, with_ids=True, shuffle=shuffle)
            batches = [batch["window_ids"] for batch in loader]
            assert len(batches) == len(loader) and sum(map(len, batches)) == loader.num_windows()
            seen += [w for batch in batches for w in batch]
        assert len(seen) == len(set(seen)) == total


def test_epochs_reshuffle_and_first_mode(dataset):
    loader = _loader(dataset, with_text=True)
    loader.set_epoch(0)
    first = [sid for batch in loader for sid in batch["story_ids"]]
    loader.set_epoch(1)
    second = [sid for batch in loader for sid in batch["story_ids"]]
    assert first != second
    loader.set_epoch(0)
    assert first == [sid for batch in loader for sid in batch["story_ids"]]
    firsts = _loader(dataset, windows="first", equalize=False, with_text=True)
    ids = [sid for batch in firsts for sid in batch["story_ids"]]
    assert len(ids) == len(set(ids)) == sum(1 for s in dataset.shards("train") for n in s["frame_counts"] if n >= 5)


def test_resume_mid_epoch_gives_the_same_batches(dataset):
    loader = _loader(dataset)
    loader.set_epoch(4)
    full = list(loader)
    loader.set_epoch(4, start_window=3 * 8)
    rest = list(loader)
    assert len(rest) == len(full) - 3
    for a, b in zip(full[3:], rest):
        assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["target_tokens"], b["target_tokens"])


def test_bad_arguments_are_clear(dataset):
    with pytest.raises(ValueError, match="rank"):
        _loader(dataset, rank=2, world_size=2)
    with pytest.raises(ValueError, match="windows"):
        _loader(dataset, windows="some")
    with pytest.raises(DatasetError, match="split 'nope'"):
        _loader(dataset, split="nope")
    assert np.isclose(windows_of(13, 4, "all"), 9) and windows_of(4, 4, "all") == 0


def _shard_reads(loader: WindowLoader) -> int:
    """Shard reads of the loader's pass: each chunk reads every shard holding one of its stories."""
    return sum(len({story.shard for story in chunk.stories}) for chunk in loader.plan())


def test_partitions_keep_one_order_on_every_world_size_and_each_rank_reads_its_share(dataset):
    """With 4 canonical partitions the global steps are the same on 1, 2, 3, 4 and 6 ranks, a resume
    mid-epoch on another world size continues at the next step, and when the world size divides the
    partitions each rank reads only its partitions' shards: all ranks together read each shard once,
    plus at most one more per partition boundary."""
    shards = len(dataset.shards("train"))
    reference = _global_steps(dataset, 1, 12, epoch=2, partitions=4)
    windows = [w for step in reference for w in step]
    total = sum(windows_of(n, 4, "all") for s in dataset.shards("train") for n in s["frame_counts"])
    assert len(reference) == total // 12 and len(windows) == len(set(windows)) == len(reference) * 12
    assert reference != _global_steps(dataset, 1, 12, epoch=2)  # the order is a function of the partitions
    for world in (2, 3, 4, 6):
        assert _global_steps(dataset, world, 12, epoch=2, partitions=4) == reference, world
    assert _global_steps(dataset, 4, 12, epoch=2, start_window=5 * 12, partitions=4) == reference[5:]
    assert _global_steps(dataset, 2, 12, epoch=2, start_window=7 * 12, partitions=4) == reference[7:]

    for world in (2, 4):
        loaders = [
            _loader(dataset, rank=r, world_size=world, batch_size=12 // world, partitions=4) for r in range(world)
        ]
        for loader in loaders:
            loader.set_epoch(2)
        reads = [_shard_reads(loader) for loader in loaders]
        assert sum(reads) <= shards + 4 - 1, (world, reads)
        assert max(reads) <= shards // world + 4 // world + 1, (world, reads)
    # one partition: every rank touches most shards (the reason for partitions)
    single = [_loader(dataset, rank=r, world_size=4, batch_size=3) for r in range(4)]
    for loader in single:
        loader.set_epoch(2)
    assert sum(_shard_reads(loader) for loader in single) > shards + 4


def test_partitions_need_whole_global_batches(dataset):
    with pytest.raises(ValueError, match="partitions"):
        _loader(dataset, partitions=2, equalize=False)


def _wait_for_reads(loader: WindowLoader) -> None:
    deadline = time.monotonic() + 30
    while not all(future.done() for _, future in loader._stream.items.pending):
        assert time.monotonic() < deadline, "the read-ahead did not finish"
        time.sleep(0.01)


def test_a_continuous_loader_reads_the_next_pass_while_this_one_is_consumed(tiny_data_uri, tmp_path):
    """After epoch 0 the next epoch's first chunks are already read: with every shard deleted, epoch 1
    still yields its first chunks' batches (the same as a fresh loader's), then names the missing
    shard. An unshuffled loader (validation) reads the same pass again, up to ``max_batches``."""
    copy = str(tmp_path / "data")
    shutil.copytree(tiny_data_uri, copy)
    kw = dict(shuffle_buffer=10, prefetch_chunks=2, with_ids=True)
    expected = _loader(PreparedDataset(tiny_data_uri), **kw)
    expected.set_epoch(1)
    reference = [batch["window_ids"] for batch in expected]
    first_two = sum(len(chunk.windows) for chunk in expected.plan()[:2]) // 8  # whole batches of chunks 0-1

    loader = _loader(PreparedDataset(copy), continuous=True, **kw)
    assert len(list(loader)) > 0
    _wait_for_reads(loader)
    shutil.rmtree(os.path.join(copy, "train"))
    loader.set_epoch(1)
    got = []
    with pytest.raises(DatasetError, match="missing"):
        for batch in loader:
            got.append(batch["window_ids"])
    assert 1 <= first_two <= len(got) < len(reference) and got == reference[: len(got)]
    loader.close()

    shutil.copytree(os.path.join(tiny_data_uri, "train"), os.path.join(copy, "train"))
    passes = _loader(PreparedDataset(copy), shuffle=False, equalize=False, max_batches=2, continuous=True, **kw)
    first = [batch["window_ids"] for batch in passes]
    assert len(first) == 2 and len(passes) == 2
    _wait_for_reads(passes)
    shutil.rmtree(os.path.join(copy, "train"))
    assert [batch["window_ids"] for batch in passes] == first  # read before the shards were gone
    passes.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("storymm-prefetch")]
