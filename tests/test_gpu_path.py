"""The GPU path, proved as far as a CPU can (issue 25): the order of device move and optimiser
restore, the CUDA RNG state of the rank's own device, the one-line failure when GPUs are asked for
and CUDA is unusable (local, Accelerate, Ray, the SLURM script), fp32 islands inside bf16 autocast,
no host sync in a training step (on the meta device), uint8 batches made floats on the device,
threads from the allocation, and `bench/gpu_check.sh --cpu` end to end. (Ray with fake GPUs, for
`--gpus-per-worker` and tune on a GPU cluster: tests/test_ray.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from storymm.data.loader import WindowLoader
from storymm.data.transfer import HOST_KEYS, to_device
from storymm.training import checkpoint, loop, step_audit
from storymm.training.devices import GpuUnavailable, requested_by_environment, require_cuda, threads_per_process
from storymm.training.loop import train
from storymm.training.ray_backend import GPU_WORKER_CPUS, worker_resources
from storymm.training.runtime import Runtime
from storymm.training.stages import TokenizerInfo
from storymm.training.tune import GPU_TRIAL_CPUS, trial_resources

from small import ROOT, SMALL, small_config, small_dataset

META = torch.device("meta")  # a device that is not the CPU, with no data: stands in for the GPU
TOKENS = TokenizerInfo(vocab_size=60, pad_id=0, bos_id=1, eos_id=2)


@pytest.fixture(scope="module")
def data_uri(tmp_path_factory):
    return small_dataset(str(tmp_path_factory.mktemp("gpu-path")), 16, seed=11, frames=(6, 8))


# ------------------------------------------------------------------------- 1. restore order


def test_optimizer_state_is_restored_where_the_model_already_is(data_uri, tmp_path):
    """Optimizer.load_state_dict puts moment tensors where the parameters are at that moment: the
    loop must move the model to the runtime's device first, or the first GPU step after a resume
    fails (device mismatch). A checkpoint of a real run, restored for a runtime on another device."""
    run = str(tmp_path / "text")
    config = small_config("train.text_ae.steps=2", "train.text_ae.log_every=1")
    train(config, "text_ae", data_uri, run, progress=False)
    resumed = checkpoint.load_latest(run)
    model, params, optimizer, _, position = loop._model_and_optimiser(
        "text_ae", config, TOKENS_OF(data_uri), resumed, [], Runtime(device=META)
    )
    assert position.step == 2 and params and all(p.device == META for p in model.parameters())
    moments = [value for p in params for key, value in optimizer.state[p].items() if key != "step"]
    assert len(optimizer.state) == len(params) and len(moments) == 2 * len(params)  # exp_avg, exp_avg_sq
    assert {m.device for m in moments} == {META}


def TOKENS_OF(data_uri: str) -> TokenizerInfo:  # noqa: N802 - reads like the constant above
    from storymm.data.loader import PreparedDataset

    return TokenizerInfo.from_manifest(PreparedDataset(data_uri).manifest)


# --------------------------------------------------------------------------- 2. CUDA RNG


def test_cuda_rng_state_is_the_ranks_own_device_only():
    cpu_state = checkpoint.rng_state(torch.device("cpu"))
    assert "cuda" not in cpu_state  # and a CPU run never touches CUDA
    one = torch.arange(16, dtype=torch.uint8)
    # this format: one state, whatever the device index
    assert checkpoint.own_cuda_state(one, torch.device("cuda", 3)) is one
    # checkpoints that saved every GPU of a 4-GPU node: each rank takes its device's entry...
    every = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    assert torch.equal(checkpoint.own_cuda_state(every, torch.device("cuda", 2)), every[2])
    assert torch.equal(checkpoint.own_cuda_state(every, torch.device("cuda", 0)), every[0])  # a 1-GPU worker
    # ...and a device the checkpoint did not see keeps its stream instead of raising IndexError
    assert checkpoint.own_cuda_state(every[:1], torch.device("cuda", 1)) is None
    # on the CPU (a GPU checkpoint resumed on a laptop) nothing CUDA is restored
    assert checkpoint.own_cuda_state(one, torch.device("cpu")) is None
    checkpoint.restore_rng({**cpu_state, "cuda": every}, torch.device("cpu"))


# ------------------------------------------------------------------ 3. the loud failure


def _one_error_line(stderr: str, launcher_traceback: bool = False) -> str:
    """The one ``storymm: error:`` line; no traceback of ours (``accelerate launch`` prints its own
    when a process it started exits non-zero)."""
    lines = [line for line in stderr.splitlines() if line.startswith("storymm: error:")]
    assert len(lines) == 1, stderr[-3000:]
    assert launcher_traceback or "Traceback" not in stderr, stderr[-3000:]
    assert "storymm/training" not in stderr.split(lines[0])[0][-2000:], stderr[-3000:]
    return lines[0]


def _assert_says_why_and_what_to_install(line: str, asked: str) -> None:
    assert f"{asked} asks for GPUs, but torch {torch.__version__}" in line, line
    assert "finds no usable GPU" in line and "whl/cu126" in line and "train on the CPU" in line, line


def test_gpus_asked_for_but_unusable_stop_with_one_line(tmp_path, monkeypatch):
    """`CUDA_VISIBLE_DEVICES` naming a GPU (storymm train, in-process) and `--gpus-per-worker` with a
    local Ray: one line saying why and what to install, exit 2, before any data is read."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    run = tmp_path / "run"
    base = [sys.executable, "-m", "storymm.cli", "train", "--config", "configs/tiny.yaml", "--stage", "visual_ae"]
    base += ["--data", str(tmp_path / "no-data"), "--run", str(run)]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES")}
    local = subprocess.run(base, cwd=ROOT, env={**env, "CUDA_VISIBLE_DEVICES": "0"}, capture_output=True, text=True)
    assert local.returncode == 2
    _assert_says_why_and_what_to_install(_one_error_line(local.stderr), "CUDA_VISIBLE_DEVICES=0")
    ray = subprocess.run(
        [*base, "--backend", "ray", "--gpus-per-worker", "1"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert ray.returncode == 2
    _assert_says_why_and_what_to_install(_one_error_line(ray.stderr), "--gpus-per-worker 1")
    assert not run.exists()
    # what hides GPUs is no request (Ray's CPU workers get CUDA_VISIBLE_DEVICES="")
    for hidden in ("", "-1", "NoDevFiles"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert requested_by_environment() is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert requested_by_environment() == "CUDA_VISIBLE_DEVICES=2,3"
    with pytest.raises(GpuUnavailable, match="asks for GPUs"):
        require_cuda("CUDA_VISIBLE_DEVICES=2,3", 2)


def test_accelerate_with_gpus_named_but_unusable_stops(data_uri, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    run = tmp_path / "run"
    accelerate = str(Path(sys.executable).parent / "accelerate")
    command = [accelerate, "launch", "--num_processes", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["jobs/train.py", "--config", "configs/tiny.yaml", "--backend", "accelerate", "--stage", "visual_ae"]
    command += ["--data", data_uri, "--run", str(run), *[a for s in SMALL for a in ("--set", s)]]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    done = subprocess.run(
        command, cwd=ROOT, env={**env, "CUDA_VISIBLE_DEVICES": "0"}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    _assert_says_why_and_what_to_install(_one_error_line(done.stderr, True), "CUDA_VISIBLE_DEVICES=0")
    assert not run.exists()


def test_slurm_script_refuses_gpus_it_cannot_use(tmp_path):
    """slurm/train_gate.sh in an allocation with GPUs (SLURM_GPUS_ON_NODE) that torch cannot use:
    one line and exit 2 before anything is launched (it used to train on the CPU instead)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    env = dict(
        os.environ,
        SLURM_JOB_ID="4242",
        SLURM_GPUS_ON_NODE="4",
        SLURM_JOB_NODELIST="node1",
        SLURM_CPUS_PER_TASK="8",
        ACCELERATE=str(ROOT / ".venv/bin/accelerate"),
        PATH="/usr/bin:/bin",
    )
    done = subprocess.run(
        ["bash", "slurm/train_gate.sh", str(tmp_path / "data"), str(tmp_path / "run")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    _assert_says_why_and_what_to_install(_one_error_line(done.stderr), "SLURM_GPUS_ON_NODE=4 (sbatch --gpus-per-node)")
    assert "accelerate" not in done.stdout  # nothing was launched


# ----------------------------------------------------------------------- 4. mixed precision


def test_fp32_islands_under_bf16_autocast_on_cpu():
    """GRU, both LSTMs, the warp head (a fresh one stays exactly the copy head) and InfoNCE run in
    fp32 inside bf16 autocast; the sequence model and its loss (gate config: warp head,
    cross-modal InfoNCE) run and backpropagate under CPU autocast."""
    config = small_config(base="gate")
    assert config.model.image_head == "warp" and config.loss.cross_modal_infonce > 0
    assert step_audit.audit_dtypes(config, TOKENS, torch.device("cpu")) == {}


def test_the_dtype_audit_sees_what_autocast_does_without_the_islands(monkeypatch):
    """The audit can fail: with the GRU's fp32 island removed it reports the GRU's bf16 output, and
    with the warp head's removed, at 60x125 a fresh warp head warps (bf16 sampling coordinates)."""
    import storymm.models.sequence as sequence
    from storymm.models.motion import MotionWarp

    monkeypatch.setattr(sequence, "run_fp32", lambda module, *inputs: module(*inputs))
    monkeypatch.setattr(MotionWarp, "forward", MotionWarp._warp)
    problems = step_audit.audit_dtypes(small_config(base="gate"), TOKENS, torch.device("cpu"))
    assert problems["gru output"] == "torch.bfloat16" and set(problems) == {"gru output", "warp coordinates"}
    assert problems["warp coordinates"].startswith("the fresh warp head differs under autocast")


def test_text_autoencoder_trains_under_cpu_autocast(data_uri, tmp_path):
    """Its LSTMs used to run in bf16 under autocast (oneDNN has no bf16 LSTM on most CPUs: it failed)."""
    run = str(tmp_path / "text")
    config = small_config(
        "train.mixed_precision=bf16", "train.autocast_on_cpu=true", "train.text_ae.steps=2", "train.text_ae.log_every=2"
    )
    train(config, "text_ae", data_uri, run, progress=False)
    assert torch.isfinite(torch.tensor(loop.read_metrics(run)[-1]["total"]))


# ------------------------------------------------------------------------------ 5. host syncs


@pytest.mark.parametrize("stage", ["sequence", "visual_ae", "text_ae"])
def test_a_gate_config_step_has_no_host_sync(stage):
    """One step of the gate config at its real sizes (60x125, BERT vocabulary, warp head) on the
    meta device: nothing is read back to the host, no blocking host-to-device copy."""
    from storymm.config import load_config

    config = load_config(ROOT / "configs/gate.yaml")
    result = step_audit.audit_syncs(config, TokenizerInfo(30522, 0, 101, 102), META, stage=stage)
    assert result.clean, result.syncs


def test_the_sync_audit_sees_reads_and_blocking_copies(monkeypatch):
    """The audit can fail: lengths counted from device tokens (a read back), and a constant copied
    from the host at every call (a blocking copy) are both reported where they happen."""
    import storymm.models.motion as motion
    import storymm.training.losses as losses

    config = small_config()
    batch = {k: v for k, v in step_audit.example_batch(config, TOKENS).items() if k not in HOST_KEYS}
    result = step_audit.audit_syncs(config, TOKENS, META, batch=batch)
    assert any("reads a value back" in s and "models/text.py" in s for s in result.syncs), result.syncs
    copy = lambda values, dtype, device: torch.tensor(values, dtype=dtype).to(device)  # noqa: E731 - the old way
    monkeypatch.setattr(losses, "device_constant", copy)
    monkeypatch.setattr(motion, "device_constant", copy)
    result = step_audit.audit_syncs(config, TOKENS, META)
    where = " ".join(result.syncs)
    assert "blocking host-to-device" in where and "training/losses.py" in where and "models/motion.py" in where


# --------------------------------------------------------------------- 6. feeding the device


def test_uint8_batches_become_the_same_floats_on_the_device(data_uri):
    common = dict(batch_size=4, context_frames=4, max_tokens=20, shuffle=True, seed=1, shuffle_buffer=16)
    floats = next(iter(WindowLoader(data_uri, "train", **common)))
    raw = next(iter(WindowLoader(data_uri, "train", uint8_pixels=True, **common)))
    assert raw["frames"].dtype == torch.uint8 and raw["frames"].nbytes * 4 == floats["frames"].nbytes
    moved = to_device(raw, torch.device("cpu"))
    for key in floats:
        assert torch.equal(moved[key], floats[key]), key  # bit-identical: CPU results do not change
    pad = TOKENS_OF(data_uri).pad_id
    assert torch.equal(floats["token_lengths"], (floats["tokens"] != pad).sum(-1).clamp(min=1))
    on_device = to_device(raw, META)
    assert on_device["frames"].device == META and on_device["frames"].dtype == torch.float32
    assert all(on_device[key].device.type == "cpu" for key in HOST_KEYS)  # packing reads them on the host


def test_threads_per_process_come_from_the_allocation(monkeypatch):
    for name in ("STORYMM_TORCH_THREADS", "SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    cpus = len(os.sched_getaffinity(0))
    assert threads_per_process() == cpus
    assert threads_per_process(cpus=8, processes=2) == 4 and threads_per_process(cpus=1, processes=4) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cpus))  # accelerate launch / torchrun: processes on this node
    assert threads_per_process() == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert threads_per_process(processes=1) == 1
    monkeypatch.setenv("STORYMM_TORCH_THREADS", "3")
    assert threads_per_process() == 3


def test_gpu_workers_and_tune_trials_ask_for_gpus_and_cpus():
    assert worker_resources(0) == {"CPU": 1.0}
    assert worker_resources(1) == {"CPU": float(GPU_WORKER_CPUS), "GPU": 1.0} and GPU_WORKER_CPUS > 1
    assert worker_resources(1, cpus=8) == {"CPU": 8.0, "GPU": 1.0}
    assert trial_resources({"CPU": 16.0}) == {"cpu": 1, "gpu": 0.0}
    assert trial_resources({"CPU": 16.0, "GPU": 2.0}) == {"cpu": GPU_TRIAL_CPUS, "gpu": 1.0}  # the cluster's GPUs
    assert trial_resources({"CPU": 16.0, "GPU": 2.0}, gpus_per_trial=0) == {"cpu": 1, "gpu": 0.0}


# ------------------------------------------------------------------------ the check script


@pytest.mark.slow
def test_gpu_check_script_passes_on_cpu(tmp_path):
    """`bench/gpu_check.sh --cpu`: every step the GPU check has, on the CPU at tiny sizes, passes and
    the summary table says so (CI keeps the script working for the first GPU)."""
    started = time.monotonic()
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--cpu", "--out", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(f"gpu_check.sh --cpu: {time.monotonic() - started:.0f} s")
    assert done.returncode == 0, (
        done.stdout[-4000:] + done.stderr[-2000:] + (tmp_path / "gpu_check.log").read_text()[-4000:]
    )
    table = (tmp_path / "gpu_check.md").read_text()
    steps = [
        "versions",
        "data",
        "dtypes-bf16",
        "cuda-rng",
        "host-syncs",
        "train-6",
        "resume-9",
        "accelerate-sigusr1",
        "evaluate",
        "export-predict",
        "train-step-bench",
    ]
    for name in steps:
        assert f"| {name} | PASS |" in table, table
    assert "11 of 11 steps passed" in table
    assert "| host-syncs | PASS |" in table and "0 host syncs" in table
    assert "resumed from step 6" in table and "stopped at step" in table
