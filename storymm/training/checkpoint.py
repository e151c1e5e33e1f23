"""Checkpoints under ``<run>/checkpoints/``: written whole, then the ``latest`` marker moves.

A checkpoint is one file with model, optimiser, scheduler, RNG state, step and data position.
It is loaded with ``torch.load(weights_only=True)``: a file carrying pickled code is refused
instead of executed. The marker is a small text file naming the checkpoint; because it is only
published after the checkpoint itself is complete, a crash mid-save leaves the previous
checkpoint in force.

Saving is off the step path (:class:`CheckpointWriter`): the state is snapshotted at the step
(tensors copied to host memory, into pinned buffers on CUDA), and a background thread of lower CPU
priority serialises and uploads it, then moves ``latest``. One save is in flight at most; the next waits for it. A save
that fails, or a process killed mid-upload, leaves the previous checkpoint as ``latest``.

If the file ``latest`` names is unreadable anyway (truncated or overwritten by a disk or copy
fault), resuming warns and falls back to the newest older checkpoint that loads (the loop keeps
``KEEP``), so at most one checkpoint interval is redone; only when none loads does it stop. A file
that is a complete checkpoint archive whose pickle asks for code is not "unreadable" but tampered:
it is refused, with no fallback, so that someone looks at it.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import pickle
import re
import threading
import time
import weakref
import zipfile
from typing import NamedTuple

import numpy as np
import torch

from storymm import storage
from storymm.errors import StorymmError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
BEST = "best"  # JSON {"checkpoint", "step", "metric", "value"}: the best validation score so far
KEEP = 2


class CheckpointError(StorymmError, RuntimeError):
    pass


class CheckpointUnreadable(CheckpointError):
    """The file is not a complete checkpoint (truncated, empty, garbage): an older one may do."""


_NAME = re.compile(r"step-(\d{8})\.pt")


def checkpoint_dir(run_uri: str) -> str:
    return storage.join(run_uri, CHECKPOINT_DIR)


def step_of(uri: str) -> int:
    """The step of a checkpoint file (``.../step-00000020.pt`` -> 20)."""
    match = _NAME.fullmatch(storage.basename(uri))
    if match is None:
        raise CheckpointError(f"{storage.redact(uri)} is not named like a checkpoint (step-NNNNNNNN.pt)")
    return int(match.group(1))


def rng_state(device: torch.device | None = None) -> dict:
    """This process's RNG state: CPU torch, numpy and, on a GPU, that one device's CUDA generator.

    Only the rank's own device: ``get_rng_state_all`` would save every GPU the process sees (four
    under ``accelerate launch`` on a 4-GPU node), and restoring that on a machine that sees fewer
    (a 1-GPU Ray worker) raises ``IndexError``."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].copy()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    state["numpy"] = torch.from_numpy(state["numpy"].astype(np.int64))
    return state


def own_cuda_state(saved, device: torch.device | None) -> torch.Tensor | None:
    """The CUDA generator state to restore on ``device`` from a checkpoint's ``cuda`` entry: one state
    (this format), or, from checkpoints that saved every visible GPU, the entry of the device's index
    (None when that GPU was not saved: it keeps its seeded stream). None off CUDA."""
    if saved is None or device is None or device.type != "cuda":
        return None
    if isinstance(saved, torch.Tensor):
        return saved
    index = device.index or 0
    if index < len(saved):
        return saved[index]
    log.warning(
        "checkpoint has no CUDA RNG state for %s (it saved %d GPUs): keeping this GPU's stream", device, len(saved)
    )
    return None


def restore_rng(state: dict, device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 0, 0, 0.0))
    cuda = own_cuda_state(state.get("cuda"), device)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def save(run_uri: str, state: dict, step: int, timings: dict | None = None, before_publish=None) -> str:
    """Publish ``state`` as ``step-NNNNNNNN.pt``, then (after ``before_publish()``, if given) move
    ``latest`` to it; prune old ones. ``timings`` (optional) gets the seconds spent serialising and
    writing."""
    name = f"step-{step:08d}.pt"
    started = time.perf_counter()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    serialised = time.perf_counter()
    directory = checkpoint_dir(run_uri)
    storage.write_bytes(storage.join(directory, name), buffer.getbuffer())  # no copy of the bytes
    if before_publish is not None:
        before_publish()
    storage.write_text(storage.join(directory, LATEST), name + "\n")
    if timings is not None:
        timings.update(serialise_s=serialised - started, write_s=time.perf_counter() - serialised, bytes=buffer.tell())
    existing = [uri for uri in storage.list_files(directory, suffix=".pt")]
    best = read_best(run_uri)
    keep = {name, best["checkpoint"] if best else None}
    for uri in existing[:-KEEP]:
        if storage.basename(uri) not in keep:
            storage.delete(uri)
    return storage.join(directory, name)


def snapshot(state, pinned: dict | None = None) -> tuple[object, object | None]:
    """``(copy, ready)``: ``state`` with every tensor copied to host memory, so training may change
    the originals at once. CPU tensors are cloned; CUDA tensors are copied asynchronously into pinned
    buffers kept in ``pinned`` (reused by the next snapshot of the same structure, which must wait
    until this one is written) and ``ready`` is a CUDA event to wait on before reading them (None on CPU).
    Containers are copied; other values are immutable or deep-copied."""
    pinned = {} if pinned is None else pinned
    on_cuda = False

    def copied(value, path: tuple):
        nonlocal on_cuda
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if value.device.type != "cuda":
                return value.clone()
            buffer = pinned.get(path)
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                buffer = pinned[path] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            buffer.copy_(value, non_blocking=True)
            on_cuda = True
            return buffer
        if isinstance(value, dict):
            return {key: copied(item, (*path, key)) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            items = [copied(item, (*path, index)) for index, item in enumerate(value)]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # namedtuples too
        if value is None or isinstance(value, (bool, int, float, str, bytes)):
            return value
        return copy.deepcopy(value)

    out = copied(state, ())
    ready = None
    if on_cuda:
        ready = torch.cuda.Event()
        ready.record()
    return out, ready


def _yield_cpu() -> None:
    """Lower this thread's CPU priority (Linux: nice applies per thread), so that serialising and
    uploading a checkpoint take the CPU the training threads leave, not theirs."""
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + 10))
    except (AttributeError, OSError):  # not Linux, or not allowed: the writer runs at normal priority
        pass


class Published(NamedTuple):
    """A checkpoint that ``latest`` has named: complete, a resume may start from it."""

    step: int
    uri: str


_WRITERS: weakref.WeakValueDictionary[str, CheckpointWriter] = weakref.WeakValueDictionary()
_WRITERS_LOCK = threading.Lock()


def settle(run_uri: str) -> None:
    """Finish the save this process has in flight for ``run_uri``, if any (a run that raised and is
    resumed in the same process reads ``latest`` only after it); its error is only logged, as that
    attempt is over."""
    with _WRITERS_LOCK:
        writer = _WRITERS.get(run_uri)
    if writer is not None:
        try:
            writer.wait()
        except CheckpointError as err:
            log.warning("%s", err)


class CheckpointWriter:
    """Writes one run's checkpoints in a background thread, one at a time.

    ``submit`` snapshots the state (:func:`snapshot`) and returns; the thread runs :func:`save`
    (serialise, upload, move ``latest``, prune) and then any ``mark_best`` asked for that step, which
    needs the file published. ``submit`` first waits for the save before it, so at most one is in
    flight and its host copy is the only one held. Errors are raised by the next ``submit`` or
    ``wait``; until then, and after them, ``latest`` names the previous checkpoint."""

    THREAD_NAME = "storymm-checkpoint"

    def __init__(self, run_uri: str):
        self.run_uri = run_uri
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._step: int | None = None  # of the save in flight
        self._after: list | None = None  # run once it is published; None when none is in flight
        self._error: BaseException | None = None
        self._published: list[Published] = []
        self._last_published: int | None = None
        self._pinned: dict = {}
        with _WRITERS_LOCK:
            _WRITERS[run_uri] = self

    def submit(self, state: dict, step: int, before_publish=None) -> str:
        """Snapshot ``state`` now and write it as ``step`` in the background; returns its URI (which
        exists once ``latest`` names it). ``before_publish()``, if given, is called in the writer's
        thread once the file is written, before ``latest`` moves (its error fails the save)."""
        started = time.perf_counter()
        self.wait()
        waited = time.perf_counter() - started
        state, ready = snapshot(state, self._pinned)
        on_step = {"waited_s": waited, "snapshot_s": time.perf_counter() - started - waited}
        with self._lock:
            self._step, self._after = step, []
        self._thread = threading.Thread(
            target=self._write, args=(state, step, ready, on_step, before_publish), name=self.THREAD_NAME
        )
        self._thread.start()
        return storage.join(checkpoint_dir(self.run_uri), f"step-{step:08d}.pt")

    def _write(self, state: dict, step: int, ready, timings: dict, before_publish) -> None:
        _yield_cpu()
        try:
            if ready is not None:
                ready.synchronize()
            uri = save(self.run_uri, state, step, timings, before_publish)
            del state
            log.info(
                "checkpoint step-%08d.pt published (%.1f MB): on the step %.3f s (waited %.3f s for the previous "
                "save, snapshot %.3f s); in the background %.2f s serialising, %.2f s writing",
                step,
                timings["bytes"] / 1e6,
                timings["waited_s"] + timings["snapshot_s"],
                timings["waited_s"],
                timings["snapshot_s"],
                timings["serialise_s"],
                timings["write_s"],
            )
            with self._lock:
                after, self._after, self._last_published = self._after, None, step
            for action in after:
                action()
            with self._lock:
                self._published.append(Published(step, uri))
        except BaseException as err:  # raised in the training thread by the next submit/wait
            self._error = err
        finally:
            with self._lock:
                self._after = None

    def wait(self) -> None:
        """Block until the save in flight (if any) is published; raise if it failed."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise CheckpointError(
                f"writing checkpoint step-{self._step:08d}.pt under {storage.redact(self.run_uri)} failed "
                f"({type(error).__name__}: {error}); 'latest' still names the previous checkpoint"
            ) from error

    def published(self) -> list[Published]:
        """The checkpoints published since the last call (oldest first); does not wait."""
        with self._lock:
            done, self._published = self._published, []
        return done

    def when_published(self, step: int, action) -> None:
        """Run ``action()`` once ``step``'s checkpoint is published: in the writer's thread when it is
        being written, at once when it already is; never when writing it failed (the next ``submit``
        or ``wait`` raises that)."""
        with self._lock:
            if self._after is not None and self._step == step:
                self._after.append(action)
                return
            published = self._last_published == step
        if published:
            action()

    def mark_best(self, step: int, metric: str, value: float) -> None:
        """Point ``best`` at ``step``'s checkpoint: once it is published if it is in flight, else now."""
        with self._lock:
            if self._after is not None and self._step == step:
                self._after.append(lambda: mark_best(self.run_uri, step, metric, value))
                return
        if self._error is not None:
            self.wait()  # that save failed: say so, not that its file is missing
        mark_best(self.run_uri, step, metric, value)


def read_best(run_uri: str) -> dict | None:
    """The ``best`` marker (``{"checkpoint", "step", "metric", "value"}``) or None."""
    marker = storage.join(checkpoint_dir(run_uri), BEST)
    if not storage.exists(marker):
        return None
    return json.loads(storage.read_text(marker))


def mark_best(run_uri: str, step: int, metric: str, value: float) -> None:
    """Point ``best`` at the (already published) checkpoint of ``step``; it is then never pruned."""
    name = f"step-{step:08d}.pt"
    if not storage.exists(storage.join(checkpoint_dir(run_uri), name)):
        raise CheckpointError(f"cannot mark {name} best: it is not under {storage.redact(run_uri)}")
    record = {"checkpoint": name, "step": int(step), "metric": metric, "value": float(value)}
    storage.write_text(storage.join(checkpoint_dir(run_uri), BEST), json.dumps(record) + "\n")


def load_best(run_uri: str, map_location="cpu", purpose: str = "loading") -> dict | None:
    best = read_best(run_uri)
    if best is None:
        return None
    uri = storage.join(checkpoint_dir(run_uri), best["checkpoint"])
    if not storage.exists(uri):
        raise CheckpointError(f"'best' names {best['checkpoint']}, which is missing under {storage.redact(run_uri)}")
    log.info(
        "%s %s (best %s %.6g at step %d)", purpose, storage.redact(uri), best["metric"], best["value"], best["step"]
    )
    return load(uri, map_location)


def latest_uri(run_uri: str) -> str | None:
    """The checkpoint file ``latest`` names (or, if it names none that exists, the newest one);
    None before the first checkpoint. Whether it loads is :func:`load_latest`'s business."""
    existing = [uri for uri in _candidates(run_uri) if storage.exists(uri)]
    return existing[0] if existing else None


def _is_complete_archive(data: bytes) -> bool:
    """torch.save writes a zip archive; a truncated one lacks its central directory."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return bool(archive.namelist())
    except (zipfile.BadZipFile, ValueError, EOFError):
        return False


def load(uri: str, map_location="cpu") -> dict:
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise CheckpointUnreadable(f"{storage.redact(uri)} is missing") from None
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if _is_complete_archive(data):
            raise CheckpointError(
                f"refusing to load {storage.redact(uri)}: it is not a plain weights checkpoint "
                f"(it would run pickled code): {str(err).splitlines()[0]}"
            ) from None
        raise CheckpointUnreadable(f"{storage.redact(uri)} is not a checkpoint archive ({len(data)} bytes)") from None
    except Exception as err:  # torch reports a damaged archive as RuntimeError, EOFError, KeyError, ...
        first_line = (str(err).splitlines() or [""])[0][:120]
        raise CheckpointUnreadable(
            f"{storage.redact(uri)} is unreadable ({len(data)} bytes): {type(err).__name__}: {first_line}"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointUnreadable(f"{storage.redact(uri)} holds no model state")
    return state


def _candidates(run_uri: str) -> list[str]:
    """The checkpoint ``latest`` names, then the older ones, newest first (empty: no checkpoint yet).

    A ``latest`` that names no checkpoint file (damaged marker) leaves every checkpoint a candidate."""
    directory = checkpoint_dir(run_uri)
    marker = storage.join(directory, LATEST)
    if not storage.exists(marker):
        return []
    try:
        named = storage.read_text(marker).strip()
    except UnicodeDecodeError:
        named = ""
    files = sorted(
        (
            storage.basename(u)
            for u in storage.list_files(directory, suffix=".pt")
            if _NAME.fullmatch(storage.basename(u))
        ),
        reverse=True,
    )
    if not _NAME.fullmatch(named):
        log.warning(
            "checkpoints/latest under %s names no checkpoint (%r): trying the newest files",
            storage.redact(run_uri),
            named[:40],
        )
        return [storage.join(directory, name) for name in files]
    return [storage.join(directory, name) for name in [named, *[f for f in files if f < named]]]


def load_latest(run_uri: str, map_location="cpu", purpose: str = "resuming from") -> dict | None:
    """The state of the newest checkpoint that loads, starting from ``latest``; None without one."""
    settle(run_uri)
    candidates = _candidates(run_uri)
    failures = []
    for uri in candidates:
        try:
            state = load(uri, map_location)
        except CheckpointUnreadable as err:
            log.warning("checkpoint unreadable, trying the previous one: %s", err)
            failures.append(str(err))
            continue
        if failures:
            log.warning("%s %s instead of the unreadable latest checkpoint", purpose, storage.redact(uri))
        else:
            log.info("%s %s", purpose, storage.redact(uri))
        return state
    if failures:
        raise CheckpointError(
            f"no checkpoint of {storage.redact(run_uri)} loads ({'; '.join(failures)}): restore one, "
            "or delete its checkpoints/ folder to start the run over"
        )
    return None
