"""Training speed with data on object storage far away vs on local disk, in one run.

    .venv/bin/python bench/storage_latency.py --latency-ms 50 [--prefetch-chunks 2] [--steps 120]

The same training run (configs/tiny.yaml, sequence stage, the real ``loop.train``) twice, on the
same prepared shards: once read from a local folder, once from a real S3 server (SeaweedFS,
``weed mini`` on 127.0.0.1, as in the tests) reached through a slow link (``tests/netlink.py``, a
proxy process on 127.0.0.1). The link holds every byte ``--latency-ms`` in *each* direction before
passing it on (like ``tc netem`` on both ends of a cable), so each S3 request's round trip grows by
2 x latency while bandwidth stays unlimited. Nothing listens or connects outside loopback. The
server and the link run at nice 19: they stand in for machines elsewhere.

Chunking is realistic: small shards (``--rows-per-shard``) and a small ``data.shuffle_buffer``,
so an epoch reads many chunks and each chunk boundary would stall a synchronous loader. Steps/s
are steady-state: steps over wall time of the logged windows after the first (start-up, the
manifest and tokenizer reads, the first allocations excluded). One torch thread, so the loader's
background thread has the second core, as a GPU node's data thread would.

Prints each side, the prefetch statistics of the S3 run's last pass over the train split, the
end-to-end ratio (local / S3 wall time of ``train()`` from its call to its return: start-up, the
first chunks, the validation at the end and the last checkpoint included) and, last, ``ratio=R``
(steady state: S3 steps/s / local steps/s; the best of ``--rounds`` runs of each side, as other load
only slows a run; one short unmeasured run first takes the process's one-time costs).
``--prefetch-chunks 0`` reads synchronously (the pre-prefetch loader).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))  # the SeaweedFS harness the tests use

import torch  # noqa: E402
from netlink import LOOPBACK, SlowLink  # noqa: E402

from storymm import storage  # noqa: E402
from storymm.config import load_config  # noqa: E402
from storymm.data import synth  # noqa: E402
from storymm.data.prepare import prepare  # noqa: E402
from storymm.training.loop import read_metrics, train  # noqa: E402

BATCH = 32


def commit() -> str:
    """The code measured: the repository's HEAD, marked dirty when the work tree differs."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL_S3")


@contextlib.contextmanager
def aws_environment():
    """The AWS variables as they were before, whatever the benchmark set."""
    saved = {name: os.environ.get(name) for name in AWS_VARS}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def scratch_folder(path: str):
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def rounds(values, unit: str = "") -> str:
    """Each round's figure, for the printout."""
    return ", ".join(f"{v:.2f}{unit}" for v in values)


def as_if_elsewhere(*pids: int) -> None:
    """Run the S3 server and the slow link at the lowest CPU priority (nice 19, all their threads:
    each runs in its own session, so its process group). They stand in for machines and a network
    elsewhere; on this 2-core box they would otherwise take CPU from the training they serve."""
    for pid in pids:
        os.setpriority(os.PRIO_PGRP, pid, 19)


def steady_steps_per_s(run: str, batch: int) -> float:
    """Steps over wall time of the logged windows after the first (each logs its samples/s)."""
    metrics = read_metrics(run)
    steps, seconds = 0, 0.0
    for previous, current in zip(metrics, metrics[1:]):
        n = current["step"] - previous["step"]
        steps, seconds = steps + n, seconds + n * batch / current["samples_per_s"]
    return steps / seconds


class PassLog(logging.Handler):
    """The loader's per-pass statistics of one split (each pass logs one line)."""

    def __init__(self, split: str):
        super().__init__(logging.INFO)
        self.prefix, self.message = f"{split} rank ", ""

    def emit(self, record):
        message = record.getMessage()
        if message.startswith(self.prefix):
            self.message = message


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
    parser.add_argument("--rounds", type=int, default=3, help="local/S3 pairs; the best run of each side counts")
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
    with aws_environment(), scratch_folder(scratch):
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
            with SlowLink(server.port, latency_ms=args.latency_ms) as link:
                as_if_elsewhere(server.pid, link.proc.pid)
                os.environ["AWS_ENDPOINT_URL"] = f"http://{LOOPBACK}:{link.port}"
                storage._s3_filesystem_cached.cache_clear()
                delayed_ms = request_round_trip_ms(storage.join(s3_data, "manifest.json"))
                steady: dict[str, list[float]] = {"local": [], "s3": []}
                whole: dict[str, list[float]] = {"local": [], "s3": []}
                passes = PassLog("train")  # the loader logs each pass's prefetch statistics
                logging.getLogger("storymm.data.loader").addHandler(passes)
                logging.getLogger("storymm.data.loader").setLevel(logging.INFO)
                logging.getLogger("storymm.data.loader").propagate = False
                # one short run first, not measured: the first run of a process pays one-time costs
                # (imports, allocator, caches) that would otherwise count against round 1's local side
                warm = config.model_copy(deep=True)
                warm.train.sequence.steps = 10
                train(warm, "sequence", local_data, os.path.join(scratch, "run-warm-up"), progress=False)
                for round_index in range(args.rounds):  # alternate, so drift in the machine's load hits both
                    for name, data in (("local", local_data), ("s3", s3_data)):
                        run = os.path.join(scratch, f"run-{name}-{round_index}")
                        started = time.perf_counter()
                        train(config, "sequence", data, run, progress=False)
                        whole[name].append(time.perf_counter() - started)
                        steady[name].append(steady_steps_per_s(run, BATCH))
                    s3_pass = passes.message

        print(
            f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{args.threads} torch thread(s), {datetime.date.today().isoformat()}, commit {commit()}"
        )
        print(
            f"data: {args.stories} synthetic stories, {shards} train shards of {args.rows_per_shard} stories, "
            f"shuffle_buffer {args.shuffle_buffer} windows, batch {BATCH}, {args.steps} steps, "
            f"prefetch_chunks {args.prefetch_chunks}"
        )
        print(
            f"S3 request round trip (HEAD): direct {direct_ms:.1f} ms, through the slow link {delayed_ms:.1f} ms "
            f"(+{args.latency_ms:g} ms each way)"
        )
        print(f"S3 run, the train split's last pass: {s3_pass}")

        # other load only slows a run: the best round of each side counts
        local, remote = max(steady["local"]), max(steady["s3"])
        print(f"steady state, local disk: {local:.2f} steps/s (rounds: {rounds(steady['local'], '')})")
        print(f"steady state, S3 + delay: {remote:.2f} steps/s (rounds: {rounds(steady['s3'], '')})")
        paired = [s3 / lo for lo, s3 in zip(steady["local"], steady["s3"])]
        print(f"steady state, S3/local per round: {', '.join(f'{r:.3f}' for r in paired)}")
        local_s, remote_s = min(whole["local"]), min(whole["s3"])
        print(
            f"end to end (train() from its start to its return, start-up included): local {local_s:.2f} s "
            f"(rounds: {rounds(whole['local'], ' s')}), S3 {remote_s:.2f} s (rounds: {rounds(whole['s3'], ' s')}); "
            f"end_to_end_ratio={local_s / remote_s:.3f}"
        )
        print(f"ratio={remote / local:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
