"""Helpers shared by the test tiers: real servers in threads, paths, a fake cloud."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from procs import free_port

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
EDGE_INT8 = MODELS / "edge" / "digits-int8"
EDGE_F32 = MODELS / "edge" / "digits-f32"
CLOUD_REPO = MODELS / "cloud"
CLOUD_MODEL = "digits-cloud"


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # not the main thread
        pass


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Run an ASGI app on a real uvicorn server on a free 127.0.0.1 port; yield its URL."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="auto"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def closed_port_url() -> str:
    """A URL on which nothing listens (connection refused at once)."""
    return f"http://127.0.0.1:{free_port()}"


def agent_process(config: Path) -> subprocess.Popen[bytes]:
    """``tandem-agent run --no-serve`` as a child process (for kill -9 tests); stderr is
    discarded so a test never blocks on a full pipe."""
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--config", str(config), "run", "--no-serve"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def infer_body(x: Any, **extra: object) -> dict[str, object]:
    """A JSON OIP request for the digits models' ``input`` tensor."""
    return {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ],
        **extra,
    }
