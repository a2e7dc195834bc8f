"""The systemd side of the agent, with a notify socket of the test's own: the protocol, the
watchdog that goes quiet when the model hangs, and a unit ``systemd-analyze verify`` accepts."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from agent.cli import main as agent_main
from agent.device.systemd import Notifier, Watchdog, model_probe, watchdog_interval_s
from tests.fakes import confident_logits, fake_model


@pytest.fixture
def listener() -> Iterator[tuple[str, socket.socket]]:
    """A notify socket on a short path (``AF_UNIX`` paths are limited to 108 bytes)."""
    folder = tempfile.mkdtemp(prefix="sd")
    path = str(Path(folder) / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    yield path, sock
    sock.close()
    shutil.rmtree(folder)


def test_notify_reaches_a_path_and_an_abstract_socket(
    listener: tuple[str, socket.socket],
) -> None:
    path, sock = listener
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier is not None and notifier.notify("READY=1", "STATUS=serving x:1")
    assert sock.recv(100) == b"READY=1\nSTATUS=serving x:1"
    notifier.close()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract:
        abstract.bind(f"\0tandem-unit-{os.getpid()}")
        notifier = Notifier(f"@tandem-unit-{os.getpid()}")
        assert notifier.notify("WATCHDOG=1")
        assert abstract.recv(100) == b"WATCHDOG=1"
        notifier.close()
    assert Notifier.from_environ({}) is None


def test_a_lost_notify_socket_is_not_an_error(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone"))
    assert notifier.notify("READY=1") is False  # logged once, never raised
    notifier.close()


def test_watchdog_interval_is_half_of_watchdog_sec() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())})
    assert watchdog_interval_s({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({}) is None and watchdog_interval_s({"WATCHDOG_USEC": "x"}) is None


def test_pings_stop_while_the_model_hangs_and_resume_when_it_answers(
    listener: tuple[str, socket.socket],
) -> None:
    path, sock = listener
    hang = threading.Event()
    release = threading.Event()
    entered = threading.Event()

    def interpreter(x: np.ndarray) -> np.ndarray:
        if hang.is_set():
            entered.set()
            release.wait(30)
        return confident_logits(x)

    agent = SimpleNamespace(model=fake_model(interpreter))
    notifier = Notifier(path)
    watchdog = Watchdog(notifier, every_s=0.05, probe=model_probe(agent))  # type: ignore[arg-type]
    watchdog.start()
    try:
        assert [sock.recv(100) for _ in range(3)] == [b"WATCHDOG=1"] * 3  # it pings
        hang.set()
        assert entered.wait(10)
        sock.settimeout(0.1)
        while True:  # drain a ping sent just before the probe hung
            try:
                sock.recv(100)
            except TimeoutError:
                break
        pings = watchdog.pings
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):  # ten intervals of silence
            sock.recv(100)
        assert watchdog.pings == pings
        hang.clear()
        release.set()
        sock.settimeout(10)
        assert sock.recv(100) == b"WATCHDOG=1"  # answers again: pings again
    finally:
        release.set()
        watchdog.stop()
        notifier.close()


def test_a_failing_or_broken_model_gets_no_ping(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    model = fake_model(lambda x: np.full((len(x), 3), np.nan))
    notifier = Notifier(path)
    probe = model_probe(SimpleNamespace(model=model))  # type: ignore[arg-type]
    with pytest.raises(Exception, match="non-finite"):
        probe()
    model.backend.fail = True  # type: ignore[attr-defined]
    watchdog = Watchdog(notifier, every_s=0.02, probe=probe)
    watchdog.start()
    sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        sock.recv(100)
    watchdog.stop()
    notifier.close()
    assert watchdog.pings == 0


def _unit(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert agent_main([*args]) == 0
    return capsys.readouterr().out


def test_the_printed_unit_is_hardened_and_systemd_accepts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    executable = Path(sys.executable).parent / "tandem-agent"
    if not executable.exists():
        executable = Path(sys.executable)  # an existing file, as verify wants
    text = _unit(
        capsys,
        "--config",
        "/etc/tandem/agent.toml",
        "systemd-unit",
        "--exec",
        str(executable),
        "--user",
        "edge",
    )
    lines = set(text.splitlines())
    assert f"ExecStart={executable} --config /etc/tandem/agent.toml run" in lines
    for line in (
        "Type=notify",
        "WatchdogSec=30",
        "User=edge",
        "StateDirectory=tandem",
        "ReadWritePaths=/var/lib/tandem",
        "Environment=TANDEM_AGENT_STATE_DIR=/var/lib/tandem",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=",
    ):
        assert line in lines, line
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the unit's syntax is not checked here")
    unit = tmp_path / "tandem-agent.service"
    unit.write_text(text)
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    # unknown keys and bad values are only warnings on stderr: none may appear
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_an_agent_in_a_home_folder_may_still_read_itself(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = _unit(
        capsys, "systemd-unit", "--exec", "/home/pi/venv/bin/tandem-agent", "--state-dir", "/srv/t"
    )
    lines = text.splitlines()
    assert "ProtectHome=read-only" in lines and "ReadWritePaths=/srv/t" in lines
    assert not any(line.startswith("StateDirectory=") for line in lines)  # not under /var/lib
