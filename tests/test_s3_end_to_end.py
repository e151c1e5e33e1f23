"""The production path on a real S3-compatible server (SeaweedFS on 127.0.0.1): synthesise stories
into a bucket, prepare them bucket-to-bucket with the CLI, stream them with the loader, train with
checkpoints in the bucket, evaluate and write the report there. No credentials may reach the output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from storymm import storage
from storymm.data.loader import PreparedDataset, WindowLoader
from storymm.training.run import read_metrics

from small import SMALL

ROOT = Path(__file__).resolve().parents[1]
SHORT = SMALL + [
    "train.visual_ae.steps=3",
    "train.text_ae.steps=3",
    "train.sequence.steps=4",
    "train.sequence.checkpoint_every=2",
    "eval.median_windows=50",
]


def storymm(*args: str, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "storymm.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"storymm {args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.mark.slow
def test_synth_prepare_train_evaluate_on_s3(s3_env, s3_server):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    source, data, runs = (storage.join(s3_env, name) for name in ("source", "data", "runs"))
    outputs = [storymm("synth", "--out", source, "--stories", "30", "--seed", "2", "--frames", "6-9", env=env)]
    outputs.append(
        storymm(
            "prepare",
            "--source",
            source,
            "--out",
            data,
            "--config",
            "configs/tiny.yaml",
            *sets("data.rows_per_shard=8"),
            env=env,
        )
    )
    assert "prepared 30 source stories" in outputs[-1].stdout

    manifest = json.loads(storage.read_text(storage.join(data, "manifest.json")))
    assert manifest["source_rows"] == 30 == sum(manifest["kept_stories"].values()) + sum(manifest["rejected"].values())
    shards = storage.list_files(storage.join(data, "train"), suffix=".parquet")
    assert len(shards) >= 2 and all(uri.startswith(s3_env) for uri in shards)

    # Two ranks stream disjoint windows straight from the bucket.
    dataset = PreparedDataset(data)
    seen = []
    for rank in range(2):
        loader = WindowLoader(
            dataset,
            "train",
            batch_size=4,
            context_frames=4,
            max_tokens=20,
            rank=rank,
            world_size=2,
            with_ids=True,
            equalize=False,
        )
        batches = list(loader)
        assert batches and batches[0]["frames"].shape[1:] == (4, 3, 32, 64)
        seen.append({window for batch in batches for window in batch["window_ids"]})
    assert seen[0] and seen[1] and not seen[0] & seen[1]

    common = ["--config", "configs/tiny.yaml", "--data", data, *sets(*SHORT)]
    for stage in ("visual_ae", "text_ae"):
        outputs.append(storymm("train", "--stage", stage, "--run", storage.join(runs, stage), *common, env=env))
    outputs.append(
        storymm(
            "train",
            "--stage",
            "sequence",
            "--run",
            storage.join(runs, "seq"),
            "--init-from",
            storage.join(runs, "visual_ae"),
            storage.join(runs, "text_ae"),
            *common,
            env=env,
        )
    )
    checkpoints = [storage.basename(u) for u in storage.list_files(storage.join(runs, "seq", "checkpoints"))]
    assert checkpoints == ["best", "latest", "step-00000002.pt", "step-00000004.pt"]  # best: by val loss
    assert [m["step"] for m in read_metrics(storage.join(runs, "seq"))][-1] == 4

    report_uri = storage.join(s3_env, "reports", "seq")
    outputs.append(
        storymm("evaluate", "--run", storage.join(runs, "seq"), "--data", data, "--out", report_uri, env=env)
    )
    report = json.loads(storage.read_text(storage.join(report_uri, "report.json")))
    # every test window was scored (windows: all, K=4), not one batch
    assert report["windows"] == manifest["kept_frames"]["test"] - 4 * manifest["kept_stories"]["test"]
    names = {storage.basename(u) for u in storage.list_files(report_uri)}
    assert {"report.json", "report.html", "report.md", "loss_curves.png", "samples.png"} <= names

    text = "".join(o.stdout + o.stderr for o in outputs)
    assert s3_server.secret_key not in text and s3_server.access_key not in text
