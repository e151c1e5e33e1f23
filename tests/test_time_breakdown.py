"""Where the time goes, per rank, and who is slow: a two-rank run (two processes, gloo) in which
rank 1 reads the prepared data from the S3 server through a proxy 50 ms away in each direction
(rank 0 reads it directly) names rank 1 and "data wait" in its log, its metrics and the report page,
and each rank's parts add up to the step time measured apart from them within 5%. The time
breakdown's bookkeeping (goodput, all-reduce wait, FLOPs) is in tests/test_metrics_log.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from netlink import SlowLink

from storymm import storage
from storymm.config import load_config
from storymm.evaluation.evaluate import evaluate
from storymm.training import timing
from storymm.training.run import read_metrics

from small import ROOT, SMALL, free_port, small_dataset

STEPS = 16
SETS = [
    *SMALL,
    f"train.sequence.steps={STEPS}",
    "train.sequence.log_every=2",
    "train.sequence.checkpoint_every=8",
    "train.sequence.warmup_steps=2",
    "data.prefetch_chunks=0",  # every chunk is read when the step needs it: slow storage is data wait
    "data.shuffle_buffer=16",
    "eval.median_windows=50",
    "eval.samples=2",
]


@pytest.mark.slow
def test_a_rank_with_slow_storage_is_named_with_data_wait(s3_env, s3_server, tmp_path):
    config = load_config(ROOT / "configs/tiny.yaml", [*SMALL, "data.rows_per_shard=2"])
    data = small_dataset(s3_env, 30, seed=11, frames=(6, 9), config=config)
    run, port = str(tmp_path / "run"), free_port()
    command = [sys.executable, "-m", "storymm.cli", "train", "--config", "configs/tiny.yaml", "--stage", "sequence"]
    command += ["--data", data, "--run", run, *[a for s in SETS for a in ("--set", s)]]
    with SlowLink(s3_server.port, latency_ms=50) as proxy:
        ranks, files = [], [tmp_path / "rank0.log", tmp_path / "rank1.log"]
        for rank, log in enumerate(files):
            env = dict(os.environ, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(ROOT))
            if rank == 1:
                env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.port}"
            with open(log, "w") as out:
                ranks.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
        try:
            codes = [rank.wait(timeout=300) for rank in ranks]
        finally:  # a rank that failed leaves the other waiting in a collective
            for rank in ranks:
                if rank.poll() is None:
                    rank.kill()
                    rank.wait()
    logs = [f.read_text() for f in files]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]

    named = [line for line in logs[0].splitlines() if "straggler: " in line]
    assert named and all("straggler: rank 1 on " in line for line in named), named
    assert "in data wait" in named[0]
    print(named[0].split("WARNING ")[-1])
    lines = [m for m in read_metrics(run) if "time/ranks" in m]
    assert [m["step"] for m in lines] == list(range(2, STEPS + 1, 2))
    for line in lines:
        assert [r["rank"] for r in line["time/ranks"]] == [0, 1]
        for rank in line["time/ranks"]:  # the phases partition each rank's time
            parts = sum(rank[p] for p in timing.PARTS)
            assert parts == pytest.approx(line["time/step_s"], rel=0.05), (line["step"], rank, line["time/step_s"])
    slow = [m for m in lines if m.get("time/slowest_rank") == 1 and m["time/straggler"].endswith("in data wait")]
    assert len(slow) >= len(lines) - 1, [m.get("time/straggler") for m in lines]
    assert not any(m.get("time/slowest_rank") == 0 for m in lines)
    assert all(m["time/ranks"][1]["data"] > 3 * m["time/ranks"][0]["data"] for m in slow)
    assert 0 < lines[-1]["time/goodput"] < 1

    out = str(tmp_path / "report")
    evaluate(run, data, "test", out, progress=False)
    page = storage.read_text(storage.join(out, "report.html"))
    assert "Where the time went" in page and 'alt="time breakdown"' in page
    assert "slowest rank: sequence: rank 1 on " in page and "in data wait, named at" in page
