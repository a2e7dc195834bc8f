"""Two real ``tandem-cloud serve`` instances split one fleet's telemetry through a shared
subscription on a real Mosquitto, into one store (a SQLite file both write, and a
PostgreSQL database); one is killed with SIGKILL mid-stream and
restarted under its instance id. Every message the devices had acknowledged is stored exactly
once: the killed instance's share (its unacknowledged in-flight messages and what the broker
queued for it meanwhile) waits in its persistent MQTT 5 session and is drained on restart,
and the store's key on (device, session, seq) drops what is delivered twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from cloud.fleet.store import FleetStore, open_store
from shared import topics
from shared.mqtt import MqttClient
from tests.fleet import wait_for
from tests.helpers import ROOT, free_port
from tests.mosquitto import Mosquitto
from tests.telemetry_samples import sample_telemetry

FLEET = "shared"
DEVICES = [f"dev-{i}" for i in range(5)]
PROBE = "dev-8"  # readiness probes, not part of the stream
MARKER = "dev-9"  # sent after the stream
MESSAGES = 300  # per device


def telemetry(device: str, seq: int) -> bytes:
    return sample_telemetry(device, seq, interval_s=1.0)


@dataclass
class Instance:
    """One ``tandem-cloud serve`` process with the collector on (its own port and log)."""

    name: str
    config: Path
    url: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cloud.cli", "--config", str(self.config), "serve"],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        wait_for(self._answers, timeout=60, what=f"instance {self.name} serving")

    def _answers(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
        try:
            return httpx.get(f"{self.url}/fleet/summary", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def counts(self) -> dict[str, int]:
        """The collector's counts in this process (stored, duplicate, ...)."""
        answer = httpx.get(f"{self.url}/fleet/summary", timeout=10)
        answer.raise_for_status()
        collector: dict[str, int] = answer.json()["collector"]
        return collector

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def instance(tmp: Path, broker: Mosquitto, name: str, store_url: str) -> Instance:
    port = free_port()
    config = tmp / f"cloud-{name}.toml"
    repo = tmp / "repo"  # no models: the fleet side alone
    repo.mkdir(exist_ok=True)
    config.write_text(
        f'repo = "{repo}"\n'
        f"port = {port}\n"
        f'fleet = "{FLEET}"\n'
        f'state_dir = "{tmp / name}"\n'
        f'database_url = "{store_url}"\n'
        f'instance_id = "{name}"\n'
        'collector_share_group = "collectors"\n'
        "repo_poll_s = 0\n"
        'log_level = "WARNING"\n'
        "[mqtt]\n"
        f'url = "{broker.url_for("collector")}"\n'
        'username = "collector"\n'
        f'password = "{broker.users["collector"]}"\n'
        "reconnect_min_s = 0.2\n"
        "reconnect_max_s = 1.0\n"
    )
    return Instance(name, config, f"http://127.0.0.1:{port}", tmp / f"cloud-{name}.log")


@dataclass
class Devices:
    """Real MQTT clients logged in as devices (MQTT 3.1.1, as agents speak it)."""

    broker: Mosquitto
    clients: dict[str, MqttClient] = field(default_factory=dict)
    sent: int = 0
    failed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, device: str) -> MqttClient:
        if device not in self.clients:
            c = MqttClient(self.broker.settings_for(device), device)
            c.start(wait_s=10)
            self.clients[device] = c
        return self.clients[device]

    def send(self, device: str, seq: int) -> None:
        """Publish one telemetry message and wait for the broker's PUBACK."""
        ok = self.client(device).publish_wait(
            topics.device_telemetry(FLEET, device), telemetry(device, seq), timeout_s=10
        )
        with self._lock:
            self.sent += ok
            self.failed += not ok

    def stream(self, device: str, pace: threading.Event) -> None:
        for seq in range(1, MESSAGES + 1):
            self.send(device, seq)
            pace.wait(0.005)  # a steady stream over a few seconds, not one burst

    def stop(self) -> None:
        for c in self.clients.values():
            c.stop()


@pytest.fixture
def devices(broker: Mosquitto) -> Iterator[Devices]:
    d = Devices(broker)
    yield d
    d.stop()


def stored(store: FleetStore, device: str) -> list[int]:
    return store.telemetry_seqs(FLEET, device, 1)


def stream_rows(store: FleetStore) -> int:
    return sum(len(stored(store, d)) for d in DEVICES)


def test_two_instances_split_the_stream_and_a_killed_one_loses_nothing(
    tmp_path: Path, broker: Mosquitto, devices: Devices, store_url: str
) -> None:
    a = instance(tmp_path, broker, "a", store_url)  # one store for both
    b = instance(tmp_path, broker, "b", store_url)
    for inst in (a, b):
        inst.start()
    store = open_store(store_url, tmp_path)
    try:
        # both subscribed: probes until each has stored one (a probe sent while neither was
        # subscribed is dropped by the broker; probes are not part of the stream)
        probes = iter(range(1, 10_000))

        def both_storing() -> bool:
            devices.send(PROBE, next(probes))
            return all(i.counts().get("stored", 0) >= 1 for i in (a, b))

        wait_for(both_storing, what="both instances storing")
        before = {i.name: i.counts().get("stored", 0) for i in (a, b)}
        devices.sent = 0  # the stream's own from here

        pace = threading.Event()
        publishers = [
            threading.Thread(target=devices.stream, args=(d, pace), daemon=True) for d in DEVICES
        ]
        for t in publishers:
            t.start()
        total = MESSAGES * len(DEVICES)
        wait_for(lambda: stream_rows(store) >= total // 6, what="a sixth of the stream stored")
        during = {i.name: i.counts().get("stored", 0) for i in (a, b)}
        a.kill()
        sent_at_kill = devices.sent
        assert sent_at_kill < total  # mid-stream
        assert all(during[n] > before[n] for n in "ab")  # both took part before the kill
        for t in publishers:
            t.join(timeout=120)
        assert devices.sent == total and devices.failed == 0  # the broker took every one

        # markers after the stream: b takes one of the two, and gets its messages in order,
        # so once one is stored b has had all the broker gave it ...
        for seq in (1, 2):
            devices.send(MARKER, seq)
        wait_for(lambda: bool(stored(store, MARKER)), what="b past the stream")
        # ... and the rest waited for a, in its session (Mosquitto went on handing the dead
        # member its turn)
        assert stream_rows(store) < total

        a.start()  # the same instance id: the same persistent session
        wait_for(lambda: stream_rows(store) == total, timeout=60, what="every message stored")
        for d in DEVICES:
            assert stored(store, d) == list(range(1, MESSAGES + 1)), d  # each once, none lost
        drained = a.counts()
        assert drained.get("stored", 0) > 0  # the restarted a drained its share
        assert b.counts().get("stored", 0) > during["b"]
        for inst in (a, b):
            assert "database is locked" not in inst.log.read_text()
    finally:
        for inst in (a, b):
            inst.stop()
        store.close()
