"""Checkpoints under ``<run>/checkpoints/``: written whole, then the ``latest`` marker moves.

A checkpoint is one file with model, optimiser, scheduler, RNG state, step and data position.
It is loaded with ``torch.load(weights_only=True)``: a file carrying pickled code is refused
instead of executed. The marker is a small text file naming the checkpoint; because it is only
published after the checkpoint itself is complete, a crash mid-save leaves the previous
checkpoint in force.

If the file ``latest`` names is unreadable anyway (truncated or overwritten by a disk or copy
fault), resuming warns and falls back to the newest older checkpoint that loads (the loop keeps
``KEEP``), so at most one checkpoint interval is redone; only when none loads does it stop. A file
that is a complete checkpoint archive whose pickle asks for code is not "unreadable" but tampered:
it is refused, with no fallback, so that someone looks at it.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
import zipfile

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


def save(run_uri: str, state: dict, step: int) -> str:
    """Publish ``state`` as ``step-NNNNNNNN.pt``, then move ``latest`` to it; prune old ones."""
    name = f"step-{step:08d}.pt"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    directory = checkpoint_dir(run_uri)
    storage.write_bytes(storage.join(directory, name), buffer.getvalue())
    storage.write_text(storage.join(directory, LATEST), name + "\n")
    existing = [uri for uri in storage.list_files(directory, suffix=".pt")]
    best = read_best(run_uri)
    keep = {name, best["checkpoint"] if best else None}
    for uri in existing[:-KEEP]:
        if storage.basename(uri) not in keep:
            storage.delete(uri)
    return storage.join(directory, name)


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
