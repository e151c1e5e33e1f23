"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # so tests can `from s3server import ...`

from s3server import SeaweedS3Server, point_storage_at  # noqa: E402

# ------------------------------------------------------------------------------------- S3


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on 127.0.0.1 for the whole session (``SeaweedS3Server``).

    ``.endpoint``, ``.access_key``, ``.secret_key``, ``.env()``, ``.client()``; killed at the end.
    Tests that stop it must start it again (or use their own ``SeaweedS3Server``).
    """
    with SeaweedS3Server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """AWS variables pointing at ``s3_server`` plus a fresh empty bucket; yields ``s3://<bucket>``.

    Also clears ``storymm.storage``'s cached S3 filesystem before and after the test.
    """
    from storymm import storage

    point_storage_at(s3_server, monkeypatch)
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    yield f"s3://{bucket}"
    storage._s3_filesystem_cached.cache_clear()


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, artifacts on ``s3_server``) for the whole
    session: it takes ~17 s to start here. ``.uri`` is its tracking URI."""
    pytest.importorskip("mlflow", reason="the mlflow tracker tests need storymm[mlflow] (make setup installs it)")
    from mlflowserver import MlflowServer

    with MlflowServer(tmp_path_factory.mktemp("mlflow"), s3_server) as server:
        yield server


# ------------------------------------------------------------------------------- data


@pytest.fixture(scope="session")
def tiny_data_uri(tmp_path_factory) -> str:
    """40 synthetic stories prepared with configs/tiny.yaml in shards of 5 rows (read-only: shared
    by the loader, Accelerate and SLURM tests)."""
    from storymm.config import load_config

    from small import ROOT, small_dataset

    config = load_config(ROOT / "configs/tiny.yaml", ["data.rows_per_shard=5"])
    return small_dataset(str(tmp_path_factory.mktemp("tiny-data")), 40, seed=5, frames=(6, 12), config=config)


# ------------------------------------------------------------------------------ summary


def pytest_terminal_summary(terminalreporter):
    """Say loudly which tests did not run and why: a skipped SLURM, browser or multi-node test means
    the run did not test what the README claims (`make test` installs their packages when it can)."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons: dict[str, list[str]] = {}
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reasons.setdefault(reason.removeprefix("Skipped: "), []).append(report.nodeid.split("::")[0])
    terminalreporter.section("TESTS THAT DID NOT RUN", sep="#", bold=True, yellow=True)
    for reason, files in sorted(reasons.items()):
        terminalreporter.write_line(f"{len(files)} skipped: {reason} [{', '.join(sorted(set(files)))}]", yellow=True)
