"""Exact resume: the windows each step trains on are the same when a run is interrupted and resumed
on another number of ranks (2 -> 1 -> 2, via ``accelerate launch`` and gloo), and the loss curve of a run
interrupted twice equals the uninterrupted one at every logged step (same world size, CPU).
(SIGKILL of a local run: tests/test_training.py; a killed Ray worker: tests/test_ray.py.)"""

from __future__ import annotations

import subprocess
from collections import Counter

import pytest
from runs import curve
from test_accelerate import _env

from storymm.training.loop import read_metrics, read_run, read_windows, train
from storymm.training.run import RunFolder
from storymm.training.runtime import Runtime

from small import ROOT, SMALL, accelerate_launch, small_config, small_dataset, train_args


@pytest.fixture(scope="module")
def data_uri(tmp_path_factory):
    return small_dataset(str(tmp_path_factory.mktemp("resume")), 40, seed=3, frames=(6, 10))


def _launch(data_uri: str, run: str, sets: list[str], ranks: int = 2) -> None:
    """``jobs/train.py --backend accelerate`` on ``ranks`` CPU processes (``accelerate launch``, gloo)."""
    command = [*accelerate_launch(ranks), *train_args(data_uri, run, SMALL + sets, stage="text_ae")]
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def _global_steps(run: str) -> list[list]:
    """Per step, the windows of all ranks in rank order (the global batch)."""
    log = read_windows(run)
    assert [entry["step"] for entry in log] == list(range(1, len(log) + 1)), "a step is missing or repeated"
    return [[tuple(w) for rank in entry["windows"] for w in rank] for entry in log]


@pytest.mark.slow
def test_windows_are_sample_exact_across_2_1_2_ranks(data_uri, tmp_path):
    # 16 windows per step (8 per rank on 2 ranks); ~9 steps per epoch, so the run crosses epochs
    base = ["train.record_windows=true", "train.text_ae.log_every=2", "train.text_ae.checkpoint_every=100"]
    reference, elastic = str(tmp_path / "reference"), str(tmp_path / "elastic")
    _launch(data_uri, reference, [*base, "train.text_ae.steps=24"])

    _launch(data_uri, elastic, [*base, "train.text_ae.steps=7"])  # stops mid-epoch 0
    # resumed on ONE rank (in this process): 16 windows per step on that rank, to step 13 (epoch 1)
    one = small_config(*base, "train.text_ae.steps=13")
    assert train(one, "text_ae", data_uri, elastic, Runtime(), progress=False)["step"] == 13
    _launch(data_uri, elastic, [*base, "train.text_ae.steps=24"])  # and on two again, to the end

    assert read_run(elastic)["global_batch"] == 16 and read_run(elastic)["partitions"] == 2  # each rank reads 1/2
    expected, got = _global_steps(reference), _global_steps(elastic)
    assert len(expected) == len(got) == 24
    sizes = [[len(rank) for rank in entry["windows"]] for entry in read_windows(elastic)]
    assert sizes[:7] == [[8, 8]] * 7 and sizes[7:13] == [[16]] * 6 and sizes[13:] == [[8, 8]] * 11
    assert got == expected, "the resumed run trained on other windows than the uninterrupted one"
    # and within each epoch no window is repeated
    epochs = [entry["epoch"] for entry in read_windows(elastic)]
    assert epochs[0] == 0 and epochs[-1] >= 2
    for epoch in set(epochs):
        seen = Counter(w for step, e in zip(got, epochs) if e == epoch for w in step)
        assert max(seen.values()) == 1, f"epoch {epoch} repeats a window"


def test_resume_on_a_world_size_that_does_not_divide_the_global_batch_is_refused(data_uri, tmp_path):
    run = str(tmp_path / "run")
    train(small_config("data.batch_size=9", "train.text_ae.steps=1"), "text_ae", data_uri, run, progress=False)
    # a second worker would need 4.5 windows per step; the loop says so before doing anything
    from storymm.training.loop import TrainingError

    with pytest.raises(TrainingError, match="global batch is 9 windows per step, which 2 workers"):
        train(
            small_config("data.batch_size=9", "train.text_ae.steps=2"),
            "text_ae",
            data_uri,
            run,
            Runtime(rank=0, world_size=2),
            progress=False,
        )


def test_a_run_planned_for_two_workers_that_starts_on_one_trains_as_if_started_on_two(data_uri, tmp_path):
    """An elastic Ray job (``--workers 1-2``) may start with one worker when the second node is not yet
    free: its global batch and partitions are still those of two workers (``planned_world_size``), so
    it trains the windows, and logs the curve, of a run started on two (here: its one-process equal,
    ``data.batch_size`` twice as large and two partitions), not those of a one-worker run."""
    sets = ["train.record_windows=true", "train.text_ae.log_every=1", "train.text_ae.steps=6"]
    planned, started_on_two, one_worker = (str(tmp_path / name) for name in ("planned", "two", "one"))
    train(
        small_config(*sets, "data.batch_size=4"),
        "text_ae",
        data_uri,
        planned,
        Runtime(planned_world_size=2),
        progress=False,
    )
    train(
        small_config(*sets, "data.batch_size=8", "data.partitions=2"),
        "text_ae",
        data_uri,
        started_on_two,
        progress=False,
    )
    train(small_config(*sets, "data.batch_size=4"), "text_ae", data_uri, one_worker, progress=False)
    assert (read_run(planned)["global_batch"], read_run(planned)["partitions"]) == (8, 2)
    assert (read_run(one_worker)["global_batch"], read_run(one_worker)["partitions"]) == (4, 1)
    assert _global_steps(planned) == _global_steps(started_on_two) != _global_steps(one_worker)
    assert curve(read_metrics(planned)) == curve(read_metrics(started_on_two))


class _StopsAfter(Runtime):
    """The in-process runtime asked to stop after ``steps`` steps, as SLURM's warning signal asks the
    Accelerate runtime (``should_stop`` is the loop's only stop hook): the loop checkpoints and returns."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps_left = steps

    def should_stop(self) -> bool:  # asked once after every step that does not finish the run
        self.steps_left -= 1
        return self.steps_left == 0


def test_sequence_stage_with_dropout_stopped_twice_gives_the_uninterrupted_curve(data_uri, tmp_path):
    """Past warm-up, with per-sample skip dropout drawing from the RNG every step: stopped at step 5
    (between checkpoints) and again at 11, each time resumed by the same call, the run logs exactly
    the uninterrupted curve, every term at every step."""
    config = small_config(
        "data.batch_size=16",
        "model.decoder_skips=true",
        "model.skip_dropout=0.5",
        "train.sequence.steps=14",
        "train.sequence.warmup_steps=2",
        "train.sequence.log_every=1",
        "train.sequence.checkpoint_every=4",
    )
    reference, interrupted = str(tmp_path / "reference"), str(tmp_path / "interrupted")
    train(config, "sequence", data_uri, reference, progress=False)
    assert train(config, "sequence", data_uri, interrupted, _StopsAfter(5), progress=False)["status"] == "stopped"
    assert train(config, "sequence", data_uri, interrupted, _StopsAfter(6), progress=False)["step"] == 11
    summary = train(config, "sequence", data_uri, interrupted, progress=False)
    assert summary["status"] == "completed" and summary["step"] == 14
    expected = curve(read_metrics(reference))
    assert [m["step"] for m in expected] == list(range(1, 15)) and expected[-1]["epoch"] >= 1
    assert curve(read_metrics(interrupted)) == expected
    assert [a["start_step"] for a in RunFolder(interrupted).read_attempts()] == [0, 5, 11]


def test_checkpoint_from_before_the_global_order_resumes_at_the_next_epoch(data_uri, tmp_path):
    """Its position ({epoch, batch, world_size}) was in an order that depended on the world size, so
    it cannot be carried over: the run goes on at the start of the next epoch, as it did before."""
    import torch

    from storymm.training import checkpoint

    run = str(tmp_path / "run")
    sets = ["train.record_windows=true", "train.text_ae.log_every=1"]
    train(small_config(*sets, "train.text_ae.steps=2"), "text_ae", data_uri, run, progress=False)
    uri = checkpoint.latest_uri(run)
    state = checkpoint.load(uri)
    state["data_position"] = {"epoch": 0, "batch": 2, "world_size": 1}
    torch.save(state, uri)
    train(small_config(*sets, "train.text_ae.steps=3"), "text_ae", data_uri, run, progress=False)
    assert [(w["step"], w["epoch"]) for w in read_windows(run)] == [(1, 0), (2, 0), (3, 1)]
    assert checkpoint.load(checkpoint.latest_uri(run))["data_position"] == {
        "epoch": 1,
        "windows": 8,
        "global_batch": 8,
        "partitions": 1,
        "world_size": 1,
    }
