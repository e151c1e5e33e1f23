"""A TCP proxy on 127.0.0.1 that delays each direction of every connection (``bench/storage_latency.py``
puts S3 "50 ms away" with it), or passes bytes straight through (``delay_s=0``) so that a test can
cut a client off a real server mid-run with ``close()``. Nothing listens or connects outside loopback."""

from __future__ import annotations

import asyncio
import threading

LOOPBACK = "127.0.0.1"


class DelayProxy:
    """A TCP proxy on 127.0.0.1 that delays each direction of every connection by ``delay_s``.

    Each chunk read from one side is written to the other ``delay_s`` after it arrived (a queue
    per direction keeps the order), so the delay adds latency without limiting bandwidth.
    Runs its own asyncio loop in a thread; ``close()`` stops it and every connection.
    """

    def __init__(self, upstream_port: int, delay_s: float):
        self.upstream_port, self.delay_s = upstream_port, delay_s
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="delay-proxy", daemon=True)
        self._tasks: set[asyncio.Task] = set()
        self.port = 0
        self.bytes_up = 0  # client -> server, counted as delivered (what a PUT really sends, headers included)
        self.bytes_down = 0

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("delay proxy did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._accept, LOOPBACK, 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    async def _accept(self, client_reader, client_writer) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(LOOPBACK, self.upstream_port)
            await asyncio.gather(
                self._pipe(client_reader, upstream_writer, "bytes_up"),
                self._pipe(upstream_reader, client_writer, "bytes_down"),
            )
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            client_writer.close()
            self._tasks.discard(task)

    async def _pipe(self, reader, writer, counter: str) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver():
            while True:
                due, data = await queue.get()
                wait = due - self.loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                setattr(self, counter, getattr(self, counter) + len(data))
                await writer.drain()

        delivery = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(1 << 16)
                queue.put_nowait((self.loop.time() + self.delay_s, data))
                if not data:
                    break
            await delivery
        except ConnectionError:
            pass
        finally:
            delivery.cancel()
            await asyncio.gather(delivery, return_exceptions=True)

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def stop():
            self.server.close()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
