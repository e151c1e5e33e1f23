"""prepare on Ray: 1 vs 2 workers on this machine, per-story cost, and what the driver still costs.

    .venv/bin/python bench/prepare_scaling.py [--stories 240] [--config configs/gate.yaml]

Source: synthetic stories whose frames are re-encoded as 512x288 JPEGs with a little grain, ~15 KB
each (StoryReasoning's frames average ~14 KB: 773 MB over ~54k frames), so that decode + resize
costs about what real frames cost. Measured, each on a fresh local Ray with exactly ``workers`` CPUs (start-up timed
apart): ``prepare(..., backend="ray", workers=N)`` for N = 1 and 2, and the local backend (threads)
for reference. The outputs are checked to be byte-identical. The shards are written by Ray tasks;
the driver only counts, in source order, and launches them: its CPU time per story (the process's
CPU time during the Ray prepare, Ray's client threads included) is what bounds a large cluster. The
writing itself (zstd parquet encoding, sha256, the write) is timed by re-encoding the output shards
the way ``prepare.write_shard`` does. Last line: ``ratio=R`` (2-worker / 1-worker stories/s).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.pop("RAY_ADDRESS", None)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402
from storage_latency import commit  # noqa: E402

from storymm.config import load_config  # noqa: E402
from storymm.data import synth  # noqa: E402
from storymm.data.prepare import prepare  # noqa: E402


def jpeg_source(out: str, stories: int) -> float:
    """Synthesise, then re-encode every frame as a 512x288 JPEG; returns mean bytes per frame."""
    synth.synthesize(out, stories, seed=0, progress=False)
    sizes, rng = [], np.random.default_rng(0)
    for split in ("train", "test"):
        for name in sorted(os.listdir(os.path.join(out, split))):
            path = os.path.join(out, split, name)
            rows = pq.read_table(path).to_pylist()
            for row in rows:
                for image in row["images"]:
                    buffer = io.BytesIO()
                    with Image.open(io.BytesIO(image["bytes"])) as picture:
                        pixels = np.asarray(
                            picture.convert("RGB").resize((512, 288), Image.Resampling.BICUBIC), dtype=np.float32
                        )
                    grain = rng.normal(0.0, 4.0, pixels.shape)  # film grain: JPEGs the size of real frames
                    Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8)).save(
                        buffer, format="JPEG", quality=85
                    )
                    image["bytes"], image["path"] = buffer.getvalue(), image["path"].replace(".png", ".jpg")
                    sizes.append(len(image["bytes"]))
            pq.write_table(pa.Table.from_pylist(rows, schema=synth.SOURCE_SCHEMA), path)
    return sum(sizes) / len(sizes)


def digest(root: str) -> str:
    hasher = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            with open(os.path.join(folder, name), "rb") as handle:
                hasher.update(name.encode() + handle.read())
    return hasher.hexdigest()


def writing_seconds(data: str) -> float:
    """Time to encode, checksum and write the output shards again (write_shard's work; reads excluded)."""
    spent = 0.0
    for folder, _, files in os.walk(data):
        for name in sorted(files):
            if name.endswith(".parquet"):
                table = pq.read_table(os.path.join(folder, name))
                started = time.perf_counter()
                sink = io.BytesIO()
                pq.write_table(table, sink, compression="zstd", row_group_size=max(1, min(32, table.num_rows)))
                hashlib.sha256(sink.getvalue()).hexdigest()
                with open(os.path.join(folder, name + ".again"), "wb") as handle:
                    handle.write(sink.getvalue())
                spent += time.perf_counter() - started
    return spent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stories", type=int, default=240)
    parser.add_argument("--config", default=os.path.join(REPO, "configs/gate.yaml"))
    args = parser.parse_args(argv)
    import ray

    config = load_config(args.config)
    scratch = tempfile.mkdtemp(prefix="storymm-bench-prepare-")
    try:
        source = os.path.join(scratch, "source")
        frame_bytes = jpeg_source(source, args.stories)
        results, digests = {}, {}
        started = time.perf_counter()
        manifest = prepare(source, os.path.join(scratch, "local"), config, progress=False)
        results["local (threads)"] = time.perf_counter() - started
        digests["local (threads)"] = digest(os.path.join(scratch, "local"))
        stories, frames = manifest["source_rows"], sum(manifest["kept_frames"].values())
        startup, driver_cpu = {}, {}
        for workers in (1, 2):
            started = time.perf_counter()
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            startup[workers] = time.perf_counter() - started
            try:
                out = os.path.join(scratch, f"ray{workers}")
                started, cpu = time.perf_counter(), time.process_time()
                prepare(source, out, config, progress=False, backend="ray", workers=workers)
                results[f"ray, {workers} worker(s)"] = time.perf_counter() - started
                driver_cpu[workers] = time.process_time() - cpu
                digests[f"ray, {workers} worker(s)"] = digest(out)
            finally:
                ray.shutdown()
        writing = writing_seconds(os.path.join(scratch, "local"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"ray {ray.__version__}, commit {commit()}"
    )
    print(
        f"source: {stories} stories, {frames} kept frames, JPEG 512x288 ~{frame_bytes / 1024:.1f} KB/frame; "
        f"output {config.data.image_height}x{config.data.image_width}, tokenizer {config.data.tokenizer}"
    )
    identical = len(set(digests.values())) == 1
    print(f"outputs byte-identical across backends: {identical}")
    for name, seconds in results.items():
        print(
            f"{name:18s}: {seconds:6.2f} s  {stories / seconds:6.1f} stories/s  "
            f"{seconds / stories * 1000:6.1f} ms/story"
        )
    print(f"Ray start-up (not in the times above): {startup[1]:.1f} s (1 CPU), {startup[2]:.1f} s (2 CPUs)")
    for workers, cpu in driver_cpu.items():
        print(
            f"driver CPU, {workers} worker(s) (counting, launching, tokenizer, manifest): {cpu:.2f} s = "
            f"{cpu / stories * 1000:.2f} ms/story"
        )
    print(
        f"shard writing, now in Ray tasks (encode + sha256 + write): {writing:.2f} s = "
        f"{writing / stories * 1000:.2f} ms/story"
    )
    one, two = results["ray, 1 worker(s)"], results["ray, 2 worker(s)"]
    print(f"ratio={one / two:.3f}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
