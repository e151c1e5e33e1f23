"""Training-step throughput of the gate model: storymm's loop vs a straight PyTorch loop, and the loader
against the step it feeds, all measured in one run.

Three measurements per config, same model, same batch size, same thread count:

* reference: a plain single-process loop (forward, backward, AdamW step) over one batch held in
  memory (on the GPU: timed between two synchronisations, none inside the loop, so kernels of
  consecutive steps queue as in real training): the best a training step can do here, with no
  data, logging or checkpoint work;
* storymm: ``storymm.training.loop.train`` (the code every backend runs) streaming real shards,
  taking steady-state ``samples_per_s`` from its metrics log (first logging window dropped);
* loader: windows/s the ``WindowLoader`` alone delivers, to show it keeps ahead of the step.

Model FLOPs per sample come from ``torch.utils.flop_counter`` on one forward+backward (matmuls and
convolutions; element-wise work is not counted), so achieved FLOP/s = FLOPs/sample x samples/s.

    python bench/train_step.py                       # tiny and gate (seed-parity 60x125) configs
    python bench/train_step.py --configs configs/tiny.yaml --steps 60
    python bench/train_step.py --configs configs/gate.yaml --stories 3552 --steps 200 [--compile]   # on a GPU
    python bench/train_step.py --configs configs/gate.yaml --data DATA_URI --steps 200   # a prepared dataset

On a GPU (picked up automatically: cuda, the config's bf16 autocast, pinned non-blocking copies)
it also samples GPU utilisation with ``nvidia-smi`` while the storymm loop runs, and reports the
time per epoch of the train split and for 5 epochs (StoryReasoning has 3,552 train stories).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time

import torch

from storymm.config import load_config
from storymm.data import synth
from storymm.data.loader import PreparedDataset, WindowLoader
from storymm.data.prepare import prepare
from storymm.training.loop import read_metrics, train
from storymm.training.losses import sequence_loss
from storymm.training.runtime import Runtime
from storymm.training.stages import TokenizerInfo, build_model, loss_weights


def _loader(dataset, config):
    return WindowLoader(
        dataset,
        "train",
        batch_size=config.data.batch_size,
        context_frames=config.data.context_frames,
        max_tokens=config.data.max_tokens,
        windows=config.data.windows,
        shuffle=True,
        seed=config.seed,
        shuffle_buffer=config.data.shuffle_buffer,
    )


def reference_rate(config, dataset, steps: int) -> tuple[float, float]:
    """(samples/s, FLOPs per sample) of a bare loop over one in-memory batch."""
    tokens = TokenizerInfo.from_manifest(dataset.manifest)
    torch.manual_seed(0)
    runtime = Runtime.from_environment(config.train.mixed_precision)  # cuda + bf16 when there is a GPU
    model = build_model("sequence", config, tokens).to(runtime.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    weights = loss_weights(config)
    batch = runtime.to_device(next(iter(_loader(dataset, config))))

    def step():
        with runtime.autocast():
            out = model(batch["frames"], batch["tokens"], batch["target_tokens"], batch["target_frame"])
            loss, _ = sequence_loss(out, batch, weights, tokens.pad_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def synchronize():
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops_per_sample = counter.get_total_flops() / config.data.batch_size
    for _ in range(3):
        step()
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return steps * config.data.batch_size / (time.perf_counter() - start), flops_per_sample


def gpu_uuid(device: int | None = None) -> str:
    """``nvidia-smi -i`` id of torch's current GPU: its UUID, since torch's index counts only the
    ``CUDA_VISIBLE_DEVICES`` GPUs (index 0 may be the node's GPU 3) while nvidia-smi counts all."""
    uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device() if device is None else device).uuid)
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


class GpuUtilisation:
    """Mean GPU utilisation (%) reported by ``nvidia-smi`` every 200 ms while in the ``with`` block."""

    def __enter__(self):
        self.proc = None
        if torch.cuda.is_available() and shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "200",
                    "-i",
                    gpu_uuid(),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
        return self

    def __exit__(self, *exc):
        self.samples = []
        if self.proc is not None:
            self.proc.terminate()
            output, _ = self.proc.communicate(timeout=10)
            self.samples = [float(line) for line in output.split() if line.replace(".", "").isdigit()]

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def storymm_rate(config, data_uri: str, run_uri: str, steps: int) -> tuple[float, float | None]:
    """Steady-state samples/s the shared training loop logs (the first logging window dropped), and
    the mean GPU utilisation over the run (None without a GPU)."""
    log_every = max(5, steps // 6)
    config = config.model_copy(deep=True)
    config.train.sequence.steps = steps + log_every
    config.train.sequence.log_every = log_every
    config.train.sequence.checkpoint_every = 10**9  # one checkpoint at the end, as in a real run
    runtime = Runtime.from_environment(config.train.mixed_precision, config.train.autocast_on_cpu)
    with GpuUtilisation() as gpu:
        train(config, "sequence", data_uri, run_uri, runtime, progress=False)
    rates = [m["samples_per_s"] for m in read_metrics(run_uri)][1:]
    return sum(rates) / len(rates), gpu.mean


def loader_rate(config, dataset, seconds: float) -> float:
    loader = _loader(dataset, config)
    windows, start, epoch = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        loader.set_epoch(epoch)
        for batch in loader:
            windows += len(batch["target_tokens"])
            if time.perf_counter() - start > seconds:
                break
        epoch += 1
    return windows / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="configs/tiny.yaml,configs/gate.yaml")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    parser.add_argument("--stories", type=int, default=120)
    parser.add_argument("--compile", action="store_true", help="train.compile: true for the storymm loop")
    parser.add_argument("--data", help="a dataset prepared with the (one) config: no synthesis, no prepare")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--loader-seconds", type=float, default=5.0, help="how long the loader alone is timed")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="storymm-bench-step-")
    source = os.path.join(scratch, "source")
    if args.data is None:
        synth.synthesize(source, args.stories, seed=0, progress=False)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}"
    )
    results = []
    for path in args.configs.split(","):
        name = os.path.splitext(os.path.basename(path))[0]
        config = load_config(path, args.overrides + (["train.compile=true"] if args.compile else []))
        data_uri = args.data or os.path.join(scratch, f"data-{name}")
        if args.data is None:
            prepare(source, data_uri, config, progress=False)
        dataset = PreparedDataset(data_uri)
        ref, flops = reference_rate(config, dataset, args.steps)
        ours, utilisation = storymm_rate(config, data_uri, os.path.join(scratch, f"run-{name}"), args.steps)
        epoch_windows = len(_loader(dataset, config)) * config.data.batch_size
        feed = loader_rate(config, dataset, seconds=args.loader_seconds)
        row = {
            "config": name,
            "image": f"{config.data.image_height}x{config.data.image_width}",
            "batch": config.data.batch_size,
            "vocab": dataset.manifest["tokenizer"]["vocab_size"],
            "reference_samples_per_s": ref,
            "storymm_samples_per_s": ours,
            "loop_vs_reference": ours / ref,
            "loader_windows_per_s": feed,
            "loader_vs_step": feed / ours,
            "gflops_per_sample": flops / 1e9,
            "achieved_gflops_per_s": flops * ours / 1e9,
            "epoch_windows": epoch_windows,
            "epoch_s": epoch_windows / ours,
            "gpu_utilisation": utilisation,
        }
        results.append(row)
        print(f"{name} ({row['image']}, batch {row['batch']}, vocab {row['vocab']}):")
        print(f"  plain PyTorch loop, in-memory batch : {ref:8.1f} samples/s")
        print(f"  storymm loop, streaming shards      : {ours:8.1f} samples/s  ratio {ours / ref:.2f}x")
        print(f"  WindowLoader alone                  : {feed:8.1f} windows/s ratio {feed / ours:.1f}x the step")
        print(f"  model FLOPs {flops / 1e9:.3f} GFLOP/sample (fwd+bwd), achieved {flops * ours / 1e9:.2f} GFLOP/s")
        print(
            f"  epoch of {epoch_windows} train windows: {epoch_windows / ours:.1f} s, 5 epochs "
            f"{5 * epoch_windows / ours:.1f} s" + (f"; GPU utilisation {utilisation:.0f}%" if utilisation else "")
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
