"""Checkpoints off the step path: the step only snapshots, a thread writes and uploads, one save is
in flight at most, ``latest`` moves only after the upload completed, and a save that fails or is
killed mid-upload (SIGKILL of a real training run) leaves the previous checkpoint as ``latest``; the
run resumed from it logs exactly the uninterrupted curve. S3 is the real SeaweedFS server behind a
slow link (``netlink.py``: latency and a bandwidth cap, in its own process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from netlink import SlowLink

from storymm import storage
from storymm.training import checkpoint
from storymm.training.checkpoint import CheckpointError, CheckpointWriter
from storymm.training.loop import read_metrics
from storymm.training.metrics_store import learned

from small import ROOT, SMALL, logged_points, mlflow_points, small_dataset


def _latest(client, bucket: str, prefix: str) -> str | None:
    """``latest`` read straight from the server (not through the slow link)."""
    try:
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/checkpoints/latest")["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    return body.decode().strip()


def _exists(client, bucket: str, key: str) -> bool:
    return "Contents" in client.list_objects_v2(Bucket=bucket, Prefix=key)


@pytest.fixture
def slow_s3(s3_env, s3_server, monkeypatch):
    """``(bucket, link, direct client)``: storymm reaches S3 through 2 ms each way and 8 Mbit/s."""
    with SlowLink(s3_server.port, latency_ms=2, mbit_s=8) as link:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{link.port}")
        storage._s3_filesystem_cached.cache_clear()
        yield s3_env.removeprefix("s3://"), link, s3_server.client()
    storage._s3_filesystem_cached.cache_clear()


def _state(value: float, step: int) -> dict:
    return {"model": {"w": torch.full((500_000,), value)}, "step": step}  # 2 MB: ~2 s at 8 Mbit/s


def test_snapshot_copies_the_tensors_and_keeps_the_structure():
    state = {"model": {"w": torch.zeros(3)}, "rng": [torch.ones(2)], "step": 4, "groups": [{"lr": 0.1}]}
    copy, ready = checkpoint.snapshot(state)
    assert ready is None  # nothing to wait for on CPU
    state["model"]["w"] += 1
    state["groups"][0]["lr"] = 0.2
    assert torch.equal(copy["model"]["w"], torch.zeros(3)) and copy["groups"] == [{"lr": 0.1}]
    assert copy["step"] == 4 and torch.equal(copy["rng"][0], torch.ones(2))


@pytest.mark.slow
def test_saves_run_in_the_background_one_at_a_time_and_latest_moves_after_the_upload(slow_s3):
    bucket, _, client = slow_s3
    run = f"s3://{bucket}/run"
    writer = CheckpointWriter(run)
    state = _state(0.0, 1)
    started = time.monotonic()
    uri = writer.submit(state, 1)
    returned_after = time.monotonic() - started
    state["model"]["w"] += 1  # training goes on changing the tensors
    assert _latest(client, bucket, "run") is None, "latest moved before the upload completed"
    assert uri == storage.join(run, "checkpoints/step-00000001.pt")

    started = time.monotonic()
    writer.submit(_state(2.0, 2), 2)  # waits for step 1 first: one save in flight
    waited = time.monotonic() - started
    assert _latest(client, bucket, "run") == "step-00000001.pt"
    assert not _exists(client, bucket, "run/checkpoints/step-00000002.pt")
    assert returned_after < waited / 2, (returned_after, waited)  # the upload took far longer than submit
    writer.wait()
    assert _latest(client, bucket, "run") == "step-00000002.pt"
    assert writer.published() == [(1, uri), (2, storage.join(run, "checkpoints/step-00000002.pt"))]
    assert torch.equal(checkpoint.load(uri)["model"]["w"], torch.zeros(500_000))  # the snapshot, not later values
    assert torch.equal(checkpoint.load_latest(run)["model"]["w"], torch.full((500_000,), 2.0))

    writer.submit(_state(3.0, 3), 3)
    writer.mark_best(3, "val_total", 0.5)  # asked while step 3 uploads: written once it is published
    writer.wait()
    assert checkpoint.read_best(run) == {
        "checkpoint": "step-00000003.pt",
        "step": 3,
        "metric": "val_total",
        "value": 0.5,
    }


@pytest.mark.slow
def test_a_failed_upload_leaves_the_previous_checkpoint_and_stops_the_next_save(slow_s3):
    bucket, link, client = slow_s3
    run = f"s3://{bucket}/run"
    writer = CheckpointWriter(run)
    writer.submit({"model": {"w": torch.zeros(10)}, "step": 1}, 1)
    writer.wait()
    writer.submit(_state(1.0, 2), 2)
    time.sleep(0.3)
    link.close()  # the network goes away mid-upload (and stays away)
    with pytest.raises(CheckpointError, match="step-00000002.pt .* failed.*'latest' still names the previous"):
        writer.submit(_state(2.0, 3), 3)
    assert _latest(client, bucket, "run") == "step-00000001.pt"
    assert not _exists(client, bucket, "run/checkpoints/step-00000002.pt")


def _curve(run: str) -> list[dict]:
    return [learned(m) for m in read_metrics(run)]


SIGKILL_SETS = [
    "train.sequence.steps=30",
    "train.sequence.log_every=1",
    "train.sequence.checkpoint_every=10",
    "train.sequence.warmup_steps=2",
    "train.sequence.eval_every=0",
]
SIGKILL_ARGS = [("--set", s) for s in SMALL + SIGKILL_SETS]


def _object(client, bucket: str, key: str) -> str | None:
    """An object's text read straight from the server (not through the slow link); None if absent."""
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    except client.exceptions.NoSuchKey:
        return None


def _mlflow_through(client, bucket: str) -> int:
    """The last step the run's MLflow tracker has sent (``trackers.json``), -1 before any."""
    text = _object(client, bucket, "run/trackers.json")
    return int(json.loads(text).get("mlflow", {}).get("through_step", -1)) if text else -1


def _logged_steps(client, bucket: str) -> list[int]:
    """The steps in the run's metrics log, read straight from the server."""
    steps = []
    for entry in client.list_objects_v2(Bucket=bucket, Prefix="run/metrics/").get("Contents", []):
        body = client.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read().decode()
        steps += [json.loads(line)["step"] for line in body.splitlines() if line.strip()]
    return sorted(steps)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_upload_resumes_from_the_previous_one_on_the_exact_curve(
    s3_env, s3_server, mlflow_server, tmp_path, request
):
    """A real `storymm train` with its run on S3 behind a 2 Mbit/s link (a checkpoint takes ~7 s to
    upload) and MLflow tracking: killed while step 20's checkpoint uploads and steps past 20 are
    already logged (so the steps went on during the upload), `latest` still names step 10 and MLflow
    holds steps up to 10 only (a step goes to MLflow once a published checkpoint covers it); the rerun
    resumes from step 10, ends with the uninterrupted run's curve, and MLflow holds each step once."""
    bucket, client = s3_env.removeprefix("s3://"), s3_server.client()
    data = small_dataset(str(tmp_path / "data"), 40, seed=3, frames=(6, 10))
    run, reference = f"s3://{bucket}/run", str(tmp_path / "reference")

    def command(run: str, *extra: str) -> list[str]:
        args = [sys.executable, "-m", "storymm.cli", "train", "--config", str(ROOT / "configs/tiny.yaml")]
        sets = [a for s in SIGKILL_ARGS for a in s]
        return [*args, "--stage", "sequence", "--data", data, "--run", run, *sets, *extra]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads as the reference: the same float sums
    done = subprocess.run(command(reference), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    tracked = ("--set", "train.trackers=[mlflow]")
    env.update(MLFLOW_TRACKING_URI=mlflow_server.uri, MLFLOW_EXPERIMENT_NAME=request.node.name)
    assert done.returncode == 0, done.stderr[-3000:]
    with SlowLink(s3_server.port, latency_ms=2, mbit_s=2) as link:
        slow_env = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{link.port}"}
        proc = subprocess.Popen(
            command(run, *tracked), cwd=ROOT, env=slow_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "never saw step 20's checkpoint uploading with steps past it"
            if _latest(client, bucket, "run") == "step-00000010.pt":
                logged = _logged_steps(client, bucket)
                uploading = not _exists(client, bucket, "run/checkpoints/step-00000020.pt")
                if logged and logged[-1] > 20 and uploading and _mlflow_through(client, bucket) == 10:
                    break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        time.sleep(1)  # whatever was on the wire has landed
    assert _latest(client, bucket, "run") == "step-00000010.pt"
    run_id = json.loads(_object(client, bucket, "run/trackers.json"))["mlflow"]["run_id"]
    held = mlflow_points(mlflow_server.uri, run_id)
    assert max(step for points in held.values() for step, _ in points) == 10

    done = subprocess.run(command(run, *tracked), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step-00000010.pt" in done.stderr and "sequence: completed at step 30" in done.stdout
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 31))
    assert _curve(run) == _curve(reference)
    assert mlflow_points(mlflow_server.uri, run_id) == logged_points(run)  # one run, each step once
