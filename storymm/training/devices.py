"""Which device a training process may use, and how many CPU threads it gets.

Why a module of its own: the pinned torch is a CUDA 13.0 build, which needs an NVIDIA driver >= 580.
On an older driver ``torch.cuda.is_available()`` is simply False, and every backend used to fall back
to the CPU without a word: a 4-GPU SLURM job would train on one CPU process per node for days. So
wherever GPUs were asked for (``sbatch --gpus-per-node``, ``--gpus-per-worker``, a
``CUDA_VISIBLE_DEVICES`` that names devices) and CUDA is unusable, :func:`require_cuda` stops with
one line that says why and what to install. ``python -m storymm.training.devices --require N`` is
the same check for shell scripts (``slurm/train_gate.sh``).

Threads: a process gets the CPUs of its allocation divided among the processes that share it
(:func:`threads_per_process`), not the ``OMP_NUM_THREADS=1`` that ``accelerate launch`` sets for
GPU processes, nor the machine's every core.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import warnings

import torch

from storymm.errors import UsageError

#: The smallest NVIDIA driver each CUDA major version of torch wheels runs on (CUDA's minor-version
#: compatibility; the cu12x wheels run on any 12.x-capable driver).
MIN_DRIVER = {"13": "580", "12": "525"}
INSTALL_HINT = (
    "install the torch wheels built for your driver, e.g. `pip install torch==2.14.1 torchvision==0.29.1 "
    "--index-url https://download.pytorch.org/whl/cu126` for drivers 525-579 (README: GPU drivers)"
)
THREADS_ENV = "STORYMM_TORCH_THREADS"
#: ``CUDA_VISIBLE_DEVICES`` values that hide every GPU instead of asking for one (Ray sets "" for
#: CPU workers; SLURM writes NoDevFiles when its GPU resource has no device files).
NO_DEVICES = {"", "-1", "none", "nodevfiles"}


class GpuUnavailable(UsageError):
    """GPUs were asked for but torch cannot use one here."""


def requested_by_environment() -> str | None:
    """``"CUDA_VISIBLE_DEVICES=0,1"`` when the environment names GPUs for this process, else None."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None or value.strip().lower() in NO_DEVICES:
        return None
    return f"CUDA_VISIBLE_DEVICES={value.strip()}"


def driver_version() -> str | None:
    """The NVIDIA driver version ``nvidia-smi`` reports, or None (no tool, no driver)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return lines[0] if out.returncode == 0 and lines else None


def usable_gpus() -> tuple[int, str | None]:
    """(GPUs torch can use, why not when none): the reason names the torch build, the driver it
    needs and what CUDA said, in one sentence."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count:
        return count, None
    build = torch.version.cuda
    if build is None:
        return 0, f"torch {torch.__version__} is a CPU-only build"
    needs = MIN_DRIVER.get(build.split(".")[0])
    said = next((str(w.message).splitlines()[0] for w in caught if "CUDA" in str(w.message)), "")
    driver = driver_version()
    reason = f"torch {torch.__version__} is built for CUDA {build}" + (f" (NVIDIA driver >= {needs})" if needs else "")
    reason += f" and finds no usable GPU (driver {driver})" if driver else " and finds no usable GPU"
    return 0, reason + (f": {said.rstrip('.')}" if said else "")


def require_cuda(asked: str, count: int = 1) -> int:
    """Stop with one line when ``asked`` (what asked for GPUs, e.g. ``--gpus-per-worker 1``) cannot
    be met: fewer than ``count`` usable GPUs. Returns the number of usable GPUs."""
    usable, why = usable_gpus()
    if usable >= count:
        return usable
    if usable:
        why = f"torch sees only {usable} GPU(s) of the {count} asked for"
    raise GpuUnavailable(f"{asked} asks for GPUs, but {why}; {INSTALL_HINT}, or ask for no GPU to train on the CPU")


# --------------------------------------------------------------------------------- threads


def allocated_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by SLURM's ``--cpus-per-task``."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(cpus, int(slurm)) if slurm.isdigit() and int(slurm) > 0 else cpus


def threads_per_process(cpus: float | None = None, processes: int | None = None) -> int:
    """Torch threads for one training process: ``STORYMM_TORCH_THREADS`` when set, else ``cpus``
    (default: :func:`allocated_cpus`) shared by ``processes`` (default: this node's processes,
    ``LOCAL_WORLD_SIZE`` as torchrun and ``accelerate launch`` set it), at least 1."""
    explicit = os.environ.get(THREADS_ENV, "")
    if explicit:
        return max(1, int(explicit))
    cpus = allocated_cpus() if cpus is None else cpus
    processes = processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, int(cpus) // max(1, processes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="exit 2 with one line when fewer GPUs are usable than asked for")
    parser.add_argument("--require", type=int, required=True, metavar="N", help="GPUs that must be usable")
    parser.add_argument("--asked", default=None, help="what asked for them, for the message")
    args = parser.parse_args(argv)
    try:
        usable = require_cuda(args.asked or f"{args.require} GPU(s)", args.require)
    except GpuUnavailable as err:
        print(f"storymm: error: {err}", file=sys.stderr)
        return 2
    print(usable)
    return 0


if __name__ == "__main__":
    sys.exit(main())
