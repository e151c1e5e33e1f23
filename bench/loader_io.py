"""What the world-size-independent window order costs each rank: stories decoded and shards read per
epoch, against the 1/N of a split of stories between ranks (the order storymm used before), and
rank 0's windows/s at N ranks against one rank with the same global batch (measured in the same run).

    python bench/loader_io.py [--config configs/tiny.yaml] [--stories 300] [--batch 32]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

from storymm import storage
from storymm.config import load_config
from storymm.data import synth
from storymm.data.loader import PreparedDataset, WindowLoader
from storymm.data.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]


def _loader(dataset, config, rank: int, world: int, batch: int) -> WindowLoader:
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
    )


def _windows_per_s(loader: WindowLoader, epochs: int = 3) -> float:
    windows, started = 0, time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        windows += sum(len(batch["target_frame"]) for batch in loader)
    return windows / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    parser.add_argument("--stories", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32, help="per rank")
    parser.add_argument("--worlds", default="1,2,4,8,16")
    args = parser.parse_args()
    config = load_config(args.config)
    root = tempfile.mkdtemp(prefix="storymm-loader-io-")
    source, data = storage.join(root, "src"), storage.join(root, "data")
    synth.synthesize(
        source, args.stories, seed=0, frames=(config.synth.frames_min, config.synth.frames_max), progress=False
    )
    prepare(source, data, config, progress=False)
    dataset = PreparedDataset(data)
    shards = dataset.shards("train")
    stories = sum(len(s["frame_counts"]) for s in shards)
    print(
        f"{platform.machine()}, {args.config}: {stories} train stories in {len(shards)} shards, "
        f"shuffle_buffer {config.data.shuffle_buffer}, batch {args.batch} per rank"
    )
    for world in (int(w) for w in args.worlds.split(",")):
        decoded = read = 0.0
        for rank in range(world):
            plans = _loader(dataset, config, rank, world, args.batch).plan()
            decoded += sum(len(p.stories) for p in plans) / stories / world
            read += len({s.shard for p in plans for s in p.stories}) / len(shards) / world
        print(
            f"N={world:2d}: a rank decodes {decoded:6.1%} of the stories ({decoded * world:4.2f}x the old 1/N), "
            f"reads {read:6.1%} of the shards"
        )
    # rank 0 of 2 against 1 rank with the same global batch: what each rank's loader now delivers
    one = _windows_per_s(_loader(dataset, config, 0, 1, 2 * args.batch))
    two = _windows_per_s(_loader(dataset, config, 0, 2, args.batch))
    print(
        f"windows/s: 1 rank (batch {2 * args.batch}) {one:,.0f}; rank 0 of 2 (batch {args.batch}) {two:,.0f}; "
        f"ratio {two / one:.2f}x"
    )


if __name__ == "__main__":
    main()
