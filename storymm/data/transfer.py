"""Batches from the loader to the device: small on the wire, pinned in the background, floats on the device.

Why: a batch of 60x125 frames as float32 is 4x the bytes of the uint8 pixels the shards hold, and
pinning it (page-locking, so the copy to the GPU is asynchronous) is a host memcpy as large as the
batch. Done on the training thread, both stand between two GPU steps. So:

- The training loader yields ``frames``/``target_frame`` as uint8 (``WindowLoader(uint8_pixels=True)``);
  :func:`to_device` copies them as they are and converts them to floats in [0, 1] on the device,
  with the same operation the loader uses (``x.float().div_(255)``), so CPU runs are bit-identical.
- :func:`feed` pins each batch in a background thread (``storymm.data.prefetch``), ``depth`` batches
  ahead, so the training thread only launches the asynchronous copy.
- The sentence lengths (``HOST_KEYS``) stay on the host: packing a sequence for the LSTM needs them
  there, and reading them back from the GPU would make every step wait (``models/text.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from storymm.data.prefetch import prefetch_map

#: Pixel tensors; uint8 ones become floats in [0, 1] on the device.
PIXEL_KEYS = frozenset({"frames", "target_frame"})
#: Tensors that stay on the host (CPU): non-pad token counts of the input and target sentences.
HOST_KEYS = frozenset({"token_lengths", "target_lengths"})
#: Batches pinned ahead of the step on CUDA.
PIN_AHEAD = 2


def pixels_to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1] (floats are returned as they are)."""
    return pixels.float().div_(255.0) if pixels.dtype == torch.uint8 else pixels


def pin(batch: dict) -> dict:
    """The batch with its device-bound tensors in page-locked memory (needs CUDA)."""
    return {
        key: value.pin_memory() if isinstance(value, torch.Tensor) and key not in HOST_KEYS else value
        for key, value in batch.items()
    }


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to ``device`` (asynchronously; pinned ones overlap the previous step's kernels), uint8
    pixels converted to floats there; ``HOST_KEYS`` and non-tensors (ids, sentences) stay."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and key not in HOST_KEYS:
            if device.type == "cuda" and not value.is_pinned():
                value = value.pin_memory()  # not fed through `feed`: pin here (a synchronous host copy)
            value = value.to(device, non_blocking=True)
            if key in PIXEL_KEYS:
                value = pixels_to_float(value)
        out[key] = value
    return out


def feed(batches: Iterable[dict], device: torch.device, depth: int = PIN_AHEAD) -> Iterator[dict]:
    """``batches`` as they come on the CPU; on CUDA each pinned in a background thread, ``depth`` ahead."""
    if device.type != "cuda" or depth <= 0:
        yield from batches
        return
    for _, pinned in prefetch_map(pin, batches, depth, describe=lambda _: "a batch (pinning)"):
        yield pinned
