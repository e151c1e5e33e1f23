"""Publish small files from a background thread, the newest version of each one only.

Why: rank 0 rewrites its current metrics segment (and TensorBoard's) at every logged step. On object
storage each write is a PUT of tens to hundreds of milliseconds; made in the training thread, every
logged step would wait for it. :class:`BackgroundWrites` takes ``put(uri, data)`` at once and
publishes from one thread; a file put again before it was written is written once, in its newest
version, so a slow store costs fewer PUTs, never a queue that grows.

A write that fails (after ``storage``'s own retries) stays pending and is retried: one warning when
writes start failing, one line when they work again. :meth:`flush` is the point where failure
becomes the caller's: it waits for everything put so far and raises the last error if a file could
not be written (the loop flushes before every checkpoint, so a checkpoint never covers a step whose
log line is not stored).

Writers are registered by the folder they write to: a new writer for a folder first finishes the
one an earlier attempt in this process left behind (a run that raised and is resumed in the same
process), so an old write can never land after the new attempt has cut the folder back.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref

from storymm import storage

log = logging.getLogger(__name__)

RETRY_SECONDS = 5.0
_LIVE: weakref.WeakValueDictionary[str, BackgroundWrites] = weakref.WeakValueDictionary()
_LIVE_LOCK = threading.Lock()


def settle(folder: str) -> None:
    """Finish the writer an earlier attempt left on ``folder`` (errors only logged: that attempt is over)."""
    with _LIVE_LOCK:
        earlier = _LIVE.pop(folder, None)
    if earlier is not None:
        try:
            earlier.close(timeout=60)
        except Exception as err:  # noqa: BLE001
            log.warning("%s: an earlier attempt's writes did not finish: %s", earlier.what, err)


class BackgroundWrites:
    def __init__(self, what: str, folder: str):
        """``what`` names the files in messages (e.g. "metrics"); ``folder`` is where they go."""
        settle(folder)
        with _LIVE_LOCK:
            _LIVE[folder] = self
        self.what = what
        self._pending: dict[str, bytes] = {}  # insertion order = write order
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._busy = False
        self._error: Exception | None = None
        self._attempts = 0  # write attempts that ended, for flush's "tried again since"

    def put(self, uri: str, data: bytes) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.what}: writes after close")
            self._pending.pop(uri, None)  # re-queued at the end: written after what was put before it
            self._pending[uri] = data
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"storymm-writes-{self.what}", daemon=True)
                self._thread.start()
            self._lock.notify_all()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything put so far is written; raise the error of a write that still fails
        after one more attempt, or ``TimeoutError``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            start = self._attempts
            self._lock.notify_all()  # a worker waiting to retry tries now
            while self._pending or self._busy:
                if self._error is not None and self._attempts > start and not self._busy:
                    raise self._error
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"{self.what}: {len(self._pending)} file(s) not written in {timeout:g} s")
                self._lock.wait(left)

    def close(self, timeout: float | None = None) -> None:
        """Flush, then stop the thread."""
        try:
            self.flush(timeout)
        finally:
            with self._lock:
                self._closed = True
                self._lock.notify_all()
            if self._thread is not None:
                self._thread.join(5)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._lock.wait()
                if not self._pending:
                    return
                uri, data = next(iter(self._pending.items()))
                self._busy = True
            try:
                storage.write_bytes(uri, data)
                error = None
            except Exception as err:  # noqa: BLE001 - kept pending, reported once, raised by flush
                error = err
            with self._lock:
                self._busy = False
                self._attempts += 1
                if error is None:
                    if self._pending.get(uri) is data:  # not put again meanwhile
                        del self._pending[uri]
                    if self._error is not None:
                        log.info("%s: writing works again (%s)", self.what, storage.redact(uri))
                    self._error = None
                else:
                    if self._error is None:
                        log.warning("%s: cannot write %s, will retry: %s", self.what, storage.redact(uri), error)
                    self._error = error
                    self._lock.notify_all()
                    if self._closed:  # close() already raised it: give up on what is left
                        self._pending.clear()
                        return
                    self._lock.wait(RETRY_SECONDS)  # woken early by put, flush or close
                self._lock.notify_all()
