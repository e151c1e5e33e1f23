"""Transient faults while a shard's bytes are being read, from the real S3 server through a loopback
proxy that cuts the connection in the middle of the response body (after the headers and part of
the object) for the first N requests of that shard.

A few cuts are absorbed (storymm retries the whole read, on top of the AWS SDK's own 3 tries) and
the bytes read equal the shard's; cuts that never stop end, within the retry budget, in an error
that names the shard.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storymm import storage
from storymm.data.loader import DatasetError, PreparedDataset

pytestmark = pytest.mark.slow

SHARD = "train/part-00000.parquet"


class CuttingProxy:
    """127.0.0.1:<port> -> the S3 server; ``faults`` GETs whose request line names ``needle`` get
    ``keep`` bytes of their response, then the connection is cut."""

    def __init__(self, target: tuple[str, int], needle: bytes, faults: int, keep: int = 1500):
        self.target, self.needle, self.faults, self.keep = target, needle, faults, keep
        self.cuts = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._server.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.target)
        state = {"left": None}  # bytes of the current response still to pass before the cut

        def requests() -> None:
            try:
                while data := client.recv(65536):
                    first_line = data.split(b"\r\n", 1)[0]
                    if first_line.startswith(b"GET ") and self.needle in first_line:
                        with self._lock:
                            if self.faults > 0:
                                self.faults -= 1
                                state["left"] = self.keep
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=requests, daemon=True).start()
        try:
            while data := upstream.recv(65536):
                left = state["left"]
                if left is not None and len(data) >= left:
                    client.sendall(data[:left])
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    with self._lock:
                        self.cuts += 1
                    break
                if left is not None:
                    state["left"] = left - len(data)
                client.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):  # shutdown, not only close: it wakes the blocked recv above
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


@pytest.fixture
def shard_in_bucket(s3_env, tiny_data_uri, s3_server):
    """The tiny dataset's manifest and first train shard in a fresh bucket; yields (data URI, bytes)."""
    data = f"{s3_env}/data"
    for name in ("manifest.json", SHARD):
        storage.write_bytes(storage.join(data, name), storage.read_bytes(storage.join(tiny_data_uri, name)))
    return data, storage.read_bytes(storage.join(tiny_data_uri, SHARD))


def _through(proxy: CuttingProxy, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    storage._s3_filesystem_cached.cache_clear()


def test_cuts_mid_read_are_retried(shard_in_bucket, s3_server, monkeypatch, caplog):
    data, expected = shard_in_bucket
    assert len(expected) > 5000  # the cut (after 1500 bytes, headers included) falls inside the body
    dataset = PreparedDataset(data)
    shard = dataset.shards("train")[0]
    # 4 cuts: more than the AWS SDK's 3 tries of one GET, so storymm's own retry has to take over
    proxy = CuttingProxy(("127.0.0.1", s3_server.port), SHARD.encode(), faults=4)
    try:
        _through(proxy, monkeypatch)
        caplog.set_level(logging.DEBUG, logger="storymm.storage")
        assert storage.read_bytes(storage.join(data, SHARD)) == expected
        assert proxy.cuts == 4
        assert any("Retrying" in r.getMessage() for r in caplog.records if r.name == "storymm.storage")
        proxy.faults = 4
        table = dataset.read_shard(shard, columns=("frames", "token_ids"))
        assert proxy.cuts == 8
        assert table.equals(pq.read_table(pa.BufferReader(expected), columns=["frames", "token_ids"]))
    finally:
        proxy.close()
        storage._s3_filesystem_cached.cache_clear()


def test_a_read_that_keeps_failing_names_the_shard(shard_in_bucket, s3_server, monkeypatch):
    data, _ = shard_in_bucket
    dataset = PreparedDataset(data)
    proxy = CuttingProxy(("127.0.0.1", s3_server.port), SHARD.encode(), faults=10_000)
    try:
        _through(proxy, monkeypatch)
        started = time.monotonic()
        with pytest.raises(DatasetError) as err:
            dataset.read_shard(dataset.shards("train")[0])
        seconds = time.monotonic() - started
        assert SHARD in str(err.value) and "attempt" in str(err.value)
        assert proxy.cuts >= 4  # the SDK's tries times storymm's attempts
        assert seconds < storage.RETRY_SECONDS + 5, seconds  # bounded: the retry budget, not forever
        assert s3_server.secret_key not in str(err.value)
    finally:
        proxy.close()
        storage._s3_filesystem_cached.cache_clear()
