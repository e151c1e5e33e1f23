"""Backend selection: the same ``loop.train`` in-process, under Ray Train, or under Accelerate."""

from __future__ import annotations

from storymm.config import Config
from storymm.training.loop import train
from storymm.training.runtime import Runtime

BACKENDS = ("local", "ray", "accelerate")


def run_training(
    config: Config,
    stage: str,
    data_uri: str,
    run_uri: str,
    *,
    backend: str = "local",
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    init_from: list[str] | tuple[str, ...] = (),
    progress: bool = True,
) -> dict:
    """Train one stage with the chosen backend; returns the loop's summary (from rank 0)."""
    if backend == "local":
        runtime = Runtime.from_environment(config.train.mixed_precision)
        return train(config, stage, data_uri, run_uri, runtime, init_from, progress)
    if backend == "ray":
        from storymm.training.ray_backend import run_ray

        return run_ray(config, stage, data_uri, run_uri, workers=workers, gpus_per_worker=gpus_per_worker,
                       init_from=init_from, progress=progress)
    if backend == "accelerate":
        from storymm.training.accelerate_backend import run_accelerate

        return run_accelerate(config, stage, data_uri, run_uri, init_from=init_from, progress=progress)
    raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
