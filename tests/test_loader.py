"""The streaming loader on real shards: shapes, rank partitioning, equal steps, windows, resume."""

from __future__ import annotations

from collections import Counter

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
    loader = _loader(dataset, with_text=True, shuffle=False, equalize=False, batch_size=1000)
    batch = next(iter(loader))
    frames = {}
    for shard in dataset.shards("train"):
        table = dataset.read_shard(shard, ["story_id", "sentences"]).to_pylist()
        frames.update({row["story_id"]: row["sentences"] for row in table})
    for story_id, inputs, target in zip(batch["story_ids"], batch["input_sentences"], batch["target_sentences"]):
        sentences = frames[story_id]
        starts = [i for i in range(len(sentences) - 4) if sentences[i:i + 4] == inputs]
        assert any(sentences[i + 4] == target for i in starts)


def test_each_story_read_by_exactly_one_rank_and_equal_steps(dataset):
    world = 3
    loaders = [_loader(dataset, rank=r, world_size=world, with_text=True) for r in range(world)]
    for loader in loaders:
        loader.set_epoch(2)
    counts = [len(loader) for loader in loaders]
    assert len(set(counts)) == 1 and counts[0] > 0
    seen = [Counter(sid for batch in loader for sid in batch["story_ids"]) for loader in loaders]
    for a in range(world):
        for b in range(a + 1, world):
            assert not set(seen[a]) & set(seen[b])
    assert all(sum(c.values()) == counts[0] * 8 for c in seen)
    # without equalizing (evaluation), the union of ranks is every window of the split exactly once
    evaluation = [_loader(dataset, rank=r, world_size=world, equalize=False, with_text=True) for r in range(world)]
    total = sum(sum(len(b["story_ids"]) for b in loader) for loader in evaluation)
    expected = sum(windows_of(n, 4, "all") for s in dataset.shards("train") for n in s["frame_counts"])
    assert total == expected


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
    assert len(ids) == len(set(ids)) == sum(
        1 for s in dataset.shards("train") for n in s["frame_counts"] if n >= 5)


def test_resume_mid_epoch_gives_the_same_batches(dataset):
    loader = _loader(dataset)
    loader.set_epoch(4)
    full = list(loader)
    loader.set_epoch(4, start_batch=3)
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
