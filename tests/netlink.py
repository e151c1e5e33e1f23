"""A slow network link on 127.0.0.1 in front of a TCP server: latency each way and a bandwidth cap.

Usage (tests and ``bench/``)::

    with SlowLink(upstream_port, latency_ms=50, mbit_s=200) as link:
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{link.port}"

It runs as its own process (``python tests/netlink.py ...``), so its work never competes with the
process under test for the GIL, as a real network does not. Each byte read from one side is written
to the other ``latency`` after it arrived, and no sooner than the connection has sent the bytes
before it at ``mbit_s`` (per connection and direction, like ``tc netem delay … rate …`` on both ends
of a cable; a transfer is capped, concurrent requests do not queue behind it). ``mbit_s`` 0 = no
cap. The link holds at most 4 MiB per connection and direction in flight (a TCP window), so a
sender that dies mid-transfer loses the rest, as over a real network. ``pause()``/``resume()``
(SIGSTOP/SIGCONT) freeze the link; ``close()`` kills it, cutting every connection (an outage).
``bytes_up``/``bytes_down``: what the link has delivered so far towards the server / back (HTTP
headers included: what a request really costs on the wire). Nothing listens or connects outside
loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys

LOOPBACK = "127.0.0.1"


class SlowLink:
    """The proxy process; ``port`` is where clients connect."""

    def __init__(self, upstream_port: int, latency_ms: float = 0.0, mbit_s: float = 0.0):
        self.upstream_port, self.latency_ms, self.mbit_s = upstream_port, latency_ms, mbit_s
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> SlowLink:
        command = [sys.executable, os.path.abspath(__file__), str(self.upstream_port)]
        command += ["--latency-ms", str(self.latency_ms), "--mbit-s", str(self.mbit_s)]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            self.close()
            raise RuntimeError(f"slow link did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def delivered(self) -> tuple[int, int]:
        """Bytes delivered so far, to the server and back (the link process is asked: SIGUSR1)."""
        self.proc.send_signal(signal.SIGUSR1)
        line = self.proc.stdout.readline()
        if not line.startswith("delivered "):
            raise RuntimeError(f"slow link did not answer: {line!r}")
        up, down = line.split()[1:]
        return int(up), int(down)

    @property
    def bytes_up(self) -> int:
        return self.delivered()[0]

    @property
    def bytes_down(self) -> int:
        return self.delivered()[1]

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class _Direction:
    """One direction of a connection: when it is free to send again; what it delivers is added to
    ``totals[side]`` (the link's count for that direction, all connections)."""

    def __init__(self, loop, latency_s: float, bytes_per_s: float, totals: list[int], side: int):
        self.loop, self.latency_s, self.bytes_per_s = loop, latency_s, bytes_per_s
        self.totals, self.side = totals, side
        self.free_at = 0.0

    def due(self, size: int) -> float:
        """When ``size`` bytes arriving now reach the other side."""
        now = self.loop.time()
        sent = max(now, self.free_at) + (size / self.bytes_per_s if self.bytes_per_s else 0.0)
        self.free_at = sent
        return sent + self.latency_s


async def _pipe(reader, writer, direction: _Direction) -> None:
    queue: asyncio.Queue = asyncio.Queue(maxsize=64)  # at most 4 MiB in flight, like a TCP window

    async def deliver():
        while True:
            due, data = await queue.get()
            wait = due - direction.loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
            direction.totals[direction.side] += len(data)

    delivery = asyncio.ensure_future(deliver())
    try:
        while True:
            data = await reader.read(1 << 16)
            await queue.put((direction.due(len(data)), data))
            if not data:
                break
        await delivery
    except ConnectionError:
        pass
    finally:
        delivery.cancel()
        await asyncio.gather(delivery, return_exceptions=True)


async def _serve(upstream_port: int, latency_s: float, bytes_per_s: float) -> None:
    loop = asyncio.get_running_loop()
    delivered = [0, 0]  # bytes, towards the server and back
    loop.add_signal_handler(signal.SIGUSR1, lambda: print(f"delivered {delivered[0]} {delivered[1]}", flush=True))

    async def accept(client_reader, client_writer):
        up = _Direction(loop, latency_s, bytes_per_s, delivered, 0)
        down = _Direction(loop, latency_s, bytes_per_s, delivered, 1)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(LOOPBACK, upstream_port)
            await asyncio.gather(_pipe(client_reader, upstream_writer, up), _pipe(upstream_reader, client_writer, down))
        except ConnectionError:
            pass
        finally:
            client_writer.close()

    server = await asyncio.start_server(accept, LOOPBACK, 0)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream_port", type=int)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added delay in each direction")
    parser.add_argument("--mbit-s", type=float, default=0.0, help="bandwidth per connection and direction; 0 = none")
    args = parser.parse_args()
    asyncio.run(_serve(args.upstream_port, args.latency_ms / 1000, args.mbit_s * 1e6 / 8))


if __name__ == "__main__":
    main()
