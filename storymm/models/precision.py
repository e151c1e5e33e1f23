"""What a GPU step needs from the models beyond the math: fp32 islands inside bf16 autocast, and
constants that are made once per device instead of copied from the host at every call.

fp32 islands (:func:`run_fp32`, :func:`autocast_off`): under bf16 autocast the cuDNN GRU/LSTM run in
reduced precision with no loss scaler (small gradients underflow), the warp head's sampling grid
gets bf16 coordinates (so a fresh warp head is no longer exactly the copy head) and contrastive
logits lose their small differences. These parts are small: they run in fp32 with autocast off. On a
CPU without autocast (every default CPU run) the casts are no-ops and results are unchanged.

Constants (:func:`device_constant`): ``torch.tensor(values).to(cuda)`` inside a step is a blocking
host-to-device copy, a host sync per call; a constant is made once per (values, dtype, device).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.nn.utils.rnn import PackedSequence


def autocast_off(like: torch.Tensor):
    """A context with autocast disabled for ``like``'s device type (a no-op where autocast does not exist)."""
    device_type = like.device.type
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _fp32(value):
    if isinstance(value, PackedSequence):
        return value.float() if value.data.is_floating_point() else value
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, tuple):  # an RNN's (h, c) state
        return tuple(_fp32(v) for v in value)
    return value


def _first_tensor(values) -> torch.Tensor:
    for value in values:
        if isinstance(value, PackedSequence):
            return value.data
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, tuple) and value:
            return _first_tensor(value)
    raise ValueError("run_fp32 needs at least one tensor input")


def run_fp32(module, *inputs):
    """``module(*inputs)`` with autocast off and floating inputs (tensors, packed sequences, state
    tuples) in fp32: an RNN whose weights are fp32 then runs entirely in fp32."""
    with autocast_off(_first_tensor(inputs)):
        return module(*(_fp32(value) for value in inputs))


@functools.lru_cache(maxsize=256)
def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():  # usable by autograd whatever mode made it first
        return torch.tensor(values, dtype=dtype, device=device)


def device_constant(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device``, made once per (values, dtype, device) and then shared:
    never modify it in place."""
    frozen = tuple(tuple(row) if isinstance(row, list | tuple) else row for row in values)
    return _constant(frozen, dtype, device)
