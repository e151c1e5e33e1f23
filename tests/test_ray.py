"""Ray Train backend and Ray Tune on a real local Ray cluster and a real S3 server (no mocks).

A Ray head is started on 127.0.0.1 with `ray start --head --block` in its own session (free ports,
private temp dir, token auth disabled); jobs go through `ray job submit` exactly as on a cluster.
Teardown kills only that head's processes (the session it runs in), never other Ray instances on
the machine: `ray stop` would stop every Ray process of this user.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from runs import ray_job_id

from storymm import storage
from storymm.config import load_config
from storymm.data import synth
from storymm.data.prepare import prepare
from storymm.training.run import RunFolder

from s3server import free_ports
from small import SMALL, logged_points, mlflow_points, tensorboard_points

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
TINY = ["--config", "configs/tiny.yaml", "--set", "data.batch_size=8"]


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) == sid:
                pids.append(int(entry))
        except (ProcessLookupError, PermissionError):
            continue
    return pids


def _free_port_block(size: int, avoid: set[int]) -> tuple[int, int]:
    """A block of ``size`` consecutive ports free on 127.0.0.1 (for Ray's worker processes)."""
    import random
    import socket

    rng = random.SystemRandom()
    for _ in range(200):
        low = rng.randrange(20000, 32000 - size, 100)
        if avoid & set(range(low, low + size)):
            continue
        try:
            socks = []
            for port in range(low, low + size):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return low, low + size - 1
    raise RuntimeError("no free block of ports for Ray workers")


_PORT_NAMES = (
    "gcs",
    "dashboard",
    "client",
    "node_manager",
    "object_manager",
    "agent_http",
    "agent_grpc",
    "runtime_env",
    "metrics",
)


class RayHead:
    """One `ray start --head --block` on loopback; `stop()` kills its whole session.

    Ports are chosen when the head starts, not when it is built: a server started in between (the
    tests' SeaweedFS) would otherwise be free to bind one of them, and a dashboard that cannot bind
    its port leaves `ray start --block` running with nothing answering.
    """

    def __init__(self, gpus: int = 0) -> None:
        self.gpus = gpus  # what the head reports to Ray: with no real GPU, a cluster that claims some
        # Unix socket paths under the temp dir must stay short: not pytest's long tmp paths.
        self.temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
        self.ports: dict[str, int] = {}
        self.worker_ports: tuple[int, int] = (0, 0)
        self.log_path = Path(self.temp_dir) / "ray-start.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
        self.env.update(
            RAY_AUTH_MODE="disabled",
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            RAY_USAGE_STATS_ENABLED="0",
            OMP_NUM_THREADS="1",
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in jobs = this venv
        )
        self.proc: subprocess.Popen | None = None

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['gcs']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    def start(self, timeout: float = 90.0, attempts: int = 2) -> RayHead:
        """Start the head and wait for its job server; a start that fails is retried on fresh ports."""
        failures = []
        for attempt in range(1, attempts + 1):
            self.ports = dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES))))
            self.worker_ports = _free_port_block(100, avoid=set(self.ports.values()))
            self._spawn()
            problem = self._wait_ready(timeout)
            if problem is None:
                return self
            failures.append(f"attempt {attempt} (ports {self.ports}): {problem}")
            self._kill_session()
        self.stop()
        raise RuntimeError("Ray head did not start:\n" + "\n\n".join(failures))

    def _spawn(self) -> None:
        p = self.ports
        cmd = [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={p['gcs']}",
            "--num-cpus=4",
            f"--num-gpus={self.gpus}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={p['dashboard']}",
            f"--ray-client-server-port={p['client']}",
            f"--node-manager-port={p['node_manager']}",
            f"--object-manager-port={p['object_manager']}",
            f"--dashboard-agent-listen-port={p['agent_http']}",
            f"--dashboard-agent-grpc-port={p['agent_grpc']}",
            f"--runtime-env-agent-port={p['runtime_env']}",
            f"--metrics-export-port={p['metrics']}",
            f"--min-worker-port={self.worker_ports[0]}",
            f"--max-worker-port={self.worker_ports[1]}",
            f"--temp-dir={self.temp_dir}",
            "--object-store-memory=200000000",
            "--disable-usage-stats",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.temp_dir
            )

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError as exc:
            return f"(no log: {exc})"

    def _wait_ready(self, timeout: float) -> str | None:
        """None once the job server answers; otherwise what went wrong, with the log's tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"ray start exited {self.proc.returncode}:\n{self._log_tail()}"
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/jobs/", timeout=2) as response:
                    if response.status == 200:
                        return None
            except OSError:
                pass
            time.sleep(0.5)
        return f"job server not ready after {timeout:.0f}s:\n{self._log_tail()}"

    def _kill_session(self) -> None:
        if self.proc is None:
            return
        sid = self.proc.pid  # session leader: its pid is the session id
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its children on exit
            try:
                self.proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                pass
        for _ in range(2):  # anything left of this head (workers, agents): SIGKILL, by pid
            for pid in _session_pids(sid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        if self.proc.poll() is None:
            self.proc.wait(timeout=5)
        self.proc = None

    def stop(self) -> None:
        self._kill_session()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    # ----------------------------------------------------------------------------- jobs

    def cli_env(self) -> dict:
        return dict(self.env)

    def submit(
        self,
        entrypoint: list[str],
        env_vars: dict,
        *,
        wait: bool,
        timeout: float = 180,
        excludes: list[str] | None = None,
    ) -> subprocess.CompletedProcess:
        runtime_env = {"env_vars": env_vars, **({"excludes": excludes} if excludes else {})}
        cmd = [
            RAY,
            "job",
            "submit",
            "--address",
            self.dashboard_url,
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            json.dumps(runtime_env),
        ]
        if not wait:
            cmd.append("--no-wait")
        return subprocess.run(
            [*cmd, "--", *entrypoint], env=self.cli_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout
        )

    def job_status(self, job_id: str) -> str:
        """The job's status from the job server's REST API (what `ray job status` prints)."""
        with urllib.request.urlopen(f"{self.dashboard_url}/api/jobs/{job_id}", timeout=10) as response:
            return json.loads(response.read())["status"]

    def job_logs(self, job_id: str) -> str:
        return subprocess.run(
            [RAY, "job", "logs", "--address", self.dashboard_url, job_id],
            env=self.cli_env(),
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout


@pytest.fixture(scope="module")
def ray_head():
    head = RayHead().start()
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def source_stories(tmp_path_factory):
    root = tmp_path_factory.mktemp("raysrc")
    synth.synthesize(str(root / "src"), 40, seed=5, frames=(6, 12), progress=False)
    return str(root / "src")


@pytest.fixture
def s3_data(s3_env, source_stories):
    """A tiny prepared dataset in a fresh bucket; yields (bucket URI, data URI)."""
    data = f"{s3_env}/data"
    prepare(source_stories, data, load_config("configs/tiny.yaml", ["data.rows_per_shard=5"]), progress=False)
    return s3_env, data


def _job_env(s3_env_vars: dict, **extra) -> dict:
    env = {k: v for k, v in s3_env_vars.items()}
    env.update(OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled", **extra)
    return env


def _aws_env() -> dict:
    return {
        k: os.environ[k]
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")
        if k in os.environ
    }


def _train_entry(
    stage: str, data: str, run: str, steps: int, checkpoint_every: int, log_every: int, extra: tuple[str, ...] = ()
) -> list[str]:
    return [
        "python",
        "jobs/train.py",
        "--backend",
        "ray",
        "--workers",
        "2",
        "--stage",
        stage,
        "--data",
        data,
        "--run",
        run,
        *TINY,
        "--set",
        f"train.{stage}.steps={steps}",
        "--set",
        f"train.{stage}.checkpoint_every={checkpoint_every}",
        "--set",
        f"train.{stage}.log_every={log_every}",
        "--set",
        f"train.{stage}.warmup_steps=2",
        *extra,
    ]


def _train_worker_pids(head: RayHead) -> list[int]:
    """PIDs of the job's live Ray Train workers (from Ray's state API: no hook in storymm)."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=head.dashboard_url,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        detail=True,
    )
    return sorted(int(a.pid) for a in actors)


def test_ray_job_submit_trains_with_two_workers_on_s3(ray_head, s3_data):
    from storymm.training.loop import read_metrics, read_run

    bucket, data = s3_data
    run = f"{bucket}/runs/visual_ae"
    started = time.monotonic()
    # the job runs with the runtime env the cluster manifests use, plus this S3 server's variables
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    env_vars = {**runtime_env["env_vars"], **_job_env(_aws_env())}
    env_vars.pop("STORYMM_TORCH_THREADS", None)  # threads then come from the CPUs Ray gives each worker
    out = ray_head.submit(
        _train_entry(
            "visual_ae", data, run, steps=20, checkpoint_every=10, log_every=5, extra=("--cpus-per-worker", "2")
        ),
        env_vars,
        wait=True,
        excludes=runtime_env["excludes"],
    )
    took = time.monotonic() - started
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    job_id = ray_job_id(out.stdout + out.stderr)
    assert ray_head.job_status(job_id) == "SUCCEEDED"
    assert "visual_ae: completed at step 20" in out.stdout

    record = read_run(run)
    assert record["world_size"] == 2 and record["backend"] == "ray" and record["stage"] == "visual_ae"
    checkpoints = storage.list_files(storage.join(run, "checkpoints"), suffix=".pt")
    assert [storage.basename(u) for u in checkpoints] == ["step-00000010.pt", "step-00000020.pt"]
    assert storage.read_text(storage.join(run, "checkpoints", "latest")).strip() == "step-00000020.pt"
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [5, 10, 15, 20]
    assert all(m["total"] > 0 and m["samples_per_s"] > 0 for m in metrics)
    # Ray's own state went to the same bucket (RunConfig storage on S3), naming our checkpoint
    ray_files = storage.list_files(storage.join(run, "ray"), recursive=True)
    pointers = [u for u in ray_files if u.endswith("storymm_checkpoint.json")]
    assert pointers, ray_files
    assert json.loads(storage.read_text(pointers[-1]))["checkpoint"].endswith("checkpoints/step-00000020.pt")
    attempts = RunFolder(run).read_attempts()
    assert [(a["attempt"], a["start_step"], a["world_size"], a["backend"]) for a in attempts] == [(1, 0, 2, "ray")]
    assert len(set(attempts[0]["node_ids"])) == 1  # both workers on this machine's one Ray node
    assert attempts[0]["torch_threads"] == [2, 2]  # --cpus-per-worker 2: each worker's allocation
    # credentials never reach what the job wrote
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in storage.read_text(storage.join(run, "run.json"))
    print(f"ray job submit -> SUCCEEDED in {took:.1f}s")


def test_killed_worker_resumes_from_last_checkpoint(ray_head, s3_data, tmp_path, mlflow_server):
    """A Ray Train worker SIGKILLed mid-run: the group restarts from the last checkpoint, the run
    logs the uninterrupted curve, and the run is one MLflow run and one TensorBoard run (event files
    on S3) whose points equal the metrics log, each step once."""
    from mlflow.tracking import MlflowClient

    from storymm.training.loop import read_metrics
    from storymm.training.metrics_store import learned

    bucket, data = s3_data
    run = f"{bucket}/runs/ft"
    steps, every = 40, 10
    experiment = f"ray-{os.path.basename(bucket)}"
    out = ray_head.submit(
        [
            *_train_entry("visual_ae", data, run, steps=steps, checkpoint_every=every, log_every=5),
            "--set",
            "train.trackers=[tensorboard,mlflow]",
        ],
        _job_env(_aws_env(), MLFLOW_TRACKING_URI=mlflow_server.uri, MLFLOW_EXPERIMENT_NAME=experiment),
        wait=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = ray_job_id(out.stdout + out.stderr)

    # wait until the first checkpoint is published and training went past it
    deadline = time.monotonic() + 120
    observed = 0
    while time.monotonic() < deadline:
        metrics = read_metrics(run) if storage.exists(storage.join(run, "checkpoints", "latest")) else []
        observed = metrics[-1]["step"] if metrics else 0
        if observed >= every + 5:
            break
        assert ray_head.job_status(job_id) in ("RUNNING", "PENDING"), ray_head.job_logs(job_id)[-4000:]
        time.sleep(0.5)
    assert observed >= every + 5, f"training did not get past step {every + 5} in time"
    assert observed < steps, "the run finished before the worker could be killed: use more steps"
    workers = _train_worker_pids(ray_head)
    assert len(workers) == 2, workers
    victim = workers[-1]
    os.kill(victim, signal.SIGKILL)
    time.sleep(1.0)  # a metrics write in flight lands; the survivor then blocks in the next collective
    kill_step = read_metrics(run)[-1]["step"]
    checkpointed = int(storage.read_text(storage.join(run, "checkpoints", "latest")).strip()[5:13])

    deadline = time.monotonic() + 150
    status = "RUNNING"
    while time.monotonic() < deadline:
        status = ray_head.job_status(job_id)
        if status not in ("RUNNING", "PENDING"):
            break
        time.sleep(1)
    logs = ray_head.job_logs(job_id)
    assert status == "SUCCEEDED", logs[-6000:]
    attempts = RunFolder(run).read_attempts()
    assert len(attempts) == 2, attempts
    resumed_from = attempts[1]["start_step"]
    # the second attempt restored the checkpoint that was latest when the worker died: at most one
    # checkpoint interval was redone (exactly one when the kill lands while the save of the step just
    # logged is still uploading in the background: `latest` moves only after the upload)
    assert resumed_from == checkpointed and kill_step - every <= resumed_from <= kill_step, (resumed_from, kill_step)
    metrics = read_metrics(run)
    steps_logged = [m["step"] for m in metrics]
    assert steps_logged == list(range(5, steps + 1, 5))  # no gap, no duplicate after the resume
    assert storage.read_text(storage.join(run, "checkpoints", "latest")).strip() == f"step-{steps:08d}.pt"
    assert f"completed at step {steps}" in logs
    # the same job uninterrupted logs exactly the same curve: the restart lost nothing and redid nothing
    reference = f"{bucket}/runs/reference"
    out = ray_head.submit(
        _train_entry("visual_ae", data, reference, steps=steps, checkpoint_every=every, log_every=5),
        _job_env(_aws_env()),
        wait=True,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert [learned(m) for m in metrics] == [learned(m) for m in read_metrics(reference)]
    print(f"killed a training worker (pid {victim}) at step ~{kill_step}; resumed from {resumed_from}")
    expected = logged_points(run)
    assert [s for s, _ in expected["total"]] == list(range(5, steps + 1, 5))
    assert tensorboard_points(run) == expected
    client = MlflowClient(mlflow_server.uri)
    (only,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert json.loads(storage.read_text(storage.join(run, "trackers.json")))["mlflow"]["run_id"] == only.info.run_id
    assert mlflow_points(mlflow_server.uri, only.info.run_id) == expected


def test_tune_two_trials_with_asha(ray_head, tmp_path, source_stories):
    from storymm.training.loop import read_metrics

    data = str(tmp_path / "data")
    prepare(source_stories, data, load_config("configs/tiny.yaml", ["data.rows_per_shard=5"]), progress=False)
    runs, out = str(tmp_path / "runs"), str(tmp_path / "reports")
    env = ray_head.cli_env()
    env["RAY_ADDRESS"] = ray_head.gcs_address
    cmd = [
        str(BIN / "storymm"),
        "tune",
        "--stage",
        "visual_ae",
        "--data",
        data,
        "--runs",
        runs,
        "--out",
        out,
        *TINY,
        "--set",
        "train.visual_ae.steps=20",
        "--set",
        "train.visual_ae.log_every=5",
        "--set",
        "train.visual_ae.warmup_steps=2",
        "--grid",
        "model.visual_latent=16,64",
    ]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((Path(out) / "tune.json").read_text())
    assert sorted(t["params"]["model.visual_latent"] for t in summary["trials"]) == [16, 64]
    assert all(t["error"] is None for t in summary["trials"])
    assert summary["best"] is not None and summary["best"]["step"] == 20
    for trial in summary["trials"]:
        # every trial is a real run of the shared loop: its own run.json, metrics, checkpoint
        run_dir = Path(trial["run"])
        assert (
            json.loads((run_dir / "run.json").read_text())["config"]["model"]["visual_latent"]
            == trial["params"]["model.visual_latent"]
        )
        logged = [m["step"] for m in read_metrics(str(run_dir))]
        assert logged[-1] == trial["step"]
        assert trial["stopped_early"] == (trial["step"] < 20)
        if not trial["stopped_early"]:  # finished trials keep their final checkpoint (what --evaluate scores)
            assert (run_dir / "checkpoints/latest").read_text().strip() == "step-00000020.pt"
    table = (Path(out) / "tune.md").read_text()
    assert "| model.visual_latent | loss | step | stopped early | run |" in table


def test_tune_stage_all_trains_each_trial_whole_and_evaluates_every_one(ray_head, tmp_path, source_stories):
    """Issue 14's latent sweep through the real CLI and a real Ray cluster: `storymm tune --stage all
    --evaluate` gives every trial its own autoencoders at its `visual_latent`, the sequence model
    starts from them, and every trial (latents unequal to the text latent) is scored into one
    comparison with every floor and a verdict."""
    data = str(tmp_path / "data")
    prepare(source_stories, data, load_config("configs/tiny.yaml", ["data.rows_per_shard=5"]), progress=False)
    runs, out = str(tmp_path / "runs"), str(tmp_path / "sweep")
    env = ray_head.cli_env()
    env["RAY_ADDRESS"] = ray_head.gcs_address
    sets = [*SMALL, "model.text_latent=16"]
    for stage in ("visual_ae", "text_ae", "sequence"):
        sets += [f"train.{stage}.steps=4", f"train.{stage}.log_every=2", f"train.{stage}.warmup_steps=1"]
    cmd = [str(BIN / "storymm"), "tune", "--config", "configs/tiny.yaml", "--stage", "all"]
    cmd += ["--data", data, "--runs", runs, "--out", out, "--grace-steps", "4", "--evaluate"]
    cmd += [a for s in sets for a in ("--set", s)] + ["--grid", "model.visual_latent=8,24"]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    summary = json.loads((Path(out) / "tune.json").read_text())
    assert sorted(t["params"]["model.visual_latent"] for t in summary["trials"]) == [8, 24]
    for trial in summary["trials"]:
        latent = trial["params"]["model.visual_latent"]
        assert trial["error"] is None and trial["step"] == 4, trial
        trial_dir = Path(runs) / f"visual_latent={latent}"
        visual = json.loads((trial_dir / "visual_ae/run.json").read_text())
        sequence = json.loads((trial_dir / "sequence/run.json").read_text())
        assert visual["config"]["model"]["visual_latent"] == latent
        assert sequence["config"]["model"]["visual_latent"] == latent
        assert sequence["init_from"] == [str(trial_dir / "visual_ae"), str(trial_dir / "text_ae")]
        assert Path(trial["run"]) == trial_dir / "sequence"
    table = (Path(out) / "compare.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| metric |"))
    assert sorted(cell.strip() for cell in header.split("|")[2:-1]) == ["visual_latent=24", "visual_latent=8"]
    for row in ("floor: best_input_oracle_l1", "floor: copy_two_back_l1", "floor: retrieval_r1_chance", "verdict"):
        assert f"| {row} |" in table, row
    assert table.count("verdict: image L1") == 2


def test_workers_argument_fixed_or_elastic_range():
    from storymm.training.ray_backend import parse_workers

    assert parse_workers("2") == 2 and parse_workers(3) == 3
    assert parse_workers("1-2") == (1, 2) and parse_workers((1, 2)) == (1, 2)
    assert parse_workers("2-2") == 2  # a range of one size is a fixed group
    for bad in ("0", "2-1", "0-2", "x", "1-"):
        with pytest.raises(ValueError):
            parse_workers(bad)


def test_a_cluster_whose_gpus_cuda_cannot_use_stops_train_and_tune_in_one_line(tmp_path):
    """A Ray cluster that reports a GPU (`ray start --num-gpus=1`; none is usable on this machine):
    `storymm train --gpus-per-worker 1` and `storymm tune` (which asks for the cluster's GPUs by
    default) stop with one line from a probe on the GPU slot, before any worker trains on a CPU."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    head = RayHead(gpus=1).start()
    try:
        env = {**head.cli_env(), "RAY_ADDRESS": head.gcs_address}
        common = ["--data", str(tmp_path / "data"), *TINY]
        runs = [
            ("--gpus-per-worker 1", ["train", "--backend", "ray", "--gpus-per-worker", "1", "--stage", "visual_ae"]),
            (
                "--gpus-per-trial 1 (the default on a Ray cluster with GPUs",
                ["tune", "--stage", "visual_ae", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")],
            ),
        ]
        for asked, args in runs:
            extra = ["--run", str(tmp_path / "run")] if args[0] == "train" else []
            done = subprocess.run(
                [str(BIN / "storymm"), *args, *common, *extra],
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=180,
            )
            errors = [line for line in done.stderr.splitlines() if line.startswith("storymm: error:")]
            assert done.returncode == 2 and len(errors) == 1, done.stdout[-2000:] + done.stderr[-4000:]
            assert asked in errors[0] and "finds no usable GPU" in errors[0] and "(Ray node" in errors[0], errors[0]
        assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()
    finally:
        head.stop()
