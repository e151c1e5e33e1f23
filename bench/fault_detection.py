"""How long Ray's own checks take to notice a silent node and a frozen training worker, on two
simulated nodes (root; slurm/local/up.sh --nodes 2 + ray-up.sh, as tests/test_two_nodes_ray.py).

  .venv/bin/python bench/fault_detection.py nodes            # node2 cut / powered off, Ray's health
                                                             # checks as in the harness and Ray's defaults
  .venv/bin/python bench/fault_detection.py worker [--timeout 60]
      # node2's training worker frozen with storymm's watchdog off: when Ray Train itself gives up
      # on it (RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, Ray's default 600 s)

One JSON line per measurement on stdout. docs/ray.md quotes the results.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from runs import ray_job_id  # noqa: E402
from simnodes import LOCAL, PYTHON, REPO, SimNodes, skip_unless_possible, wait_for  # noqa: E402

from storymm.config import load_config  # noqa: E402

from small import small_dataset  # noqa: E402

HEALTH = {
    "harness": {
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    },
    "ray defaults": {
        "RAY_health_check_period_ms": "3000",
        "RAY_health_check_timeout_ms": "10000",
        "RAY_health_check_failure_threshold": "5",
    },
}


def _until_node_dead(cluster: SimNodes, node: str, fault: str) -> float:
    """Seconds from ``slurm/local/node FAULT NODE`` until Ray's GCS declares ``node`` dead (polled
    every 0.1 s on node1)."""
    watcher = f"""
        import json, sys, time, ray
        ray.init(address="{cluster.ip("node1")}:6379", logging_level="ERROR", log_to_driver=False)
        print("ready", flush=True)
        sys.stdin.readline()
        start = time.time()
        while any(n["Alive"] for n in ray.nodes() if n["NodeManagerAddress"] == "{cluster.ip(node)}"):
            time.sleep(0.1)
        print(json.dumps(time.time() - start), flush=True)"""
    proc = subprocess.Popen(
        [str(LOCAL / "on"), "node1", PYTHON, "-c", textwrap.dedent(watcher)],
        env={**cluster.env, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    while proc.stdout.readline().strip() != "ready":
        pass
    proc.stdin.write("go\n")
    proc.stdin.flush()
    cluster.node(fault, node)
    out, _ = proc.communicate(timeout=600)
    return float(out.strip().splitlines()[-1])


def measure_nodes(name: str, env: dict) -> None:
    cluster = SimNodes(nodes=2)
    try:
        cluster.up().ray_up(**env)
        time.sleep(5)
        cut = _until_node_dead(cluster, "node2", "cut")
        print(json.dumps({"health checks": name, **env, "fault": "silent partition", "node_dead_after_s": cut}))
        cluster.node("heal", "node2")
        cluster.node("kill", "node2")
        cluster.node("start", "node2")
        cluster.ray_join("node2")
        wait_for(lambda: cluster.ray_node_alive("node2"), 60, "node2 back in Ray")
        time.sleep(5)
        power = _until_node_dead(cluster, "node2", "kill")
        print(json.dumps({"health checks": name, **env, "fault": "power cut", "node_dead_after_s": power}))
    finally:
        cluster.down()


def measure_worker(timeout: float) -> None:
    cluster = SimNodes(nodes=2)
    try:
        cluster.up().ray_up()
        config = load_config(REPO / "configs/tiny.yaml", ["data.rows_per_shard=5"])
        data = small_dataset(tempfile.mkdtemp(prefix="smm-data-"), 40, 5, (6, 12), config)
        cluster.upload(data, f"s3://{cluster.bucket}/data")
        run = f"s3://{cluster.bucket}/runs/frozen"
        sets = ["data.batch_size=8", "train.visual_ae.steps=100", "train.visual_ae.checkpoint_every=10"]
        sets += ["train.visual_ae.log_every=5", "train.hang_timeout_s=0"]  # storymm's watchdog off
        args = ["--backend", "ray", "--workers", "2", "--stage", "visual_ae", "--config", "configs/tiny.yaml"]
        args += ["--data", f"s3://{cluster.bucket}/data", "--run", run, *[a for s in sets for a in ("--set", s)]]
        env = {"RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S": str(timeout)}
        job = ray_job_id(cluster.ray_submit(args, wait=False, **env))
        cluster.wait_past_checkpoint(run, logged=12)
        frozen_at = time.time()
        cluster.node("freeze", "node2")
        wait_for(lambda: len(cluster.run_state(run)["attempts"]) >= 2, timeout + 300, "a new attempt", interval=2)
        deaths = [t - frozen_at for t in cluster.ray_worker_deaths() if t > frozen_at]
        second = cluster.run_state(run)["attempts"][1]
        row = {"fault": "frozen worker", "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S": timeout, "watchdog": "off"}
        row.update(first_worker_death_s=min(deaths) if deaths else None, training_again_s=second["time"] - frozen_at)
        row.update(world_size_after=second["world_size"], job=cluster.ray_job_status(job))
        print(json.dumps(row))
    finally:
        cluster.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("nodes", "worker"))
    parser.add_argument("--timeout", type=float, default=60, help="RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S (worker)")
    args = parser.parse_args()
    skip_unless_possible()
    if args.what == "worker":
        measure_worker(args.timeout)
    else:
        for name, env in HEALTH.items():
            measure_nodes(name, env)


if __name__ == "__main__":
    main()
