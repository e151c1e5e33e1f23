"""Experiment trackers (``train.trackers: [tensorboard, mlflow]``): rank 0 sends every line of the
run's metrics log to them, one tracker run per storymm run through resumes, requeues and restarts,
each step once. The metrics log (``metrics_store.py``) stays the record; a tracker that fails costs a
warning, never the run.

The two trackers differ in one way that decides how a resume is handled:

- **TensorBoard** event files are storymm's own files under ``<run>/tensorboard/``, segmented like
  the metrics log. A resume from step S cuts them back exactly (events after S are removed) and the
  next file starts with a ``SessionLog.START`` at S+1, so a TensorBoard that was already showing the
  lost steps drops them. Values are float64 scalar tensors: exactly the numbers of ``metrics/``.
  Every logged step is visible at once.
- **MLflow** keeps every point it is sent and cannot take one back, while a resume redoes the steps
  after its checkpoint. So a step goes to MLflow once it is covered by a checkpoint (at every
  checkpoint and at the end): steps a resume could redo are never sent. The MLflow run id and the last
  step MLflow holds are kept in ``<run>/trackers.json``; a resumed attempt continues that run and first
  sends whatever MLflow missed (an unreachable server, a tracker added later). MLflow calls run in a
  thread of their own, so a slow or unreachable server never holds up a step.

Both are optional dependencies: ``pip install 'storymm[tensorboard]'`` / ``'storymm[mlflow]'``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Callable

from storymm import storage
from storymm.errors import StorymmError
from storymm.training import background
from storymm.training.background import BackgroundWrites
from storymm.training.metrics_store import SEGMENT_LINES
from storymm.training.run import RunFolder

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "mlflow")
MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # what each tracker imports
#: not sent as values: the step is the x axis, the time the point's timestamp
NOT_VALUES = frozenset({"step", "time"})


class TrackerError(StorymmError, RuntimeError):
    """A tracker named in the config cannot be used at all (its package is missing)."""


def numeric_values(line: dict) -> dict[str, float]:
    """The keys of a metrics line a tracker gets, as floats (``step`` and ``time`` are not values)."""
    return {
        k: float(v)
        for k, v in line.items()
        if k not in NOT_VALUES and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class Tracker:
    """What the metrics log hands a tracker (rank 0 only)."""

    name = "tracker"

    def open(self, resume_step: int, history: Callable[[], list[dict]]) -> None:
        """Start an attempt that continues after ``resume_step``; ``history()`` reads the metrics log
        (only when the tracker needs to check or catch up)."""

    def record(self, step: int, values: dict, wall_time: float) -> None:
        """New values for ``step`` (a new logged step, or validation terms of the last one)."""

    def checkpointed(self, step: int) -> None:
        """Everything up to ``step`` is covered by a checkpoint: no resume redoes it."""

    def close(self, completed: bool) -> None:
        """End of this attempt (``completed``: the run reached its last step)."""


def check_trackers(names: list[str]) -> None:
    """Refuse, on every rank and before training, a tracker whose package is not installed."""
    for name in names:
        if name not in TRACKERS:
            raise TrackerError(f"unknown tracker {name!r} (choose from {', '.join(TRACKERS)})")
        if importlib.util.find_spec(MODULES[name]) is None:
            raise TrackerError(f"train.trackers names {name}, which needs its package: pip install 'storymm[{name}]'")


def make_trackers(names: list[str], run: RunFolder, record: dict) -> list[Tracker]:
    """The trackers ``names`` asks for (rank 0), each :class:`Guarded`."""
    check_trackers(names)
    made = {"tensorboard": lambda: TensorBoardTracker(run), "mlflow": lambda: MlflowTracker(run, record)}
    return [Guarded(made[name]()) for name in names]


class Guarded(Tracker):
    """A tracker whose failure costs one warning and the tracker (for this attempt), never the run."""

    def __init__(self, tracker: Tracker):
        self.tracker, self.name, self.failed = tracker, tracker.name, False

    def _call(self, method: str, *args) -> None:
        if self.failed:
            return
        try:
            getattr(self.tracker, method)(*args)
        except Exception as err:  # noqa: BLE001 - a tracker never stops training
            self.failed = True
            log.warning(
                "%s tracker failed (%s: %s); training goes on, the metrics log keeps every step",
                self.name,
                type(err).__name__,
                err,
            )

    def open(self, resume_step, history):
        self._call("open", resume_step, history)

    def record(self, step, values, wall_time):
        self._call("record", step, values, wall_time)

    def checkpointed(self, step):
        self._call("checkpointed", step)

    def close(self, completed):
        self._call("close", completed)


# --------------------------------------------------------------------------------- TensorBoard


def _tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC32C, the data, its masked CRC32C (what event files hold)."""
    from tensorboard.summary.writer.record_writer import masked_crc32c

    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def _tfrecords(blob: bytes) -> list[bytes]:
    """The records of an event file; a torn last record (a crash mid-write) is dropped."""
    out, offset = [], 0
    while offset + 12 <= len(blob):
        (length,) = struct.unpack_from("<Q", blob, offset)
        end = offset + 12 + length + 4
        if end > len(blob):
            break
        out.append(blob[offset + 12 : offset + 12 + length])
        offset = end
    return out


class TensorBoardTracker(Tracker):
    """Event files ``<run>/tensorboard/events.out.tfevents.<first step>.storymm``, one per segment."""

    name = "tensorboard"
    SUFFIX = ".storymm"

    def __init__(self, run: RunFolder):
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2  # noqa: F401

        self.folder = run.tensorboard_uri()
        self.local = not storage.is_remote(self.folder)
        self._writes = None
        self._uri: str | None = None
        self._buffer = bytearray()
        self._steps: list[int] = []
        self._sealed = True
        self._purge_at: int | None = None

    # -------------------------------------------------------------------------- the events

    @staticmethod
    def _event(step: int, values: dict[str, float], wall_time: float) -> bytes:
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2

        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        )
        summary = summary_pb2.Summary(
            value=[
                summary_pb2.Summary.Value(
                    tag=key,
                    tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_DOUBLE, double_val=[value]),
                    metadata=metadata,
                )
                for key, value in sorted(values.items())
            ]
        )
        return event_pb2.Event(wall_time=wall_time, step=step, summary=summary).SerializeToString()

    @staticmethod
    def _header(wall_time: float, purge_at: int | None) -> bytes:
        from tensorboard.compat.proto import event_pb2

        records = [_tfrecord(event_pb2.Event(wall_time=wall_time, file_version="brain.Event:2").SerializeToString())]
        if purge_at is not None:  # a reader that saw steps >= purge_at of a lost attempt drops them
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            records.append(
                _tfrecord(event_pb2.Event(wall_time=wall_time, step=purge_at, session_log=start).SerializeToString())
            )
        return b"".join(records)

    def _files(self) -> list[str]:
        return [u for u in storage.list_files(self.folder) if "tfevents" in storage.basename(u)]

    def _name(self, first_step: int) -> str:
        return storage.join(self.folder, f"events.out.tfevents.{first_step:08d}{self.SUFFIX}")

    # ------------------------------------------------------------------------- the tracker

    def open(self, resume_step, history):
        from tensorboard.compat.proto import event_pb2

        background.settle(self.folder)
        held: dict[int, set[str]] = {}
        for uri in self._files():
            records = _tfrecords(storage.read_bytes(uri))
            kept = []
            for raw in records:
                event = event_pb2.Event.FromString(raw)
                if event.HasField("summary") and event.step > resume_step:
                    continue
                if event.HasField("session_log") and event.step > resume_step:
                    continue
                kept.append(raw)
                if event.HasField("summary"):
                    held.setdefault(event.step, set()).update(v.tag for v in event.summary.value)
            if not any(event_pb2.Event.FromString(r).HasField("summary") for r in kept):
                storage.delete(uri)
            elif len(kept) != len(records):
                storage.write_bytes(uri, b"".join(_tfrecord(r) for r in kept))
        expected: dict[int, set[str]] = {}
        lines = [m for m in history() if m["step"] <= resume_step] if resume_step > 0 or held else []
        for line in lines:
            expected.setdefault(line["step"], set()).update(numeric_values(line))
        if held != expected:  # a gap (tracker added later, a failed write): rebuild from the metrics log
            for uri in self._files():
                storage.delete(uri)
            if lines:
                log.info("tensorboard: rewriting the event files from the metrics log (%d steps)", len(lines))
                blob = self._header(lines[0].get("time", time.time()), None) + b"".join(
                    _tfrecord(self._event(m["step"], numeric_values(m), m.get("time", time.time()))) for m in lines
                )
                storage.write_bytes(self._name(lines[0]["step"]), blob)
        self._purge_at = resume_step + 1 if resume_step > 0 else None
        self._sealed = True
        if not self.local:
            self._writes = BackgroundWrites("tensorboard", self.folder)

    def record(self, step, values, wall_time):
        values = numeric_values(values)
        if not values:
            return
        if self._uri is None or self._sealed or (step not in self._steps[-1:] and len(self._steps) >= SEGMENT_LINES):
            self._start(step, wall_time)
        self._append(_tfrecord(self._event(step, values, wall_time)))
        if step not in self._steps[-1:]:
            self._steps.append(step)

    def _start(self, step: int, wall_time: float) -> None:
        self._uri, self._buffer, self._steps, self._sealed = self._name(step), bytearray(), [], False
        header = self._header(wall_time, self._purge_at)
        self._purge_at = None
        if self.local:
            storage.write_bytes(self._uri, b"")  # the folder, and no leftover of a lost attempt
        self._append(header)

    def _append(self, data: bytes) -> None:
        self._buffer += data
        if self.local:  # appended in place: a running `tensorboard --logdir` follows the file
            with open(storage.locate(self._uri).path, "ab") as handle:
                handle.write(data)
        else:  # object stores have no append: the whole (bounded) segment, newest version only
            self._writes.put(self._uri, bytes(self._buffer))

    def checkpointed(self, step):
        # a new file for what follows; no flush here: the metrics log is the record, and a resume
        # checks the event files against it (and rewrites them if an upload was lost)
        self._sealed = True

    def close(self, completed):
        if self._writes is not None:
            self._writes.close()


# ------------------------------------------------------------------------------------- MLflow


#: MLflow's own default retries for a request add up to minutes; storymm retries at the next
#: checkpoint anyway. Set only when the user has not.
MLFLOW_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
MLFLOW_BATCH = 1000  # MLflow's limit of metrics per log_batch request
CLOSE_WAIT_S = float(os.environ.get("STORYMM_TRACKER_CLOSE_SECONDS", "30"))
RETRY_S = 30.0
_OPEN: dict[str, MlflowTracker] = {}  # run URI -> the attempt sending for it in this process
_OPEN_LOCK = threading.Lock()


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow parameters: ``{"data.batch_size": "32", ...}``."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


class MlflowTracker(Tracker):
    """One MLflow run per storymm run (``MLFLOW_TRACKING_URI``; experiment ``MLFLOW_EXPERIMENT_NAME``,
    default "storymm"): the run's metrics at checkpoints, its resolved config as parameters and
    ``run.json`` as an artifact."""

    name = "mlflow"

    def __init__(self, run: RunFolder, record: dict):
        from mlflow.tracking import MlflowClient  # noqa: F401 - the package must be there before training

        for key, value in MLFLOW_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.run, self.record_ = run, record
        self.pending: dict[int, dict] = {}  # step -> values, not yet covered by a checkpoint
        self.wall: dict[int, float] = {}
        self.outbox: list[tuple[int, dict, float]] = []  # covered by a checkpoint, to send
        self.sent_through = -1
        self.run_id: str | None = None
        self.completed = False
        self._lock = threading.Condition()
        self._closing = False
        self._down = False  # a warning was given and the server has not answered since
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------- state

    def _state(self) -> dict:
        uri = self.run.tracker_file()
        return json.loads(storage.read_text(uri)).get("mlflow", {}) if storage.exists(uri) else {}

    def _save_state(self, **fields) -> None:
        uri = self.run.tracker_file()
        state = json.loads(storage.read_text(uri)) if storage.exists(uri) else {}
        state.setdefault("mlflow", {}).update(fields)
        storage.write_text(uri, json.dumps(state, indent=2) + "\n")

    # ------------------------------------------------------------------------- the tracker

    def open(self, resume_step, history):
        self.resume_step, self.history = resume_step, history
        with _OPEN_LOCK:  # an earlier attempt in this process (it raised) stops sending first
            earlier = _OPEN.pop(self.run.uri, None)
            _OPEN[self.run.uri] = self
        if earlier is not None:
            earlier.close(completed=False)
        self._thread = threading.Thread(target=self._work, name="storymm-mlflow", daemon=True)
        self._thread.start()

    def record(self, step, values, wall_time):
        with self._lock:
            self.pending.setdefault(step, {}).update(numeric_values(values))
            self.wall.setdefault(step, wall_time)

    def checkpointed(self, step):
        with self._lock:
            for done in sorted(s for s in self.pending if s <= step):
                self.outbox.append((done, self.pending.pop(done), self.wall.pop(done)))
            self._lock.notify_all()

    def close(self, completed):
        with self._lock:
            if self._closing:
                return
            self.completed = completed
            self._closing = True
            self._lock.notify_all()
        with _OPEN_LOCK:
            if _OPEN.get(self.run.uri) is self:
                del _OPEN[self.run.uri]
        if self._thread is not None:
            self._thread.join(CLOSE_WAIT_S)
        with self._lock:
            left = len(self.outbox)
        if left or self._thread is not None and self._thread.is_alive():
            log.info(
                "mlflow: %d logged step(s) not sent (server unreachable); the metrics log has them, and the "
                "next run of this command on %s sends them",
                left,
                self.run.shown,
            )

    # ---------------------------------------------------------------------- the MLflow side

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self.outbox and not self._closing and self.run_id is not None:
                    self._lock.wait()
                closing = self._closing
            try:
                if self.run_id is None:
                    self._connect()
                with self._lock:  # what to send now: anything after it is appended, never inserted
                    batch = list(self.outbox)
                if batch:
                    self._send(batch)
                    with self._lock:
                        del self.outbox[: len(batch)]
                if closing and not self.outbox:
                    if self.completed:
                        self.client.set_terminated(self.run_id, "FINISHED")
                    return
                if self._down:
                    self._down = False
                    log.info("mlflow: the server answers again; sent through step %d", self.sent_through)
            except Exception as err:  # noqa: BLE001 - unreachable, refused, 5xx: the run goes on
                if not self._down:
                    self._down = True
                    log.warning(
                        "mlflow: cannot reach %s (%s); training goes on, the metrics log keeps every step, "
                        "and they are sent when the server answers",
                        storage.redact(self._tracking_uri()),
                        " ".join(str(err).split())[:200],
                    )
                with self._lock:
                    if self._closing:
                        return
                    self._lock.wait(RETRY_S)

    @staticmethod
    def _tracking_uri() -> str:
        import mlflow

        return mlflow.get_tracking_uri()

    def _connect(self) -> None:
        """The run this storymm run already has (``trackers.json``), or a new one; then what MLflow
        missed up to the resume step."""
        from mlflow.entities import Param, RunStatus
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        state = self._state()
        run_id, through = state.get("run_id"), int(state.get("through_step", 0))
        if run_id is not None:
            try:
                self.client.get_run(run_id)
            except MlflowException as err:
                if "RESOURCE_DOES_NOT_EXIST" not in str(err.error_code):
                    raise
                log.warning(
                    "mlflow: run %s is not on %s; starting a new MLflow run",
                    run_id,
                    storage.redact(self._tracking_uri()),
                )
                run_id, through = None, 0
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "storymm")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            created = self.client.create_run(
                experiment_id,
                run_name=storage.basename(self.run.uri),
                tags={"storymm.run": self.run.shown, "storymm.stage": self.record_.get("stage", "")},
            )
            run_id, through = created.info.run_id, 0
            self._save_state(run_id=run_id, experiment_id=experiment_id, through_step=0)
            params = [Param(k, v[:6000]) for k, v in flat_params(self.record_.get("config", {})).items()]
            for start in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[start : start + 100])
            try:
                self.client.log_dict(run_id, self.record_, "storymm/run.json")
            except Exception as err:  # noqa: BLE001 - the server's artifact store; the metrics still go
                log.warning("mlflow: run.json not stored as an artifact of run %s: %s", run_id, err)
            log.info("mlflow: run %s at %s", run_id, storage.redact(self._tracking_uri()))
        else:
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            log.info("mlflow: continuing run %s (holds steps through %d)", run_id, through)
        if through > self.resume_step:
            log.warning(
                "mlflow: run %s holds steps through %d but training resumes from %d (an older checkpoint): "
                "steps %d-%d keep their first values there",
                run_id,
                through,
                self.resume_step,
                self.resume_step + 1,
                through,
            )
        elif through < self.resume_step:  # sent first, before what this attempt logs
            missed = [m for m in self.history() if through < m["step"] <= self.resume_step]
            with self._lock:
                self.outbox[:0] = [(m["step"], numeric_values(m), m.get("time", time.time())) for m in missed]
        self.run_id, self.sent_through = run_id, through

    def _send(self, batch: list[tuple[int, dict, float]]) -> None:
        from mlflow.entities import Metric

        fresh = [(step, values, wall) for step, values, wall in batch if step > self.sent_through]
        if not fresh:
            return
        metrics = [
            Metric(key, value, int(wall * 1000), step) for step, values, wall in fresh for key, value in values.items()
        ]
        for start in range(0, len(metrics), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + MLFLOW_BATCH])
        self.sent_through = max(step for step, _, _ in fresh)
        self._save_state(through_step=self.sent_through)
