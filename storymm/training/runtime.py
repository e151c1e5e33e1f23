"""The small interface the training loop is written against, so Ray Train, Accelerate and a plain
process run the same loop. A backend only says who this process is, where tensors live, how a
model is wrapped for data parallelism, and how numbers are combined across processes.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.distributed as dist

from storymm.data import transfer
from storymm.training.devices import requested_by_environment, require_cuda
from storymm.training.phases import Phase, PhaseClock


def effective_precision(mixed_precision: str, device_type: str, cpu_autocast: bool = False) -> str:
    """The autocast a run really uses: the configured one on CUDA; on CPU bf16 only when asked
    (``train.autocast_on_cpu``: most CPUs run bf16 slower)."""
    if device_type == "cuda":
        return mixed_precision
    return "bf16" if cpu_autocast and mixed_precision == "bf16" else "no"


@dataclass
class Runtime:
    """In-process runtime: one process, or a torch.distributed group when launched by ``torchrun``
    (``WORLD_SIZE`` > 1 in the environment; gloo on CPU, nccl on GPU)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mixed_precision: str = "no"
    name: str = "local"
    #: the workers a run is planned for (an elastic Ray job's maximum; 0 = ``world_size``): a fresh
    #: run's global batch and partitions come from it, not from how many workers were free at its start
    planned_world_size: int = 0
    #: this rank's phase clock (``phases.py``): the loop marks phases, the collectives below mark theirs
    phases: PhaseClock = field(default_factory=PhaseClock, repr=False, compare=False)
    # checkpoints are written in the background while training goes on; a runtime whose report at a
    # checkpoint may end the process (Ray Tune's ASHA) waits for each to be published instead
    wait_for_checkpoints: ClassVar[bool] = False

    @classmethod
    def from_environment(
        cls, mixed_precision: str = "no", cpu_autocast: bool = False, timeout: datetime.timedelta | None = None
    ) -> Runtime:
        """A GPU (``cuda:LOCAL_RANK``) when torch has one, else the CPU; but never the CPU when the
        environment names GPUs (``CUDA_VISIBLE_DEVICES``) that torch cannot use: that stops with
        one line saying why (``devices.require_cuda``). ``timeout``: of the process group's operations
        (``watchdog.process_group_timeout``)."""
        asked = requested_by_environment()
        if asked:
            require_cuda(asked)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return cls(rank, world, local_rank, device, effective_precision(mixed_precision, device.type, cpu_autocast))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def node_id(self) -> str | None:
        """The scheduler's id of the node this rank runs on, where it has one (Ray)."""
        return None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    # ------------------------------------------------------------------ model and optimisation

    def prepare_model(self, model: torch.nn.Module, find_unused: bool = False) -> torch.nn.Module:
        """To the device; DDP when distributed. ``find_unused`` only for a model with trainable
        parameters the loss never reaches (``stages.unused_parameters``): DDP then walks the
        autograd graph after every forward to find them, which costs GPU throughput."""
        model = model.to(self.device)
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)
        return model

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.module if hasattr(model, "module") else model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def autocast(self):
        if self.mixed_precision == "bf16":  # on CPU only with train.autocast_on_cpu (effective_precision)
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, batch: dict) -> dict:
        """Tensors to the device, asynchronously (through pinned memory on CUDA), uint8 pixels made
        floats there, sentence lengths left on the host (``storymm.data.transfer``); on CPU nothing
        is copied."""
        return transfer.to_device(batch, self.device)

    def feed(self, batches):
        """The loader's batches for the step: on CUDA pinned in a background thread ahead of it."""
        return transfer.feed(batches, self.device)

    # ------------------------------------------------------------------------ collectives

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum in place across ranks. The loop hands CPU tensors; NCCL only reduces GPU ones."""
        if self.distributed:
            with self.phases.within(Phase.COLLECTIVE):
                on_device = tensor.to(self.device)
                dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
                if on_device is not tensor:
                    tensor.copy_(on_device)
        return tensor

    def all_gather_object(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        with self.phases.within(Phase.COLLECTIVE):
            dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            with self.phases.within(Phase.COLLECTIVE):
                dist.barrier()

    # ------------------------------------------------------------------------- reporting

    def report(self, metrics: dict, checkpoint_uri: str | None = None) -> None:
        """Hook for backends with their own metric/checkpoint tracking (Ray Train). ``checkpoint_uri``
        is a checkpoint published (complete, ``latest``) since the previous report, if any."""

    def should_stop(self) -> bool:
        """True when the scheduler asked us to stop (e.g. SLURM's warning signal): checkpoint and exit."""
        return False
