"""storymm.storage against local folders, file:// URIs and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import errno
import io
import logging
import os
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tenacity import stop_after_attempt

from storymm import storage

from s3server import SeaweedS3Server, free_ports

# ------------------------------------------------------------------------------ URIs, pure


def test_join_and_basename():
    assert storage.join("s3://bucket/run", "ckpt", "/model.pt") == "s3://bucket/run/ckpt/model.pt"
    assert storage.join("s3://bucket/run/", "a/") == "s3://bucket/run/a"
    assert storage.join("file:///tmp/x", "y") == "file:///tmp/x/y"
    assert storage.join("/tmp/x", "y", "z.txt") == os.path.join("/tmp/x", "y", "z.txt")
    assert storage.basename("s3://bucket/run/ckpt/") == "ckpt"
    assert storage.basename("s3://bucket/a/b.parquet") == "b.parquet"
    assert storage.basename("/tmp/x/y.txt") == "y.txt"
    assert storage.is_remote("s3://b/x") and not storage.is_remote("/tmp/x")


def test_redact_strips_userinfo_and_signed_query_secrets():
    assert storage.redact("s3://AKIAEXAMPLE:s3cr3t@bucket/x") == "s3://bucket/x"
    # AWS secret keys often contain "/" and "+"
    assert storage.redact("s3://AKIAEXAMPLE:ab/c+d/ef@bucket/x") == "s3://bucket/x"
    assert storage.redact("s3://tokenonly@bucket/x") == "s3://bucket/x"
    assert storage.redact("http://user:pw@host:9000/b") == "http://host:9000/b"
    signed = (
        "https://host/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F2026"
        "&X-Amz-Signature=deadbeef&X-Amz-Security-Token=SESSIONTOK&part=1"
    )
    out = storage.redact(signed)
    for secret in ("AKIAEXAMPLE", "deadbeef", "SESSIONTOK"):
        assert secret not in out
    assert "part=1" in out and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in out
    # plain URIs are left alone, "@" and ":" inside keys too
    for plain in ("s3://bucket/a@b/c", "s3://bucket/dir/a:b@c", "/tmp/x@y", "file:///tmp/a"):
        assert storage.redact(plain) == plain


@pytest.mark.parametrize(
    "uri",
    [
        "s3://AKIAKEYID:topsecretvalue@bucket/x",
        "s3://AKIAKEYID:top/secret+value@bucket/x",  # "/" in the secret fooled urlparse
        "s3://AKIAKEYID@bucket/x",
    ],
)
def test_locate_rejects_credentials_without_echoing_them(uri):
    with pytest.raises(ValueError) as info:
        storage.locate(uri)
    message = str(info.value) + repr(info.value)
    for secret in ("AKIAKEYID", "topsecretvalue", "top/secret+value", "secret"):
        assert secret not in message
    assert "s3://bucket/x" in message


def test_locate_rejects_unknown_schemes_redacted():
    with pytest.raises(ValueError) as info:
        storage.locate("https://user:hunter2@example.com/x")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    "message, transient",
    [
        # what pyarrow really raises against a stopped server / a flaky one
        (
            "When getting information for key 'd/x.txt' in bucket 'b': AWS Error "
            "NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Could not connect",
            True,
        ),
        ("AWS Error UNKNOWN (HTTP status 503) during PutObject operation: Slow", True),
        ("AWS Error SERVICE_UNAVAILABLE during UploadPart operation: busy", True),
        ("AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate.", True),
        ("AWS Error INTERNAL_FAILURE during CompleteMultipartUpload operation: oops", True),
        ("curlCode: 56, Failure when receiving data from the peer", True),
        # permanent
        ("AWS Error ACCESS_DENIED during HeadObject operation: No response body.", False),
        (
            "AWS Error SIGNATURE_DOES_NOT_MATCH during CreateMultipartUpload operation: The "
            "request signature we calculated does not match (Request ID: 18EA5003)",
            False,
        ),
        ("When reading key 'runs/500/x': AWS Error INVALID_ARGUMENT during GetObject", False),
        ("Bucket 'nope' not found", False),
    ],
)
def test_transient_classification(message, transient):
    assert storage._is_transient(OSError(message)) is transient


def test_exception_types_classification():
    assert storage._is_transient(ConnectionRefusedError("x"))
    assert storage._is_transient(TimeoutError("x"))
    assert not storage._is_transient(FileNotFoundError("connection refused"))
    assert not storage._is_transient(PermissionError("timeout"))
    assert not storage._is_transient(ValueError("network"))


# ------------------------------------------------------------------------------ local files


def test_local_round_trip(tmp_path):
    uri = str(tmp_path / "deep" / "er" / "a.txt")
    assert not storage.exists(uri)
    storage.write_text(uri, "héllo")  # parent folders are created
    assert storage.read_text(uri) == "héllo"
    assert storage.exists(uri) and storage.is_file(uri)
    folder = str(tmp_path / "deep")
    assert storage.exists(folder) and not storage.is_file(folder)
    storage.write_bytes(uri, b"\x00\x01")  # overwrite
    assert storage.read_bytes(uri) == b"\x00\x01"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "missing.bin"))


def test_file_uri_round_trip(tmp_path):
    base = "file://" + str(tmp_path)
    uri = storage.join(base, "sub", "x.json")
    storage.write_text(uri, '{"a": 1}')
    assert (tmp_path / "sub" / "x.json").read_text() == '{"a": 1}'
    assert storage.read_text(uri) == '{"a": 1}'
    assert storage.is_file(uri)
    assert storage.list_files(storage.join(base, "sub")) == [uri]
    assert storage.list_dirs(base) == ["sub"]
    storage.delete(uri)
    assert not storage.exists(uri)


def _populate(base: str) -> None:
    for name in ("b.parquet", "a.parquet", "c.json", ".tmp-half-written", "sub/d.parquet"):
        storage.write_text(storage.join(base, name), name)


def test_local_list_files_and_dirs(tmp_path):
    base = str(tmp_path)
    _populate(base)
    os.makedirs(tmp_path / "empty")
    assert storage.list_files(base) == [os.path.join(base, n) for n in ("a.parquet", "b.parquet", "c.json")]
    assert storage.list_files(base, suffix=".parquet") == [
        os.path.join(base, "a.parquet"),
        os.path.join(base, "b.parquet"),
    ]
    assert storage.list_files(base, suffix=".parquet", recursive=True) == [
        os.path.join(base, "a.parquet"),
        os.path.join(base, "b.parquet"),
        os.path.join(base, "sub", "d.parquet"),
    ]
    assert storage.list_files(str(tmp_path / "nope")) == []
    assert storage.list_dirs(base) == ["empty", "sub"]
    assert storage.list_dirs(str(tmp_path / "nope")) == []


def test_local_delete(tmp_path):
    base = str(tmp_path)
    _populate(base)
    storage.delete(storage.join(base, "a.parquet"))
    assert not storage.exists(storage.join(base, "a.parquet"))
    storage.delete(storage.join(base, "sub"))
    assert not storage.exists(storage.join(base, "sub"))
    storage.delete(storage.join(base, "never-existed"))  # missing is fine
    assert storage.list_files(base) == [storage.join(base, n) for n in ("b.parquet", "c.json")]


def test_local_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    storage.write_text(str(target), "old")
    seen = {}

    def failing_fsync(fd):
        # the new bytes sit in a private temp file; the target still has the old content
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
        seen["temps"] = [p.read_bytes() for p in temps]
        seen["target"] = target.read_text()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        storage.write_text(str(target), "new content " * 1000)
    monkeypatch.undo()

    assert seen["temps"] == [("new content " * 1000).encode()]
    assert seen["target"] == "old"
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temp file left


def test_local_ensure_bucket_and_upload(tmp_path):
    folder = tmp_path / "made" / "here"
    storage.ensure_bucket(str(folder))
    assert folder.is_dir()
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    storage.upload_file(str(src), str(folder / "dst.bin"))
    assert (folder / "dst.bin").read_bytes() == b"payload"


# ------------------------------------------------------------------------- real S3 server


@pytest.mark.slow
def test_s3_round_trip(s3_env):
    base = storage.join(s3_env, "run")
    uri = storage.join(base, "a.txt")
    assert not storage.exists(uri)
    storage.write_text(uri, "héllo s3")
    assert storage.read_text(uri) == "héllo s3"
    assert storage.exists(uri) and storage.is_file(uri)
    assert storage.exists(base) and not storage.is_file(base)

    _populate(base)
    assert storage.list_files(base) == [storage.join(base, n) for n in ("a.parquet", "a.txt", "b.parquet", "c.json")]
    assert storage.list_files(base, suffix=".parquet") == [
        storage.join(base, "a.parquet"),
        storage.join(base, "b.parquet"),
    ]
    assert storage.list_files(base, suffix=".parquet", recursive=True)[-1] == storage.join(base, "sub/d.parquet")
    assert storage.list_files(storage.join(s3_env, "nope")) == []
    assert storage.list_dirs(base) == ["sub"]
    assert storage.list_dirs(s3_env) == ["run"]

    storage.delete(uri)
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(uri)
    storage.delete(storage.join(base, "sub"))
    assert storage.list_dirs(base) == []
    storage.delete(storage.join(base, "missing.bin"))  # missing is fine
    storage.delete(base)
    assert not storage.exists(storage.join(base, "b.parquet"))


@pytest.mark.slow
def test_s3_large_file_multipart(s3_env, s3_server, tmp_path):
    data = os.urandom(23 * 1024 * 1024 + 17)  # > 2 parts of pyarrow's 10 MB upload part size
    uri = storage.join(s3_env, "big", "blob.bin")
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    bucket, key = uri[len("s3://") :].split("/", 1)
    head = s3_server.client().head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3")  # completed as a 3-part multipart upload

    src = tmp_path / "src.bin"
    src.write_bytes(data[:1_000_000])
    storage.upload_file(str(src), storage.join(s3_env, "big", "uploaded.bin"))
    assert storage.read_bytes(storage.join(s3_env, "big", "uploaded.bin")) == data[:1_000_000]


@pytest.mark.slow
def test_s3_ensure_bucket(s3_env, s3_server):
    name = "ensure-" + os.urandom(4).hex()
    storage.ensure_bucket(f"s3://{name}/some/prefix")
    s3_server.client().head_bucket(Bucket=name)  # raises if missing
    storage.ensure_bucket(f"s3://{name}")  # idempotent
    storage.write_text(f"s3://{name}/some/prefix/x.txt", "x")
    assert storage.read_text(f"s3://{name}/some/prefix/x.txt") == "x"


@pytest.mark.slow
def test_s3_parquet_through_open_input_file(s3_env):
    table = pa.table({"id": list(range(5000)), "text": [f"story {i}" for i in range(5000)]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=1000)
    uri = storage.join(s3_env, "data", "train-00000.parquet")
    storage.write_bytes(uri, buffer.getvalue())

    with storage.open_input_file(uri) as handle:
        parquet = pq.ParquetFile(handle)
        assert parquet.metadata.num_row_groups == 5
        assert parquet.read_row_group(3).column("id").to_pylist() == list(range(3000, 4000))
        assert parquet.read().equals(table)
    with pytest.raises(FileNotFoundError):
        storage.open_input_file(storage.join(s3_env, "data", "missing.parquet"))


# ------------------------------------------------------------------------------- retries


def _retry_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == storage.__name__ and "Retrying" in r.getMessage()]


def _assert_no_credentials(texts, *secrets_):
    blob = "\n".join(texts)
    for secret in secrets_:
        assert secret not in blob


@pytest.mark.slow
def test_write_survives_server_restart(tmp_path, monkeypatch, caplog, capfd):
    """A write started while the server is down succeeds once it is back (same port, same data)."""
    caplog.set_level(logging.DEBUG)
    with SeaweedS3Server(tmp_path / "seaweedfs") as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        storage._s3_filesystem_cached.cache_clear()
        bucket = "s3://" + server.create_bucket()
        storage.write_text(storage.join(bucket, "before.txt"), "before")
        port = server.port

        server.stop()
        outcome: dict = {}

        def writer():
            start = time.monotonic()
            try:
                storage.write_text(storage.join(bucket, "during.txt"), "written through an outage")
            except BaseException as exc:  # reported below
                outcome["error"] = exc
            outcome["seconds"] = time.monotonic() - start

        thread = threading.Thread(target=writer)
        thread.start()
        # pyarrow's own retries (3 attempts) cover ~1-2.7 s of outage; stay down longer so that
        # storymm's retry layer has to take over at least once.
        time.sleep(3.0)
        assert thread.is_alive(), f"write gave up while the server was down: {outcome}"
        server.start()
        assert server.port == port
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert "error" not in outcome, repr(outcome.get("error"))
        assert outcome["seconds"] >= 3.0

        assert storage.read_text(storage.join(bucket, "during.txt")) == "written through an outage"
        assert storage.read_text(storage.join(bucket, "before.txt")) == "before"  # data kept
        retries = _retry_records(caplog)
        assert retries and all(r.levelno == logging.DEBUG for r in retries)  # -v shows them
        assert "write_text" in retries[0].getMessage() or "write_bytes" in retries[0].getMessage()

        out, err = capfd.readouterr()
        _assert_no_credentials(
            [caplog.text, out, err] + [r.getMessage() for r in caplog.records],
            server.secret_key,
            server.access_key,
        )
    storage._s3_filesystem_cached.cache_clear()


@pytest.mark.slow
def test_permanent_errors_fail_fast(s3_env, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(s3_env, "does", "not", "exist.bin"))
    assert time.monotonic() - start < 1.0
    assert _retry_records(caplog) == []

    # a missing bucket (NO_SUCH_BUCKET) is permanent too
    start = time.monotonic()
    with pytest.raises(OSError, match="(?i)bucket .* does not exist"):
        storage.write_text(f"s3://missing-{os.urandom(4).hex()}/x.txt", "x")
    assert time.monotonic() - start < 1.5
    assert _retry_records(caplog) == []

    # wrong credentials: the real server's ACCESS_DENIED / SIGNATURE_DOES_NOT_MATCH is permanent
    storage.write_text(storage.join(s3_env, "x.txt"), "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-key-for-this-test")
    storage._s3_filesystem_cached.cache_clear()
    start = time.monotonic()
    with pytest.raises(OSError) as info:
        storage.read_bytes(storage.join(s3_env, "x.txt"))
    assert not isinstance(info.value, FileNotFoundError)
    assert time.monotonic() - start < 1.5
    assert _retry_records(caplog) == []
    assert "wrong-secret-key-for-this-test" not in str(info.value)


@pytest.mark.slow
def test_credentials_never_in_logs_or_errors(s3_server, s3_env, monkeypatch, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    secret, key_id = s3_server.secret_key, s3_server.access_key
    texts: list[str] = []

    def record(exc: BaseException) -> None:
        while exc is not None:
            texts.extend([str(exc), repr(exc)])
            exc = exc.__cause__ or exc.__context__

    # ordinary operations
    uri = storage.join(s3_env, "c", "x.txt")
    storage.write_text(uri, "x")
    texts.append(repr(storage.locate(uri)))
    assert storage.read_text(uri) == "x"
    storage.list_files(storage.join(s3_env, "c"))
    # failing ones
    for bad in (
        lambda: storage.read_bytes(storage.join(s3_env, "c", "missing")),
        lambda: storage.locate(f"s3://{key_id}:{secret}@bucket/x"),
        lambda: storage.read_text(f"s3://{key_id}:{secret}@bucket/x"),
    ):
        with pytest.raises((OSError, ValueError)) as info:
            bad()
        record(info.value)
    # a retried one: same credentials, an endpoint where nothing listens (2 attempts)
    monkeypatch.setattr(storage.read_bytes.retry, "stop", stop_after_attempt(2))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    storage._s3_filesystem_cached.cache_clear()
    with pytest.raises(OSError) as info:
        storage.read_bytes(uri)
    record(info.value)
    assert len(_retry_records(caplog)) == 1
    storage._s3_filesystem_cached.cache_clear()

    out, err = capfd.readouterr()
    texts += [caplog.text, out, err] + [r.getMessage() for r in caplog.records]
    texts += [str(r.exc_info[1]) for r in caplog.records if r.exc_info]
    _assert_no_credentials(texts, secret, key_id)


# ------------------------------------------------------------------- second implementation


def test_s3_round_trip_on_moto(monkeypatch):
    """A quick check against moto too (different server, same code path)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "motokey")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "motosecret")
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        storage._s3_filesystem_cached.cache_clear()
        storage.ensure_bucket("s3://moto-bucket/p")
        storage.write_text("s3://moto-bucket/p/a.txt", "moto")
        assert storage.read_text("s3://moto-bucket/p/a.txt") == "moto"
        assert storage.list_files("s3://moto-bucket/p") == ["s3://moto-bucket/p/a.txt"]
    finally:
        storage._s3_filesystem_cached.cache_clear()
        server.stop()


def test_local_files_are_published_with_the_usual_mode(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    target = tmp_path / "out" / "f.txt"
    storage.write_text(str(target), "x")
    assert target.stat().st_mode & 0o777 == 0o666 & ~storage._UMASK


@pytest.mark.parametrize(
    "text, keep, expected",
    [
        ("gate retrained/v2", "._-", "gate_retrained_v2"),
        (".hidden", "._-", "hidden"),
        ("///", "._-", "run"),
        ("visual_latent=16", "._=-", "visual_latent=16"),
        ("visual_latent=16", "._-", "visual_latent_16"),
    ],
)
def test_safe_name_is_one_visible_path_component(text, keep, expected):
    assert storage.safe_name(text, keep=keep) == expected
