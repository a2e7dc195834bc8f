"""A broker on 127.0.0.1 for the demo and the benchmarks, so that they need no broker set up.

- ``LocalMosquitto``: the system's Mosquitto (Debian's ``mosquitto`` package), started on a
  free port with a generated configuration. Preferred when it is installed: it is the broker
  a fleet runs.
- ``EmbeddedBroker``: amqtt in a thread of this process, for machines without Mosquitto
  (``pip`` alone installs it). amqtt 0.12.1 iterates its subscription table across ``await``
  points (when a client connects, and when it broadcasts) while other clients subscribe, and
  then drops the connecting client with ``dictionary changed size during iteration``; here
  the table iterates over a snapshot, which is what its loops need.

Both are anonymous with no ACL: fine for a demo on one machine, never for a fleet (use
Mosquitto with per-device accounts and the ACL in docs/operations.md).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import ItemsView, Iterator, KeysView
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from procs import free_port

log = logging.getLogger(__name__)
BrokerChoice = Literal["auto", "mosquitto", "embedded"]


def mosquitto_binary() -> str | None:
    """The installed Mosquitto, if any (Debian puts it in /usr/sbin, often not on PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


class _Broker:
    """What the demo and benchmarks use of a broker: its URL, its name, start and stop."""

    name = "broker"

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def _wait_listening(self, alive: Any, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not alive():
                raise RuntimeError(f"{self.name} exited before it listened")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not listen on {self.port} in {timeout_s} s")

    def __enter__(self) -> _Broker:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class LocalMosquitto(_Broker):
    """Mosquitto as a child process: anonymous, 127.0.0.1 only, no persistence."""

    name = "mosquitto"

    def __init__(self, workdir: Path | None = None) -> None:
        super().__init__()
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self._binary = binary
        self._dir = workdir or Path(tempfile.mkdtemp(prefix="tandem-mosquitto-"))
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        conf = self._dir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            "persistence false\nuser root\nmax_queued_messages 100000\n"
        )
        self._proc = subprocess.Popen(
            [self._binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        proc = self._proc
        self._wait_listening(lambda: proc.poll() is None)

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


class _SnapshotDict(dict[str, Any]):
    """A dict whose iteration walks a copy: a loop over it may ``await`` while others add
    and remove keys (amqtt's subscription table)."""

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().keys()))

    def keys(self) -> KeysView[str]:
        return dict.fromkeys(super().keys()).keys()

    def items(self) -> ItemsView[str, Any]:
        return dict(super().items()).items()


class EmbeddedBroker(_Broker):
    """amqtt on an event loop of its own thread."""

    name = "embedded (amqtt)"

    def __init__(self) -> None:
        super().__init__()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="amqtt")
        self._broker: Any = None

    def start(self) -> None:
        from amqtt.broker import Broker

        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        self._thread.start()

        async def boot() -> Any:
            broker = Broker(config)
            table = getattr(broker, "_subscriptions", None)
            if isinstance(table, dict):
                broker._subscriptions = _SnapshotDict(table)
            else:  # another amqtt: its own iteration, hopefully fixed
                log.warning("amqtt has no subscription table to guard; connects may race")
            await broker.start()
            return broker

        self._broker = asyncio.run_coroutine_threadsafe(boot(), self._loop).result(timeout=15)
        self._wait_listening(self._thread.is_alive)

    def stop(self) -> None:
        if self._broker is not None:
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(10)
            self._broker = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()


def local_broker(choice: BrokerChoice = "auto", workdir: Path | None = None) -> _Broker:
    """A broker to start: Mosquitto when installed (or asked for), else the embedded one."""
    if choice == "mosquitto" or (choice == "auto" and mosquitto_binary() is not None):
        return LocalMosquitto(workdir)
    return EmbeddedBroker()
