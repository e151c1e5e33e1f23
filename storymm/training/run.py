"""A training run's folder, and the one place that knows its layout:

    <run>/run.json        what was trained: stage, resolved config, data, backend, world size
    <run>/metrics/        one JSON line per logged step, in segments (rank 0 writes it; ``metrics_store.py``)
    <run>/tensorboard/    TensorBoard event files (``train.trackers``; ``trackers.py``)
    <run>/trackers.json   the experiment trackers' ids for this run (one MLflow run through every resume)
    <run>/windows.jsonl   with ``train.record_windows``: the windows each rank trained on, per step
    <run>/attempts.jsonl  one line per start of training (every backend): attempt, the step it restored
    <run>/reports.jsonl   one line per evaluation report written of this run (``storymm export`` cites the latest)
    <run>/checkpoints/    the checkpoints and their ``latest`` marker (format: ``checkpoint.py``),
                          written in the background by the folder's ``CheckpointWriter``
    <run>/heartbeats/     rank-R.json: each rank's phase and step, rewritten every few seconds (``watchdog.py``)
    <run>/incidents/      attempt-AAA-rank-RRRR.json: what a rank's watchdog saw when it declared a hang

The loop, evaluation, the backends and the tests go through :class:`RunFolder` instead of joining
file names themselves.
"""

from __future__ import annotations

import json
import os
import time

from storymm import storage
from storymm.errors import StorymmError
from storymm.training import checkpoint
from storymm.training.metrics_store import MetricsStore

RUN_FILE = "run.json"
WINDOWS_FILE = "windows.jsonl"
ATTEMPTS_FILE = "attempts.jsonl"
HEARTBEATS_DIR = "heartbeats"
INCIDENTS_DIR = "incidents"
TRACKERS_FILE = "trackers.json"
TENSORBOARD_DIR = "tensorboard"
REPORTS_FILE = "reports.jsonl"


class TrainingError(StorymmError, RuntimeError):
    """A run that cannot be trained or read as asked; the message says what to do."""


class RunFolder:
    """``<run_uri>``: local path, ``file://`` or ``s3://``."""

    def __init__(self, uri: str):
        self.uri = str(uri)
        self._writer: checkpoint.CheckpointWriter | None = None

    def __repr__(self) -> str:
        return f"RunFolder({self.shown!r})"

    @property
    def shown(self) -> str:
        """The URI as it may be printed (no credentials)."""
        return storage.redact(self.uri)

    # ------------------------------------------------------------------------------ run.json

    def exists(self) -> bool:
        return storage.exists(storage.join(self.uri, RUN_FILE))

    def read_record(self) -> dict:
        try:
            return json.loads(storage.read_text(storage.join(self.uri, RUN_FILE)))
        except FileNotFoundError:
            raise TrainingError(f"{self.shown} is not a storymm run (no {RUN_FILE})") from None

    def write_record(self, record: dict) -> None:
        storage.write_text(storage.join(self.uri, RUN_FILE), json.dumps(record, indent=2))

    @property
    def stage(self) -> str:
        return self.read_record()["stage"]

    # ----------------------------------------------------------------------- metrics, windows

    def _read_jsonl(self, name: str) -> list[dict]:
        uri = storage.join(self.uri, name)
        if not storage.exists(uri):
            return []
        return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]

    def _write_jsonl(self, name: str, lines: list[dict]) -> None:
        """The whole file at once: object stores have no append, and a resumed run rewrites the lines
        past its checkpoint instead of repeating them."""
        storage.write_text(storage.join(self.uri, name), "".join(json.dumps(m) + "\n" for m in lines))

    def read_metrics(self) -> list[dict]:
        """One dict per logged step, in step order (the lines of ``<run>/metrics/``)."""
        return self.metrics_store().read()

    def metrics_store(self) -> MetricsStore:
        return MetricsStore(self.uri)

    def tracker_file(self) -> str:
        return storage.join(self.uri, TRACKERS_FILE)

    def tensorboard_uri(self) -> str:
        return storage.join(self.uri, TENSORBOARD_DIR)

    def read_windows(self) -> list[dict]:
        """Per step ``{"step", "epoch", "windows"}``; ``windows[r]`` lists the ``[story_id, start]``
        windows rank r trained on at that step."""
        return self._read_jsonl(WINDOWS_FILE)

    def write_windows(self, lines: list[dict]) -> None:
        self._write_jsonl(WINDOWS_FILE, lines)

    # ------------------------------------------------------------------------ attempts.jsonl

    def read_attempts(self) -> list[dict]:
        """One line per start of training: ``attempt`` (1, 2, ...), ``start_step`` (the step the loop
        restored from a checkpoint, 0 for a fresh start), ``world_size``, ``backend``, ``hosts`` (per
        rank), ``time``; Ray adds ``node_ids``."""
        return self._read_jsonl(ATTEMPTS_FILE)

    def record_attempt(self, entry: dict) -> None:
        """Rank 0, once per attempt, after every rank has read the attempts so far (``read_attempts``)."""
        self._write_jsonl(ATTEMPTS_FILE, [*self.read_attempts(), {**entry, "time": time.time()}])

    # -------------------------------------------------------------- heartbeats and incidents

    def write_heartbeat(self, rank: int, record: dict) -> None:
        storage.write_text(storage.join(self.uri, HEARTBEATS_DIR, f"rank-{rank:04d}.json"), json.dumps(record))

    def read_heartbeats(self) -> list[dict]:
        """Every rank's latest heartbeat (any attempt: filter on ``attempt``)."""
        folder = storage.join(self.uri, HEARTBEATS_DIR)
        return [json.loads(storage.read_text(uri)) for uri in storage.list_files(folder, suffix=".json")]

    def incident_uri(self, attempt: int, rank: int) -> str:
        return storage.join(self.uri, INCIDENTS_DIR, f"attempt-{attempt:03d}-rank-{rank:04d}.json")

    def write_incident(self, attempt: int, rank: int, record: dict) -> str:
        uri = self.incident_uri(attempt, rank)
        storage.write_text(uri, json.dumps(record, indent=1))
        return uri

    def read_incidents(self) -> list[dict]:
        """Every incident of the run, oldest attempt first."""
        folder = storage.join(self.uri, INCIDENTS_DIR)
        return [json.loads(storage.read_text(uri)) for uri in storage.list_files(folder, suffix=".json")]

    # ------------------------------------------------------------------------- reports.jsonl

    def record_report(self, report_uri: str, **fields) -> None:
        """Note that an evaluation report of this run was written at ``report_uri`` (with ``fields``
        such as split, step, checkpoint): the run does not otherwise know where its reports went."""
        if not storage.is_remote(report_uri) and not str(report_uri).startswith("file://"):
            report_uri = os.path.abspath(report_uri)
        entry = {"report": storage.redact(report_uri), **fields}
        self._write_jsonl(REPORTS_FILE, self._read_jsonl(REPORTS_FILE) + [entry])

    def latest_report(self) -> tuple[str, dict] | None:
        """The newest recorded report that can still be read: its folder and its ``report.json``."""
        for entry in reversed(self._read_jsonl(REPORTS_FILE)):
            try:
                return entry["report"], json.loads(storage.read_text(storage.join(entry["report"], "report.json")))
            except (FileNotFoundError, ValueError):  # moved, deleted or half-written: try the one before
                continue
        return None

    # --------------------------------------------------------------------------- checkpoints

    def latest_checkpoint_uri(self) -> str | None:
        return checkpoint.latest_uri(self.uri)

    def load_latest(self, purpose: str = "resuming from") -> dict | None:
        return checkpoint.load_latest(self.uri, purpose=purpose)

    @property
    def checkpoint_writer(self) -> checkpoint.CheckpointWriter:
        if self._writer is None:
            self._writer = checkpoint.CheckpointWriter(self.uri)
        return self._writer

    def save_checkpoint(self, state: dict, step: int, before_publish=None) -> str:
        """Snapshot ``state`` now and write it in the background (after the save before it, which it
        waits for); ``latest`` moves when it is complete and ``before_publish()`` (if given) returned.
        Returns the checkpoint's URI."""
        return self.checkpoint_writer.submit(state, step, before_publish)

    def wait_for_checkpoint(self) -> None:
        """Block until the checkpoint being written is published (raises if writing it failed)."""
        if self._writer is not None:
            self._writer.wait()

    def when_checkpoint_published(self, step: int, action) -> None:
        """Run ``action()`` once the checkpoint of ``step`` is published (maybe in the writer's thread)."""
        self.checkpoint_writer.when_published(step, action)

    def published_checkpoints(self) -> list[checkpoint.Published]:
        """Checkpoints published since the last call, oldest first (does not wait)."""
        return self._writer.published() if self._writer is not None else []

    def load_best(self, purpose: str = "loading") -> dict | None:
        """The checkpoint with the best validation score (``train.<stage>.eval_every``), if any."""
        return checkpoint.load_best(self.uri, purpose=purpose)

    def read_best(self) -> dict | None:
        """The ``best`` marker (checkpoint, step, metric, value), or None before validation improved."""
        return checkpoint.read_best(self.uri)

    def mark_best(self, step: int, metric: str, value: float) -> None:
        """Point ``best`` at ``step``'s checkpoint (once it is published, if it is being written)."""
        self.checkpoint_writer.mark_best(step, metric, value)


def read_run(run_uri: str) -> dict:
    """``run.json`` of the run at ``run_uri``."""
    return RunFolder(run_uri).read_record()


def read_metrics(run_uri: str) -> list[dict]:
    """The metrics log of the run at ``run_uri``, one dict per logged step (empty before the first)."""
    return RunFolder(run_uri).read_metrics()


def read_windows(run_uri: str) -> list[dict]:
    """``windows.jsonl`` of the run at ``run_uri`` (``train.record_windows``)."""
    return RunFolder(run_uri).read_windows()
