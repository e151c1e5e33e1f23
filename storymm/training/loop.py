"""The training loop, written once for every backend (see ``runtime.py``).

``train`` reads top to bottom: build the model, optimiser and loader; restore the run folder's
latest checkpoint if there is one; then repeat :func:`train_step`, with :class:`MetricsLog` logging
every ``log_every`` steps and :class:`CheckpointPolicy` deciding when to save. Running the same
command again resumes: model, optimiser, scheduler, RNG and the data position are restored, so an
interrupted run ends where an uninterrupted one would. The run folder's layout is
:class:`~storymm.training.run.RunFolder`'s business.

The data position is global: (epoch, windows of the epoch's global sequence consumed), see
``data/loader.py``. A run's global batch is fixed when it starts (``data.batch_size`` per worker
times the number of workers it is planned for: an elastic Ray job's maximum, whatever number was
free at its start) and kept in its checkpoints; a resume on another number of workers
gives each worker ``global batch / workers`` windows per step (and refuses a number that does not
divide it), so it continues at exactly the next window of the interrupted epoch.
"""

from __future__ import annotations

import functools
import logging
import math
import socket
import time
from dataclasses import dataclass

import numpy as np
import torch

from storymm import storage
from storymm.config import Config
from storymm.data.loader import PreparedDataset, WindowLoader
from storymm.progress import Progress
from storymm.training import checkpoint, timing
from storymm.training.phases import Phase
from storymm.training.run import RunFolder, TrainingError, read_metrics, read_run, read_windows
from storymm.training.runtime import Runtime
from storymm.training.stages import (
    STAGES,
    TokenizerInfo,
    batch_loss_fn,
    build_model,
    unused_parameters,
    window_loader,
    windows_per_step,
)
from storymm.training.trackers import Tracker, check_trackers, make_trackers
from storymm.training.validation import Validator
from storymm.training.watchdog import HangPolicy, Watchdog

log = logging.getLogger(__name__)

__all__ = ["TrainingError", "read_metrics", "read_run", "read_windows", "train", "train_step", "load_autoencoders"]


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
        source = RunFolder(run_uri)
        stage = source.stage
        state = source.load_latest(purpose="initialising from")
        if state is None:
            raise TrainingError(f"--init-from {source.shown} has no checkpoint yet")
        target = {"visual_ae": model.visual, "text_ae": model.text}.get(stage)
        if target is None:
            raise TrainingError(f"--init-from takes visual_ae or text_ae runs, {source.shown} is {stage}")
        target.load_state_dict(state["model"])
        loaded.append(stage)
    return loaded


# ----------------------------------------------------------------------------- the units


@dataclass
class Position:
    """Where training stands: the optimiser step and the global data position (epoch, windows of
    its global sequence consumed), with the run's global batch (windows per step, all workers) and
    partitions of the order (``data/loader.py``), both fixed when the run starts."""

    global_batch: int
    step: int = 0
    epoch: int = 0
    windows: int = 0
    partitions: int = 1

    def advance(self) -> None:
        self.step += 1
        self.windows += self.global_batch

    def next_epoch(self) -> None:
        self.epoch, self.windows = self.epoch + 1, 0

    def data_position(self, world_size: int) -> dict:
        return {
            "epoch": self.epoch,
            "windows": self.windows,
            "global_batch": self.global_batch,
            "partitions": self.partitions,
            "world_size": world_size,
        }

    def per_worker_batch(self, world_size: int) -> int:
        if self.global_batch % world_size:
            raise TrainingError(
                f"this run's global batch is {self.global_batch} windows per step, which {world_size} workers "
                f"cannot share equally: resume it on a number of workers that divides {self.global_batch}"
            )
        return self.global_batch // world_size


def _build_model(
    stage: str, config: Config, tokens: TokenizerInfo, resumed: dict | None, init_from: list[str]
) -> torch.nn.Module:
    """The stage's model with identical initial weights on every rank, then the checkpoint's weights
    (a resume) or the pretrained autoencoders (a fresh sequence run)."""
    torch.manual_seed(config.seed)
    model = build_model(stage, config, tokens)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
    elif stage == "sequence":
        missing = {"visual_ae", "text_ae"} - set(load_autoencoders(model, init_from))
        if missing:
            log.warning("sequence stage without pretrained %s: training those parts from scratch", sorted(missing))
    if stage == "sequence" and getattr(config.train, stage).freeze_autoencoders:
        model.freeze_autoencoders(True)
    return model


def _restore(resumed: dict | None, optimizer, scheduler, runtime: Runtime, config: Config) -> Position:
    """Optimiser, scheduler, this rank's RNG and the global data position from a checkpoint; or a
    fresh start with a per-rank seed (dropout differs between ranks)."""
    if resumed is None:
        torch.manual_seed(config.seed + runtime.rank)
        planned = runtime.planned_world_size or runtime.world_size
        global_batch = config.data.batch_size * planned
        # more partitions than windows per step would leave some without a slot: at most G
        partitions = min(config.data.partitions or planned, global_batch)
        return Position(global_batch=global_batch, partitions=partitions)
    optimizer.load_state_dict(resumed["optimizer"])
    scheduler.load_state_dict(resumed["scheduler"])
    data, step = resumed["data_position"], int(resumed["step"])
    if "windows" in data:  # checkpoints from before partitions trained on one (the same order)
        position = Position(
            int(data["global_batch"]), step, int(data["epoch"]), int(data["windows"]), int(data.get("partitions", 1))
        )
    else:
        # a checkpoint from before the global order: its order depended on the world size, so the
        # position cannot be carried over; start the next epoch, as such runs always did on resume
        log.warning("checkpoint without a global data position: resuming at the start of the next epoch")
        position = Position(config.data.batch_size * int(data["world_size"]), step, int(data["epoch"]) + 1)
    if runtime.rank < len(resumed["rng"]):
        checkpoint.restore_rng(resumed["rng"][runtime.rank], runtime.device)
    else:  # a rank the checkpoint did not have (resumed on more workers): its own seeded stream
        torch.manual_seed(int(np.random.SeedSequence([config.seed, runtime.rank, step]).generate_state(1)[0]))
    return position


def _model_and_optimiser(stage: str, config: Config, tokens: TokenizerInfo, resumed, init_from, runtime: Runtime):
    """The model on the runtime's device, then its optimiser, scheduler and position restored.

    In that order: ``Optimizer.load_state_dict`` puts the moment tensors where the parameters are at
    that moment, so a state restored while the model is still on the CPU makes the first GPU step
    after every resume fail with a device mismatch (every SLURM requeue, every Ray restart)."""
    model = _build_model(stage, config, tokens, resumed, init_from).to(runtime.device)
    params = [p for p in model.parameters() if p.requires_grad]
    stage_cfg = getattr(config.train, stage)
    optimizer = torch.optim.AdamW(params, lr=stage_cfg.lr, weight_decay=stage_cfg.weight_decay)
    scheduler = _scheduler(optimizer, stage_cfg)
    position = _restore(resumed, optimizer, scheduler, runtime, config)
    return model, params, optimizer, scheduler, position


def _train_loader(
    dataset: PreparedDataset, config: Config, stage: str, runtime: Runtime, position: Position
) -> WindowLoader:
    batch_size = position.per_worker_batch(runtime.world_size)
    if batch_size != config.data.batch_size:
        log.info(
            "resuming on %d workers: %d windows per worker per step (global batch %d, as when the run started)",
            runtime.world_size,
            batch_size,
            position.global_batch,
        )
    loader = window_loader(
        dataset,
        "train",
        config,
        batch_size=batch_size,
        rank=runtime.rank,
        world_size=runtime.world_size,
        tags=stage == "sequence",
        shuffle=True,
        seed=config.seed,
        shuffle_buffer=config.data.shuffle_buffer,
        equalize=True,
        with_ids=config.train.record_windows,
        uint8_pixels=True,  # 4x fewer bytes to pin and copy: floats on the device (data/transfer.py)
        partitions=position.partitions,
        continuous=True,  # reads the next epoch's first chunks while this one trains
    )
    if position.partitions % runtime.world_size and runtime.is_main:
        log.info(
            "%d workers share the run's %d data partitions: each reads more than 1/%d of the data "
            "(a number of workers that divides %d reads 1/N)",
            runtime.world_size,
            position.partitions,
            runtime.world_size,
            position.partitions,
        )
    if len(loader) == 0:  # epoch 0 from its start: every epoch has as many windows
        raise TrainingError(
            f"not one full global batch of {position.global_batch} windows ({batch_size} per worker, "
            f"{runtime.world_size} workers): use more data or a smaller data.batch_size"
        )
    loader.set_epoch(position.epoch, start_window=position.windows)
    loader.begin()  # the first chunks load while the model is prepared
    return loader


class WindowRecord:
    """``train.record_windows`` (debug): which windows every rank trained on at every step, gathered
    to rank 0 and kept in ``windows.jsonl`` beside the metrics (the proof of sample-exact resumes)."""

    def __init__(self, run: RunFolder, runtime: Runtime, enabled: bool, start: int):
        self.run, self.runtime, self.enabled = run, runtime, enabled
        self.lines = [w for w in run.read_windows() if w["step"] <= start] if enabled and runtime.is_main else []

    def take(self, batch: dict, position: Position) -> None:
        """Remove the batch's window ids (they are not model input) and remember them for the step."""
        if not self.enabled:
            return
        ranks = self.runtime.all_gather_object(batch.pop("window_ids"))
        if self.runtime.is_main:
            self.lines.append({"step": position.step + 1, "epoch": position.epoch, "windows": ranks})

    def flush(self) -> None:
        if self.enabled and self.runtime.is_main:
            self.run.write_windows(self.lines)


class NonFiniteGuard:
    """The first step whose loss was not finite, kept on the device so that no step waits for the
    host; checked (combined across ranks) at logging steps and before every checkpoint, so a
    diverged run stops with the step named and never saves a checkpoint past it."""

    def __init__(self, runtime: Runtime, stage: str, start: int):
        self.runtime, self.stage, self.checked_from = runtime, stage, start
        self.first = torch.full((), -1, dtype=torch.int64, device=runtime.device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        self.first = torch.where((self.first < 0) & ~torch.isfinite(loss.detach()), step, self.first)

    def check(self, step: int) -> None:
        flagged = (self.first >= 0).to(torch.float64).reshape(1).cpu()
        if self.runtime.all_reduce_sum(flagged).item() > 0:
            where = int(self.first)
            raise TrainingError(
                f"{self.stage}: loss became non-finite "
                + (f"at step {where}" if where >= 0 else "on another rank")
                + f" (checked steps {self.checked_from}..{step - 1}); nothing after the last checkpoint was saved"
            )
        self.checked_from = step


def train_step(
    model,
    batch: dict,
    loss_fn,
    optimizer,
    scheduler,
    runtime: Runtime,
    params,
    grad_clip: float,
    guard: NonFiniteGuard,
    step: int,
) -> dict:
    """One optimiser step on one batch; returns this rank's loss terms as 0-d device tensors (read
    only at logging steps: a step never waits for the device)."""
    runtime.phases.enter(Phase.FORWARD_BACKWARD)
    batch = runtime.to_device(batch)
    with runtime.autocast():
        loss, terms = loss_fn(model, batch)
    guard.observe(loss, step)
    optimizer.zero_grad(set_to_none=True)
    runtime.backward(loss)
    runtime.phases.enter(Phase.OPTIMIZER)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()
    return terms


class MetricsLog:
    """Every ``log_every`` steps (and the last): loss terms averaged over ranks, throughput since the
    previous log, where each rank's time went (``timing.py``), one line in the run's metrics log and in
    the trackers (rank 0), the progress bar or line, the backend's report. A resumed run rewrites the
    lines past its checkpoint instead of repeating them (``metrics_store.py``); the trackers learn,
    once a checkpoint is published, that the steps before it are final (``trackers.py``)."""

    def __init__(
        self,
        run: RunFolder,
        runtime: Runtime,
        stage: str,
        every: int,
        total: int,
        samples_per_step: int,
        start: int,
        progress: bool,
        trackers: list[Tracker] = (),
        hosts: list[str] = (),
        sync: timing.GradientSyncTimer | None = None,
        count_flops: bool = True,
    ):
        """``samples_per_step``: over all workers; ``trackers``: rank 0's; ``hosts``: per rank;
        ``sync``: the DDP gradient all-reduce timer; ``count_flops``: on this attempt's first step."""
        self.runtime, self.every, self.total = runtime, every, total
        self.samples_per_step, self.hosts = samples_per_step, list(hosts)
        self.store = run.metrics_store() if runtime.is_main else None
        self.trackers = list(trackers)
        self.sync, self.clock = sync, None  # the clock starts with the loop (start-up is not a step's)
        self.times = None
        self._flops: list[float] | None = [] if count_flops and runtime.is_main else None
        if self.store is not None:
            resumed = self.store.open(start) or {}
            self.times = timing.StepTimes(
                run.read_record().get("started"),
                resumed.get(f"{timing.TIMING_PREFIX}productive_s", 0.0),
                runtime.world_size,
                timing.peak_flops(runtime.device, runtime.mixed_precision),
            )
            for tracker in self.trackers:
                tracker.open(start, self.store.read)
        self.last: dict = {}
        self.progress = Progress(total, initial=start, desc=stage, enabled=progress and runtime.is_main)
        self._since, self._steps = time.perf_counter(), 0

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    def counted(self, batches):
        """The loop's batches (the first logging window starts here); the model FLOPs of this
        attempt's first step are counted (rank 0)."""
        if self.clock is None:
            self.clock = timing.RankClock(self.runtime.phases, self.sync)
            self._since = time.perf_counter()
        if self._flops is None or self._flops:
            return batches
        return timing.first_step_flops(batches, self._flops)

    def step_done(self, position: Position, lr: float, terms: dict) -> bool:
        """True when this step was logged."""
        self._steps += 1
        self.progress.update(1)
        if not self.due(position.step):
            return False
        names = sorted(terms)
        sums = self.runtime.all_reduce_sum(torch.stack([terms[n] for n in names]).to(torch.float64).cpu())
        elapsed, steps = time.perf_counter() - self._since, self._steps
        seconds = self.runtime.all_gather_object(self.clock.take())  # per rank, since the last logged step
        self._since, self._steps = time.perf_counter(), 0
        self.last = {n: float(v) / self.runtime.world_size for n, v in zip(names, sums.tolist())}
        self.last.update(
            step=position.step,
            epoch=position.epoch,
            lr=lr,
            samples_per_s=self.samples_per_step * steps / max(elapsed, 1e-9),
            time=round(time.time(), 3),
        )
        if self.times is not None:
            if self._flops and self.times.flops_per_step is None:
                self.times.flops_per_step = self._flops[0]
            self.last.update(self.times.line(seconds, self.hosts, steps, elapsed, self.last["time"]))
        self._record(self.last)
        self.progress.show(**{"loss": f"{self.last['total']:.4f}", "samples/s": f"{self.last['samples_per_s']:.0f}"})
        self.runtime.report(self.last)
        return True

    def add_validation(self, record: dict, step: int) -> None:
        """Validation terms (``val_*``) into the step's line, or a line of their own."""
        if self.last.get("step") != step:
            record = {**record, "time": round(time.time(), 3)}
        self._record(record)

    def _record(self, line: dict) -> None:
        if self.store is None:
            return
        step = line["step"]
        values = {k: v for k, v in line.items() if k != "step"}
        self.store.record(step, values)
        wall = values.get("time", self.last.get("time", time.time()))
        for tracker in self.trackers:
            tracker.record(step, values, wall)

    def stored_wait(self):
        """A call that waits until the lines logged so far are stored (rank 0; None elsewhere): the
        checkpoint writer makes it before it moves ``latest``, so no checkpoint covers a step whose
        line is not stored, and the step does not wait for the upload."""
        return self.store.stored_wait() if self.store is not None else None

    def checkpoint_taken(self) -> None:
        """A checkpoint of this step is being written: the log's segment ends here, so a resume from it
        cuts at a segment's end."""
        if self.store is not None:
            self.store.seal()

    def checkpointed(self, step: int) -> None:
        """The checkpoint of ``step`` is published (``latest`` names it, after its upload; called from the
        checkpoint writer's thread): no resume redoes the steps up to it, so the trackers may keep them."""
        for tracker in self.trackers:
            tracker.checkpointed(step)

    def close(self, completed: bool = False) -> None:
        self.progress.close()
        if self.store is not None:
            for tracker in self.trackers:
                tracker.close(completed)
            self.store.close()


class CheckpointPolicy:
    """When to save: every ``every`` steps, at the last step and when the scheduler asks to stop;
    never twice for the same step."""

    def __init__(self, every: int, total: int, saved_at: int):
        self.every, self.total, self.saved_at = every, total, saved_at

    def status_to_save(self, step: int, stopping: bool, improved: bool = False) -> str | None:
        """``completed``/``stopped``/``running`` when this step is saved, else None. A step that
        improved the validation loss is saved too: it becomes the ``best`` checkpoint."""
        if step >= self.total:
            return "completed"
        if stopping:
            return "stopped"
        return "running" if step % self.every == 0 or improved else None

    def saved(self, step: int) -> None:
        self.saved_at = step


def _save(
    run: RunFolder,
    runtime: Runtime,
    stage: str,
    model,
    optimizer,
    scheduler,
    position: Position,
    status: str,
    before_publish=None,
) -> None:
    """Every rank hands in its RNG state; rank 0 snapshots the state and writes it in the background
    (``RunFolder.save_checkpoint``: the steps go on while it uploads; :func:`train` learns when it is
    published), calling ``before_publish()`` before ``latest`` moves."""
    states = runtime.all_gather_object(checkpoint.rng_state(runtime.device))
    if not runtime.is_main:
        return
    run.save_checkpoint(
        {
            "stage": stage,
            "model": runtime.unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": states,
            "step": position.step,
            "data_position": position.data_position(runtime.world_size),
            "status": status,
        },
        position.step,
        before_publish,
    )
    if runtime.wait_for_checkpoints:
        run.wait_for_checkpoint()


# ----------------------------------------------------------------------------------- train


def train(
    config: Config,
    stage: str,
    data_uri: str,
    run_uri: str,
    runtime: Runtime | None = None,
    init_from: list[str] | tuple[str, ...] = (),
    progress: bool = True,
) -> dict:
    """Train ``stage`` until ``config.train.<stage>.steps``; resumable; returns a summary. A progress
    watchdog (``watchdog.py``) watches the attempt and ends the process if it hangs."""
    if stage not in STAGES:
        raise TrainingError(f"unknown stage {stage!r} (choose from {', '.join(STAGES)})")
    policy = HangPolicy.from_config(config.train)
    runtime = runtime or Runtime.from_environment(
        config.train.mixed_precision, config.train.autocast_on_cpu, policy.process_group_timeout()
    )
    run = RunFolder(run_uri)
    # every rank reads the attempts so far before rank 0 adds this one (after a collective, in _train)
    attempt = len(run.read_attempts()) + 1
    with Watchdog(policy, runtime.phases, run, attempt, runtime.rank, runtime.world_size) as watchdog:
        return _train(config, stage, data_uri, run, runtime, list(init_from), progress, attempt, watchdog.accepted)


def _train(
    config: Config,
    stage: str,
    data_uri: str,
    run: RunFolder,
    runtime: Runtime,
    init_from: list[str],
    progress: bool,
    attempt: int,
    accepted=lambda: None,
) -> dict:
    """The loop; ``accepted()`` once the stage, data and checkpoint are accepted (nothing is written
    into the run before, so a bad input leaves it as it was)."""
    stage_cfg = getattr(config.train, stage)
    dataset = PreparedDataset(data_uri)
    _check_dataset(dataset, config)
    tokens = TokenizerInfo.from_manifest(dataset.manifest)

    check_trackers(config.train.trackers)  # on every rank, before anything runs
    previous = run.read_record()["stage"] if run.exists() else stage
    if previous != stage:  # before anything is loaded or logged
        raise TrainingError(f"{run.shown} holds a {previous} run, not {stage}")
    resumed = run.load_latest()
    model, params, optimizer, scheduler, position = _model_and_optimiser(
        stage, config, tokens, resumed, list(init_from), runtime
    )
    accepted()
    phases = runtime.phases
    phases.resumed_at(position.step)
    # one per rank: where the run really ran
    hosts, node_ids, threads = zip(
        *runtime.all_gather_object((socket.gethostname(), runtime.node_id(), torch.get_num_threads()))
    )
    hosts = list(hosts)
    if runtime.is_main:
        log.info("%s: %d rank(s) on %s", stage, runtime.world_size, ", ".join(hosts))
    if runtime.is_main and resumed is None:
        run.write_record(
            {
                "stage": stage,
                "config": config.to_dict(),
                "data": storage.redact(data_uri),
                "init_from": [storage.redact(u) for u in init_from],
                "backend": runtime.name,
                "world_size": runtime.world_size,
                "global_batch": position.global_batch,
                "partitions": position.partitions,
                "hosts": hosts,
                # goodput counts from the start of this process (the clock's start), through every restart
                "started": time.time() - (time.monotonic() - runtime.phases.started),
            }
        )
    if runtime.is_main:  # the step this attempt really restored: a resume, not a restart, is provable
        entry = {"attempt": attempt, "start_step": position.step, "world_size": runtime.world_size}
        entry.update(backend=runtime.name, hosts=hosts, torch_threads=list(threads))  # threads: per rank
        run.record_attempt({**entry, **({"node_ids": list(node_ids)} if any(node_ids) else {})})

    unused = unused_parameters(stage, config, tokens, model) if runtime.world_size > 1 else []
    if unused:
        log.info(
            "%s: %d trainable parameters get no gradient with this config (%s, ...): DDP finds them each step",
            stage,
            len(unused),
            unused[0],
        )
    model = runtime.prepare_model(model, find_unused=bool(unused))
    model.train()
    # compiled for the steps only: checkpoints keep the plain module's state_dict keys
    step_model = torch.compile(model, backend=config.train.compile_backend) if config.train.compile else model
    loader = _train_loader(dataset, config, stage, runtime, position)
    loss_fn = batch_loss_fn(stage, config, tokens)
    samples = windows_per_step(stage, position.global_batch, config.data.context_frames)
    trackers = make_trackers(config.train.trackers, run, run.read_record()) if runtime.is_main else []
    metrics = MetricsLog(
        run,
        runtime,
        stage,
        stage_cfg.log_every,
        stage_cfg.steps,
        samples,
        position.step,
        progress,
        trackers,
        hosts,
        timing.GradientSyncTimer.attach_to(model),
        count_flops=not config.train.compile,
    )
    windows = WindowRecord(run, runtime, config.train.record_windows, position.step)
    policy = CheckpointPolicy(stage_cfg.checkpoint_every, stage_cfg.steps, position.step if resumed else -1)
    guard = NonFiniteGuard(runtime, stage, position.step)
    validator = Validator(config, stage, dataset, runtime, run, loss_fn)

    def report_published() -> None:
        """The newest checkpoint published since the last report (rank 0), for the backend."""
        published = run.published_checkpoints()
        runtime.report(metrics.last, published[-1].uri if published else None)

    def save(status: str) -> None:
        phases.enter(Phase.CHECKPOINT)
        guard.check(position.step)
        _save(run, runtime, stage, model, optimizer, scheduler, position, status, metrics.stored_wait())
        metrics.checkpoint_taken()
        if runtime.is_main:  # written in the background: the trackers learn it once it is published
            run.when_checkpoint_published(position.step, functools.partial(metrics.checkpointed, position.step))
        windows.flush()
        report_published()
        policy.saved(position.step)

    status = "completed"
    while position.step < stage_cfg.steps and status != "stopped":
        loader.set_epoch(position.epoch, start_window=position.windows)
        for batch in metrics.counted(phases.iterate(runtime.feed(loader), Phase.DATA)):
            windows.take(batch, position)
            terms = train_step(
                step_model,
                batch,
                loss_fn,
                optimizer,
                scheduler,
                runtime,
                params,
                stage_cfg.grad_clip,
                guard,
                position.step,
            )
            position.advance()
            phases.step_done(position.step)
            if metrics.due(position.step):
                phases.enter(Phase.LOGGING)
                guard.check(position.step)
            if metrics.step_done(position, scheduler.get_last_lr()[0], terms):
                windows.flush()
            finished = position.step >= stage_cfg.steps
            stopping = not finished and runtime.should_stop()
            improved = False
            if validator.due(position.step, finished):
                phases.enter(Phase.VALIDATION)
                record, improved = validator.run(runtime.unwrap(model), position.step)
                metrics.add_validation(record, position.step)
            saving = policy.status_to_save(position.step, stopping, improved)
            if saving is not None:
                save(saving)
            if improved and runtime.is_main:
                run.mark_best(position.step, validator.key, validator.best)
            if saving in ("completed", "stopped"):
                status = saving
                break
        else:
            position.next_epoch()
    if policy.saved_at != position.step:
        save(status)
    loader.close()
    validator.close()
    if runtime.is_main:  # the end of training, also a stop on SLURM's signal, waits for the upload
        run.wait_for_checkpoint()
    report_published()
    runtime.barrier()
    metrics.close(completed=status == "completed")
    phases.enter(Phase.FINISHED)
    return {"stage": stage, "run": run.shown, "step": position.step, "status": status, "metrics": metrics.last}
