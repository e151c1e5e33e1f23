"""``storymm tune``: a Ray Tune sweep where every trial is a real (short) training run of one stage.

Each trial runs the shared training loop (``loop.train``) in its own Ray worker process, with its
own run URI ``<runs>/<trial name>`` (checkpoints, the metrics log, ``run.json``, so a trial can
be inspected, evaluated or resumed like any other run). Its loss goes to Ray Tune at every logged
step; an ASHA scheduler stops the trials that fall behind at each rung. The results table (the
swept values, final loss, step reached, whether ASHA stopped it, run URI) is written to ``--out``
as ``tune.md`` and ``tune.json``.

``--stage all`` makes a trial the whole pipeline: it trains its own ``visual_ae`` and ``text_ae``
at the trial's values, then the sequence model started from them (``<runs>/<trial>/<stage>``), with
ASHA on the sequence loss. That is the sweep the second seed ran: a latent size is a property of the
autoencoder, so a sequence-only sweep from scratch cannot ask what a pretrained latent of that size
is worth.

With ``--evaluate`` (``sequence`` or ``all`` sweeps) every trial is then scored on the test split and
the trials are compared side by side with all metrics and floors (:func:`compare_trials`,
``OUT/compare.md``).

Trials run where the cluster's compute is: on a Ray cluster with GPUs each trial gets one
(``--gpus-per-trial``, default 1 there, 0 on a CPU-only cluster) and trains on it with the config's
mixed precision, like ``storymm train``; without, on CPUs in fp32 (bf16 with ``train.autocast_on_cpu``).
A trial's torch threads are the CPUs Ray gave it.

The grid defaults to the visual latent sizes the second seed compared (16/32/64/128); any config
key can be swept with ``--grid KEY=V1,V2,...`` (e.g. loss weights: ``--grid loss.gradient=0,0.1``).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import time

from storymm import storage
from storymm.config import Config, ConfigError, config_from_dict, parse_value, set_key
from storymm.errors import UsageError
from storymm.training.devices import require_cuda, threads_per_process
from storymm.training.run import RunFolder
from storymm.training.runtime import Runtime, effective_precision
from storymm.training.stages import STAGES

log = logging.getLogger(__name__)

DEFAULT_GRID = {"model.visual_latent": [16, 32, 64, 128]}
#: ``--stage all``: every trial trains the autoencoders it needs, then the sequence model.
ALL_STAGES = "all"
TABLE_MD = "tune.md"
TABLE_JSON = "tune.json"
#: CPUs a trial asks for: 1 on CPUs (one process per core), more beside a GPU to feed it.
TRIAL_CPUS = 1
GPU_TRIAL_CPUS = 4


def parse_grid(items: list[str] | tuple[str, ...]) -> dict[str, list]:
    """``["model.visual_latent=16,32", "loss.gradient=0,0.1"]`` -> ``{key: [values]}`` (YAML-typed)."""
    grid: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid expects KEY=V1,V2,..., got {item!r}")
        key, raw = item.split("=", 1)
        values = [parse_value(v, f"--grid {item}") for v in raw.split(",") if v.strip() != ""]
        if not key.strip() or not values:
            raise ConfigError(f"--grid expects KEY=V1,V2,..., got {item!r}")
        grid[key.strip()] = values
    return grid


def trial_config(base: dict, params: dict) -> Config:
    tree = copy.deepcopy(base)
    for key, value in params.items():
        set_key(tree, key, value, where="--grid")
    return config_from_dict(tree, source=f"--grid {', '.join(params)}")


def trial_name(params: dict) -> str:
    parts = [f"{key.split('.')[-1]}={value}" for key, value in sorted(params.items())]
    return storage.safe_name("-".join(parts), keep="._=-") if parts else "trial"


def trial_runs(runs_uri: str, params: dict, stage: str) -> dict[str, str]:
    """The run folder of each stage a trial trains: ``<runs>/<trial>``, or, for ``--stage all``,
    ``<runs>/<trial>/<stage>`` for all three stages."""
    folder = storage.join(runs_uri, trial_name(params))
    if stage == ALL_STAGES:
        return {name: storage.join(folder, name) for name in STAGES}
    return {stage: folder}


def scored_stage(stage: str) -> str:
    """The stage whose loss ASHA compares (and whose run ``--evaluate`` scores)."""
    return "sequence" if stage == ALL_STAGES else stage


class TuneRuntime(Runtime):
    """One process per trial; the loss of each logged step goes to Ray Tune (and ASHA)."""

    def __init__(self, checkpoint_every: int = 0, final_step: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self._last_step = -1
        self.checkpoint_every, self.final_step = checkpoint_every, final_step

    def report(self, metrics: dict, checkpoint_uri: str | None = None) -> None:
        from ray import tune

        step = int(metrics.get("step", -1)) if metrics else -1
        if step <= self._last_step:  # the loop reports again at a checkpoint of the same step
            return
        saving = step == self.final_step or (self.checkpoint_every and step % self.checkpoint_every == 0)
        if saving and checkpoint_uri is None:  # wait for the checkpoint: ASHA may stop the trial at this report
            return
        self._last_step = step
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        clean["loss"] = clean.get("total", float("nan"))
        tune.report(clean)


def trial_resources(cluster: dict, gpus_per_trial: float | None = None) -> dict:
    """Ray Tune resources of one trial: ``gpus_per_trial`` GPUs (default: 1 when ``cluster``, Ray's
    ``cluster_resources()``, has a GPU, else none) and the CPUs that go with them."""
    gpus = gpus_per_trial if gpus_per_trial is not None else (1.0 if cluster.get("GPU", 0) >= 1 else 0.0)
    return {"cpu": GPU_TRIAL_CPUS if gpus else TRIAL_CPUS, "gpu": float(gpus)}


def trial_device(config: Config, gpus: float) -> dict:
    """Device and precision of a trial's runtime: the GPU Ray gave it (its mixed precision), or the
    CPU; a trial given GPUs that CUDA cannot use stops with the reason."""
    import torch

    if gpus:
        require_cuda(f"a tune trial with {gpus:g} GPU")
        device = torch.device("cuda", 0)  # Ray makes the trial's GPU the only visible one
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    precision = effective_precision(config.train.mixed_precision, device.type, config.train.autocast_on_cpu)
    return {"device": device, "mixed_precision": precision}


def _trial(params: dict, *, base: dict, stage: str, data_uri: str, runs_uri: str, gpus: float = 0.0) -> None:
    """A Ray Tune trial: one training run of ``stage`` with ``params`` applied to the base config."""
    import torch

    from storymm.training.loop import train
    from storymm.training.ray_backend import assigned_cpus

    torch.set_num_threads(threads_per_process(cpus=assigned_cpus(), processes=1))
    config = trial_config(base, params)
    placed = trial_device(config, gpus)
    runs = trial_runs(runs_uri, params, stage)
    init_from: list[str] = []
    if stage == ALL_STAGES:  # the trial's own autoencoders first; Tune hears of the sequence stage only
        for autoencoder in ("visual_ae", "text_ae"):
            train(config, autoencoder, data_uri, runs[autoencoder], Runtime(name="tune", **placed), progress=False)
        init_from = [runs["visual_ae"], runs["text_ae"]]
    scored = scored_stage(stage)
    stage_cfg = getattr(config.train, scored)
    runtime = TuneRuntime(
        name="tune", checkpoint_every=stage_cfg.checkpoint_every, final_step=stage_cfg.steps, **placed
    )
    train(config, scored, data_uri, runs[scored], runtime, init_from=init_from, progress=False)


def _format_value(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def results_markdown(summary: dict) -> str:
    keys = summary["grid_keys"]
    lines = [
        f"# storymm tune: {summary['stage']}",
        "",
        f"{len(summary['trials'])} trials, {summary['steps']} steps each at most, ASHA on `loss` "
        f"(grace {summary['grace_steps']} steps, reduction factor {summary['reduction_factor']}), "
        f"{summary['seconds']:.0f} s. Data: `{summary['data']}`.",
        "",
        "| " + " | ".join([*keys, "loss", "step", "stopped early", "run"]) + " |",
        "|" + "---|" * (len(keys) + 4),
    ]
    for trial in summary["trials"]:
        cells = [_format_value(trial["params"][k]) for k in keys]
        cells += [
            _format_value(trial["loss"]),
            str(trial["step"]),
            "yes" if trial["stopped_early"] else "no",
            f"`{trial['run']}`",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if summary.get("best"):
        best = summary["best"]
        chosen = ", ".join(f"{k}={best['params'][k]}" for k in keys)
        lines += ["", f"Best: {chosen} (loss {best['loss']:.4f})."]
    return "\n".join(lines) + "\n"


def run_tune(
    config: Config,
    stage: str,
    data_uri: str,
    runs_uri: str,
    out_uri: str,
    *,
    grid: dict[str, list] | None = None,
    max_concurrent: int = 2,
    grace_steps: int | None = None,
    reduction_factor: int = 2,
    gpus_per_trial: float | None = None,
) -> dict:
    """Run the sweep; returns (and writes to ``out_uri``) the results summary. ``gpus_per_trial``:
    default 1 when the Ray cluster has GPUs, else 0 (:func:`trial_resources`)."""
    try:
        import ray
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler
    except ImportError as err:
        raise UsageError(f"storymm tune needs Ray Tune: pip install 'ray[default,train,tune]' ({err})") from None
    from storymm.training.ray_backend import check_gpu_workers, ensure_ray, ray_storage

    if stage not in (*STAGES, ALL_STAGES):
        raise UsageError(f"unknown stage {stage!r} (choose from {', '.join(STAGES)} or {ALL_STAGES})")
    grid = dict(grid or DEFAULT_GRID)
    base = config.to_dict()
    for params in (dict(zip(grid, combo)) for combo in itertools.product(*grid.values())):
        trial_config(base, params)  # fail now, not inside a trial
    stage_cfg = getattr(config.train, scored_stage(stage))
    steps = stage_cfg.steps
    grace = grace_steps or max(stage_cfg.log_every, steps // 4)

    if gpus_per_trial and not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        require_cuda(f"--gpus-per-trial {gpus_per_trial:g}")  # the local Ray about to start: this machine
    ensure_ray(ray)
    resources = trial_resources(ray.cluster_resources(), gpus_per_trial)
    asked = f"--gpus-per-trial {resources['gpu']:g}"
    if gpus_per_trial is None and resources["gpu"]:
        asked += " (the default on a Ray cluster with GPUs; --gpus-per-trial 0 trains on CPUs)"
        log.info("the Ray cluster has GPUs: each trial trains on %g of them", resources["gpu"])
    check_gpu_workers(ray, resources["gpu"], asked)
    storage_path, filesystem = ray_storage(runs_uri, "tune")
    scheduler = ASHAScheduler(
        time_attr="step", metric="loss", mode="min", max_t=steps, grace_period=grace, reduction_factor=reduction_factor
    )
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial, base=base, stage=stage, data_uri=data_uri, runs_uri=runs_uri, gpus=resources["gpu"]
        ),
        resources,
    )
    tuner = tune.Tuner(
        trainable,
        param_space={key: tune.grid_search(values) for key, values in grid.items()},
        tune_config=tune.TuneConfig(
            scheduler=scheduler,
            num_samples=1,
            max_concurrent_trials=max_concurrent,
            trial_dirname_creator=lambda trial: trial_name(trial.config),
        ),
        run_config=tune.RunConfig(
            name=f"tune-{stage}", storage_path=storage_path, storage_filesystem=filesystem, verbose=1
        ),
    )
    started = time.perf_counter()
    results = tuner.fit()
    trials = []
    for result in results:
        params = {key: result.config[key] for key in grid}
        metrics = result.metrics or {}
        step = int(metrics.get("step", 0))
        trials.append(
            {
                "params": params,
                "loss": float(metrics.get("loss", float("nan"))),
                "step": step,
                "stopped_early": result.error is None and step < steps,
                "error": str(result.error).splitlines()[0] if result.error else None,
                "run": storage.redact(trial_runs(runs_uri, params, stage)[scored_stage(stage)]),
            }
        )
    trials.sort(key=lambda t: (t["error"] is not None, t["step"] < steps, t["loss"]))
    finished = [t for t in trials if t["error"] is None and t["step"] == steps]
    summary = {
        "stage": stage,
        "data": storage.redact(data_uri),
        "runs": storage.redact(runs_uri),
        "grid_keys": list(grid),
        "grid": grid,
        "steps": steps,
        "grace_steps": grace,
        "reduction_factor": reduction_factor,
        "seconds": time.perf_counter() - started,
        "trials": trials,
        "best": finished[0] if finished else None,
    }
    storage.write_text(storage.join(out_uri, TABLE_JSON), json.dumps(summary, indent=2))
    storage.write_text(storage.join(out_uri, TABLE_MD), results_markdown(summary))
    errors = [t for t in trials if t["error"]]
    if errors:
        log.warning("%d of %d trials failed: %s", len(errors), len(trials), errors[0]["error"])
    return summary


def compare_trials(
    summary: dict, runs_uri: str, data_uri: str, out_uri: str, *, split: str = "test", evaluate_fn=None
) -> dict:
    """Evaluate every trial run that has a checkpoint (``sequence`` and ``all`` sweeps) and write one
    comparison (``OUT/compare.md/.html/.json``, reports under ``OUT/reports/<trial>``): every metric
    and floor."""
    from storymm.evaluation.compare import compare

    if scored_stage(summary["stage"]) != "sequence":
        raise ValueError(f"--evaluate scores sequence models; this sweep trained {summary['stage']}")
    names, sources = [], []
    for trial in summary["trials"]:
        name = trial_name(trial["params"])
        run = trial_runs(runs_uri, trial["params"], summary["stage"])["sequence"]
        if RunFolder(run).latest_checkpoint_uri() is None:
            log.warning("trial %s has no checkpoint: left out of the comparison", name)
            continue
        names.append(name)
        sources.append(run)
    if not sources:
        raise ValueError("no trial has a checkpoint to evaluate")
    return compare(sources, out_uri, names=names, data_uri=data_uri, split=split, evaluate_fn=evaluate_fn)
