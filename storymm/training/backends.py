"""Backend selection: the same ``loop.train`` in-process, under Ray Train, or under Accelerate."""

from __future__ import annotations

from collections.abc import Callable

from storymm import storage
from storymm.config import Config
from storymm.training.loop import TrainingError, train
from storymm.training.runtime import Runtime
from storymm.training.stages import STAGES
from storymm.training.watchdog import process_group_timeout

BACKENDS = ("local", "ray", "accelerate")


def run_training(
    config: Config,
    stage: str,
    data_uri: str,
    run_uri: str,
    *,
    backend: str = "local",
    workers: int | tuple[int, int] = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float | None = None,
    init_from: list[str] | tuple[str, ...] = (),
    progress: bool = True,
) -> dict:
    """Train one stage with the chosen backend; returns the loop's summary (from rank 0)."""
    if isinstance(workers, tuple) and backend != "ray":
        raise ValueError(f"--workers MIN-MAX (elastic) is a Ray backend option, not {backend!r}")
    if backend == "local":
        runtime = Runtime.from_environment(
            config.train.mixed_precision, config.train.autocast_on_cpu, process_group_timeout(config.train)
        )
        return train(config, stage, data_uri, run_uri, runtime, init_from, progress)
    if backend == "ray":
        from storymm.training.ray_backend import run_ray

        return run_ray(
            config,
            stage,
            data_uri,
            run_uri,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            cpus_per_worker=cpus_per_worker,
            init_from=init_from,
            progress=progress,
        )
    if backend == "accelerate":
        from storymm.training.accelerate_backend import run_accelerate

        return run_accelerate(config, stage, data_uri, run_uri, init_from=init_from, progress=progress)
    raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")


def train_stages(
    config: Config,
    data_uri: str,
    runs: dict[str, str],
    *,
    backend: str = "local",
    workers: int = 1,
    progress: bool = True,
    announce: Callable[[str, str], None] = lambda stage, run_uri: None,
) -> None:
    """Train ``visual_ae``, ``text_ae``, then ``sequence`` started from them, into ``runs[stage]``.

    Each stage resumes where it stopped, so rerunning after an interruption continues; a stage
    that ends without completing (stopped by a signal) raises instead of training on top of it.
    """
    for stage in STAGES:
        announce(stage, runs[stage])
        init = [runs["visual_ae"], runs["text_ae"]] if stage == "sequence" else []
        summary = run_training(
            config, stage, data_uri, runs[stage], backend=backend, workers=workers, init_from=init, progress=progress
        )
        if summary.get("status") not in ("completed", None):
            raise TrainingError(
                f"{stage} run {storage.redact(runs[stage])} did not complete ({summary.get('status')}); rerun to resume"
            )
