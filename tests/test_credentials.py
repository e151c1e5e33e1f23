"""No file or object that storymm, Ray Train or Ray Tune writes holds the S3 access key or secret.

One real SeaweedFS server with distinctive keys and one real Ray head on loopback whose environment
carries the AWS variables (as a node's environment or instance role would on a cluster). Through the
CLI, with ``-v``: a Ray Train run, the smallest Ray Tune sweep, a nightly evaluation and
``report url``. Then every object in the bucket and every file under the folders the commands could
write (home, temp dir, Ray's temp dir, working dir) plus everything they printed is scanned for both
keys. The scan is meaningful only if Ray really stored its pickled state in the bucket: checked too.
"""

from __future__ import annotations

import os
import pickle
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from test_ray import RayHead

from s3server import AWS_VARS_TO_CLEAR, SeaweedS3Server, _quiet_boto, point_storage_at
from small import SMALL, small_config, small_dataset

REPO = Path(__file__).resolve().parents[1]
ACCESS_KEY = "AKLEAKCHECK" + secrets.token_hex(5).upper()
SECRET_KEY = "leak-check-SECRET-" + secrets.token_urlsafe(18)
DATE = "2026-11-23"


def _leaks(data: bytes) -> list[str]:
    return [name for name, key in (("access key", ACCESS_KEY), ("secret", SECRET_KEY)) if key.encode() in data]


def _context(data: bytes, width: int = 150) -> list[str]:
    """Where the keys occur (masked), so a failure says which component wrote them."""
    text = data.decode("utf-8", "replace")
    spots = []
    for key, _mask in ((ACCESS_KEY, "<ACCESS-KEY>"), (SECRET_KEY, "<SECRET>")):
        at = text.find(key)
        if at >= 0:
            spots.append(
                text[max(0, at - width) : at + len(key) + 40]
                .replace(ACCESS_KEY, "<ACCESS-KEY>")
                .replace(SECRET_KEY, "<SECRET>")
            )
    return spots


def _scan_folder(root: Path) -> tuple[int, dict[str, list[str]]]:
    """(files read, {path: leaked keys}) for every regular file under ``root``."""
    count, found = 0, {}
    for path in root.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        try:
            data = path.read_bytes()
        except OSError:  # a socket or a file removed while we walk
            continue
        count += 1
        if _leaks(data):
            found[str(path)] = _context(data)
    return count, found


def test_unit_s3_filesystem_pickles_without_credentials(monkeypatch):
    """What Ray stores is the pickle of this object: endpoint, scheme and region, never a key."""
    from storymm import storage

    for name in AWS_VARS_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8999")
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    storage._s3_filesystem_cached.cache_clear()
    try:
        fs = storage.s3_filesystem()
        data = pickle.dumps(fs)
        assert _leaks(data) == []
        assert b"127.0.0.1:8999" in data and b"eu-central-1" in data
        copy = pickle.loads(data)
        assert copy.region == "eu-central-1"
    finally:
        storage._s3_filesystem_cached.cache_clear()


@pytest.mark.slow
def test_ray_train_tune_nightly_and_report_url_store_no_credentials(tmp_path, monkeypatch):
    started = time.monotonic()
    short = Path(tempfile.mkdtemp(prefix="cr-", dir="/tmp"))  # unix socket paths must stay short
    home, tmp, work = short / "home", short / "tmp", tmp_path / "work"
    for folder in (home, tmp, work):
        folder.mkdir()
    server = SeaweedS3Server(tmp_path / "weed", access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    head = RayHead()
    try:
        server.start()
        point_storage_at(server, monkeypatch)
        bucket = server.create_bucket("leakcheck")
        root = f"s3://{bucket}"
        data = small_dataset(root, 12, seed=3, frames=(6, 8), config=small_config("data.rows_per_shard=4"))

        aws = {**server.env(), "AWS_EC2_METADATA_DISABLED": "true"}
        private = {"HOME": str(home), "TMPDIR": str(tmp), "STORYMM_TORCH_THREADS": "1"}
        head.env.update(aws, **private)  # the node's environment: the only way the keys reach workers
        head.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
        env.update(head.env, RAY_ADDRESS=head.gcs_address, PYTHONPATH=str(REPO))

        outputs: dict[str, str] = {}

        def storymm(name: str, *args: str) -> subprocess.CompletedProcess:
            result = subprocess.run(
                [sys.executable, "-m", "storymm.cli", "-v", *args],
                env=env,
                cwd=work,
                capture_output=True,
                text=True,
                timeout=180,
            )
            outputs[name] = result.stdout + result.stderr
            assert result.returncode == 0, f"{name}:\n{outputs[name][-4000:]}"
            return result

        config = [
            "--config",
            str(REPO / "configs/tiny.yaml"),
            *[a for s in SMALL for a in ("--set", s)],
            "--set",
            "eval.median_windows=20",
            "--set",
            "eval.samples=2",
        ]
        run = f"{root}/runs/seq"
        storymm(
            "train",
            "train",
            "--backend",
            "ray",
            "--workers",
            "1",
            "--stage",
            "sequence",
            "--data",
            data,
            "--run",
            run,
            *config,
            "--set",
            "train.sequence.steps=4",
            "--set",
            "train.sequence.checkpoint_every=2",
            "--set",
            "train.sequence.log_every=2",
            "--set",
            "train.sequence.warmup_steps=1",
        )
        storymm(
            "tune",
            "tune",
            "--stage",
            "visual_ae",
            "--data",
            data,
            "--runs",
            f"{root}/tune-runs",
            "--out",
            f"{root}/tune-out",
            "--grid",
            "model.visual_latent=16",
            *config,
            "--set",
            "train.visual_ae.steps=2",
            "--set",
            "train.visual_ae.log_every=1",
            "--set",
            "train.visual_ae.warmup_steps=1",
        )
        storymm("nightly", "nightly", "--runs", run, "--data", data, "--reports", f"{root}/reports", "--date", DATE)
        link = storymm("report url", "report", "url", f"{root}/reports/nightly").stdout.strip().splitlines()[-1]

        # every object in the bucket
        with _quiet_boto():
            client = server.client()
            keys = [
                obj["Key"]
                for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                for obj in page.get("Contents", [])
            ]
            objects = {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}
        leaked_objects = {key: _leaks(body) for key, body in objects.items() if _leaks(body)}
        assert leaked_objects == {}, leaked_objects
        # the scan covered what the issue found leaking: Ray's persisted run state (Tune pickles the filesystem)
        pickles = {k: v for k, v in objects.items() if k.endswith(("trainer.pkl", "tuner.pkl"))}
        # Ray Train v2 keeps no trainer.pkl; its persisted run state is the checkpoint manager's snapshot
        assert "runs/seq/ray/train/checkpoint_manager_snapshot.json" in objects, sorted(objects)
        assert any(k.startswith("tune-runs/tune/") for k in pickles), sorted(objects)
        endpoint = urlparse(server.endpoint).netloc.encode()
        assert all(endpoint in body for body in pickles.values()), "the S3 filesystem was not pickled"
        assert any(k.endswith("manifest.json") for k in objects) and any(k.endswith(".pt") for k in objects)
        assert any(k.startswith(f"reports/nightly/{DATE}/") for k in objects)

        # every local file the commands (and the Ray head serving them) could write
        scanned = 0
        for folder in (short, work, Path(head.temp_dir)):
            count, found = _scan_folder(folder)
            scanned += count
            assert found == {}, found
        assert scanned > 50, scanned  # Ray's session logs are among them
        assert any(Path(head.temp_dir).rglob("raylet.out")), "Ray's logs were not where the scan looked"

        # everything printed, -v included; a presigned link necessarily names the key id (never the secret)
        for name, text in outputs.items():
            if name == "report url":
                text = text.replace(link, "")
            assert _leaks(text.encode()) == [], (name, _leaks(text.encode()))
        assert SECRET_KEY not in link
        assert parse_qs(urlparse(link).query)["X-Amz-Credential"][0].startswith(ACCESS_KEY + "/")
        print(f"{len(objects)} objects and {scanned} local files scanned in {time.monotonic() - started:.0f} s")
    finally:
        head.stop()
        server.close()
        shutil.rmtree(short, ignore_errors=True)
