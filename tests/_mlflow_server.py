"""A real ``mlflow server`` for tests: loopback only, sqlite backend, local artifacts, stopped by PID.

Shared by test_tracking.py, test_tune.py and test_reliability.py. The server runs in its own
process group (``start_new_session``), so stopping it (``stop()``) signals exactly the
processes it started (gunicorn/uvicorn workers included) and nothing else on the machine.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``with MlflowServer(tmp_dir) as srv: srv.uri`` -- healthy on entry, stopped on exit."""

    def __init__(self, workdir: str | os.PathLike, timeout: float = 120.0):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> "MlflowServer":
        self._log = open(self.workdir / "mlflow_server.log", "w")
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.workdir / 'server.db'}",
             "--artifacts-destination", str(self.workdir / "artifacts"), "--workers", "1"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.workdir)
        deadline = time.time() + self.timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}; "
                                   f"log: {self.workdir / 'mlflow_server.log'}")
            if time.time() > deadline:
                self.stop()
                raise TimeoutError(f"mlflow server at {self.uri} not healthy after {self.timeout:.0f}s")
            time.sleep(1.0)

    def stop(self) -> None:
        """SIGTERM to the server's own process group, SIGKILL if it lingers."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        if self._log is not None and not self._log.closed:
            self._log.close()

    def is_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
