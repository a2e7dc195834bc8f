"""Starting and stopping Tandem's servers as child processes, for the demo and benchmarks.

Each server binds 127.0.0.1 on a free port, is waited for until its readiness route answers,
and is stopped (terminate, then kill) when the ``with`` block ends, whatever happened in it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def stop_process(proc: subprocess.Popen[Any], timeout_s: float) -> None:
    """SIGTERM (the server's own shutdown: Mosquitto writes its persistence, uvicorn drains),
    then SIGKILL if it is not gone in ``timeout_s``."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class CloudProcess:
    """``tandem-cloud serve`` in a child process."""

    def __init__(
        self,
        repo: Path,
        delay_ms: float = 0.0,
        extra: list[str] | None = None,
        log: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._cmd = [
            sys.executable,
            "-m",
            "cloud.cli",
            "serve",
            "--repo",
            str(repo),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--simulated-delay-ms",
            str(delay_ms),
            *(extra or []),
        ]
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = log
        self._env = env or {}

    def start(self, timeout_s: float = 30.0) -> None:
        out = self._log.open("ab") if self._log else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            self._cmd, cwd=ROOT, stdout=out, stderr=out, env={**os.environ, **self._env}
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"cloud server exited with {self._proc.returncode}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"cloud server not ready after {timeout_s} s")

    def stop(self) -> None:
        if self._proc is None:
            return
        stop_process(self._proc, 10)
        self._proc = None

    def __enter__(self) -> CloudProcess:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
