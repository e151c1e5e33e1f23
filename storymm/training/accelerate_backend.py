"""Accelerate backend: the shared training loop inside a process started by ``accelerate launch``.

One process per GPU (or per CPU slot when there is none); ``accelerate launch`` (directly or from
``slurm/train_gate.sh`` under ``srun``) starts them and sets the rendezvous variables. Each process
calls :func:`run_accelerate`, which builds an :class:`accelerate.Accelerator` and hands the loop of
``loop.py`` a :class:`AccelerateRuntime`: DDP via ``accelerator.prepare``, ``accelerator.backward``,
``accelerator.autocast`` and ``torch.distributed`` collectives on the group Accelerate created.

Stopping early (SLURM's warning signal before the time limit, preemption, ``scancel --signal=USR1``):
SIGUSR1 or SIGTERM received by *any* rank sets a flag; ``should_stop`` combines the flags of all
ranks with an all-reduce (MAX) after every step, so every rank leaves the loop at the same step, the
loop saves a checkpoint with status ``stopped`` and returns. ``storymm train`` then exits with
``EXIT_STOPPED`` and the job script requeues the job; the requeued run resumes from ``latest``.

On CPU: launch with ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N`` (the
obvious ``--cpu`` flag silently starts ONE process); ``Accelerator(cpu=True)`` then uses gloo.
"""

from __future__ import annotations

import logging
import os
import signal

import torch
import torch.distributed as dist

from storymm.config import Config
from storymm.training.devices import requested_by_environment, require_cuda, threads_per_process
from storymm.training.loop import train
from storymm.training.phases import Phase
from storymm.training.runtime import Runtime, effective_precision
from storymm.training.watchdog import process_group_timeout

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
STOP_CHECK_EVERY_GPU = 10


class AccelerateRuntime(Runtime):
    """The loop's runtime interface mapped onto an ``Accelerator``."""

    def __init__(self, accelerator):
        state = accelerator.state
        super().__init__(
            rank=state.process_index,
            world_size=state.num_processes,
            local_rank=state.local_process_index,
            device=accelerator.device,
            mixed_precision=str(accelerator.mixed_precision),
            name="accelerate",
        )
        self.accelerator = accelerator
        self._signalled: int | None = None  # the signal number this process received, if any
        self._previous_handlers: dict = {}
        self._stop_calls = 0

    # ------------------------------------------------------------------------ signals

    def install_signal_handlers(self) -> None:
        """Remember SIGUSR1/SIGTERM instead of dying; the loop stops at the next step boundary."""

        def remember(signum, frame):  # noqa: ARG001 - signal handler signature
            if self._signalled is None:
                log.warning("rank %d: received %s; stopping after this step", self.rank, signal.Signals(signum).name)
            self._signalled = signum

        for signum in STOP_SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, remember)

    def restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers.clear()

    def should_stop(self) -> bool:
        # Called once per step on every rank; combining the flags makes all ranks stop at the same
        # step. On a GPU the combination waits for the step's kernels (a host sync), so it runs
        # every STOP_CHECK_EVERY_GPU calls only: the warning signal comes minutes before the end.
        self._stop_calls += 1
        if self.device.type == "cuda" and self._stop_calls % STOP_CHECK_EVERY_GPU:
            return False
        flag = torch.tensor([1 if self._signalled is not None else 0], dtype=torch.int32)
        if self.distributed:
            with self.phases.within(Phase.COLLECTIVE):
                flag = flag.to(self.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ------------------------------------------------------------------ model and optimisation

    def prepare_model(self, model: torch.nn.Module, find_unused: bool = False) -> torch.nn.Module:
        self.accelerator.ddp_handler.find_unused_parameters = find_unused  # see Runtime.prepare_model
        return self.accelerator.prepare(model)  # moves to the device; DDP when world_size > 1

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def autocast(self):
        return self.accelerator.autocast()

    # ------------------------------------------------------------------------ collectives

    def barrier(self) -> None:
        if self.distributed:
            with self.phases.within(Phase.COLLECTIVE):
                self.accelerator.wait_for_everyone()


def make_accelerator(config: Config):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    precision = effective_precision(
        config.train.mixed_precision, "cuda" if cuda else "cpu", config.train.autocast_on_cpu
    )
    handlers = [
        DistributedDataParallelKwargs(),  # find_unused_parameters is set per model (prepare_model)
        InitProcessGroupKwargs(timeout=process_group_timeout(config.train)),  # see watchdog.py
    ]
    return Accelerator(cpu=not cuda, mixed_precision=precision, kwargs_handlers=handlers)


def run_accelerate(
    config: Config,
    stage: str,
    data_uri: str,
    run_uri: str,
    *,
    init_from: list[str] | tuple[str, ...] = (),
    progress: bool = True,
) -> dict:
    """Train ``stage`` in this process as one rank of an ``accelerate launch`` group.

    Returns the loop's summary (the same on every rank); ``status`` is ``stopped`` when a rank
    received SIGUSR1/SIGTERM, after a checkpoint of the stopping step was written.
    """
    # GPUs named for this process but unusable (old driver, CPU-only torch): stop, never train on the
    # CPU instead. ACCELERATE_USE_CPU=true is the explicit request for CPU processes.
    asked = requested_by_environment()
    if asked and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes"):
        require_cuda(asked)
    # The node's CPUs shared by its processes (accelerate launch sets OMP_NUM_THREADS=1 for GPU runs)
    torch.set_num_threads(threads_per_process())
    accelerator = make_accelerator(config)
    runtime = AccelerateRuntime(accelerator)
    log.info(
        "accelerate rank %d/%d (local %d) on %s, %s, mixed precision %s, %d torch threads",
        runtime.rank,
        runtime.world_size,
        runtime.local_rank,
        runtime.device,
        accelerator.distributed_type,
        runtime.mixed_precision,
        torch.get_num_threads(),
    )
    runtime.install_signal_handlers()
    try:
        return train(config, stage, data_uri, run_uri, runtime, init_from, progress)
    finally:
        runtime.restore_signal_handlers()
