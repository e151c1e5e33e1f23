"""A real MLflow tracking server on 127.0.0.1 for the tests: sqlite backend store, artifacts on the
test S3 server (SeaweedFS, ``s3server.py``), proxied by the server (``--artifacts-destination``), so
clients need only ``MLFLOW_TRACKING_URI``.

It takes ~17 s to answer on a 2-core machine (INFRA-NOTES.md), so the suite shares one
(``conftest.mlflow_server``). ``mlflow server`` starts a dozen processes (uvicorn, a job runner,
consumers) that outlive a TERM to the first one: it runs in its own session and is stopped by its
process group, that group only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from s3server import SeaweedS3Server, free_ports


class MlflowUnavailable(RuntimeError):
    pass


class MlflowServer:
    def __init__(self, workdir: str | os.PathLike, s3: SeaweedS3Server, startup_timeout: float = 90.0):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.s3, self.startup_timeout = s3, startup_timeout
        self.bucket = s3.create_bucket()
        self.port = free_ports(1)[0]
        self.log_path = self.workdir / "mlflow.log"
        self._proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        mlflow = Path(sys.executable).parent / "mlflow"
        if not mlflow.exists():
            raise MlflowUnavailable("the mlflow command is not installed: pip install 'storymm[mlflow]'")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
        env.update(self.s3.env(), MLFLOW_S3_ENDPOINT_URL=self.s3.endpoint)
        command = [
            str(mlflow),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.workdir / 'db.sqlite'}",
            "--artifacts-destination",
            f"s3://{self.bucket}/artifacts",
            "--workers",
            "1",
        ]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                command, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise MlflowUnavailable(f"mlflow server exited ({self._proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise MlflowUnavailable(f"mlflow server did not answer in {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """TERM the server's process group, then KILL what is left of it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # the leader is gone; its group may not be: check it
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
