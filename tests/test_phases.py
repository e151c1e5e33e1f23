"""The per-rank phase clock (storymm/training/phases.py): what the watchdog and time accounting read."""

from __future__ import annotations

import time

import pytest

from storymm.training.loop import train
from storymm.training.phases import Phase, PhaseClock
from storymm.training.runtime import Runtime

from small import small_config, small_dataset


class _Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_totals_add_up_and_a_nested_collective_returns_to_the_phase_it_interrupted():
    clock = _Clock()
    phases = PhaseClock(clock)
    clock.now += 2  # start-up
    phases.enter(Phase.DATA)
    clock.now += 1
    phases.enter(Phase.LOGGING)
    clock.now += 0.5
    with phases.within(Phase.COLLECTIVE):
        snap = phases.snapshot()
        assert (snap.phase, snap.outer) == (Phase.COLLECTIVE, Phase.LOGGING)
        assert snap.describe() == "collective (during logging)"
        clock.now += 3
    after = phases.snapshot()
    assert (after.phase, after.outer, after.since) == (Phase.LOGGING, None, 106.5)
    clock.now += 0.25
    assert phases.totals() == {"startup": 2, "data": 1, "logging": 0.75, "collective": 3}
    assert sum(phases.totals().values()) == clock.now - phases.started


def test_progress_is_a_phase_change_a_step_or_a_tick_and_step_durations_skip_the_first():
    clock = _Clock()
    phases = PhaseClock(clock)
    phases.resumed_at(40)
    assert phases.snapshot().step == 40 and phases.snapshot().steps_done == 0
    for _ in range(3):
        clock.now += 2
        phases.step_done(phases.snapshot().step + 1)
    assert phases.snapshot().step == 43 and phases.step_durations() == [2, 2]
    phases.enter(Phase.VALIDATION)
    clock.now += 7
    assert phases.snapshot().stalled_s == 7
    phases.tick()
    clock.now += 1
    assert phases.snapshot().stalled_s == 1 and phases.snapshot().phase is Phase.VALIDATION


def test_iterate_counts_the_wait_for_each_item_as_data():
    clock = _Clock()
    phases = PhaseClock(clock)

    def slow_items():
        for item in range(3):
            clock.now += 1  # the producer's wait
            yield item

    for _ in phases.iterate(slow_items()):
        assert phases.snapshot().phase is Phase.DATA
        phases.enter(Phase.FORWARD_BACKWARD)
        clock.now += 0.5
    assert phases.totals() == {"startup": 0, "data": 3, "forward_backward": 1.5}


@pytest.fixture(scope="module")
def data_uri(tmp_path_factory):
    return small_dataset(str(tmp_path_factory.mktemp("phases")), 20, seed=4, frames=(6, 9))


def test_a_training_run_puts_its_time_into_phases_and_counts_its_steps(data_uri, tmp_path):
    sets = ["train.visual_ae.steps=6", "train.visual_ae.log_every=2", "train.visual_ae.checkpoint_every=3"]
    sets += ["train.visual_ae.eval_every=3", "train.visual_ae.val_batches=2"]
    runtime, started = Runtime(), time.monotonic()
    train(small_config(*sets), "visual_ae", data_uri, str(tmp_path / "run"), runtime, progress=False)
    wall = time.monotonic() - started
    totals, snap = runtime.phases.totals(), runtime.phases.snapshot()
    for phase in ("startup", "data", "forward_backward", "optimizer", "logging", "validation", "checkpoint"):
        assert totals[phase] > 0, (phase, totals)
    assert snap.phase is Phase.FINISHED and snap.step == 6 and snap.steps_done == 6
    assert len(runtime.phases.step_durations()) == 5
    assert sum(totals.values()) == pytest.approx(wall, abs=0.5)  # every second of the attempt is in a phase

    resumed = Runtime()
    longer = small_config(*[s.replace("steps=6", "steps=8") for s in sets])
    train(longer, "visual_ae", data_uri, str(tmp_path / "run"), resumed, progress=False)
    assert resumed.phases.snapshot().step == 8 and resumed.phases.snapshot().steps_done == 2
