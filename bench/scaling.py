"""Data-parallel scaling on this machine: steady-state samples/s of the same tiny sequence training
in-process (the reference), under Accelerate with 1 and 2 processes and under Ray Train with 1 and 2
workers, all in one run, plus the all-reduce volume per step that a multi-node projection needs.

Each variant is a real ``storymm train`` (or ``accelerate launch jobs/train.py``) process tree; the
rate is the mean ``samples_per_s`` the loop logs to the run's metrics log (global samples per second,
first logging window dropped so start-up and worker-group creation are excluded). Every process is
pinned to one torch thread so 2 processes on 2 cores compare fairly with 1 process on 1 core.

    python bench/scaling.py [--steps 60] [--variants local,accelerate1,accelerate2,ray1,ray2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(PY).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_args(data: str, run: str, steps: int, log_every: int) -> list[str]:
    sets = [
        f"train.sequence.steps={steps}",
        f"train.sequence.log_every={log_every}",
        "train.sequence.checkpoint_every=100000",
        "data.batch_size=16",
    ]
    return [
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--stage",
        "sequence",
        "--data",
        data,
        "--run",
        run,
        *[a for s in sets for a in ("--set", s)],
    ]


def command(variant: str, data: str, run: str, steps: int, log_every: int) -> tuple[list[str], dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = _train_args(data, run, steps, log_every)
    if variant == "local":
        return [PY, "-m", "storymm.cli", "train", *args, "--backend", "local"], env
    if variant.startswith("accelerate"):
        procs = int(variant[-1])
        env["ACCELERATE_USE_CPU"] = "true"
        launch = [
            str(BIN / "accelerate"),
            "launch",
            "--num_processes",
            str(procs),
            "--num_machines",
            "1",
            "--main_process_port",
            str(_free_port()),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
        launch += ["--multi_gpu"] if procs > 1 else ["--cpu"]
        return [*launch, str(ROOT / "jobs/train.py"), *args, "--backend", "accelerate"], env
    if variant.startswith("ray"):
        env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        return [PY, "-m", "storymm.cli", "train", *args, "--backend", "ray", "--workers", variant[-1]], env
    raise ValueError(variant)


def steady_rate(run: str) -> tuple[float, int]:
    sys.path.insert(0, str(ROOT))
    from storymm.training.run import read_metrics

    lines = read_metrics(run)
    rates = [m["samples_per_s"] for m in lines][1:]
    world = json.loads(Path(run, "run.json").read_text())["world_size"]
    return sum(rates) / len(rates), world


def allreduce_bytes(data: str) -> int:
    """Bytes of gradients one DDP step all-reduces (fp32, every trainable parameter)."""
    from storymm.config import load_config
    from storymm.data.loader import PreparedDataset
    from storymm.training.stages import TokenizerInfo, build_model

    config = load_config(ROOT / "configs/tiny.yaml")
    model = build_model("sequence", config, TokenizerInfo.from_manifest(PreparedDataset(data).manifest))
    return 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--variants", default="local,accelerate1,accelerate2,ray1,ray2")
    parser.add_argument("--stories", type=int, default=200)
    args = parser.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="storymm-bench-scaling-")
    source, data = os.path.join(scratch, "source"), os.path.join(scratch, "data")
    subprocess.run(
        [PY, "-m", "storymm.cli", "synth", "--out", source, "--stories", str(args.stories)],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    subprocess.run(
        [
            PY,
            "-m",
            "storymm.cli",
            "prepare",
            "--source",
            source,
            "--out",
            data,
            "--config",
            str(ROOT / "configs/tiny.yaml"),
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    log_every = max(5, args.steps // 6)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, no GPU; tiny config, batch 16 per worker, "
        f"1 torch thread per process, {args.steps} steps"
    )
    results = {}
    for variant in args.variants.split(","):
        run = os.path.join(scratch, f"run-{variant}")
        cmd, env = command(variant, data, run, args.steps, log_every)
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            print(f"{variant:12s} FAILED (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
            continue
        rate, world = steady_rate(run)
        results[variant] = rate
        ratio = rate / results["local"] if "local" in results else float("nan")
        print(
            f"{variant:12s} world {world}: {rate:8.1f} samples/s  x{ratio:.2f} vs in-process  "
            f"(wall {wall:.0f} s incl. start-up)"
        )
    grad_bytes = allreduce_bytes(data)
    print(f"all-reduce per step: {grad_bytes / 1e6:.2f} MB of fp32 gradients (tiny config)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
