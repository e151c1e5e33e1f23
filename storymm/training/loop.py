"""The training loop, written once for every backend (see ``runtime.py``).

A run directory (``RUN_URI``) holds ``run.json`` (stage, config, data), ``metrics.jsonl`` (one line
per logged step) and ``checkpoints/``. Running the same command again resumes from ``latest``:
model, optimiser, scheduler, RNG and the data position are restored, so an interrupted run ends
where an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import math
import time

import torch
from tqdm import tqdm

from storymm import storage
from storymm.config import Config
from storymm.data.loader import PreparedDataset, WindowLoader
from storymm.training import checkpoint
from storymm.training.runtime import Runtime
from storymm.training.stages import STAGES, TokenizerInfo, batch_loss_fn, build_model, loader_options, windows_per_step
from storymm.training.validation import Validator

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"


class TrainingError(RuntimeError):
    pass


def read_run(run_uri: str) -> dict:
    try:
        return json.loads(storage.read_text(storage.join(run_uri, RUN_FILE)))
    except FileNotFoundError:
        raise TrainingError(f"{storage.redact(run_uri)} is not a storymm run (no {RUN_FILE})") from None


def read_metrics(run_uri: str) -> list[dict]:
    uri = storage.join(run_uri, METRICS_FILE)
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def _check_dataset(dataset: PreparedDataset, config: Config) -> None:
    size = [config.data.image_height, config.data.image_width]
    if dataset.manifest["image_size"] != size:
        raise TrainingError(
            f"dataset frames are {dataset.manifest['image_size']} but the config asks for {size}: "
            "prepare the data with this config"
        )


def _scheduler(optimizer, stage_cfg):
    warmup, total = stage_cfg.warmup_steps, stage_cfg.steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def load_autoencoders(model, init_from: list[str]) -> list[str]:
    """Copy pretrained autoencoder weights from ``visual_ae``/``text_ae`` runs into a sequence model."""
    loaded = []
    for run_uri in init_from:
        stage = read_run(run_uri)["stage"]
        state = checkpoint.load_latest(run_uri, purpose="initialising from")
        if state is None:
            raise TrainingError(f"--init-from {storage.redact(run_uri)} has no checkpoint yet")
        target = {"visual_ae": model.visual, "text_ae": model.text}.get(stage)
        if target is None:
            raise TrainingError(f"--init-from takes visual_ae or text_ae runs, {storage.redact(run_uri)} is {stage}")
        target.load_state_dict(state["model"])
        loaded.append(stage)
    return loaded


def train(
    config: Config,
    stage: str,
    data_uri: str,
    run_uri: str,
    runtime: Runtime | None = None,
    init_from: list[str] | tuple[str, ...] = (),
    progress: bool = True,
) -> dict:
    """Train ``stage`` until ``config.train.<stage>.steps``; resumable; returns a summary."""
    if stage not in STAGES:
        raise TrainingError(f"unknown stage {stage!r} (choose from {', '.join(STAGES)})")
    runtime = runtime or Runtime.from_environment(config.train.mixed_precision)
    stage_cfg = getattr(config.train, stage)
    dataset = PreparedDataset(data_uri)
    _check_dataset(dataset, config)
    tokens = TokenizerInfo.from_manifest(dataset.manifest)

    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = build_model(stage, config, tokens)
    resumed = checkpoint.load_latest(run_uri)
    if resumed is not None:
        previous = read_run(run_uri)
        if previous["stage"] != stage:
            raise TrainingError(f"{storage.redact(run_uri)} holds a {previous['stage']} run, not {stage}")
        model.load_state_dict(resumed["model"])
    elif stage == "sequence":
        loaded = load_autoencoders(model, list(init_from))
        missing = {"visual_ae", "text_ae"} - set(loaded)
        if missing:
            log.warning("sequence stage without pretrained %s: training those parts from scratch", sorted(missing))
    if stage == "sequence" and stage_cfg.freeze_autoencoders:
        model.freeze_autoencoders(True)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage_cfg.lr, weight_decay=stage_cfg.weight_decay)
    scheduler = _scheduler(optimizer, stage_cfg)
    step, epoch, batch_in_epoch = 0, 0, 0
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        step = int(resumed["step"])
        position = resumed["data_position"]
        epoch, batch_in_epoch = int(position["epoch"]), int(position["batch"])
        if int(position["world_size"]) != runtime.world_size:  # another split of the data: next epoch
            epoch, batch_in_epoch = epoch + 1, 0
        rng = resumed["rng"][runtime.rank] if runtime.rank < len(resumed["rng"]) else None
        if rng is not None:
            checkpoint.restore_rng(rng)
    else:
        torch.manual_seed(config.seed + runtime.rank)

    if runtime.is_main and resumed is None:
        record = {
            "stage": stage,
            "config": config.to_dict(),
            "data": storage.redact(data_uri),
            "init_from": [storage.redact(u) for u in init_from],
            "backend": runtime.name,
            "world_size": runtime.world_size,
        }
        storage.write_text(storage.join(run_uri, RUN_FILE), json.dumps(record, indent=2))
    history = [m for m in read_metrics(run_uri) if m["step"] <= step] if runtime.is_main else []

    model = runtime.prepare_model(model)
    model.train()
    loader = WindowLoader(
        dataset, "train", batch_size=config.data.batch_size, context_frames=config.data.context_frames,
        max_tokens=config.data.max_tokens, windows=config.data.windows, rank=runtime.rank,
        world_size=runtime.world_size, shuffle=True, seed=config.seed,
        shuffle_buffer=config.data.shuffle_buffer, equalize=True,
        **(loader_options(config) if stage == "sequence" else {}),
    )
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise TrainingError(
            f"not one full batch of {config.data.batch_size} windows per worker "
            f"({runtime.world_size} workers): use more data or a smaller data.batch_size"
        )
    loss_fn = batch_loss_fn(stage, config, tokens)
    validator = Validator(config, stage, dataset, runtime, run_uri, loss_fn)
    per_step = windows_per_step(stage, config.data.batch_size, config.data.context_frames) * runtime.world_size

    def save(status: str) -> str:
        states = runtime.all_gather_object(checkpoint.rng_state())
        uri = None
        if runtime.is_main:
            uri = checkpoint.save(
                run_uri,
                {
                    "stage": stage,
                    "model": runtime.unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": states,
                    "step": step,
                    "data_position": {"epoch": epoch, "batch": batch_in_epoch, "world_size": runtime.world_size},
                    "status": status,
                },
                step,
            )
        runtime.barrier()
        return uri

    bar = tqdm(total=stage_cfg.steps, initial=step, desc=stage, unit="step", disable=not (progress and runtime.is_main))
    last_terms: dict = {}
    status = "completed"
    window_start, window_steps = time.perf_counter(), 0
    saved_at = step if resumed is not None else -1
    while step < stage_cfg.steps:
        loader.set_epoch(epoch, start_batch=batch_in_epoch)
        for batch in loader:
            batch = runtime.to_device(batch)
            with runtime.autocast():
                loss, terms = loss_fn(model, batch)
            if not math.isfinite(loss.detach().item()):
                raise TrainingError(f"{stage}: loss became {loss.detach().item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            runtime.backward(loss)
            if stage_cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, stage_cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            batch_in_epoch += 1
            window_steps += 1
            bar.update(1)

            if step % stage_cfg.log_every == 0 or step == stage_cfg.steps:
                names = sorted(terms)
                values = runtime.all_reduce_sum(torch.tensor([terms[n] for n in names], dtype=torch.float64))
                elapsed = time.perf_counter() - window_start
                last_terms = {n: float(v) / runtime.world_size for n, v in zip(names, values.tolist())}
                last_terms.update(
                    step=step, epoch=epoch, lr=scheduler.get_last_lr()[0],
                    samples_per_s=per_step * window_steps / max(elapsed, 1e-9),
                )
                window_start, window_steps = time.perf_counter(), 0
                if runtime.is_main:
                    history.append(last_terms)
                    storage.write_text(
                        storage.join(run_uri, METRICS_FILE), "".join(json.dumps(m) + "\n" for m in history)
                    )
                    bar.set_postfix(loss=f"{last_terms['total']:.4f}", sps=f"{last_terms['samples_per_s']:.0f}")
                runtime.report(last_terms)

            finished = step >= stage_cfg.steps
            stopping = not finished and runtime.should_stop()
            improved = False
            if validator.due(step, finished):
                record, improved = validator.run(runtime.unwrap(model), step)
                if runtime.is_main:  # into the step's training record when there is one
                    history[-1].update(record) if history and history[-1]["step"] == step else history.append(record)
                    storage.write_text(
                        storage.join(run_uri, METRICS_FILE), "".join(json.dumps(m) + "\n" for m in history)
                    )
            if step % stage_cfg.checkpoint_every == 0 or finished or stopping or improved:
                state = "completed" if finished else "stopped" if stopping else "running"
                runtime.report(last_terms, save(state))
                saved_at = step
            if improved and runtime.is_main:
                checkpoint.mark_best(run_uri, step, validator.key, validator.best)
            if finished:
                break
            if stopping:
                status = "stopped"
                break
        if status == "stopped" or step >= stage_cfg.steps:
            break
        epoch, batch_in_epoch = epoch + 1, 0
    if saved_at != step:
        runtime.report(last_terms, save(status))
    bar.close()
    return {"stage": stage, "run": storage.redact(run_uri), "step": step, "status": status, "metrics": last_terms}
