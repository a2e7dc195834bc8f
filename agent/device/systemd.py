"""The agent under systemd: the notify protocol (``READY=1``, ``WATCHDOG=1``, ``STOPPING=1``),
a watchdog loop that pings only while the model still answers, and the unit file that
``tandem-agent systemd-unit`` prints.

The protocol is one datagram per message on the ``AF_UNIX`` socket named by
``$NOTIFY_SOCKET`` (a path, or the abstract namespace when it starts with ``@``); no library
is needed. ``$WATCHDOG_USEC`` is systemd's ``WatchdogSec``: a service that stays silent
that long is killed and, with ``Restart=on-failure``, started again. Without these
variables (not under systemd, or ``Type=simple``) everything here is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.errors import BackendError
from agent.inference.core import Agent
from shared.contract import probe_inputs

log = logging.getLogger(__name__)


class Notifier:
    """Sends notify messages to the service manager; never raises (a lost message must
    not take the agent down; systemd acts on the silence)."""

    def __init__(self, address: str) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier | None:
        address = environ.get("NOTIFY_SOCKET")
        return cls(address) if address else None

    def notify(self, *fields: str) -> bool:
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify the service manager: %s", exc)
                self._warned = True
            return False
        return True

    def close(self) -> None:
        self._sock.close()


def watchdog_interval_s(environ: Mapping[str, str] = os.environ) -> float | None:
    """How often to ping: half of ``WatchdogSec``, as systemd recommends; None when no
    watchdog is asked for this process (``WATCHDOG_PID`` names another one)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6


def model_probe(agent: Agent) -> Callable[[], None]:
    """One real local inference on the serving model (a flat classifier's first golden
    input, or zeros; any other model's load-time probe),
    through the same backend and lock as requests: it hangs when serving hangs. It goes
    to the backend rather than ``Agent.infer`` so probes never count as requests in
    telemetry or in an update's health watch."""

    def probe() -> None:
        model = agent.model
        if not model.flat:  # any model: its load-time probe (a streaming model hears silence)
            outputs = model.backend.run(probe_inputs(model.manifest.inputs))
            if not all(np.all(np.isfinite(v)) for v in outputs.values()):
                raise BackendError(f"{model.manifest.ref} answered a non-finite output")
            return
        golden = model.manifest.golden
        row = golden[0].input if golden else [0.0] * model.features
        out, _, _ = model.backend.infer_one(np.asarray([row], dtype=np.float32))
        if not np.all(np.isfinite(out)):
            raise BackendError(f"{model.manifest.ref} answered a non-finite output")

    return probe


class Watchdog:
    """Every ``every_s``, run ``probe``; ping only if it returned in ``timeout_s``. A probe
    that hangs holds the loop, so the pings stop and systemd restarts the agent."""

    def __init__(
        self,
        notifier: Notifier,
        every_s: float,
        probe: Callable[[], None],
        timeout_s: float | None = None,
    ) -> None:
        self.notifier = notifier
        self.every_s = every_s
        self.probe = probe
        self.timeout_s = timeout_s if timeout_s is not None else every_s
        self.pings = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tandem-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops pinging; does not wait for a probe that hangs (it is a daemon thread)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s)

    def _healthy(self) -> bool:
        start = time.monotonic()
        try:
            self.probe()
        except Exception:
            log.warning("watchdog probe failed; not pinging systemd", exc_info=True)
            return False
        took = time.monotonic() - start
        if took > self.timeout_s:
            log.warning("watchdog probe took %.1f s (> %.1f s); not pinging", took, self.timeout_s)
            return False
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            if self._healthy() and not self._stop.is_set():
                self.notifier.notify("WATCHDOG=1")
                self.pings += 1


class Supervision:
    """What this process tells systemd: ready once it serves (and from then on the
    watchdog), stopping when it shuts down. A no-op outside systemd."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self.notifier = Notifier.from_environ(environ)
        self.every_s = watchdog_interval_s(environ) if self.notifier else None
        self.watchdog: Watchdog | None = None

    def ready(self, agent: Agent) -> None:
        if self.notifier is None:
            return
        self.notifier.notify("READY=1", f"STATUS=serving {agent.model.manifest.ref}")
        if self.every_s is not None:
            self.watchdog = Watchdog(self.notifier, self.every_s, model_probe(agent))
            self.watchdog.start()

    def stopping(self) -> None:
        if self.notifier is None:
            return
        self.notifier.notify("STOPPING=1")
        if self.watchdog is not None:
            self.watchdog.stop()

    def close(self) -> None:
        if self.notifier is not None:
            self.notifier.close()


# ----------------------------------------------------------------------------- the unit


@dataclass(frozen=True)
class UnitOptions:
    executable: Path
    config: Path = Path("/etc/tandem/agent.toml")
    user: str = "tandem"
    state_dir: Path = Path("/var/lib/tandem")
    watchdog_s: int = 30


def unit_text(o: UnitOptions) -> str:
    """A hardened ``tandem-agent.service``. The state folder is the only place it may
    write; exit code 2 (bad settings, missing extra) is not worth a restart."""
    state = o.state_dir
    lines = [
        "[Unit]",
        "Description=Tandem edge agent (local model, cloud fallback, MQTT updates)",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={o.executable} --config {o.config} run",
        f"User={o.user}",
        f"Group={o.user}",
        f"Environment=TANDEM_AGENT_STATE_DIR={state}",
        f"WatchdogSec={o.watchdog_s}",
        "TimeoutStartSec=120",
        "TimeoutStopSec=20",
        "Restart=on-failure",
        "RestartSec=2",
        "RestartPreventExitStatus=2",
    ]
    if state.is_relative_to("/var/lib") and state != Path("/var/lib"):
        lines += [f"StateDirectory={state.relative_to('/var/lib')}", "StateDirectoryMode=0750"]
    paths = (o.executable, o.config, state)
    home = any(p.is_relative_to("/home") or p.is_relative_to("/root") for p in paths)
    lines += [
        f"WorkingDirectory={state}",
        f"ReadWritePaths={state}",
        "UMask=0027",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        # an agent installed in a home folder must still be able to read itself
        f"ProtectHome={'read-only' if home else 'yes'}",
        "PrivateTmp=yes",
        "# a GPU or NPU backend (ONNX Runtime on a Jetson) needs its devices: PrivateDevices=no",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallErrorNumber=EPERM",
        "CapabilityBoundingSet=",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"
