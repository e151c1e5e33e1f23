"""Where a run's time goes, read off each rank's phase clock (``phases.py``) at every logged step:
the seconds per step in each phase per rank, the slowest rank and why, goodput, achieved FLOP/s and
MFU. :class:`StepTimes` does it for the loop's :class:`~storymm.training.loop.MetricsLog`.

What can be told apart, host side (the phase clock never waits for the device):

- ``data``: waiting for the next batch; ``optimizer``: clipping, optimiser and scheduler step;
  ``validation``, ``checkpoint``, ``logging`` (metrics combined across ranks, written, trackers);
  ``collective``: the loop's own all-reduces, gathers and barriers (loss terms, RNG states, stop flags).
- ``all_reduce``: DDP's gradient all-reduce runs inside ``backward()``, overlapped with it; a DDP
  communication hook (:class:`GradientSyncTimer`, same arithmetic as DDP's own reduction) times, per
  step, how long this rank waited after its last gradient bucket was handed over until every bucket
  was reduced. That wait is taken out of ``forward_backward``. It is the time the rank waits for the
  slowest rank's backward plus the transfer itself; the two cannot be told apart from one rank.
- On a GPU, kernels run asynchronously: device time lands in the phase where the host next waits for
  the device (the step's all-reduce or the loss read at a logging step), and NCCL's futures complete
  when the reduction is queued, so ``all_reduce`` stays near zero there and the wait is part of
  ``forward_backward``.

The phases partition a rank's time, so each rank's parts add up to its wall time between logged
steps. **Straggler**: a rank whose own work (data + forward/backward + optimizer) per step exceeds
the median of the other ranks by more than ``STRAGGLER_THRESHOLD`` of the step; the category is its
phase furthest above the others' median ("rank 1 on node2: +38% step time, in data wait").
**Goodput**: productive step time (data, forward/backward, all-reduce and optimizer of the steps the
run kept) over the wall time since the run started (``run.json``), so start-up, checkpoints,
validation, logging, the time between a crash and the restart and the steps redone after it all count
against it. **FLOP/s**: the model FLOPs of one training step, counted by ``torch.utils.flop_counter``
on this attempt's first step (matmuls and convolutions, forward and backward; what
``bench/train_step.py`` counts), times steps per second; **MFU** against the GPU's dense peak
(:data:`PEAK_TFLOPS`, or ``STORYMM_PEAK_TFLOPS``); none on CPU.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Iterable, Iterator

import torch

from storymm.training.metrics_store import TIMING_PREFIX
from storymm.training.phases import PhaseClock

log = logging.getLogger(__name__)

#: the breakdown's parts, in the order they are drawn
PARTS = ("data", "forward_backward", "all_reduce", "optimizer", "collective", "validation", "checkpoint", "logging")
LABELS = {
    "data": "data wait",
    "forward_backward": "forward/backward",
    "all_reduce": "gradient all-reduce wait",
    "optimizer": "optimizer step",
    "collective": "collectives",
    "validation": "validation",
    "checkpoint": "checkpointing",
    "logging": "logging",
}
OWN_WORK = ("data", "forward_backward", "optimizer")  # what a rank does itself; the rest waits on others
PRODUCTIVE = ("data", "forward_backward", "all_reduce", "optimizer")  # a training step's own time
STRAGGLER_THRESHOLD = 0.10
RANKS_KEPT = 64  # per-rank detail in each line for at most this many ranks (the slowest)

# Dense peak TFLOP/s per GPU (bf16, tf32, fp32), from the vendors' data sheets; matched by name.
PEAK_TFLOPS = {
    "H200": (989.0, 494.0, 67.0),
    "H100 PCIe": (756.0, 378.0, 51.0),
    "H100": (989.0, 494.0, 67.0),  # SXM
    "A100": (312.0, 156.0, 19.5),
    "L40S": (362.0, 183.0, 91.6),
    "L4": (121.0, 60.0, 30.3),
    "A10G": (70.0, 35.0, 31.2),
}
PEAK_ENV = "STORYMM_PEAK_TFLOPS"


def key(part: str) -> str:
    return f"{TIMING_PREFIX}{part}_s"


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak FLOP/s for ``precision`` ("bf16" or "no"), or None (CPU, unknown GPU)."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for model, (bf16, tf32, fp32) in PEAK_TFLOPS.items():
        if model in name:
            if precision == "bf16":
                return bf16 * 1e12
            return (tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32) * 1e12
    return None


# ----------------------------------------------------------------------------- one rank


class GradientSyncTimer:
    """A DDP communication hook with DDP's own arithmetic (each gradient bucket scaled by 1/world,
    then summed across ranks) that times the wait for it: per step, from the moment this rank handed
    over its last bucket (its backward was done) until the last bucket came back reduced."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waited = 0.0
        self._last_launch = 0.0
        self._last_done = 0.0

    @classmethod
    def attach_to(cls, model) -> GradientSyncTimer | None:
        """A timer hooked into ``model`` when it is DDP-wrapped (before its first step), else None."""
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return None
        timer = cls()
        model.register_comm_hook(None, timer._hook)
        return timer

    def _hook(self, state, bucket):
        import torch.distributed as dist

        launched = time.monotonic()
        with self._lock:
            if bucket.index() == 0:  # a new step: the previous one's wait is over
                self._settle()
            self._last_launch = launched
        buffer = bucket.buffer()
        buffer.mul_(1.0 / dist.get_world_size())
        future = dist.all_reduce(buffer, async_op=True).get_future()

        def done(fut):
            with self._lock:
                self._last_done = max(self._last_done, time.monotonic())
            return fut.value()[0]

        return future.then(done)

    def _settle(self) -> None:
        if self._last_done > self._last_launch > 0:
            self._waited += self._last_done - self._last_launch
            self._last_launch = self._last_done = 0.0

    def take(self) -> float:
        """Seconds waited since the previous call (steps whose reduction has come back)."""
        with self._lock:
            self._settle()
            waited, self._waited = self._waited, 0.0
        return waited


class RankClock:
    """This rank's seconds per part since the previous logged step."""

    def __init__(self, phases: PhaseClock, sync: GradientSyncTimer | None = None):
        self.phases, self.sync = phases, sync
        self._last = phases.totals()

    def take(self) -> dict[str, float]:
        now = self.phases.totals()
        seconds = {part: now.get(part, 0.0) - self._last.get(part, 0.0) for part in PARTS if part != "all_reduce"}
        self._last = now
        waited = self.sync.take() if self.sync is not None else 0.0
        waited = min(waited, seconds["forward_backward"])  # the wait happened inside backward()
        seconds["forward_backward"] -= waited
        seconds["all_reduce"] = waited
        return {part: seconds[part] for part in PARTS}


def first_step_flops(batches: Iterable, counted: list) -> Iterator:
    """``batches``, with the model FLOPs of everything done on the first one (forward, backward;
    torch's FlopCounterMode counts matmuls and convolutions) appended to ``counted``."""
    from torch.utils.flop_counter import FlopCounterMode

    iterator = iter(batches)
    for first in iterator:
        counter = FlopCounterMode(display=False)
        with counter:
            yield first
        counted.append(counter.get_total_flops())
        break
    yield from iterator


# ------------------------------------------------------------------------------ all ranks


def per_step(seconds: dict[str, float], steps: int) -> dict[str, float]:
    return {part: value / max(steps, 1) for part, value in seconds.items()}


def straggler(ranks: list[dict], hosts: list[str], step_s: float) -> dict | None:
    """The slowest rank, when its own work per step exceeds the others' median by more than
    ``STRAGGLER_THRESHOLD`` of the step: ``{"rank", "host", "excess", "part", "text"}``. ``ranks``:
    seconds per step per part, one dict per rank."""
    if len(ranks) < 2 or step_s <= 0:
        return None
    own = [sum(r[p] for p in OWN_WORK) for r in ranks]
    slowest = max(range(len(ranks)), key=own.__getitem__)
    others = [r for i, r in enumerate(ranks) if i != slowest]
    behind = own[slowest] - statistics.median(o for i, o in enumerate(own) if i != slowest)
    # how much longer the step is than it would be if this rank kept the others' pace
    excess = behind / max(step_s - behind, 1e-9)
    if behind <= 0 or excess < STRAGGLER_THRESHOLD:
        return None
    part = max(OWN_WORK, key=lambda p: ranks[slowest][p] - statistics.median(r[p] for r in others))
    host = hosts[slowest] if slowest < len(hosts) else "?"
    text = f"rank {slowest} on {host}: +{100 * excess:.0f}% step time, in {LABELS[part]}"
    return {"rank": slowest, "host": host, "excess": excess, "part": part, "text": text}


class StepTimes:
    """The time breakdown of one logging window, for the metrics line (rank 0)."""

    def __init__(self, started: float | None, productive_s: float, world_size: int, peak: float | None):
        """``started``: Unix time the run started; ``productive_s``: productive seconds of the steps
        kept before this attempt (from the line of the step it resumed from)."""
        self.started, self.productive_s = started, productive_s
        self.world_size, self.peak = world_size, peak
        self.flops_per_step: float | None = None  # model FLOPs of one step on one rank
        self._named: tuple | None = None
        self._named_at = 0.0

    def line(self, ranks: list[dict], hosts: list[str], steps: int, wall_s: float, now: float) -> dict:
        """Keys for the metrics line: mean seconds per step per part, the step's wall time, the
        slowest rank, goodput, FLOP/s, MFU, and the per-rank detail (``time/ranks``)."""
        ranks = [per_step(r, steps) for r in ranks]
        step_s = wall_s / max(steps, 1)
        out: dict = {key("step"): step_s}
        for part in PARTS:
            out[key(part)] = sum(r[part] for r in ranks) / len(ranks)
        self.productive_s += sum(ranks[0][p] for p in PRODUCTIVE) * steps
        out[f"{TIMING_PREFIX}productive_s"] = self.productive_s
        if self.started is not None and now > self.started:
            out[f"{TIMING_PREFIX}goodput"] = self.productive_s / (now - self.started)
        slow = straggler(ranks, hosts, step_s)
        if slow is not None:
            out[f"{TIMING_PREFIX}slowest_rank"] = slow["rank"]
            out[f"{TIMING_PREFIX}slowest_excess"] = slow["excess"]
            out[f"{TIMING_PREFIX}straggler"] = slow["text"]
            self._say(slow)
        else:
            self._named = None
        if self.flops_per_step:
            achieved = self.flops_per_step * self.world_size / step_s
            out["flops_per_s"] = achieved
            if self.peak:
                out["mfu"] = achieved / self.world_size / self.peak
        order = sorted(range(len(ranks)), key=lambda i: -sum(ranks[i][p] for p in OWN_WORK))[:RANKS_KEPT]
        out[f"{TIMING_PREFIX}ranks"] = [
            {"rank": i, "host": hosts[i] if i < len(hosts) else "?", **{p: round(ranks[i][p], 6) for p in PARTS}}
            for i in sorted(order)
        ]
        return out

    def _say(self, slow: dict) -> None:
        """Log a straggler when it appears, when the rank or the part changes, and every 5 minutes."""
        named = (slow["rank"], slow["part"])
        now = time.monotonic()
        if named != self._named or now - self._named_at >= 300:
            log.warning("straggler: %s", slow["text"])
            self._named, self._named_at = named, now


# ------------------------------------------------------------------------------- a whole run


def run_summary(lines: list[dict]) -> dict | None:
    """A run's time over its metrics log: ``{"ranks": [{"rank", "host", <part>: s/step}], "goodput":
    [(step, goodput)], "stragglers": [text], "flops_per_s", "mfu"}`` (logging windows weighted by
    their steps; a straggler line per rank and part named, with the median excess and how many
    windows named it; FLOP/s and MFU: medians over the windows, None where not measured); None for a
    log without the time breakdown."""
    totals: dict[int, dict] = {}
    goodput, named, windows, previous = [], {}, 0, 0
    rates: dict[str, list[float]] = {"flops_per_s": [], "mfu": []}
    for line in lines:
        ranks = line.get(f"{TIMING_PREFIX}ranks")
        if not ranks:
            continue
        steps, previous = line["step"] - previous, line["step"]
        windows += 1
        for entry in ranks:
            total = totals.setdefault(entry["rank"], {"host": entry.get("host", "?"), "steps": 0})
            total["steps"] += steps
            for part in PARTS:
                total[part] = total.get(part, 0.0) + entry.get(part, 0.0) * steps
        if f"{TIMING_PREFIX}goodput" in line:
            goodput.append((line["step"], line[f"{TIMING_PREFIX}goodput"]))
        for name, values in rates.items():
            if name in line:
                values.append(line[name])
        text = line.get(f"{TIMING_PREFIX}straggler")
        if text:
            rank, part = int(line[f"{TIMING_PREFIX}slowest_rank"]), text.rsplit(", in ", 1)[-1]
            named.setdefault((rank, part), []).append(line[f"{TIMING_PREFIX}slowest_excess"])
    if not totals:
        return None
    ranks = [
        {"rank": rank, "host": t["host"], **{p: t.get(p, 0.0) / max(t["steps"], 1) for p in PARTS}}
        for rank, t in sorted(totals.items())
    ]
    stragglers = [
        f"rank {rank} on {totals.get(rank, {}).get('host', '?')}: +{100 * statistics.median(excess):.0f}% step time "
        f"(median), in {part}, named at {len(excess)} of {windows} logged steps"
        for (rank, part), excess in sorted(named.items(), key=lambda item: -len(item[1]))
    ]
    medians = {name: statistics.median(values) if values else None for name, values in rates.items()}
    return {"ranks": ranks, "goodput": goodput, "stragglers": stragglers, **medians}
