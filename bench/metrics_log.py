"""What one logged step costs the metrics log on S3 50 ms away, from 100 to 20,000 logged steps.

    .venv/bin/python bench/metrics_log.py [--latency-ms 50] [--at 100,1000,5000,10000,20000] [--window 40]

The run's real metrics log (``MetricsStore``: what rank 0 of ``loop.train`` writes through) against
a real S3 server (SeaweedFS ``weed mini`` on 127.0.0.1, as in the tests) reached through the
slow link of ``tests/netlink.py`` (its own process; +``--latency-ms`` in each direction, so every
request's round trip grows by twice that; bandwidth unlimited). Lines have the keys and size of a sequence-stage
line with the time breakdown (``--line-bytes`` checks it). No checkpoints: segments end only at
``SEGMENT_LINES`` lines, the largest a segment gets.

Between the measurement points lines are logged as fast as the store takes them (its background
writer keeps only the newest version of a segment). At each point ``--window`` logged steps are
measured one at a time, each flushed before the next, so each waits for its own upload (the worst
case), giving: bytes sent to S3 per logged step (counted at the link, HTTP headers included), wall
time per logged step, and the time ``record()`` holds the training thread (all a step waits for
when the log is not flushed). The old scheme, one ``metrics.jsonl`` rewritten whole, is measured the
same way at the same history sizes (``--old-window`` rewrites each). Last: reading the whole log
(``read_metrics``) and a resume's cut-back (``MetricsStore.open``) at the final size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from unittest import mock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from netlink import LOOPBACK, SlowLink  # noqa: E402  (tests/)

from storymm import storage  # noqa: E402
from storymm.training.metrics_store import SEGMENT_LINES, MetricsStore  # noqa: E402
from storymm.training.run import read_metrics  # noqa: E402

TERMS = ["total", "l1", "mse", "gradient", "context", "text", "perceptual", "copy_gate", "warp", "cosine", "infonce"]
TIMING = ["data", "forward_backward", "all_reduce", "optimizer", "checkpoint", "validation", "logging", "step"]


def line(step: int, rng: random.Random) -> dict:
    values = {t: rng.random() for t in TERMS}
    values.update(epoch=step // 500, lr=rng.random() * 1e-3, samples_per_s=rng.random() * 1e4)
    values.update({f"time/{p}_s": rng.random() for p in TIMING})
    values.update({"time/goodput": rng.random(), "time/slowest_rank": 1, "time": 1.7e9 + step})
    return {"step": step, **values}


def measure(proxy: SlowLink, steps: int, action) -> tuple[float, float, float]:
    """(bytes sent per step, seconds per step, seconds per step in the caller before the flush)."""
    sent, started, held = proxy.bytes_up, time.perf_counter(), 0.0
    for _ in range(steps):
        held += action()
    return (proxy.bytes_up - sent) / steps, (time.perf_counter() - started) / steps, held / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-ms", type=float, default=50.0, help="added delay per direction")
    parser.add_argument("--at", default="100,1000,5000,10000,20000", help="logged steps at which to measure")
    parser.add_argument(
        "--window",
        type=int,
        default=SEGMENT_LINES,
        help="logged steps measured at each point (default: one whole segment)",
    )
    parser.add_argument("--old-window", type=int, default=5, help="whole-file rewrites measured at each point")
    args = parser.parse_args(argv)
    points = sorted(int(x) for x in args.at.split(","))
    rng = random.Random(0)

    from s3server import SeaweedS3Server

    scratch = tempfile.mkdtemp(prefix="storymm-bench-metrics-")
    rows = []
    try:  # the S3 variables are this script's own: the environment is restored on leaving
        with mock.patch.dict(os.environ), SeaweedS3Server(os.path.join(scratch, "weed")) as server:
            os.environ.update(server.env())
            bucket = server.create_bucket("bench-metrics")
            with SlowLink(server.port, latency_ms=args.latency_ms) as proxy:
                os.environ["AWS_ENDPOINT_URL"] = f"http://{LOOPBACK}:{proxy.port}"
                storage._s3_filesystem_cached.cache_clear()
                run = f"s3://{bucket}/run"
                store = MetricsStore(run)
                store.open(0)
                old_uri = f"s3://{bucket}/old/metrics.jsonl"
                history: list[dict] = []
                step = 0

                def log_one() -> float:
                    nonlocal step
                    step += 1
                    current = line(step, rng)
                    history.append(current)
                    began = time.perf_counter()
                    store.record(step, {k: v for k, v in current.items() if k != "step"})
                    held = time.perf_counter() - began
                    store.flush()
                    return held

                def rewrite_old() -> float:
                    storage.write_text(old_uri, "".join(json.dumps(m) + "\n" for m in history))
                    return 0.0

                line_bytes = len(json.dumps(line(1, rng))) + 1
                for point in points:
                    while step < point - args.window:  # as fast as it goes: the writer coalesces
                        step += 1
                        current = line(step, rng)
                        history.append(current)
                        store.record(step, {k: v for k, v in current.items() if k != "step"})
                    store.flush()
                    seg_bytes, seg_s, seg_held = measure(proxy, point - step, log_one)
                    old_bytes, old_s, _ = measure(proxy, args.old_window, rewrite_old)
                    rows.append((point, seg_bytes, seg_s, seg_held, old_bytes, old_s))
                    print(f"  measured at {point} logged steps", flush=True)
                store.close()
                began = time.perf_counter()
                lines = read_metrics(run)
                read_s = time.perf_counter() - began
                assert [m["step"] for m in lines] == list(range(1, step + 1)), "the log lost or repeated a line"
                segments = len(MetricsStore(run).segments())
                began = time.perf_counter()
                MetricsStore(run).open(step - SEGMENT_LINES // 2)  # a resume from a checkpoint mid-segment
                open_s = time.perf_counter() - began
                began = time.perf_counter()
                storage.read_text(old_uri)
                old_read_s = time.perf_counter() - began
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {datetime.date.today().isoformat()}, "
        f"commit {commit.stdout.strip() or '?'}; S3 +{args.latency_ms:g} ms each way; line {line_bytes} bytes; "
        f"segments of {SEGMENT_LINES} lines, no checkpoints"
    )
    print(
        "| logged steps | segments: bytes sent per logged step | ms per logged step | ms in record() "
        "| one metrics.jsonl: bytes sent per logged step | ms per logged step |"
    )
    print("|---|---|---|---|---|---|")
    for point, seg_bytes, seg_s, seg_held, old_bytes, old_s in rows:
        print(
            f"| {point:,} | {seg_bytes:,.0f} | {seg_s * 1000:.0f} | {seg_held * 1000:.2f} "
            f"| {old_bytes:,.0f} | {old_s * 1000:.0f} |"
        )
    first, last = rows[0], rows[-1]
    print(f"read_metrics() of {step:,} lines in {segments} segments: {read_s:.2f} s (one file: {old_read_s:.2f} s)")
    print(f"resume cut-back (open) at {step:,} lines: {open_s:.2f} s")
    print(
        f"ratio_bytes={last[1] / first[1]:.3f} ratio_time={last[2] / first[2]:.3f} "
        f"(segments, {last[0]:,} vs {first[0]:,} logged steps); old scheme ratio_bytes={last[4] / first[4]:.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
