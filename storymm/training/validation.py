"""Validation during training: score the prepared ``val`` split every ``train.<stage>.eval_every`` steps
(by default at every checkpoint of the sequence stage; the autoencoder stages only when asked).

The loop calls :meth:`Validator.due` after each step and, when due, :meth:`Validator.run`: every loss
term of the stage (for ``sequence`` these include the image ``l1``) averaged over the validation
windows, as sums weighted by batch size and combined across ranks, so the numbers do not depend on
the world size. They go to the run's metrics log as one record ``{"step", "val_windows", "val_<term>"…}``.
When ``val_<best_metric>`` improves (lower is better: every term is a loss or an error), the loop
checkpoints that step and :func:`checkpoint.mark_best` points ``best`` at it
(``storymm evaluate --checkpoint best``).

Cheap by construction: at most ``train.<stage>.val_batches`` batches (0 = the whole split), read in a
fixed order, in eval mode without gradients; the RNG state is restored afterwards, so a run's training
curve is the same with and without validation.
"""

from __future__ import annotations

import logging
import math

import torch

from storymm.config import Config
from storymm.data.loader import DatasetError, PreparedDataset
from storymm.training.run import RunFolder
from storymm.training.runtime import Runtime
from storymm.training.stages import window_loader

log = logging.getLogger(__name__)

SPLIT = "val"


class Validator:
    def __init__(self, config: Config, stage: str, dataset: PreparedDataset, runtime: Runtime, run: RunFolder, loss_fn):
        stage_cfg = getattr(config.train, stage)
        self.every = stage_cfg.eval_every
        if self.every is None:  # the sequence model's best checkpoint is what evaluation wants
            self.every = stage_cfg.checkpoint_every if stage == "sequence" else 0
        self.key = f"val_{stage_cfg.best_metric}"
        self.runtime, self.loss_fn = runtime, loss_fn
        self.loader = None
        if self.every == 0:
            return
        try:
            loader = window_loader(
                dataset,
                SPLIT,
                config,
                batch_size=config.data.batch_size,
                rank=runtime.rank,
                world_size=runtime.world_size,
                tags=stage == "sequence",
                shuffle=False,
                equalize=False,
            )
        except DatasetError as err:
            log.info("no validation: %s", err)
            return
        if sum(runtime.all_gather_object(loader.num_windows())) == 0:
            log.info("no validation: the %r split is empty", SPLIT)
            return
        self.loader = loader
        per_rank = math.ceil(stage_cfg.val_batches / runtime.world_size) if stage_cfg.val_batches else None
        self.max_batches = per_rank
        best = run.read_best()
        self.best = best["value"] if best and best.get("metric") == self.key else math.inf

    def due(self, step: int, finished: bool) -> bool:
        return self.loader is not None and (step % self.every == 0 or finished)

    @torch.no_grad()
    def run(self, model: torch.nn.Module, step: int) -> tuple[dict, bool]:
        """``(record, improved)``: the validation record of ``step`` (same on every rank) and whether
        it is the best so far by ``val_<best_metric>``."""
        rng = torch.get_rng_state()
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        windows = 0
        for index, batch in enumerate(self.loader):
            if self.max_batches is not None and index >= self.max_batches:
                break
            batch = self.runtime.to_device(batch)
            with self.runtime.autocast():
                _, terms = self.loss_fn(model, batch)
            size = len(batch["target_tokens"])
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value) * size
            windows += size
            self.runtime.phases.tick()  # a long validation pass is progress, batch by batch
        model.train(was_training)
        torch.set_rng_state(rng)
        totals: dict[str, float] = {}
        count = 0
        for part_sums, part_windows in self.runtime.all_gather_object((sums, windows)):
            count += part_windows
            for name, value in part_sums.items():
                totals[name] = totals.get(name, 0.0) + value
        record = {"step": step, "val_windows": count, **{f"val_{k}": v / count for k, v in sorted(totals.items())}}
        value = record.get(self.key)
        if value is None:
            raise ValueError(f"best_metric: validation has no term {self.key[4:]!r} (has {sorted(totals)})")
        improved = value < self.best
        if improved:
            self.best = value
        return record, improved
