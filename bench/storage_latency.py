"""Training speed with data on object storage far away vs on local disk, in one run.

    .venv/bin/python bench/storage_latency.py --latency-ms 50 [--prefetch-chunks 2] [--steps 120]

The same training run (configs/tiny.yaml, sequence stage, the real ``loop.train``) twice, on the
same prepared shards: once read from a local folder, once from a real S3 server (SeaweedFS,
``weed mini`` on 127.0.0.1, as in the tests) reached through a delaying TCP proxy that this script
runs on 127.0.0.1. The proxy holds every byte ``--latency-ms`` in *each* direction before passing it
on (like ``tc netem`` on both ends of a link), so each S3 request's round trip grows by
2 x latency while bandwidth stays unlimited. Nothing listens or connects outside loopback.

Chunking is realistic: small shards (``--rows-per-shard``) and a small ``data.shuffle_buffer``,
so an epoch reads many chunks and each chunk boundary would stall a synchronous loader. Steps/s
are steady-state: steps over wall time of the logged windows after the first (start-up, the
manifest and tokenizer reads, the first allocations excluded). One torch thread, so the loader's
background thread has the second core, as a GPU node's data thread would.

Prints each side, the prefetch statistics of the S3 run's last pass and, last, ``ratio=R``
(S3 steps/s / local steps/s). ``--prefetch-chunks 0`` reads synchronously (the pre-prefetch loader).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))  # the SeaweedFS harness the tests use

import torch  # noqa: E402

from storymm import storage  # noqa: E402
from storymm.config import load_config  # noqa: E402
from storymm.data import synth  # noqa: E402
from storymm.data.prepare import prepare  # noqa: E402
from storymm.training.loop import read_metrics, train  # noqa: E402

from delayproxy import LOOPBACK, DelayProxy  # noqa: E402  (tests/)

BATCH = 32


def steady_steps_per_s(run: str, batch: int) -> float:
    """Steps over wall time of the logged windows after the first (each logs its samples/s)."""
    metrics = read_metrics(run)
    steps, seconds = 0, 0.0
    for previous, current in zip(metrics, metrics[1:]):
        n = current["step"] - previous["step"]
        steps, seconds = steps + n, seconds + n * batch / current["samples_per_s"]
    return steps / seconds


class _LastRecord(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.message = ""

    def emit(self, record):
        self.message = record.getMessage()


def request_round_trip_ms(uri: str, repeats: int = 5) -> float:
    """Median wall time of a small S3 request (a HEAD) to ``uri``."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        storage.exists(uri)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] * 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-ms", type=float, default=50.0, help="added delay per direction")
    parser.add_argument("--prefetch-chunks", type=int, default=2, help="0 = synchronous reads")
    parser.add_argument("--steps", type=int, default=120, help="training steps per run")
    parser.add_argument("--stories", type=int, default=300)
    parser.add_argument("--rows-per-shard", type=int, default=16)
    parser.add_argument("--shuffle-buffer", type=int, default=64, help="windows per chunk (at least)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the step")
    parser.add_argument("--rounds", type=int, default=2, help="local/S3 pairs; the best run of each side counts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    from s3server import SeaweedS3Server

    scratch = tempfile.mkdtemp(prefix="storymm-bench-latency-")
    config = load_config(
        os.path.join(REPO, "configs/tiny.yaml"),
        [
            f"data.rows_per_shard={args.rows_per_shard}",
            f"data.shuffle_buffer={args.shuffle_buffer}",
            f"data.batch_size={BATCH}",
            f"data.prefetch_chunks={args.prefetch_chunks}",
            f"train.sequence.steps={args.steps}",
            "train.sequence.log_every=10",
            f"train.sequence.checkpoint_every={10**6}",
            "train.sequence.warmup_steps=5",
        ],
    )
    saved_env = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL_S3")
    }
    try:
        source, local_data = os.path.join(scratch, "source"), os.path.join(scratch, "data")
        synth.synthesize(source, args.stories, seed=0, progress=False)
        manifest = prepare(source, local_data, config, progress=False)
        shards = len(manifest["shards"]["train"])
        with SeaweedS3Server(os.path.join(scratch, "weed")) as server:
            os.environ.pop("AWS_ENDPOINT_URL_S3", None)
            os.environ.update(server.env())
            storage._s3_filesystem_cached.cache_clear()
            bucket = server.create_bucket("bench-latency")
            s3_data = f"s3://{bucket}/data"
            for root, _, files in os.walk(local_data):  # the very same bytes on S3
                for name in files:
                    path = os.path.join(root, name)
                    storage.upload_file(path, storage.join(s3_data, os.path.relpath(path, local_data)))
            direct_ms = request_round_trip_ms(storage.join(s3_data, "manifest.json"))
            with DelayProxy(server.port, args.latency_ms / 1000) as proxy:
                os.environ["AWS_ENDPOINT_URL"] = f"http://{LOOPBACK}:{proxy.port}"
                storage._s3_filesystem_cached.cache_clear()
                delayed_ms = request_round_trip_ms(storage.join(s3_data, "manifest.json"))
                rates: dict[str, list[float]] = {"local": [], "s3": []}
                passes = _LastRecord()  # the loader logs each pass's prefetch statistics
                logging.getLogger("storymm.data.loader").addHandler(passes)
                logging.getLogger("storymm.data.loader").setLevel(logging.INFO)
                logging.getLogger("storymm.data.loader").propagate = False
                for round_index in range(args.rounds):  # alternate, so drift in the machine's load hits both
                    for name, data in (("local", local_data), ("s3", s3_data)):
                        run = os.path.join(scratch, f"run-{name}-{round_index}")
                        train(config, "sequence", data, run, progress=False)
                        rates[name].append(steady_steps_per_s(run, BATCH))
                    s3_pass = passes.message

        print(
            f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{args.threads} torch thread(s), {datetime.date.today().isoformat()}"
        )
        print(
            f"data: {args.stories} synthetic stories, {shards} train shards of {args.rows_per_shard} stories, "
            f"shuffle_buffer {args.shuffle_buffer} windows, batch {BATCH}, {args.steps} steps, "
            f"prefetch_chunks {args.prefetch_chunks}"
        )
        print(
            f"S3 request round trip (HEAD): direct {direct_ms:.1f} ms, through the proxy {delayed_ms:.1f} ms "
            f"(+{args.latency_ms:g} ms each way)"
        )
        print(f"S3 run, loader's last pass: {s3_pass}")
        local, remote = max(rates["local"]), max(rates["s3"])  # other load only slows a run: best of rounds
        print(f"local disk : {local:.2f} steps/s (rounds: {', '.join(f'{r:.2f}' for r in rates['local'])})")
        print(f"S3 + delay : {remote:.2f} steps/s (rounds: {', '.join(f'{r:.2f}' for r in rates['s3'])})")
        print(f"ratio={remote / local:.3f}")
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
