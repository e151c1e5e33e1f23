"""Checkpoints under ``<run>/checkpoints/``: written whole, then the ``latest`` marker moves.

A checkpoint is one file with model, optimiser, scheduler, RNG state, step and data position.
It is loaded with ``torch.load(weights_only=True)``: a file carrying pickled code is refused
instead of executed. The marker is a small text file naming the checkpoint; because it is only
published after the checkpoint itself is complete, a crash mid-save leaves the previous
checkpoint in force.
"""

from __future__ import annotations

import io
import json
import logging
import pickle

import numpy as np
import torch

from storymm import storage

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
BEST = "best"  # JSON {"checkpoint", "step", "metric", "value"}: the best validation score so far
KEEP = 2


class CheckpointError(RuntimeError):
    pass


def checkpoint_dir(run_uri: str) -> str:
    return storage.join(run_uri, CHECKPOINT_DIR)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].copy()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["numpy"] = torch.from_numpy(state["numpy"].astype(np.int64))
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 0, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    log.info("%s %s (best %s %.6g at step %d)", purpose, storage.redact(uri), best["metric"], best["value"],
             best["step"])
    return load(uri, map_location)


def latest_uri(run_uri: str) -> str | None:
    marker = storage.join(checkpoint_dir(run_uri), LATEST)
    if not storage.exists(marker):
        return None
    name = storage.read_text(marker).strip()
    uri = storage.join(checkpoint_dir(run_uri), name)
    if not storage.exists(uri):
        raise CheckpointError(f"'latest' names {name}, which is missing under {storage.redact(run_uri)}")
    return uri


def load(uri: str, map_location="cpu") -> dict:
    data = storage.read_bytes(uri)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {storage.redact(uri)}: it is not a plain weights checkpoint "
            f"(it would run pickled code): {str(err).splitlines()[0]}"
        ) from None


def load_latest(run_uri: str, map_location="cpu", purpose: str = "resuming from") -> dict | None:
    uri = latest_uri(run_uri)
    if uri is None:
        return None
    log.info("%s %s", purpose, storage.redact(uri))
    return load(uri, map_location)
