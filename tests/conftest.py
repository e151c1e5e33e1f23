"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # so tests can `from s3server import ...`

from s3server import SeaweedS3Server  # noqa: E402

# ------------------------------------------------------------------------------------- S3

_AWS_VARS_TO_CLEAR = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


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
    for name in _AWS_VARS_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    from storymm import storage

    storage._s3_filesystem_cached.cache_clear()
    if not s3_server.running:  # a previous test stopped it
        s3_server.start()
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    yield f"s3://{bucket}"
    storage._s3_filesystem_cached.cache_clear()
