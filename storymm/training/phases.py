"""Where a rank's time goes: the phase it is in and since when, its last completed step, and the
seconds it spent in each phase since this attempt started.

The training loop marks phase changes (a handful per step, each a monotonic clock read under an
uncontended lock: never a host/device sync); :mod:`storymm.training.watchdog` reads the clock from
its own thread to tell a hang from a slow step, and time accounting reads :meth:`PhaseClock.totals`.

Phases are host-side. On a GPU, kernels are launched asynchronously, so device time shows up in the
phase where the host next waits for the device (a collective, the loss read at a logging step);
under DDP the gradient all-reduce overlaps the backward pass and its wait is counted in
``forward_backward``. The explicit collectives of the loop (metrics, checkpoint barrier, window
records, stop flags) are their own ``collective`` phase, nested in the phase that called them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum


class Phase(StrEnum):
    STARTUP = "startup"  # process group, model, checkpoint restore, data open: until the first batch is asked for
    DATA = "data"  # waiting for the next batch
    FORWARD_BACKWARD = "forward_backward"  # to device, forward, loss, backward (with DDP's gradient all-reduce)
    OPTIMIZER = "optimizer"  # gradient clipping, optimiser and scheduler step
    COLLECTIVE = "collective"  # an explicit all-reduce/all-gather/barrier (nested in another phase)
    LOGGING = "logging"  # loss terms combined across ranks, metrics written, trackers
    VALIDATION = "validation"
    CHECKPOINT = "checkpoint"
    FINISHED = "finished"


STEP_DURATIONS_KEPT = 256


@dataclass(frozen=True)
class PhaseSnapshot:
    """One consistent reading of a :class:`PhaseClock` (monotonic seconds)."""

    phase: Phase
    outer: Phase | None  # the phase a nested one (a collective) interrupted
    since: float  # when ``phase`` was entered
    step: int | None  # last completed (or restored) step; None before either
    steps_done: int  # steps completed in this attempt
    progress_at: float  # last sign of progress: a phase change, a step, a tick
    now: float

    @property
    def stalled_s(self) -> float:
        """Seconds since the last sign of progress."""
        return self.now - self.progress_at

    def describe(self) -> str:
        return self.phase.value + (f" (during {self.outer.value})" if self.outer else "")


class PhaseClock:
    """Per-rank phase clock; safe to read from other threads while the loop writes it."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        now = clock()
        self.started = now
        self._phase, self._outer, self._since = Phase.STARTUP, None, now
        self._totals: dict[Phase, float] = {}
        self._step: int | None = None
        self._step_at: float | None = None
        self._steps_done = 0
        self._progress_at = now
        self._durations: deque[float] = deque(maxlen=STEP_DURATIONS_KEPT)

    # ------------------------------------------------------------------ written by the loop

    def _switch(self, phase: Phase, outer: Phase | None, now: float) -> None:
        self._totals[self._phase] = self._totals.get(self._phase, 0.0) + (now - self._since)
        self._phase, self._outer, self._since = phase, outer, now
        self._progress_at = now

    def enter(self, phase: Phase) -> None:
        """From now on this rank is in ``phase`` (ends a nested phase too)."""
        with self._lock:
            self._switch(phase, None, self._clock())

    @contextlib.contextmanager
    def within(self, phase: Phase) -> Iterator[None]:
        """``phase`` for the duration of the block, then back to the phase that was interrupted."""
        with self._lock:
            previous, previous_outer = self._phase, self._outer
            self._switch(phase, previous_outer or previous, self._clock())
        try:
            yield
        finally:
            with self._lock:
                self._switch(previous, previous_outer, self._clock())

    def iterate(self, items: Iterable, phase: Phase = Phase.DATA) -> Iterator:
        """``items``, with the wait for each one counted as ``phase``."""
        iterator = iter(items)
        while True:
            self.enter(phase)
            try:
                item = next(iterator)
            except StopIteration:
                return
            yield item

    def tick(self) -> None:
        """A long phase moved on (e.g. one validation batch done): progress without a phase change."""
        with self._lock:
            self._progress_at = self._clock()

    def step_done(self, step: int) -> None:
        """Optimiser step ``step`` completed."""
        with self._lock:
            now = self._clock()
            if self._step_at is not None:
                self._durations.append(now - self._step_at)
            self._step, self._step_at, self._progress_at = step, now, now
            self._steps_done += 1

    def resumed_at(self, step: int) -> None:
        """The attempt restored ``step`` from a checkpoint (not a step done, no duration)."""
        with self._lock:
            self._step = step

    # ---------------------------------------------------------------- read from anywhere

    def totals(self) -> dict[str, float]:
        """Seconds per phase since this clock started, the current phase's time so far included."""
        with self._lock:
            totals = dict(self._totals)
            totals[self._phase] = totals.get(self._phase, 0.0) + (self._clock() - self._since)
        return {phase.value: seconds for phase, seconds in totals.items()}

    def snapshot(self) -> PhaseSnapshot:
        with self._lock:
            return PhaseSnapshot(
                self._phase, self._outer, self._since, self._step, self._steps_done, self._progress_at, self._clock()
            )

    def step_durations(self) -> list[float]:
        """Seconds between consecutive completed steps of this attempt (the latest ones)."""
        with self._lock:
            return list(self._durations)
