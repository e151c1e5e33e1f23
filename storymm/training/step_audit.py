"""Audits of one training step for the GPU path: host syncs (:func:`audit_syncs`) and the dtypes
inside bf16 autocast (:func:`audit_dtypes`). ``bench/gpu_check.sh`` runs both on the GPU; the tests
run them on the CPU.

Host syncs. A sync (``.item()``, ``.cpu()``, ``bool(tensor)``, a blocking host-to-device copy) stalls
the CPU until the GPU has finished everything queued, so the next step's kernels are not queued while
the GPU works: with the small kernels of this model that is most of a step. The loop is written to
need none (loss terms are read only at logging steps; ``NonFiniteGuard``; lengths and pixels
prepared on the host: ``data/transfer.py``); the audit checks one step of :func:`loop.train_step`,
the host-to-device copy of the batch included.

- On CUDA: ``torch.cuda.set_sync_debug_mode("warn")`` reports every synchronising call.
- Without a GPU, the same step runs on the ``meta`` device (shapes, no data): any read of a value
  back to the host fails there, and every host-to-device copy is seen by a dispatch mode, which
  flags the blocking ones (non-blocking copies and the packed LSTM's host lengths are what the GPU
  path does on purpose). It cannot see what only CUDA kernels do, but it covers storymm's code.

The first step is not audited: it creates the per-device constants (``models/precision.py``).

Dtypes. Under bf16 autocast the GRU/LSTMs, the warp head's coordinates and InfoNCE must stay fp32
(``models/precision.py`` says why); the audit runs the sequence model and its loss under autocast
and reads what those parts produced.
"""

from __future__ import annotations

import os
import traceback
import warnings
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import storymm
from storymm.config import Config
from storymm.training import loop
from storymm.training.losses import info_nce
from storymm.training.runtime import Runtime, effective_precision
from storymm.training.stages import TokenizerInfo, batch_loss_fn, build_model

#: Host inputs that these operations take on purpose on a GPU too (packing reads CPU lengths).
HOST_INPUT_OPS = {"aten._pack_padded_sequence.default"}
COPY_OPS = {"aten._to_copy.default", "aten.copy_.default"}
PACKAGE = os.path.dirname(os.path.abspath(storymm.__file__)) + os.sep


@dataclass
class AuditResult:
    device: str
    syncs: list[str] = field(default_factory=list)  # one line each: what and where

    @property
    def clean(self) -> bool:
        return not self.syncs


def example_batch(config: Config, tokens: TokenizerInfo, batch_size: int | None = None) -> dict:
    """A batch shaped and typed like the training loader's (uint8 pixels, padded ids, host lengths)."""
    d = config.data
    b, k, length = batch_size or d.batch_size, d.context_frames, d.max_tokens
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, tokens.vocab_size, (b, k + 1, length), generator=generator)
    counts = torch.randint(3, length + 1, (b, k + 1), generator=generator)
    ids[torch.arange(length).expand(b, k + 1, length) >= counts[..., None]] = tokens.pad_id
    pixels = torch.randint(0, 256, (b, k + 1, 3, d.image_height, d.image_width), dtype=torch.uint8, generator=generator)
    batch = {
        "frames": pixels[:, :-1].contiguous(),
        "tokens": ids[:, :-1].contiguous(),
        "target_frame": pixels[:, -1].contiguous(),
        "target_tokens": ids[:, -1].contiguous(),
        "token_lengths": counts[:, :-1].contiguous(),
        "target_lengths": counts[:, -1].contiguous(),
    }
    if config.model.tag_features:
        batch["tags"] = torch.randint(0, config.model.tag_vocab, (b, k, config.model.max_tags), generator=generator)
    return batch


def _describe(frames) -> str:
    """The innermost frame of storymm's code (what caused it; not this module), else the innermost."""
    ours = [f for f in frames if f.filename.startswith(PACKAGE) and not f.filename.endswith("step_audit.py")]
    frame = (ours or list(frames))[-1]
    return f"storymm/{frame.filename[len(PACKAGE) :]}:{frame.lineno} ({frame.line})"


class _HostCopies(TorchDispatchMode):
    """On the meta device: records operations that take host tensors and produce device ones, except
    non-blocking copies and ``HOST_INPUT_OPS``."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        from_host = any(t.device.type == "cpu" and t.dim() > 0 for t in inputs)
        to_device = any(t.device.type == "meta" for t in outputs)
        if from_host and to_device and name not in HOST_INPUT_OPS:
            non_blocking = kwargs.get(
                "non_blocking", args[2] if name == "aten.copy_.default" and len(args) > 2 else False
            )
            if not (name in COPY_OPS and non_blocking):
                self.found.append(f"blocking host-to-device {name} at {_describe(traceback.extract_stack())}")
        return out


def audit_syncs(
    config: Config,
    tokens: TokenizerInfo,
    device: torch.device,
    stage: str = "sequence",
    batch: dict | None = None,
) -> AuditResult:
    """Two steps of ``stage`` at ``config``'s sizes on ``device`` (``cuda`` or ``meta``); the second
    is audited. ``batch``: a loader batch (default :func:`example_batch`), pinned on CUDA."""
    precision = effective_precision(config.train.mixed_precision, device.type) if device.type == "cuda" else "no"
    runtime = Runtime(device=device, mixed_precision=precision, name="audit")
    torch.manual_seed(config.seed)
    model = build_model(stage, config, tokens).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    stage_cfg = getattr(config.train, stage)
    optimizer = torch.optim.AdamW(params, lr=stage_cfg.lr, weight_decay=stage_cfg.weight_decay)
    scheduler = loop._scheduler(optimizer, stage_cfg)
    guard = loop.NonFiniteGuard(runtime, stage, 0)
    loss_fn = batch_loss_fn(stage, config, tokens)
    batch = batch if batch is not None else example_batch(config, tokens)
    if device.type == "cuda":
        from storymm.data.transfer import pin

        batch = pin(batch)  # what runtime.feed hands the step

    def step(index: int) -> None:
        loop.train_step(
            model, dict(batch), loss_fn, optimizer, scheduler, runtime, params, stage_cfg.grad_clip, guard, index
        )

    result = AuditResult(device=str(device))
    if device.type == "cuda":
        step(0)
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(1)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        result.syncs = [
            f"{str(w.message).splitlines()[0]} at {w.filename}:{w.lineno}"
            for w in caught
            if "synchroniz" in str(w.message)
        ]
        return result
    if device.type != "meta":
        raise ValueError(f"the audit runs on cuda or meta, not {device}")
    copies = _HostCopies()
    try:
        step(0)  # a read back fails here already; host copies are counted from the second step on
        with copies:
            step(1)
    except (NotImplementedError, RuntimeError) as err:
        if "meta" not in str(err):
            raise
        where = _describe(traceback.extract_tb(err.__traceback__))
        result.syncs.append(f"reads a value back from the device ({str(err).splitlines()[0]}) at {where}")
    result.syncs = copies.found + result.syncs
    return result


def audit_dtypes(config: Config, tokens: TokenizerInfo, device: torch.device) -> dict[str, str]:
    """The sequence model (``config``'s, with a fresh warp head when it has one) and its loss under
    bf16 autocast on ``device``: ``{check: problem}`` for each fp32 island that is not fp32 (empty:
    all fine). Checks that autocast was really on (a Linear gives bf16)."""
    from storymm.data.transfer import to_device

    torch.manual_seed(config.seed)
    model = build_model("sequence", config, tokens).to(device).train()
    batch = to_device(example_batch(config, tokens, batch_size=4), device)
    seen: dict[str, torch.dtype] = {}

    def record(name, pick):
        def hook(module, args, output) -> None:  # returns None: the output is left as it is
            seen.setdefault(name, pick(output).dtype)

        return hook

    hooks = [
        model.gru.register_forward_hook(record("gru output", lambda out: out[0])),
        model.text.encoder.register_forward_hook(record("text encoder LSTM state", lambda out: out[1][0])),
        model.text.decoder.register_forward_hook(record("text decoder LSTM output", lambda out: out[0])),
    ]
    problems: dict[str, str] = {}
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if torch.nn.Linear(4, 4).to(device)(torch.ones(2, 4, device=device)).dtype != torch.bfloat16:
                problems["autocast"] = "a Linear did not give bf16: autocast is not on, nothing was checked"
            loss, _ = batch_loss_fn("sequence", config, tokens)(model, batch)
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    if not torch.isfinite(loss):
        problems["loss"] = f"not finite under autocast: {loss.item()}"
    for name, dtype in seen.items():
        if dtype != torch.float32:
            problems[name] = str(dtype)
    a, b = torch.randn(8, 16, device=device), torch.randn(8, 16, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        mixed = info_nce(a, b)
    if mixed.dtype != torch.float32 or not torch.equal(mixed, info_nce(a, b)):
        problems["infonce"] = f"{mixed.dtype}, {mixed.item():.7f} under autocast vs {info_nce(a, b).item():.7f}"
    if getattr(model, "motion", None) is not None:
        frames = batch["frames"]
        ctx = torch.randn(frames.shape[0], 2 * model.hidden_dim, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            warped = model.motion(frames, ctx)["warped"]
        plain = model.motion(frames, ctx)["warped"]
        if warped.dtype != torch.float32 or not torch.equal(warped, plain):
            problems["warp coordinates"] = f"the fresh warp head differs under autocast ({warped.dtype})"
        elif (plain - frames).abs().max().item() > 1e-4:  # fp32 grid rounding: ~1e-5 at 60x125; bf16: ~0.15
            problems["warp coordinates"] = "a fresh warp head does not reproduce its input (the copy head)"
    return problems
