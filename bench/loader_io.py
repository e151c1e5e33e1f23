"""What each rank reads per epoch with the world-size-independent window order: shards read and stories
decoded by a rank, with the run's canonical partitions (``data.partitions``) and without them (one
partition, the order storymm used before), for N ranks and one fixed global batch; and rank 0's
windows/s at 2 ranks against one rank with the same global batch (measured in the same run).

    python bench/loader_io.py [--stories 2400] [--rows-per-shard 2] [--partitions 64] [--global-batch 256]

A rank's *read factor* is the shards it reads in an epoch (a shard read by two of its chunks counts
twice) x N / the split's shards: 1.0 is exactly its share. Reads come from the loader's plan (which
shards each chunk reads), the same plan that drives the real reads. The partitions' boundaries cut
shards, so the read factor is about 1 + P/S (P partitions, S shards): prepare enough shards.
Prints a table and, last, ``read_factor=`` (the worst rank over the N of ``--worlds``).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

from storymm import storage
from storymm.config import load_config
from storymm.data import synth
from storymm.data.loader import PreparedDataset, WindowLoader
from storymm.data.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from storage_latency import commit  # noqa: E402


def _loader(dataset, config, rank: int, world: int, batch: int, partitions: int) -> WindowLoader:
    return WindowLoader(
        dataset,
        "train",
        batch_size=batch,
        context_frames=config.data.context_frames,
        max_tokens=config.data.max_tokens,
        windows=config.data.windows,
        rank=rank,
        world_size=world,
        shuffle_buffer=config.data.shuffle_buffer,
        seed=config.seed,
        partitions=partitions,
    )


def _windows_per_s(loader: WindowLoader, epochs: int = 3) -> float:
    windows, started = 0, time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        windows += sum(len(batch["target_frame"]) for batch in loader)
    return windows / (time.perf_counter() - started)


def per_rank(dataset, config, world: int, global_batch: int, partitions: int, epoch: int = 1) -> tuple[float, float]:
    """(worst read factor over the ranks, mean share of the stories a rank decodes)."""
    shards = dataset.shards("train")
    stories = sum(len(s["frame_counts"]) for s in shards)
    worst, decoded = 0.0, 0.0
    for rank in range(world):
        loader = _loader(dataset, config, rank, world, global_batch // world, partitions)
        loader.set_epoch(epoch)
        plans = loader.plan()
        reads = sum(len({story.shard for story in plan.stories}) for plan in plans)
        worst = max(worst, reads * world / len(shards))
        decoded += len({(s.shard, s.row) for plan in plans for s in plan.stories}) / stories / world
    return worst, decoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    parser.add_argument("--stories", type=int, default=2400)
    parser.add_argument("--rows-per-shard", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=64, help="the run's canonical partitions")
    parser.add_argument("--global-batch", type=int, default=256, help="windows per step, all ranks")
    parser.add_argument("--worlds", default="1,2,4,8,16,64")
    args = parser.parse_args()
    config = load_config(args.config, [f"data.rows_per_shard={args.rows_per_shard}"])
    root = tempfile.mkdtemp(prefix="storymm-loader-io-")
    source, data = storage.join(root, "src"), storage.join(root, "data")
    synth.synthesize(
        source, args.stories, seed=0, frames=(config.synth.frames_min, config.synth.frames_max), progress=False
    )
    prepare(source, data, config, progress=False)
    dataset = PreparedDataset(data)
    shards = dataset.shards("train")
    stories = sum(len(s["frame_counts"]) for s in shards)
    worlds = [int(w) for w in args.worlds.split(",")]
    print(
        f"{platform.machine()}, commit {commit()}, {Path(args.config).name}: {stories} train stories in "
        f"{len(shards)} shards, shuffle_buffer {config.data.shuffle_buffer}, global batch {args.global_batch}"
    )
    print("ranks N | partitions | worst rank's read factor | stories a rank decodes")
    worst = 0.0
    for world in worlds:
        for partitions in (args.partitions, 1):
            factor, decoded = per_rank(dataset, config, world, args.global_batch, partitions)
            if partitions == args.partitions:
                worst = max(worst, factor)
            print(f"{world:7d} | {partitions:10d} | {factor:24.2f} | {decoded:6.1%} (x{decoded * world:.2f} of 1/N)")
    # rank 0 of 2 against 1 rank with the same global batch (2 partitions: a run started on 2 workers)
    batch = args.global_batch // 2
    one = _windows_per_s(_loader(dataset, config, 0, 1, 2 * batch, 2))
    two = _windows_per_s(_loader(dataset, config, 0, 2, batch, 2))
    print(
        f"windows/s: 1 rank (batch {2 * batch}) {one:,.0f}; rank 0 of 2 (batch {batch}) {two:,.0f}; "
        f"ratio {two / one:.2f}x (2 partitions)"
    )
    print(f"read_factor={worst:.3f}")


if __name__ == "__main__":
    main()
