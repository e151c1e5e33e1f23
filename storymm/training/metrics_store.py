"""A run's metrics log, ``<run>/metrics/``: JSON lines in segments, so a logged step costs the same at
step 100 and at step 1,000,000, also on object storage.

Object stores have no append: a single ``metrics.jsonl`` rewritten at every logged step uploads
O(steps^2) bytes over a run. Here the lines live in segment files named by their first step
(``metrics/00000010.jsonl``, ``metrics/00000110.jsonl`` …). Rank 0 rewrites only the current
segment, which ends at every checkpoint and after ``SEGMENT_LINES`` lines, so each logged step
writes at most ``SEGMENT_LINES`` lines, in the background (:mod:`background`).

A resume from the checkpoint of step S cuts the log back exactly: segments that start after S are
deleted and the one holding S is rewritten without the lines after it (since segments end at
checkpoints, that is usually a no-op), so every step appears once, whichever checkpoint the run
resumes from. Readers see one list of lines in step order (:meth:`MetricsStore.read`, reached as
``RunFolder.read_metrics()``); ``cat <run>/metrics/*.jsonl`` gives the same lines. A run written
before segments (one ``<run>/metrics.jsonl``) is still read, and moved into a segment when it resumes.

Each line: ``step``, ``epoch``, ``lr``, the loss terms, ``samples_per_s``, ``time`` (Unix seconds when
rank 0 logged it) and, at validation steps, ``val_*``; :func:`learned` drops what measures time.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor

from storymm import storage
from storymm.training import background
from storymm.training.background import BackgroundWrites

log = logging.getLogger(__name__)

FOLDER = "metrics"
LEGACY_FILE = "metrics.jsonl"
SEGMENT_LINES = 100
READ_THREADS = 16

#: Keys that measure time rather than learning: they differ between two runs of the same steps.
TIMING_KEYS = frozenset({"samples_per_s", "time", "flops_per_s", "mfu"})
TIMING_PREFIX = "time/"


def is_timing_key(key: str) -> bool:
    return key in TIMING_KEYS or key.startswith(TIMING_PREFIX)


def learned(line: dict) -> dict:
    """``line`` without the keys that measure time: what a resumed and an uninterrupted run share."""
    return {k: v for k, v in line.items() if not is_timing_key(k)}


def _segment_name(first_step: int) -> str:
    return f"{int(first_step):08d}.jsonl"


def _first_step(uri: str) -> int:
    return int(storage.basename(uri).split(".")[0])


def _parse(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _render(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode("utf-8")


class MetricsStore:
    def __init__(self, run_uri: str):
        self.run_uri = str(run_uri)
        self.folder = storage.join(self.run_uri, FOLDER)
        self.legacy = storage.join(self.run_uri, LEGACY_FILE)
        self._writes: BackgroundWrites | None = None
        self._current: list[dict] = []
        self._rendered: list[bytes] = []  # the current segment's lines as written: each rendered once
        self._sealed = True

    # ------------------------------------------------------------------------------- reading

    def segments(self) -> list[str]:
        """Segment URIs in step order."""
        return [uri for uri in storage.list_files(self.folder, suffix=".jsonl") if _is_segment(uri)]

    def read(self) -> list[dict]:
        """Every line in step order (empty before the first logged step)."""
        segments = self.segments()
        lines = []
        if storage.exists(self.legacy):
            first = _first_step(segments[0]) if segments else None
            lines = [m for m in _parse(storage.read_text(self.legacy)) if first is None or m["step"] < first]
        with ThreadPoolExecutor(min(READ_THREADS, max(1, len(segments)))) as pool:
            for text in pool.map(_read_if_there, segments):
                lines.extend(_parse(text))
        return lines

    # ------------------------------------------------------------------------------- writing

    def open(self, resume_step: int) -> dict | None:
        """Start writing after ``resume_step``: every line past it goes (rank 0, once per attempt).
        Returns the last line kept (None if none)."""
        background.settle(self.folder)
        segments = self.segments()
        if storage.exists(self.legacy):  # a run from before segments: its lines become a segment
            first = _first_step(segments[0]) if segments else None
            old = [m for m in _parse(storage.read_text(self.legacy)) if first is None or m["step"] < first]
            if old:
                uri = storage.join(self.folder, _segment_name(old[0]["step"]))
                storage.write_bytes(uri, _render(old))
                segments.insert(0, uri)
            storage.delete(self.legacy)
        last = None
        for uri in reversed(segments):  # newest first: a crash half-way leaves a consistent prefix
            if _first_step(uri) > resume_step:
                storage.delete(uri)
                continue
            lines = _parse(storage.read_text(uri))
            kept = [m for m in lines if m["step"] <= resume_step]  # its first line is (named after its first step)
            if len(kept) != len(lines):
                storage.write_bytes(uri, _render(kept))
                log.info(
                    "metrics: dropped %d line(s) after step %d (redone from there)", len(lines) - len(kept), resume_step
                )
            last = kept[-1] if kept else None
            break
        self._writes = BackgroundWrites("metrics", self.folder)
        self._current, self._rendered, self._sealed = [], [], True
        return last

    def record(self, step: int, values: dict) -> None:
        """A new line for ``step``, or more keys for the last line when it is ``step``'s."""
        if self._current and self._current[-1]["step"] == step:
            self._current[-1].update(values)
            self._rendered[-1] = _render(self._current[-1:])
        else:
            if self._sealed or len(self._current) >= SEGMENT_LINES:
                self._current, self._rendered, self._sealed = [], [], False
            self._current.append({"step": step, **values})
            self._rendered.append(_render(self._current[-1:]))
        uri = storage.join(self.folder, _segment_name(self._current[0]["step"]))
        self._writes.put(uri, b"".join(self._rendered))

    def seal(self) -> None:
        """The next line starts a new segment (at checkpoints, so a resume cuts at a segment's end)."""
        self._sealed = True

    def flush(self) -> None:
        if self._writes is not None:
            self._writes.flush()

    def close(self) -> None:
        if self._writes is not None:
            self._writes.close()
            self._writes = None


def _read_if_there(uri: str) -> str:
    """A segment's text; empty if a resume cut it away since it was listed."""
    try:
        return storage.read_text(uri)
    except FileNotFoundError:
        return ""


def _is_segment(uri: str) -> bool:
    stem = storage.basename(uri).split(".")[0]
    return stem.isdigit()
