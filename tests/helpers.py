"""Helpers shared by the test tiers: real servers in threads, paths, free ports, and the
loader for the few tests that check a script of ``scripts/`` itself."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import uvicorn

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
MODELS = ROOT / "models"
DIGITS = MODELS / "data" / "digits.npz"
EDGE_INT8 = MODELS / "edge" / "digits-int8"
EDGE_F32 = MODELS / "edge" / "digits-f32"
CLOUD_REPO = MODELS / "cloud"
CLOUD_MODEL = "digits-cloud"


def free_port() -> int:
    """A port nothing listens on now (the OS's choice; a test binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module, for a test of that script itself (its amqtt guard,
    its benchmark cases). Scripts import their siblings by putting ``scripts/`` on
    ``sys.path``; that entry and the sibling modules it let in are removed again once the
    script is loaded (the loaded module keeps its references), so no other test can import a
    script by accident."""
    path = SCRIPTS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_scripts_{name}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    finally:
        sys.path[:] = saved_path
        for added in set(sys.modules) - saved_modules:
            origin = getattr(sys.modules[added], "__file__", None) or ""
            if added != spec.name and Path(origin).parent == SCRIPTS:
                del sys.modules[added]
    return module


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
