"""Ray Train backend: the shared training loop (``loop.train``) on a ``TorchTrainer`` worker group.

Ray owns the processes, the torch process group (gloo on CPU, nccl on GPU), restarts after a lost
worker (``FailureConfig``) and its own progress tracking (``ray.train.report``). storymm's own
checkpoints (``<run>/checkpoints/`` and the ``latest`` marker) stay the source of truth: when Ray
restarts the worker group, ``train()`` runs again from the top and resumes from ``latest``, exactly
as a rerun of the command would. What Ray keeps under ``<run>/ray/`` (its run state and tiny
checkpoint folders that name the storymm checkpoint) is bookkeeping only.

Ray Train v2 is the default (``RAY_TRAIN_V2_ENABLED=0`` selects v1): only v2 trains elastically,
``--workers MIN-MAX``: after a lost node the group restarts from the latest checkpoint with the
workers that still fit, and grows again when nodes join.

Every start of the worker group (the first and each restart) is a new attempt of the loop, which
appends a line to ``<run>/attempts.jsonl`` (attempt number, the step it restored, world size, each
rank's hostname and Ray node id), so a restart after a failure, and where workers ran, can be checked.

A frozen worker (alive, no progress) is ended by storymm's progress watchdog (``watchdog.py``) on the
ranks that wait for it; Ray Train then restarts the group, as after any lost worker. Ray's own check
of a frozen worker (``RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S``) takes 10 minutes by default.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile

import torch

from storymm import storage
from storymm.config import Config, config_from_dict
from storymm.training import checkpoint
from storymm.training.devices import GpuUnavailable, require_cuda, threads_per_process
from storymm.training.loop import TrainingError
from storymm.training.run import RunFolder
from storymm.training.runtime import Runtime, effective_precision
from storymm.training.watchdog import process_group_timeout

log = logging.getLogger(__name__)

RAY_DIR = "ray"
RAY_RUN_NAME = "train"
POINTER_FILE = "storymm_checkpoint.json"
MAX_FAILURES_ENV = "STORYMM_RAY_MAX_FAILURES"
DEFAULT_MAX_FAILURES = 3
#: CPUs a GPU worker asks for by default (``--cpus-per-worker``): the loader's prefetch and pinning
#: threads and the torch threads feeding the GPU; a CPU worker takes 1 (one process per core).
GPU_WORKER_CPUS = 4
GPU_PROBE_TIMEOUT_S = 120


class RayBackendError(TrainingError):
    pass


TRAIN_V2_ENV = "RAY_TRAIN_V2_ENABLED"
RESIZE_INTERVAL_ENV = "STORYMM_RAY_RESIZE_INTERVAL_S"
# Ray Train v2 (the default) hands each ray.train.report to its controller through a queue of size
# one that the controller drains when it polls the workers, every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
# (Ray's default 2 s): a worker reporting more often than that blocks until the next poll. With a
# report every 10 steps of a fast model that held training to one report per 2 s (-45% steps/s,
# bench/ray_overhead.py). Polling every 0.25 s costs little and also notices failures sooner.
# Overridable from the environment; Ray propagates RAY_TRAIN_* from the driver to the controller.
V2_DEFAULTS = {
    TRAIN_V2_ENV: "1",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
}


def _import_ray():
    for name, value in V2_DEFAULTS.items():
        os.environ.setdefault(name, value)
    try:
        import ray
        import ray.train  # noqa: F401
        import ray.train.torch  # noqa: F401
    except ImportError as err:
        raise RayBackendError(f"--backend ray needs Ray Train: pip install 'ray[default,train,tune]' ({err})") from None
    return ray


def train_v2() -> bool:
    return os.environ.get(TRAIN_V2_ENV, "1") != "0"


def parse_workers(text: str | int | tuple[int, int]) -> int | tuple[int, int]:
    """``--workers N`` (fixed) or ``MIN-MAX`` (elastic, Ray Train v2): 1 <= MIN <= MAX."""
    if isinstance(text, (int, tuple)):
        workers: int | tuple[int, int] = text if isinstance(text, int) else (int(text[0]), int(text[1]))
    else:
        low, sep, high = str(text).partition("-")
        try:
            workers = (int(low), int(high)) if sep else int(low)
        except ValueError:
            raise ValueError(f"--workers takes N or MIN-MAX, got {text!r}") from None
    lowest = workers[0] if isinstance(workers, tuple) else workers
    if lowest < 1 or (isinstance(workers, tuple) and workers[1] < workers[0]):
        raise ValueError(f"--workers takes N >= 1 or MIN-MAX with 1 <= MIN <= MAX, got {text!r}")
    if isinstance(workers, tuple) and workers[0] == workers[1]:
        return workers[0]
    return workers


def ensure_ray(ray) -> None:
    """Connect to a running cluster when ``RAY_ADDRESS`` is set, else start a local one."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    # A job started by `ray job submit` runs with RAY_ADDRESS set to its cluster.
    ray.init(address="auto" if address else None, log_to_driver=True)


# Ray Tune (and Ray Train v1, which runs on Tune) copies these from the driver's environment into
# every trial actor's runtime_env; Ray logs runtime envs in each node's runtime_env_agent.log and
# keeps them in the GCS actor table (dashboard). Workers need no copy: they inherit the node's own
# environment (or role), which is where credentials belong on a cluster (README, "Storage and S3").
CREDENTIAL_VARS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"})


def _keep_credentials_out_of_runtime_envs() -> None:
    try:
        from ray.tune.execution import class_cache
    except ImportError:  # a Ray without Tune's trial-actor cache has nothing to copy them
        return
    propagated = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if propagated is not None and CREDENTIAL_VARS & set(propagated):
        class_cache.ENV_VARS_TO_PROPAGATE = set(propagated) - CREDENTIAL_VARS


def ray_storage(run_uri: str, folder: str = RAY_DIR) -> tuple[str, object | None]:
    """(storage_path, storage_filesystem) for Ray's own files under ``<run>/<folder>``.

    Ray Train and Tune pickle the filesystem into ``trainer.pkl``/``tuner.pkl`` and experiment
    state there, so it is storymm's S3 filesystem, which carries endpoint, scheme and region but no
    credentials (``storage.s3_filesystem``): the driver and every worker resolve their own from the
    environment at use. Tune is also stopped from copying the driver's AWS keys into runtime envs."""
    _keep_credentials_out_of_runtime_envs()
    location = storage.locate(storage.join(run_uri, folder))
    if storage.is_remote(run_uri):
        return location.path, location.fs
    os.makedirs(location.path, exist_ok=True)
    return location.path, None


class RayRuntime(Runtime):
    """A worker of a ``TorchTrainer``: rank and world size from ``ray.train.get_context()``,
    collectives over the process group Ray created, progress reported to Ray Train."""

    @classmethod
    def from_ray_context(
        cls,
        mixed_precision: str = "no",
        cpu_autocast: bool = False,
        gpus_per_worker: float = 0.0,
        planned_world_size: int = 0,
    ) -> RayRuntime:
        """This worker's rank, device and precision; torch threads = the CPUs Ray gave it
        (``STORYMM_TORCH_THREADS`` overrides). A worker given GPUs that CUDA cannot use stops here
        with the reason instead of training on its CPU."""
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        device = ray.train.torch.get_device()
        if gpus_per_worker and device.type != "cuda":
            require_cuda(f"--gpus-per-worker {gpus_per_worker:g}")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.set_num_threads(threads_per_process(cpus=assigned_cpus(), processes=1))
        return cls(
            rank=context.get_world_rank(),
            world_size=context.get_world_size(),
            planned_world_size=planned_world_size,
            local_rank=context.get_local_rank(),
            device=device,
            mixed_precision=effective_precision(mixed_precision, device.type, cpu_autocast),
            name="ray",
        )

    def node_id(self) -> str | None:
        import ray

        return ray.get_runtime_context().get_node_id()

    def report(self, metrics: dict, checkpoint_uri: str | None = None) -> None:
        # Every rank calls this the same number of times (the loop calls it on all ranks), which
        # ray.train.report requires: it is a barrier across the worker group.
        import ray.train

        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if "total" in clean:
            clean["loss"] = clean["total"]
        if checkpoint_uri is None or not self.is_main:
            ray.train.report(clean)
            return
        # the checkpoint was published (it is written in the background), possibly some steps ago
        step = checkpoint.step_of(checkpoint_uri)
        with tempfile.TemporaryDirectory(prefix="storymm-ray-ckpt-") as folder:
            with open(os.path.join(folder, POINTER_FILE), "w") as handle:
                json.dump({"checkpoint": storage.redact(checkpoint_uri), "step": step}, handle)
            ray.train.report(
                clean,
                checkpoint=ray.train.Checkpoint.from_directory(folder),
                checkpoint_dir_name=f"checkpoint-step-{step:08d}",
            )


def assigned_cpus() -> float | None:
    """The CPUs Ray reserved for this task or actor; None outside one (then: the process's allocation)."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        resources = ray.get_runtime_context().get_assigned_resources()
    except AssertionError:  # Ray's way of saying "this is the driver, not a task or actor"
        return None
    return resources.get("CPU") or None


def _gpu_probe(asked: str) -> str | None:
    """Runs on a GPU slot of the cluster: None when CUDA is usable there, else the one-line reason."""
    try:
        require_cuda(asked)
    except GpuUnavailable as err:
        return f"{err} (Ray node {socket.gethostname()})"
    return None


def check_gpu_workers(ray, gpus: float, asked: str) -> None:
    """Before any worker starts: when ``gpus`` per worker were asked for, one probe task with that
    GPU request checks that CUDA works where Ray places it; a failure stops the run with one line
    (instead of every worker failing, and Ray restarting them ``max_failures`` times). A cluster
    with no such GPU yet (an autoscaler adds GPU nodes on demand) is not probed: the workers check."""
    if not gpus:
        return
    if ray.cluster_resources().get("GPU", 0.0) < gpus:
        log.warning("%s, but the Ray cluster has no such GPU now: waiting for GPU nodes to join", asked)
        return
    from ray.exceptions import GetTimeoutError

    probe = ray.remote(num_gpus=gpus, num_cpus=0)(_gpu_probe)
    try:
        problem = ray.get(probe.remote(asked), timeout=GPU_PROBE_TIMEOUT_S)
    except GetTimeoutError:
        log.warning("%s: no GPU free for %d s to check CUDA on; the workers will check", asked, GPU_PROBE_TIMEOUT_S)
        return
    if problem:
        raise GpuUnavailable(problem)


def _train_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker (and again on each worker-group restart)."""
    from storymm.training.loop import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_dict(loop_config["config"])
    runtime = RayRuntime.from_ray_context(
        config.train.mixed_precision,
        config.train.autocast_on_cpu,
        loop_config.get("gpus_per_worker", 0.0),
        loop_config.get("planned_workers", 0),
    )
    summary = train(
        config,
        loop_config["stage"],
        loop_config["data_uri"],
        loop_config["run_uri"],
        runtime,
        loop_config["init_from"],
        loop_config["progress"],
    )
    if runtime.is_main:
        log.info("ray worker 0 finished: %s", summary)


def worker_resources(gpus: float, cpus: float | None = None) -> dict:
    """Ray resources of one training worker: ``cpus`` (default 1, ``GPU_WORKER_CPUS`` with GPUs) and ``gpus``."""
    resources = {"CPU": float(cpus if cpus is not None else (GPU_WORKER_CPUS if gpus else 1))}
    if gpus:
        resources["GPU"] = float(gpus)
    return resources


def run_ray(
    config: Config,
    stage: str,
    data_uri: str,
    run_uri: str,
    *,
    workers: int | tuple[int, int] | str = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float | None = None,
    init_from: list[str] | tuple[str, ...] = (),
    progress: bool = True,
    max_failures: int | None = None,
) -> dict:
    """Train ``stage`` on ``workers`` Ray Train workers, or on MIN..MAX workers (a ``(min, max)``
    tuple or ``"MIN-MAX"``: elastic, as many as the cluster has room for, resized after a lost node
    and when nodes join); returns the loop's summary (rank 0's view, read back from the run's
    checkpoint and metrics). ``cpus_per_worker``: default 1, ``GPU_WORKER_CPUS`` for GPU workers;
    each worker runs that many torch threads."""
    ray = _import_ray()
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    workers = parse_workers(workers)
    v2 = train_v2()
    if isinstance(workers, tuple) and not v2:
        raise RayBackendError(f"--workers {workers[0]}-{workers[1]} (elastic) needs Ray Train v2: unset {TRAIN_V2_ENV}")
    if max_failures is None:
        max_failures = int(os.environ.get(MAX_FAILURES_ENV, str(DEFAULT_MAX_FAILURES)))
    asked = f"--gpus-per-worker {gpus_per_worker:g}"
    if gpus_per_worker and not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        require_cuda(asked)  # the local Ray about to start gets this machine's GPUs: there must be some
    ensure_ray(ray)
    check_gpu_workers(ray, gpus_per_worker, asked)
    storage_path, filesystem = ray_storage(run_uri)
    use_gpu = gpus_per_worker > 0
    resources = worker_resources(gpus_per_worker, cpus_per_worker)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "config": config.to_dict(),
            "stage": stage,
            "data_uri": data_uri,
            "run_uri": run_uri,
            "init_from": list(init_from),
            "progress": progress,
            "gpus_per_worker": gpus_per_worker,
            # an elastic job's run is planned for its maximum, whatever number of workers starts it
            "planned_workers": workers[1] if isinstance(workers, tuple) else workers,
        },
        torch_config=TorchConfig(
            backend="nccl" if use_gpu else "gloo",
            timeout_s=int(process_group_timeout(config.train).total_seconds()),  # see watchdog.py
        ),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            # v2: how often a healthy elastic group checks whether more workers would fit now
            **(
                {"elastic_resize_monitor_interval_s": float(os.environ.get(RESIZE_INTERVAL_ENV, "60"))}
                if isinstance(workers, tuple)
                else {}
            ),
            # v1's trainer actor only coordinates; without this it holds a CPU of its own and
            # 2 workers never start on a 2-CPU machine
            **({} if v2 else {"trainer_resources": {"CPU": 0}}),
        ),
        run_config=RunConfig(
            name=RAY_RUN_NAME,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # v1 prints a metrics table per report; storymm's own progress bar and log say it all
            **({} if v2 else {"verbose": 0}),
        ),
    )
    log.info(
        "Ray Train %s: %s on %s worker(s)%s, run %s",
        "v2" if v2 else "v1",
        stage,
        "-".join(map(str, workers)) if isinstance(workers, tuple) else workers,
        f", {gpus_per_worker:g} GPU and {resources['CPU']:g} CPUs each"
        if use_gpu
        else f" ({resources['CPU']:g} CPU each, gloo)",
        storage.redact(run_uri),
    )
    try:
        trainer.fit()
    except Exception as err:  # TrainingFailedError and friends: keep the message, drop Ray's wrapping
        raise RayBackendError(f"Ray Train run failed for {storage.redact(run_uri)}: {err}") from err
    state = RunFolder(run_uri).load_latest(purpose="summarising")
    metrics = RunFolder(run_uri).read_metrics()
    step = int(state["step"]) if state else 0
    return {
        "stage": stage,
        "run": storage.redact(run_uri),
        "step": step,
        "status": state["status"] if state else "unknown",
        "metrics": metrics[-1] if metrics else {},
    }
