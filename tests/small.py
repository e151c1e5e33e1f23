"""Model sizes small enough that a training step takes milliseconds, small prepared datasets, and
the `accelerate launch` command line, shared by the tests that train."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from storymm import storage
from storymm.config import Config, load_config
from storymm.data import synth
from storymm.data.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]

#: ``--set`` overrides shrinking every model of configs/tiny.yaml (and of the seed configs).
SMALL = [
    "data.batch_size=8",
    "model.visual_channels=[8,16,16]",
    "model.visual_latent=16",
    "model.text_latent=16",
    "model.embed_dim=16",
    "model.text_hidden=32",
    "model.sequence_hidden=32",
]


def small_config(*extra: str, base: str = "tiny") -> Config:
    """``configs/<base>.yaml`` with ``SMALL`` and then ``extra`` applied."""
    return load_config(ROOT / f"configs/{base}.yaml", SMALL + list(extra))


def small_dataset(
    root: str, stories: int, seed: int, frames: tuple[int, int], config: Config | None = None, scene: str = "shapes"
) -> str:
    """Synthesise ``stories`` of ``scene`` into ``<root>/src`` and prepare them into ``<root>/data``
    (local or s3://) with ``config`` (default ``small_config()``); returns the data URI."""
    src, data = storage.join(root, "src"), storage.join(root, "data")
    synth.synthesize(src, stories, seed=seed, frames=frames, progress=False, scene=scene)
    prepare(src, data, config or small_config(), progress=False)
    return data


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_args(data: str, run: str, sets: list[str], stage: str = "sequence") -> list[str]:
    """``jobs/train.py --backend accelerate`` on configs/tiny.yaml with ``--set`` for each of ``sets``."""
    args = ["jobs/train.py", "--config", "configs/tiny.yaml", "--backend", "accelerate", "--stage", stage]
    return [*args, "--data", data, "--run", run, *[a for s in sets for a in ("--set", s)]]


def accelerate_launch(processes: int = 2, port: int | None = None, python: str = sys.executable) -> list[str]:
    """``accelerate launch`` for ``processes`` CPU ranks. Run it with ``ACCELERATE_USE_CPU=true``:
    ``--cpu`` instead would silently start ONE process; ``--multi_gpu`` with that variable starts them all."""
    return [
        str(Path(python).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(port or free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]


# ----------------------------------------------------------------------------- trackers


def logged_points(run: str) -> dict[str, list[tuple[int, float]]]:
    """Per key, the (step, value) points of the run's metrics log that trackers must hold."""
    from storymm.training.loop import read_metrics
    from storymm.training.trackers import numeric_values

    points: dict[str, list[tuple[int, float]]] = {}
    for line in read_metrics(run):
        for key, value in numeric_values(line).items():
            points.setdefault(key, []).append((line["step"], value))
    return points


def tensorboard_points(run: str) -> dict[str, list[tuple[int, float]]]:
    """What a local TensorBoard reader (the tensorboard package's ``EventAccumulator``, as
    ``tensorboard --logdir`` uses) finds under ``<run>/tensorboard`` (copied from S3 first if remote)."""
    import tempfile

    from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator
    from tensorboard.util import tensor_util

    from storymm.training.run import RunFolder

    folder = RunFolder(run).tensorboard_uri()
    with tempfile.TemporaryDirectory() as local:
        for uri in storage.list_files(folder):
            Path(local, storage.basename(uri)).write_bytes(storage.read_bytes(uri))
        events = EventAccumulator(local, size_guidance={TENSORS: 0})
        events.Reload()
        return {
            tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in events.Tensors(tag)]
            for tag in events.Tags()[TENSORS]
        }


def mlflow_points(tracking_uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every point the MLflow server holds for ``run_id``, per metric, in step order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in client.get_run(run_id).data.metrics
    }
