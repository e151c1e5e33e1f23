"""A training run's folder, and the one place that knows its layout:

    <run>/run.json        what was trained: stage, resolved config, data, backend, world size
    <run>/metrics.jsonl   one JSON line per logged step (rank 0 writes it)
    <run>/windows.jsonl   with ``train.record_windows``: the windows each rank trained on, per step
    <run>/checkpoints/    the checkpoints and their ``latest`` marker (format: ``checkpoint.py``),
                          written in the background by the folder's ``CheckpointWriter``

The loop, evaluation, the backends and the tests go through :class:`RunFolder` instead of joining
file names themselves.
"""

from __future__ import annotations

import json

from storymm import storage
from storymm.errors import StorymmError
from storymm.training import checkpoint

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
WINDOWS_FILE = "windows.jsonl"


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

    # ------------------------------------------------------------------------- metrics.jsonl

    def _read_jsonl(self, name: str) -> list[dict]:
        uri = storage.join(self.uri, name)
        if not storage.exists(uri):
            return []
        return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]

    def _write_jsonl(self, name: str, lines: list[dict]) -> None:
        """The whole log at once: object stores have no append, and a resumed run rewrites the lines
        past its checkpoint instead of repeating them."""
        storage.write_text(storage.join(self.uri, name), "".join(json.dumps(m) + "\n" for m in lines))

    def read_metrics(self) -> list[dict]:
        return self._read_jsonl(METRICS_FILE)

    def write_metrics(self, history: list[dict]) -> None:
        self._write_jsonl(METRICS_FILE, history)

    def read_windows(self) -> list[dict]:
        """Per step ``{"step", "epoch", "windows"}``; ``windows[r]`` lists the ``[story_id, start]``
        windows rank r trained on at that step."""
        return self._read_jsonl(WINDOWS_FILE)

    def write_windows(self, lines: list[dict]) -> None:
        self._write_jsonl(WINDOWS_FILE, lines)

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

    def save_checkpoint(self, state: dict, step: int) -> str:
        """Snapshot ``state`` now and write it in the background (after the save before it, which it
        waits for); ``latest`` moves when it is complete. Returns the checkpoint's URI."""
        return self.checkpoint_writer.submit(state, step)

    def wait_for_checkpoint(self) -> None:
        """Block until the checkpoint being written is published (raises if writing it failed)."""
        if self._writer is not None:
            self._writer.wait()

    def published_checkpoints(self) -> list[str]:
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
    """``metrics.jsonl`` of the run at ``run_uri`` (empty before the first logged step)."""
    return RunFolder(run_uri).read_metrics()


def read_windows(run_uri: str) -> list[dict]:
    """``windows.jsonl`` of the run at ``run_uri`` (``train.record_windows``)."""
    return RunFolder(run_uri).read_windows()
