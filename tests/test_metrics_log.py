"""The run's metrics log in segments (constant cost per logged step, exact cut-back on resume), its
background writes, and progress output that suits a terminal or a log file. No training here: the
loop's use of them is in tests/test_trackers.py."""

from __future__ import annotations

import io
import json
import logging
import os

import pytest
import torch

from storymm.progress import Progress
from storymm.training import metrics_store, timing
from storymm.training.background import BackgroundWrites
from storymm.training.metrics_store import SEGMENT_LINES, MetricsStore, learned
from storymm.training.run import RunFolder, read_metrics


def _log(store: MetricsStore, steps, checkpoints=()) -> None:
    for step in steps:
        store.record(step, {"total": 1.0 / step, "time": 1000.0 + step})
        if step in checkpoints:
            store.flush()
            store.seal()


def _segment_steps(store: MetricsStore) -> list[list[int]]:
    return [[m["step"] for m in metrics_store._parse(open(u).read())] for u in store.segments()]


def test_segments_end_at_checkpoints_and_stay_bounded(tmp_path):
    """A segment ends at every checkpoint and after SEGMENT_LINES lines, so no write is larger than
    SEGMENT_LINES lines however long the run; readers get one list in step order."""
    store = RunFolder(str(tmp_path)).metrics_store()
    store.open(0)
    steps = range(1, 2 * SEGMENT_LINES + 31)
    _log(store, steps, checkpoints={20})
    store.close()
    segments = _segment_steps(store)
    assert segments[0] == list(range(1, 21))
    assert [len(s) for s in segments] == [20, SEGMENT_LINES, SEGMENT_LINES, 10]
    assert [storage_name(u) for u in store.segments()] == [f"{s[0]:08d}.jsonl" for s in segments]
    assert [m["step"] for m in read_metrics(str(tmp_path))] == list(steps)


def storage_name(uri: str) -> str:
    return os.path.basename(uri)


@pytest.mark.parametrize("resume_at", [20, 25, 0])
def test_a_resume_cuts_the_log_back_exactly(tmp_path, resume_at):
    """Whatever checkpoint a resume starts from (a segment's end, inside a segment after an older
    checkpoint fallback, or a fresh start), the lines after it are gone and the redone steps
    appear once; validation terms join their step's line."""
    run = str(tmp_path)
    store = MetricsStore(run)
    store.open(0)
    _log(store, range(1, 38), checkpoints={10, 20, 30})
    store.close()

    again = MetricsStore(run)
    again.open(resume_at)
    assert [m["step"] for m in again.read()] == list(range(1, resume_at + 1))
    _log(again, range(resume_at + 1, 41))
    again.record(40, {"val_total": 0.5})
    again.close()
    lines = read_metrics(run)
    assert [m["step"] for m in lines] == list(range(1, 41))
    assert lines[-1] == {"step": 40, "total": 1 / 40, "time": 1040.0, "val_total": 0.5}


def test_a_log_from_before_segments_is_read_and_moved_on_resume(tmp_path):
    run = str(tmp_path)
    old = [{"step": s, "total": float(s)} for s in (5, 10, 15)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in old))
    assert read_metrics(run) == old
    store = MetricsStore(run)
    store.open(10)  # its checkpoint was at 10
    _log(store, [15, 20])
    store.close()
    assert not (tmp_path / "metrics.jsonl").exists()
    assert [m["step"] for m in read_metrics(run)] == [5, 10, 15, 20]
    assert read_metrics(run)[:2] == old[:2]


def test_learned_drops_what_measures_time():
    line = {"step": 3, "total": 0.5, "lr": 1e-3, "samples_per_s": 40.0, "time": 1.0, "time/data_s": 0.1}
    assert learned(line) == {"step": 3, "total": 0.5, "lr": 1e-3}


def test_background_writes_warn_once_retry_and_raise_at_flush(tmp_path, caplog, monkeypatch):
    """A folder that cannot be written (a file stands where it should be): one warning however many
    writes fail, flush raises the error, and once the folder can be written the newest version of
    each file lands."""
    monkeypatch.setattr("storymm.training.background.RETRY_SECONDS", 0.05)
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    writes = BackgroundWrites("test", str(tmp_path / "out"))
    with caplog.at_level(logging.WARNING, logger="storymm.training.background"):
        for version in range(5):
            writes.put(str(blocker / "a.txt"), f"a{version}".encode())
        writes.put(str(blocker / "b.txt"), b"b")
        with pytest.raises(OSError):
            writes.flush()
    assert len([r for r in caplog.records if "cannot write" in r.getMessage()]) == 1
    blocker.unlink()
    writes.flush()
    assert (blocker / "a.txt").read_text() == "a4" and (blocker / "b.txt").read_text() == "b"
    writes.close()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_in_a_log_file(caplog):
    """A log file gets one plain line per interval and one at the end, each with the step, the loss,
    samples/s and an ETA, and not one carriage return; a terminal gets tqdm's bar."""
    log_file = io.StringIO()
    with caplog.at_level(logging.INFO, logger="storymm.progress"):
        progress = Progress(50, desc="sequence", stream=log_file, every_s=0.0)
        for step in range(1, 51):
            progress.update(1)
            progress.show(**{"loss": f"{1 / step:.4f}", "samples/s": "640"})
        progress.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "storymm.progress"]
    assert log_file.getvalue() == ""  # nothing drawn on the stream itself
    assert len(lines) == 51 and not any("\r" in line for line in lines)
    assert lines[9].startswith("sequence: step 10/50 (20%), loss 0.1111, samples/s 640, ETA ")
    assert lines[-1].startswith("sequence: step 50/50 (100%), loss 0.0200, samples/s 640, done in ")

    caplog.clear()
    terminal = _Terminal()
    with caplog.at_level(logging.INFO, logger="storymm.progress"):
        bar = Progress(50, desc="sequence", stream=terminal, every_s=0.0)
        bar.update(50)
        bar.close()
    assert "\r" in terminal.getvalue() and "50/50" in terminal.getvalue()
    assert not [r for r in caplog.records if r.name == "storymm.progress"]


# ------------------------------------------------------------------------- time breakdown


def _rank(data=0.01, forward_backward=0.10, all_reduce=0.0, optimizer=0.01, **rest) -> dict:
    parts = dict.fromkeys(timing.PARTS, 0.0)
    parts.update(data=data, forward_backward=forward_backward, all_reduce=all_reduce, optimizer=optimizer, **rest)
    return parts


def test_the_straggler_is_the_rank_whose_own_work_exceeds_the_others_and_its_category_is_named():
    """Rank 2 waits 0.30 s per step for data; the others wait for it in the gradient all-reduce. Its
    excess is measured against the step it would take at the others' pace."""
    ranks = [_rank(all_reduce=0.29), _rank(all_reduce=0.30), _rank(data=0.31), _rank(all_reduce=0.28)]
    slow = timing.straggler(ranks, ["n1", "n1", "n2", "n2"], step_s=0.42)
    assert slow["rank"] == 2 and slow["part"] == "data"
    assert slow["excess"] == pytest.approx(0.30 / 0.12)
    assert slow["text"] == "rank 2 on n2: +250% step time, in data wait"
    # a rank 5% slower in forward/backward is not named; 30% slower is, with its category
    assert timing.straggler([_rank(), _rank(forward_backward=0.1055)], ["a", "b"], step_s=0.12) is None
    slow = timing.straggler([_rank(), _rank(forward_backward=0.136)], ["a", "b"], step_s=0.156)
    assert slow["rank"] == 1 and slow["part"] == "forward_backward"
    assert timing.straggler([_rank()], ["a"], step_s=0.12) is None  # one rank: nobody to compare with


def test_a_window_line_has_the_means_goodput_flops_and_the_ranks(monkeypatch):
    """Goodput counts from the run's start through earlier attempts: the productive seconds carried
    from the step a run resumed from, over the wall time since the run started."""
    times = timing.StepTimes(started=1000.0, productive_s=30.0, world_size=2, peak=None)
    times.flops_per_step = 5e9
    ranks = [_rank(data=0.2, all_reduce=0.6), _rank(data=0.8)]  # seconds over a 4-step window
    line = times.line(ranks, ["a", "b"], steps=4, wall_s=1.2, now=1100.0)
    assert line["time/step_s"] == pytest.approx(0.3)
    assert line["time/data_s"] == pytest.approx((0.05 + 0.2) / 2)
    assert line["time/productive_s"] == pytest.approx(30.0 + 0.2 + 0.1 + 0.6 + 0.01)
    assert line["time/goodput"] == pytest.approx(line["time/productive_s"] / 100.0)
    assert line["flops_per_s"] == pytest.approx(5e9 * 2 / 0.3) and "mfu" not in line
    assert line["time/slowest_rank"] == 1 and line["time/straggler"].endswith("in data wait")
    assert [r["rank"] for r in line["time/ranks"]] == [0, 1] and line["time/ranks"][1]["data"] == 0.2
    summary = timing.run_summary([{"step": 4, "time": 1.0, **line}, {"step": 6, "val_total": 1.0}])
    assert summary["ranks"][1]["data"] == pytest.approx(0.2) and summary["goodput"] == [(4, line["time/goodput"])]
    assert summary["stragglers"] == [
        "rank 1 on b: +100% step time (median), in data wait, named at 1 of 1 logged steps"
    ]


def test_first_step_flops_counts_forward_and_backward_of_the_first_batch_only():
    model = torch.nn.Linear(8, 4)
    batches, counted = [torch.randn(5, 8) for _ in range(3)], []
    for batch in timing.first_step_flops(batches, counted):
        model(batch).sum().backward()
    assert counted == [4 * 5 * 8 * 4]  # forward 2BIO, backward 2BIO for the weight (the input needs no gradient)
