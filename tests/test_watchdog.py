"""The progress watchdog (storymm/training/watchdog.py) on one machine: its limits, whom it blames,
a real stuck data mount (every train shard a FIFO nobody writes: reads block like a hung NFS mount)
ending in an incident and exit 85, and a whole-process pause (SIGSTOP/SIGCONT) that is not a hang.
The two-node faults (a frozen or cut-off rank, named by the ranks that wait for it) are in
test_two_nodes_slurm.py and test_two_nodes_ray.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest

from storymm.config import load_config
from storymm.training.exits import EXIT_HUNG
from storymm.training.phases import Phase, PhaseSnapshot
from storymm.training.run import RunFolder
from storymm.training.watchdog import STEP_MULTIPLE, WARMUP_STEPS, HangPolicy, waiting_for

from small import ROOT, SMALL, small_dataset


def _snap(phase: Phase, steps_done: int, outer: Phase | None = None) -> PhaseSnapshot:
    return PhaseSnapshot(phase, outer, since=0.0, step=steps_done, steps_done=steps_done, progress_at=0.0, now=1.0)


def test_limit_is_the_grace_until_steps_are_measured_then_a_multiple_of_the_median_step():
    auto = HangPolicy(timeout_s=None, floor_s=60, grace_s=600)
    assert auto.limit(_snap(Phase.DATA, 0), []) == (600, "train.hang_grace_s (first step)")
    few = [1.0] * (WARMUP_STEPS + 7)
    assert auto.limit(_snap(Phase.DATA, 10), few)[0] == 600  # 7 measured steps: not enough yet
    slow = [100.0] * WARMUP_STEPS + [4.0, 5.0, 6.0, 5.0, 5.0, 4.0, 6.0, 5.0]
    seconds, rule = auto.limit(_snap(Phase.FORWARD_BACKWARD, 20), slow)
    assert seconds == STEP_MULTIPLE * 5.0 and "median step 5 s" in rule  # warm-up steps left out
    fast = [0.1] * (WARMUP_STEPS + 8)
    assert auto.limit(_snap(Phase.DATA, 20), fast) == (60, "max(train.hang_floor_s, 20 x median step 0.1 s)")
    # slow phases keep the grace, also for a collective inside them
    assert auto.limit(_snap(Phase.CHECKPOINT, 20), fast) == (600, "train.hang_grace_s (checkpoint)")
    assert auto.limit(_snap(Phase.COLLECTIVE, 20, outer=Phase.VALIDATION), fast)[0] == 600
    assert auto.limit(_snap(Phase.COLLECTIVE, 20, outer=Phase.LOGGING), fast)[0] == 60

    explicit = HangPolicy(timeout_s=30, floor_s=60, grace_s=600)
    assert explicit.limit(_snap(Phase.DATA, 20), fast) == (30, "train.hang_timeout_s")
    assert explicit.limit(_snap(Phase.STARTUP, 0), [])[0] == 600


def test_config_sets_the_policy_and_the_process_group_timeout_past_the_watchdog():
    config = load_config(ROOT / "configs/tiny.yaml")
    policy = HangPolicy.from_config(config.train)
    assert (policy.timeout_s, policy.enabled) == (None, True)
    assert policy.process_group_timeout() == timedelta(seconds=max(policy.floor_s, policy.grace_s) + 60)
    sets = ["train.hang_timeout_s=20", "train.hang_grace_s=40"]
    assert HangPolicy.from_config(load_config(None, sets).train).process_group_timeout() == timedelta(seconds=100)
    off = HangPolicy.from_config(load_config(None, ["train.hang_timeout_s=0"]).train)
    assert not off.enabled


def _beat(rank: int, step: int, phase: str, age: float, now: float, interval: float = 2.0) -> dict:
    where = {"rank": rank, "host": f"node{rank + 1}", "pid": 100 + rank, "step": step, "phase": phase, "outer": None}
    return {**where, "stalled_s": 1.0, "interval_s": interval, "time": now - age}


def test_waiting_for_names_silent_or_missing_ranks_first_then_those_elsewhere():
    now, me = 1000.0, {"rank": 0, "step": 160, "phase": "forward_backward"}
    peers = [_beat(1, 160, "data", age=40, now=now), _beat(2, 160, "forward_backward", age=1, now=now)]
    blamed = waiting_for(peers, 4, me, now)
    assert [(s["rank"], s["why"]) for s in blamed] == [
        (1, "silent: its last heartbeat is 40 s old"),
        (3, "no heartbeat in this attempt"),
    ]
    assert blamed[0]["host"] == "node2" and blamed[0]["phase"] == "data" and blamed[0]["step"] == 160
    # all alive: the one stuck somewhere else (a deadlocked reader), not the one waiting like me
    alive = [_beat(1, 160, "data", age=1, now=now), _beat(2, 160, "forward_backward", age=1, now=now)]
    assert [s["rank"] for s in waiting_for(alive, 3, me, now)] == [1]
    assert waiting_for([_beat(1, 160, "forward_backward", age=1, now=now)], 2, me, now) == []


# ----------------------------------------------------------------------------- real processes


@pytest.fixture(scope="module")
def data_uri(tmp_path_factory):
    return small_dataset(str(tmp_path_factory.mktemp("watchdog")), 20, seed=6, frames=(6, 9))


def _train(data: str, run: str, steps: int, *sets: str) -> list[str]:
    sets = (*SMALL, f"train.visual_ae.steps={steps}", "train.visual_ae.checkpoint_every=4", *sets)
    cmd = [sys.executable, "-m", "storymm.cli", "train", "--config", str(ROOT / "configs/tiny.yaml")]
    return [*cmd, "--stage", "visual_ae", "--data", data, "--run", run, *[a for s in sets for a in ("--set", s)]]


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def test_a_stuck_data_mount_ends_in_an_incident_and_exit_85(data_uri, tmp_path):
    """A run passes a checkpoint; then every train shard becomes a FIFO that nobody writes (a read
    blocks forever, as on a hung mount). The resumed attempt stalls in `data`; after the first-step
    grace its watchdog writes the incident (the reader threads' stacks in it), prints one line and
    exits 85, recording that for the job script. With the shards back, the run completes."""
    data, run = str(tmp_path / "data"), str(tmp_path / "run")
    shutil.copytree(data_uri, data)
    done = subprocess.run(_train(data, run, 4), env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = sorted((tmp_path / "data/train").glob("*.parquet"))
    for shard in shards:
        shard.rename(shard.with_suffix(".real"))
        os.mkfifo(shard)

    outcomes = tmp_path / "outcomes"
    started = time.monotonic()
    hung = subprocess.run(
        _train(data, run, 12, "train.hang_timeout_s=2", "train.hang_grace_s=6"),
        env=_env(STORYMM_OUTCOME_DIR=str(outcomes), RANK="0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - started
    assert hung.returncode == EXIT_HUNG, hung.stderr[-3000:]
    lines = [line for line in hung.stderr.splitlines() if line.startswith("storymm: hang:")]
    host = socket.gethostname()
    assert len(lines) == 1 and f"rank 0 on {host} (pid " in lines[0] and " in data at step 4 " in lines[0], lines
    assert "(limit 6 s, attempt 2)" in lines[0] and "attempt-002-rank-0000.json" in lines[0]
    (incident,) = RunFolder(run).read_incidents()
    assert (incident["rank"], incident["attempt"], incident["host"], incident["step"]) == (0, 2, host, 4)
    assert incident["phase"] == "data" and incident["limit_rule"] == "train.hang_grace_s (first step)"
    assert 6 < incident["stalled_s"] < took
    readers = [t for t in incident["threads"] if any("read_shard" in line for line in t["stack"])]
    assert readers and all(t["name"].startswith("storymm-prefetch") for t in readers), incident["threads"]
    main = next(t for t in incident["threads"] if t["name"] == "MainThread")
    assert any("iterate" in line for line in main["stack"])  # the loop waits for the next batch
    assert incident["phase_totals_s"]["data"] > 6
    assert (outcomes / f"rank-0-{host}").read_text() == "85 hung\n"
    attempts = RunFolder(run).read_attempts()
    assert [(a["attempt"], a["start_step"], a["world_size"]) for a in attempts] == [(1, 0, 1), (2, 4, 1)]
    beat = json.loads((tmp_path / "run/heartbeats/rank-0000.json").read_text())
    assert beat["attempt"] == 2 and beat["step"] == 4

    for shard in shards:
        shard.unlink()
        shard.with_suffix(".real").rename(shard)
    done = subprocess.run(_train(data, run, 8), env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "visual_ae: completed at step 8" in done.stdout, done.stderr[-3000:]
    assert [a["start_step"] for a in RunFolder(run).read_attempts()] == [0, 4, 4]


def test_a_paused_process_is_not_a_hang(data_uri, tmp_path):
    """SIGSTOP for three times the hang limit, then SIGCONT (Ctrl-Z and `fg`): the process's own
    watchdog sees that it was paused as a whole and the run completes, with no incident."""
    run = str(tmp_path / "run")
    proc = subprocess.Popen(
        _train(data_uri, run, 60, "train.hang_timeout_s=2", "train.hang_grace_s=4", "train.visual_ae.log_every=2"),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "run/checkpoints/latest").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.1)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(6)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "was paused for" in err and "storymm: hang" not in err
    assert RunFolder(run).read_incidents() == []
