"""The Accelerate backend for real: `accelerate launch` with two CPU processes (gloo DDP), the stop
signal reaching one rank stopping all of them at the same step, the resume, and `storymm train`'s
exit code when stopped. (Under SLURM: tests/test_slurm.py.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from storymm.cli import EXIT_STOPPED
from storymm.training import checkpoint
from storymm.training.loop import read_metrics, read_run

from small import accelerate_launch, train_args

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
SETS = ["data.batch_size=8", "train.sequence.checkpoint_every=10", "train.sequence.log_every=5"]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    env.pop("STORYMM_STOPPED_MARKER", None)
    env.update(extra)
    return env


def _train_args(data: str, run: str, steps: int) -> list[str]:
    return train_args(data, run, [*SETS, f"train.sequence.steps={steps}"])


def _launch(data: str, run: str, steps: int) -> list[str]:
    return [*accelerate_launch(), *_train_args(data, run, steps)]


def _wait_logged(proc: subprocess.Popen, run: str, lines: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(read_metrics(run)) < lines:
        assert proc.poll() is None, f"training exited early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "no metrics in time"
        time.sleep(0.3)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.fixture(scope="module")
def dataset(tiny_data_uri) -> str:
    return tiny_data_uri


def test_runtime_maps_onto_accelerator_and_remembers_the_stop_signal():
    """One process, no launcher: a CPU Accelerator, fp32 on CPU whatever the config says, and
    SIGUSR1/SIGTERM turn should_stop() on instead of killing the process."""
    script = textwrap.dedent("""
        import os, signal, torch
        from storymm.config import load_config
        from storymm.training.accelerate_backend import AccelerateRuntime, make_accelerator
        config = load_config("configs/gate.yaml")
        assert config.train.mixed_precision == "bf16"
        runtime = AccelerateRuntime(make_accelerator(config))
        assert (runtime.rank, runtime.world_size, runtime.name) == (0, 1, "accelerate")
        assert runtime.device.type == "cpu" and runtime.mixed_precision == "no"
        model = runtime.prepare_model(torch.nn.Linear(3, 1))
        assert runtime.unwrap(model).weight.shape == (1, 3)
        assert runtime.all_reduce_sum(torch.tensor([2.0])).item() == 2.0
        runtime.install_signal_handlers()
        assert not runtime.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert runtime.should_stop()
        runtime.restore_signal_handlers()
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
        print("ok")
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.slow
def test_signal_to_one_rank_stops_all_ranks_then_resume_finishes(dataset, tmp_path):
    run, marker = str(tmp_path / "run"), tmp_path / "stopped"
    started = time.monotonic()
    proc = subprocess.Popen(
        _launch(dataset, run, steps=40),
        cwd=REPO,
        env=_env(STORYMM_STOPPED_MARKER=str(marker)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    try:
        _wait_logged(proc, run, 2)
        ranks = {_rank_of(pid): pid for pid in _children(proc.pid)}
        assert set(ranks) >= {0, 1}, f"expected two worker processes under the launcher, found {ranks}"
        os.kill(ranks[1], signal.SIGUSR1)  # only rank 1 hears it
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"stopped run: {time.monotonic() - started:.1f}s")
    assert proc.returncode == 0, output[-3000:]  # jobs/train.py turns "stopped" into the marker + exit 0
    assert marker.exists()
    assert "rank 1: received SIGUSR1" in output and "rank 0: received SIGUSR1" not in output
    stops = re.findall(r"sequence: stopped at step (\d+)", output)
    assert len(stops) == 2 and len(set(stops)) == 1, output[-3000:]  # both ranks, the same step
    stopped_at = int(stops[0])
    assert 10 <= stopped_at < 40
    state = checkpoint.load(checkpoint.latest_uri(run))
    assert state["step"] == stopped_at and len(state["rng"]) == 2
    # no second checkpoint is written when the stop falls on a periodic checkpoint's step
    assert state["status"] == "stopped" or (stopped_at % 10 == 0 and state["status"] == "running")
    assert read_run(run)["world_size"] == 2 and read_run(run)["backend"] == "accelerate"

    # the same command again resumes from `latest` and runs to the end
    marker.unlink()
    again = subprocess.run(
        _launch(dataset, run, steps=40),
        cwd=REPO,
        env=_env(STORYMM_STOPPED_MARKER=str(marker)),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert not marker.exists()
    assert f"resuming from {run}/checkpoints/step-{stopped_at:08d}.pt" in again.stderr
    final = checkpoint.load(checkpoint.latest_uri(run))
    assert final["step"] == 40 and final["status"] == "completed"
    assert [m["step"] for m in read_metrics(run)] == list(range(5, 41, 5))


@pytest.mark.slow
def test_storymm_train_exits_with_exit_stopped_on_sigterm(dataset, tmp_path):
    """Without a launcher or a job script: `storymm train --backend accelerate` stopped by a signal
    exits EXIT_STOPPED (75) after checkpointing, so any wrapper can tell it from success and failure."""
    run = str(tmp_path / "run")
    proc = subprocess.Popen(
        [sys.executable, *_train_args(dataset, run, steps=200)],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    try:
        _wait_logged(proc, run, 1)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_STOPPED, output[-3000:]
    state = checkpoint.load(checkpoint.latest_uri(run))
    assert 5 <= state["step"] < 200 and state["status"] in ("stopped", "running")
    assert read_run(run)["world_size"] == 1
