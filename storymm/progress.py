"""Progress that suits where it is read: a bar on a terminal, plain lines in a log file.

A tqdm bar redraws itself with carriage returns; written into a SLURM or Ray job log it leaves
thousands of frames on one "line". When stderr is not a terminal, :class:`Progress` logs one plain
line every ``STORYMM_PROGRESS_SECONDS`` (default 30) and one at the end instead::

    sequence: step 120/400 (30%), loss 0.4123, 612 samples/s, ETA 0:00:41

through the ``storymm.progress`` logger (so the line carries the log's timestamp and level).
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time

from tqdm import tqdm

log = logging.getLogger(__name__)

SECONDS_ENV = "STORYMM_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0


def line_interval() -> float:
    return float(os.environ.get(SECONDS_ENV, DEFAULT_SECONDS))


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


class Progress:
    """``update(n)`` as work is done, ``show(**fields)`` for the latest figures, ``close()``."""

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        unit: str = "step",
        initial: int = 0,
        enabled: bool = True,
        stream=None,
        every_s: float | None = None,
    ):
        stream = stream if stream is not None else sys.stderr
        self.total, self.desc, self.unit, self.done = total, desc, unit, initial
        self.enabled = enabled
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream) if self.tty else None
        self.every_s = line_interval() if every_s is None else every_s
        self.fields: dict[str, str] = {}
        self._started, self._start_done = time.monotonic(), initial
        self._last_line = self._started
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self._last_line >= self.every_s:
            self._line()

    def show(self, **fields: str) -> None:
        """Figures for the bar's postfix and the next line, already formatted (``loss="0.41"``)."""
        self.fields.update(fields)
        if self.bar is not None:
            self.bar.set_postfix(self.fields, refresh=False)

    def line(self) -> str:
        """The plain progress line for where things stand now."""
        parts = [
            f"{self.unit} {self.done}/{self.total}" + (f" ({100 * self.done / self.total:.0f}%)" if self.total else "")
        ]
        parts += [f"{name} {value}" for name, value in self.fields.items()]
        elapsed = time.monotonic() - self._started
        rate = (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0
        if self.done >= self.total:
            parts.append(f"done in {_duration(elapsed)}")
        elif rate > 0:
            parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        return f"{self.desc}: " + ", ".join(parts)

    def _line(self) -> None:
        self._last_line = time.monotonic()
        log.info("%s", self.line())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done > self._start_done:
            self._line()
