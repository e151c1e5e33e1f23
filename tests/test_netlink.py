"""The slow link the storage tests and benchmarks put between storymm and its servers
(``tests/netlink.py``): it delays each direction, caps the bandwidth and counts what it delivered."""

from __future__ import annotations

import socket
import threading
import time

from netlink import LOOPBACK, SlowLink


class _Echo:
    """A TCP server on 127.0.0.1 that sends back whatever it reads (one connection at a time)."""

    def __init__(self):
        self.server = socket.create_server((LOOPBACK, 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(1 << 16):
                    conn.sendall(data)

    def close(self):
        self.server.close()


def _round_trip(port: int, payload: bytes) -> float:
    started = time.perf_counter()
    with socket.create_connection((LOOPBACK, port), timeout=30) as conn:
        received = bytearray()
        sender = threading.Thread(target=conn.sendall, args=(payload,))
        sender.start()
        while len(received) < len(payload):
            chunk = conn.recv(1 << 16)
            assert chunk, "the link closed the connection early"
            received += chunk
        sender.join()
    assert bytes(received) == payload
    return time.perf_counter() - started


def test_slow_link_delays_each_direction_caps_bandwidth_and_counts_bytes():
    echo = _Echo()
    try:
        with SlowLink(echo.port, latency_ms=50) as link:
            assert link.delivered() == (0, 0)
            assert _round_trip(link.port, b"x" * 1000) >= 0.1  # 50 ms there, 50 ms back
            payload = bytes(range(256)) * 4096  # 1 MiB
            _round_trip(link.port, payload)
            assert link.delivered() == (1000 + len(payload), 1000 + len(payload))
            assert link.bytes_up == link.bytes_down == 1000 + len(payload)
        with SlowLink(echo.port, mbit_s=16) as capped:  # 1 MiB at 2 MB/s: about half a second each way
            assert _round_trip(capped.port, payload) >= 0.5
    finally:
        echo.close()
