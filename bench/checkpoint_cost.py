"""What checkpoints cost the training steps: a checkpoint every N steps to S3 far away, against none.

    .venv/bin/python bench/checkpoint_cost.py [--every 20] [--latency-ms 50] [--mbit-s 1000] [--steps 60] [--batch B]

The same training run (the gate config's model, so its checkpoint has the gate config's size:
model, AdamW moments, scheduler, RNG; the real ``loop.train``, sequence stage) with its run folder
on a real S3 server (SeaweedFS ``weed mini`` on 127.0.0.1, as in the tests) behind a slow link
(``tests/netlink.py``, its own process: ``--latency-ms`` each way and ``--mbit-s`` per connection;
server and link at nice 19, as they stand in for machines elsewhere),
twice per round: with a checkpoint every ``--every`` steps, and with none but the last. Data are read
from a local folder, so only the checkpoints differ. The batch is the config's (gate: 32); a smaller
``--batch`` shortens the steps until the interval between checkpoints is no longer than an upload
(``--batch 4`` on a 2-core CPU), where the next save must wait for the one in flight.

Steps/s are steady-state: steps over wall time of the logged windows after the first (every
checkpoint but the last falls inside them; start-up and the last checkpoint do not). Prints the
checkpoint size, each side's rounds, the end-to-end ratio (``train()`` from its call to its return,
the last checkpoint's upload included) and, last, ``ratio=R``: steady steps/s with checkpoints /
without (the best of ``--rounds`` runs of each side: other load on the machine only slows a run).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))  # the SeaweedFS harness and slow link the tests use

import torch  # noqa: E402
from netlink import LOOPBACK, SlowLink  # noqa: E402
from storage_latency import (  # noqa: E402
    as_if_elsewhere,
    aws_environment,
    commit,
    rounds,
    scratch_folder,
    steady_steps_per_s,
)

from storymm import storage  # noqa: E402
from storymm.config import load_config  # noqa: E402
from storymm.data import synth  # noqa: E402
from storymm.data.prepare import prepare  # noqa: E402
from storymm.training import checkpoint  # noqa: E402
from storymm.training.loop import read_metrics, train  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LOG_EVERY = 10


def step_path(run: str) -> tuple[float, float]:
    """From the run's time breakdown (``time/*``, per step, mean over each logged window after the
    first): seconds of checkpointing on the step path over the steady windows, and their mean step."""
    metrics = read_metrics(run)
    checkpointing = steps = seconds = 0.0
    for previous, current in zip(metrics, metrics[1:]):
        n = current["step"] - previous["step"]
        checkpointing += n * current.get("time/checkpoint_s", 0.0)
        steps, seconds = steps + n, seconds + n * current.get("time/step_s", 0.0)
    return checkpointing, seconds / max(steps, 1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class CheckpointLog(logging.Handler):
    """The writer's line per published checkpoint (time on the step, in the background), and when
    each save was in the background (wall clock: from the end of the snapshot to the publication)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.in_flight: list[tuple[float, float]] = []

    def emit(self, record):
        if "published" in record.getMessage():
            self.lines.append(record.getMessage())
            serialising, writing = record.args[-2:]
            self.in_flight.append((record.created - serialising - writing, record.created))


def steps_beside_saves(run: str, in_flight: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Per steady logged window: (the share of its wall time a save was in the background, its mean
    step). Windows with and without a save come from the same run, so drift in the machine's speed
    between runs does not enter their comparison."""
    metrics = read_metrics(run)
    windows = []
    for previous, current in zip(metrics, metrics[1:]):  # after the first window, which holds start-up
        start, end = previous["time"], current["time"]
        overlap = sum(max(0.0, min(end, b) - max(start, a)) for a, b in in_flight)
        windows.append((overlap / (end - start), (end - start) / (current["step"] - previous["step"])))
    return windows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(REPO, "configs/gate.yaml"))
    parser.add_argument("--every", type=int, default=20, help="steps between checkpoints")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--batch", type=int, default=None, help="windows per step (default: the config's)")
    parser.add_argument("--stories", type=int, default=60)
    parser.add_argument("--latency-ms", type=float, default=50.0, help="added delay per direction")
    parser.add_argument("--mbit-s", type=float, default=1000.0, help="bandwidth per connection and direction")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the step")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs; the best run of each side counts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    from s3server import SeaweedS3Server

    def config(every: int):
        return load_config(
            args.config,
            [
                *([f"data.batch_size={args.batch}"] if args.batch else []),
                f"train.sequence.steps={args.steps}",
                f"train.sequence.log_every={LOG_EVERY}",
                "train.sequence.warmup_steps=5",
                "train.sequence.eval_every=0",  # validation would differ between the sides
                f"train.sequence.checkpoint_every={every}",
            ],
        )

    with_checkpoints, without = config(args.every), config(10**6)
    batch = with_checkpoints.data.batch_size
    scratch = tempfile.mkdtemp(prefix="storymm-bench-checkpoint-")
    with aws_environment(), scratch_folder(scratch):
        source, data = os.path.join(scratch, "source"), os.path.join(scratch, "data")
        synth.synthesize(source, args.stories, seed=0, progress=False)
        prepare(source, data, with_checkpoints, progress=False)
        with SeaweedS3Server(os.path.join(scratch, "weed")) as server:
            os.environ.pop("AWS_ENDPOINT_URL_S3", None)
            os.environ.update(server.env())
            bucket = server.create_bucket("bench-checkpoint")
            with SlowLink(server.port, latency_ms=args.latency_ms, mbit_s=args.mbit_s) as link:
                as_if_elsewhere(server.pid, link.proc.pid)
                os.environ["AWS_ENDPOINT_URL"] = f"http://{LOOPBACK}:{link.port}"
                storage._s3_filesystem_cached.cache_clear()
                steady: dict[str, list[float]] = {"none": [], "every": []}
                whole: dict[str, list[float]] = {"none": [], "every": []}
                servers: dict[str, list[float]] = {"none": [], "every": []}  # CPU s of the S3 server and link
                breakdown: dict[str, list[tuple[float, float]]] = {"none": [], "every": []}
                saves = CheckpointLog()
                windows: list[tuple[float, float]] = []  # (share with a save in flight, mean step), every run
                logging.getLogger("storymm.training.checkpoint").addHandler(saves)
                logging.getLogger("storymm.training.checkpoint").setLevel(logging.INFO)
                logging.getLogger("storymm.training.checkpoint").propagate = False
                size = 0
                warm = config(10**6)  # one short run first, not measured: the process's one-time costs
                warm.train.sequence.steps = 10
                train(warm, "sequence", data, os.path.join(scratch, "run-warm-up"), progress=False)
                for round_index in range(args.rounds):  # alternate, so drift in the machine's load hits both
                    for name, cfg in (("none", without), ("every", with_checkpoints)):
                        run = f"s3://{bucket}/run-{name}-{round_index}"
                        before = cpu_seconds(server.pid) + cpu_seconds(link.proc.pid)
                        saves.lines.clear()
                        saves.in_flight.clear()
                        started = time.perf_counter()
                        train(cfg, "sequence", data, run, progress=False)
                        whole[name].append(time.perf_counter() - started)
                        servers[name].append(cpu_seconds(server.pid) + cpu_seconds(link.proc.pid) - before)
                        if name == "every":
                            every_saves = list(saves.lines)
                            windows.extend(steps_beside_saves(run, saves.in_flight))
                        steady[name].append(steady_steps_per_s(run, batch))
                        breakdown[name].append(step_path(run))
                        latest = checkpoint.latest_uri(run)
                        size = storage.locate(latest).fs.get_file_info(storage.locate(latest).path).size

        print(
            f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{args.threads} torch thread(s), {datetime.date.today().isoformat()}, commit {commit()}"
        )
        print(
            f"{os.path.relpath(args.config, REPO)} model, sequence stage, batch {batch}, {args.steps} steps; "
            f"checkpoint {size / 1e6:.1f} MB to S3 behind +{args.latency_ms:g} ms each way and "
            f"{args.mbit_s:g} Mbit/s per connection"
        )

        print("the last run's checkpoints:")
        for line in every_saves:
            print(f"  {line}")
        print(
            f"CPU of the S3 server and the slow link (stand-ins for machines elsewhere) per run: no checkpoint "
            f"{rounds(servers['none'], ' s')}, every {args.every} {rounds(servers['every'], ' s')}"
        )
        # the checkpoints inside the steady windows: after the first logged step, before the last
        saves = sum(1 for k in range(args.every, args.steps, args.every) if k >= LOG_EVERY)
        print(
            f"on the step path (the time breakdown, steady windows): checkpointing "
            f"{rounds([c for c, _ in breakdown['every']], ' s')} in all ({saves} checkpoints per run); mean step "
            f"no checkpoint {rounds([s for _, s in breakdown['none']], ' s')}, every {args.every} "
            f"{rounds([s for _, s in breakdown['every']], ' s')}"
        )
        beside = [(share, step) for share, step in windows if share > 0]
        alone = [step for share, step in windows if share == 0]
        if beside and alone:
            share = sum(f for f, _ in beside) / len(beside)
            step_beside, step_alone = sum(s for _, s in beside) / len(beside), sum(alone) / len(alone)
            slower = step_beside / step_alone
            print(
                f"within the runs with checkpoints, logged windows: mean step {step_beside:.3f} s in the "
                f"{len(beside)} with a save in the background ({share:.0%} of their time on average), "
                f"{step_alone:.3f} s in the {len(alone)} without (x{slower:.3f}; while a save is in flight "
                f"about x{1 + (slower - 1) / share:.3f})"
            )
        none, every = max(steady["none"]), max(steady["every"])
        print(f"steady state, no checkpoint: {none:.3f} steps/s (rounds: {rounds(steady['none'])})")
        print(f"steady state, every {args.every} steps: {every:.3f} steps/s (rounds: {rounds(steady['every'])})")
        print(
            f"end to end: no checkpoint {min(whole['none']):.1f} s (rounds: {rounds(whole['none'], ' s')}), every "
            f"{args.every} {min(whole['every']):.1f} s (rounds: {rounds(whole['every'], ' s')}); "
            f"end_to_end_ratio={min(whole['none']) / min(whole['every']):.3f}"
        )
        print(f"ratio={every / none:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
