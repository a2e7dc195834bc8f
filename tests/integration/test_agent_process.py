"""``tandem-agent`` as a device runs it: a real child process against a real Mosquitto,
stopped with SIGTERM as systemd stops it, with and without the ``serve`` extra, and talking
the systemd notify protocol to a socket of the test's own."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared import topics
from shared.mqtt import MqttClient
from tests.fleet import wait_for
from tests.helpers import EDGE_INT8, ROOT, free_port
from tests.mosquitto import Mosquitto

FLEET = "proc"


class Watcher:
    """The collector's view of the fleet: every status and telemetry message, in order."""

    def __init__(self, broker: Mosquitto) -> None:
        self.messages: list[tuple[str, dict[str, object], bool]] = []
        self._lock = threading.Lock()
        self.mqtt = MqttClient(broker.settings_for("collector"), client_id="watcher")
        for leaf in ("status", "telemetry"):
            self.mqtt.subscribe(topics.fleet_device_filter(FLEET, leaf), self._on)  # type: ignore[arg-type]
        self.mqtt.start(wait_s=10)

    def _on(self, topic: str, payload: bytes, retained: bool) -> None:
        with self._lock:
            self.messages.append((topic.rsplit("/", 1)[-1], json.loads(payload), retained))

    def of(self, leaf: str) -> list[dict[str, object]]:
        with self._lock:
            return [m for kind, m, _ in self.messages if kind == leaf]

    def states(self) -> list[object]:
        return [m["state"] for m in self.of("status")]


@pytest.fixture
def watcher(broker: Mosquitto) -> Iterator[Watcher]:
    w = Watcher(broker)
    yield w
    w.mqtt.stop()


def device_config(tmp_path: Path, broker: Mosquitto, port: int, *extra: str) -> Path:
    """dev-0 with telemetry far apart: the only telemetry a test sees is the last flush."""
    lines = [
        f'model_dir = "{EDGE_INT8}"',
        'device = "dev-0"',
        f'fleet = "{FLEET}"',
        f'state_dir = "{tmp_path / "state"}"',
        'log_level = "INFO"',
        "[mqtt]",
        f'url = "{broker.url}"',
        'username = "dev-0"',
        'password = "pw-0"',
        "[telemetry]",
        "interval_s = 3600",
        "[server]",
        f"port = {port}",
        *extra,
    ]
    path = tmp_path / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``python -m agent.cli ARGS`` with stderr to ``log`` (a file never blocks the child)."""
    with log.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "agent.cli", *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )


def serving(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_on_run_with_the_endpoint_runs_the_graceful_shutdown(
    tmp_path: Path, broker: Mosquitto, watcher: Watcher
) -> None:
    port = free_port()
    log = tmp_path / "agent.log"
    proc = spawn(["--config", str(device_config(tmp_path, broker, port)), "run"], log)
    try:
        wait_for(lambda: serving(port), what="the endpoint")
        wait_for(lambda: "online" in watcher.states(), what="the birth")
        assert watcher.of("telemetry") == []  # the interval is an hour: nothing yet
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()
    # the last interval was flushed, and the agent said goodbye itself (no Last Will)
    wait_for(lambda: len(watcher.of("telemetry")) == 1, what="the final telemetry")
    assert watcher.of("telemetry")[0]["seq"] == 1
    wait_for(lambda: watcher.states()[-1] == "offline", what="offline")
    broker_log = (broker.dir / "mosquitto.log").read_text()
    assert "Client dev-0 disconnected." in broker_log
    assert "Client dev-0 closed its connection" not in broker_log  # what a killed one leaves


def test_sigterm_on_serve_runs_its_shutdown(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "agent.log"
    proc = spawn(["--model-dir", str(EDGE_INT8), "serve", "--port", str(port)], log)
    try:
        wait_for(lambda: serving(port), what="the endpoint")
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()
    assert "stopped cleanly" in log.read_text()


# ------------------------------------------------------------ without the serve extra

#: ``python -c`` as on a plain ``pip install tandem``: the modules named in its first
#: argument (FastAPI and uvicorn by default) cannot be imported.
PLAIN_INSTALL = (
    "import sys\n"
    "for name in sys.argv.pop(1).split(','): sys.modules[name] = None\n"
    "from agent.cli import main; raise SystemExit(main(sys.argv[1:]))"
)


def spawn_plain(
    args: list[str], log: Path, missing: str = "fastapi,uvicorn"
) -> subprocess.Popen[bytes]:
    with log.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-c", PLAIN_INSTALL, missing, *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )


def test_run_without_the_serve_extra_refuses_to_start_and_says_what_to_do(
    tmp_path: Path, broker: Mosquitto, watcher: Watcher
) -> None:
    config = device_config(tmp_path, broker, free_port())
    log = tmp_path / "plain.log"
    proc = spawn_plain(["--config", str(config), "run"], log)
    try:
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = log.read_text()
    assert code == 2, err
    assert "pip install 'tandem[serve]'" in err and "--no-serve" in err
    assert "server.enabled = false" in err and "Traceback" not in err
    assert not (tmp_path / "state" / "session.json").exists()  # it never booted

    # positive control, same install: without the endpoint (a flag, or the setting) it runs,
    # comes online and says goodbye, where before nothing of dev-0 reached the broker
    assert watcher.states() == []
    config.write_text(config.read_text() + "enabled = false\n")  # in [server], the last table
    proc = spawn_plain(["--config", str(config), "run"], log)
    try:
        wait_for(lambda: "online" in watcher.states(), what="the birth")
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()
    proc = spawn_plain(["--config", str(config), "run", "--no-serve"], log)
    try:
        wait_for(lambda: watcher.states().count("online") == 2, what="the second birth")
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn"])
def test_either_endpoint_package_missing_is_refused_before_boot(
    tmp_path: Path, broker: Mosquitto, missing: str
) -> None:
    log = tmp_path / "plain.log"
    config = device_config(tmp_path, broker, free_port())
    for command in ("run", "serve"):
        proc = spawn_plain(["--config", str(config), command], log, missing)
        try:
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err = log.read_text()
        assert code == 2 and f"cannot import {missing}" in err, err
    assert not (tmp_path / "state" / "session.json").exists()


# ------------------------------------------------------------------- systemd notify


class NotifySocket:
    """The service manager's end of the notify protocol: a datagram socket of our own, in
    the abstract namespace (``@...``, as systemd's own may be)."""

    def __init__(self) -> None:
        self.name = f"@tandem-test-{os.getpid()}-{id(self)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(20)

    def next(self) -> list[str]:
        return self.sock.recv(4096).decode().split("\n")

    def until(self, field: str) -> list[list[str]]:
        """Messages up to and including the first that carries ``field``."""
        seen = []
        while True:
            message = self.next()
            seen.append(message)
            if field in message:
                return seen


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    n = NotifySocket()
    yield n
    n.sock.close()


def test_run_tells_systemd_ready_then_pings_then_stopping(
    tmp_path: Path, broker: Mosquitto, notify: NotifySocket
) -> None:
    port = free_port()
    log = tmp_path / "agent.log"
    env = {"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "400000"}  # a ping every 0.2 s
    proc = spawn(["--config", str(device_config(tmp_path, broker, port)), "run"], log, env)
    try:
        first = notify.until("READY=1")
        assert len(first) == 1 and "STATUS=serving digits:1" in first[0]
        assert serving(port)  # READY=1 came once the endpoint listened
        assert [notify.next() for _ in range(3)] == [["WATCHDOG=1"]] * 3
        proc.send_signal(signal.SIGTERM)
        # pings may still come while it stops (one every 0.2 s), then STOPPING=1
        assert all(m == ["WATCHDOG=1"] for m in notify.until("STOPPING=1")[:-1])
        assert proc.wait(timeout=20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_without_the_endpoint_is_ready_once_booted(
    tmp_path: Path, broker: Mosquitto, notify: NotifySocket
) -> None:
    log = tmp_path / "agent.log"
    config = device_config(tmp_path, broker, free_port())
    env = {"NOTIFY_SOCKET": notify.name}  # no WATCHDOG_USEC: no pings
    proc = spawn(["--config", str(config), "run", "--no-serve"], log, env)
    try:
        assert notify.next()[0] == "READY=1"
        proc.send_signal(signal.SIGTERM)
        assert notify.next() == ["STOPPING=1"]
        assert proc.wait(timeout=20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _tgkill(pid: int, tid: int, sig: int) -> None:
    """A signal to one thread of another process (glibc's ``tgkill``)."""
    if ctypes.CDLL(None, use_errno=True).tgkill(pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill {pid} {tid}")


@pytest.mark.parametrize("serve", [False, True], ids=["no-serve", "endpoint"])
def test_a_stop_signal_landing_on_any_thread_runs_the_shutdown(
    tmp_path: Path, broker: Mosquitto, notify: NotifySocket, serve: bool
) -> None:
    """The kernel hands a process-directed SIGTERM to any thread not blocking it, and NumPy's
    BLAS threads exist before ``main`` runs. Sent to each thread but the main one, it must
    end in the agent's own shutdown (it killed the agent outright, or was never seen)."""
    port = free_port()
    log = tmp_path / "agent.log"
    args = ["--config", str(device_config(tmp_path, broker, port)), "run"]
    proc = spawn([*args] if serve else [*args, "--no-serve"], log, {"NOTIFY_SOCKET": notify.name})
    try:
        assert notify.until("READY=1")
        tasks = Path(f"/proc/{proc.pid}/task").iterdir()
        others = sorted(int(t.name) for t in tasks if int(t.name) != proc.pid)
        assert others  # BLAS, MQTT, updater, telemetry threads
        for tid in others:
            with contextlib.suppress(OSError):  # a thread may have ended meanwhile
                _tgkill(proc.pid, tid, signal.SIGTERM)
            if proc.poll() is not None:
                break
        assert proc.wait(timeout=20) == 0, log.read_text()
        assert "stopped cleanly" in log.read_text()
        assert notify.until("STOPPING=1")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
