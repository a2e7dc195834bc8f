"""The rollout controller's lease: who may act, when a holder must stop, and a controller
that stops acting the moment its renewal fails. A real SQLite fleet store on a fake clock
(expiry without waiting), a fake MQTT connection that records what is published."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import cast

import pytest

from cloud.fleet.lease import Lease, LeaseLostError
from cloud.fleet.rollout import RolloutController
from cloud.fleet.store import FleetStore
from cloud.releases.registry import Registry
from shared import topics
from shared.manifest import Manifest
from shared.mqtt import MqttClient
from shared.signing import SigningKey
from shared.status import DeviceStatus
from shared.topics import Topic
from tests.fleet import wait_for
from tests.helpers import EDGE_INT8

TTL = 10.0


class Clock:
    """One time for the store (lease expiry) and the leases (their own deadline)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    def utc(self) -> datetime:
        return datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=self.t)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[FleetStore]:
    s = FleetStore(tmp_path / "fleet.db", clock=clock.utc)
    yield s
    s.close()


def _lease(store: FleetStore, clock: Clock, holder: str) -> Lease:
    return Lease(store, "rollouts:f", holder, TTL, clock=clock.monotonic, renew_in_background=False)


def test_one_holder_at_a_time_and_takeover_after_expiry(store: FleetStore, clock: Clock) -> None:
    a, b = _lease(store, clock, "a"), _lease(store, clock, "b")
    assert a.acquire() and a.held
    a.check()
    assert not b.acquire() and not b.held
    with pytest.raises(LeaseLostError):
        b.check()
    clock.t += TTL / 3
    assert a.renew() and not b.acquire()  # renewed: still a's a whole ttl from now
    clock.t += TTL - 1
    assert not b.acquire()
    clock.t += 2  # a stopped renewing (paused, dead): its lease has expired
    assert not a.held  # a sees it by its own clock, before any renewal fails
    with pytest.raises(LeaseLostError):
        a.check()
    assert b.acquire() and store.lease_holder("rollouts:f") == "b"
    assert not a.renew() and not a.held  # too late: b has it


def test_a_refused_renewal_stops_the_holder_at_once(store: FleetStore, clock: Clock) -> None:
    a = _lease(store, clock, "a")
    assert a.acquire()
    store.execute("UPDATE leases SET holder='intruder'")  # taken over behind a's back
    assert not a.renew()
    with pytest.raises(LeaseLostError):  # well before its ttl
        a.check()


def test_a_store_error_on_renewal_counts_as_lost(store: FleetStore, clock: Clock) -> None:
    a = _lease(store, clock, "a")
    assert a.acquire()
    store.execute("DROP TABLE leases")
    assert not a.renew() and not a.held


def test_release_hands_over_at_once(store: FleetStore, clock: Clock) -> None:
    a, b = _lease(store, clock, "a"), _lease(store, clock, "b")
    assert a.acquire()
    a.release()
    assert not a.held and b.acquire()
    a.release()  # a's release leaves b's lease alone
    assert store.lease_holder("rollouts:f") == "b"


def test_background_renewal_keeps_the_lease_and_drop_stops_it(tmp_path: Path) -> None:
    """Real time, a short ttl: the renewal thread keeps the lease past its ttl, and after
    ``drop`` it no longer does."""
    store = FleetStore(tmp_path / "real.db")
    try:
        a = Lease(store, "rollouts:f", "a", 0.3)
        assert a.acquire()
        first = store.query("SELECT expires FROM leases")[0]["expires"]
        wait_for(
            lambda: store.query("SELECT expires FROM leases")[0]["expires"] > first,
            what="a renewal",
        )
        assert a.held
        a.drop()
        assert not a.held
        with pytest.raises(LeaseLostError):
            a.check()
        a.release()
        assert store.lease_holder("rollouts:f") is None
    finally:
        store.close()


class Acked:
    """A publish the broker has acknowledged (paho's ``MQTTMessageInfo``, done)."""

    def wait_for_publish(self, timeout: float | None = None) -> None:
        pass

    def is_published(self) -> bool:
        return True


class FakeMqtt:
    """Connected, every publish acknowledged; ``on_publish`` runs inside each publish."""

    def __init__(self) -> None:
        self.connected = threading.Event()
        self.connected.set()
        self.manifests: list[str] = []  # topics of the non-empty publishes, in order
        self.on_publish: Callable[[], None] = lambda: None

    def publish(self, topic: Topic, payload: bytes) -> Acked:
        if payload:
            self.manifests.append(topic.name)
        self.on_publish()
        return Acked()


def test_controller_stops_acting_when_its_renewal_fails(
    store: FleetStore, clock: Clock, tmp_path: Path
) -> None:
    key = SigningKey.generate()
    registry = Registry(tmp_path / "registry")
    manifest = Manifest.load(EDGE_INT8)
    registry.publish(key.sign(manifest), (EDGE_INT8 / "model.tflite").read_bytes())
    devices = ["dev-a", "dev-b", "dev-c"]
    for device in devices:
        store.record_status("f", DeviceStatus(device=device, state="online"))
    mine, other = _lease(store, clock, "mine"), _lease(store, clock, "other")
    mqtt = FakeMqtt()

    def lose_the_lease() -> None:  # mid-wave: the first device's manifest is out
        clock.t += TTL + 1
        assert other.acquire()
        assert not mine.renew()

    mqtt.on_publish = lose_the_lease
    controller = RolloutController(
        store, cast(MqttClient, mqtt), registry, "f", poll_s=0.01, lease=mine
    )
    rid = controller.create(manifest.model, manifest.version, canary="0", waves=1)
    assert mine.acquire()
    with pytest.raises(LeaseLostError):
        controller.run(rid)
    device_topic = {d: topics.manifest("f", manifest.model, device=d).name for d in devices}
    assert mqtt.manifests == [device_topic["dev-a"]]  # nothing after the failed renewal
    assert store.waves(rid) == [[("dev-a", True), ("dev-b", False), ("dev-c", False)]]
    r = store.rollout(rid)
    assert (r.state, r.current_wave) == ("RUNNING", 0)

    # the holder that took over carries on from there: the devices left, once each
    mqtt.on_publish = lambda: None
    for device in devices:  # the devices report (as the listener would record it)
        store.execute(
            "INSERT INTO jobs (fleet, device, model, version, state, reason, ts)"
            " VALUES ('f', ?, ?, ?, 'ACTIVE', '', ?)",
            (device, manifest.model, manifest.version, clock.utc().isoformat()),
        )
    takeover = RolloutController(
        store, cast(MqttClient, mqtt), registry, "f", poll_s=0.01, lease=other
    )
    assert takeover.run(rid).state == "COMPLETED"
    assert mqtt.manifests == [
        device_topic["dev-a"],
        device_topic["dev-b"],
        device_topic["dev-c"],
        topics.manifest("f", manifest.model).name,  # promoted
    ]


def test_controllers_take_turns_by_the_lease(tmp_path: Path) -> None:
    """Two ``FleetController``s on one store (real clock): the holder runs the
    rollout, the other only waits; a stopped holder hands the lease over at once."""
    from cloud.fleet.controller import ControllerSettings, FleetController, lease_name

    store = FleetStore(tmp_path / "fleet.db")
    key = SigningKey.generate()
    registry = Registry(tmp_path / "registry")
    manifest = Manifest.load(EDGE_INT8)
    registry.publish(key.sign(manifest), (EDGE_INT8 / "model.tflite").read_bytes())
    store.record_status("f", DeviceStatus(device="dev-a", state="online"))
    mqtt = FakeMqtt()

    def device_reports() -> None:  # each device manifest is taken at once
        store.execute(
            "INSERT INTO jobs (fleet, device, model, version, state, reason, ts)"
            " VALUES ('f', 'dev-a', ?, ?, 'ACTIVE', '', '2026-01-01T00:00:00.000000+00:00')"
            " ON CONFLICT DO NOTHING",
            (manifest.model, manifest.version),
        )

    mqtt.on_publish = device_reports
    # a ttl well past a stalled renewal on a loaded machine: b must not take it mid-rollout
    settings = ControllerSettings(lease_ttl_s=3.0, poll_s=0.02, wave_poll_s=0.01)
    said: dict[str, list[str]] = {"a": [], "b": []}
    a, b = (
        FleetController(
            store,
            cast(MqttClient, mqtt),
            registry,
            "f",
            settings,
            holder=name,
            progress=said[name].append,
        )
        for name in ("a", "b")
    )
    threads = [threading.Thread(target=c.serve) for c in (a, b)]
    try:
        threads[0].start()
        wait_for(lambda: store.lease_holder(lease_name("f")) == "a", what="a's lease")
        threads[1].start()
        rid = store.create_rollout(
            "f", manifest.model, manifest.version, "fleet", None, "0", 1, 0.0, 30.0
        )
        wait_for(lambda: store.rollout(rid).state == "COMPLETED", what="the rollout")
        assert f"rollout {rid}: COMPLETED" in said["a"] and said["b"] == []
        a.stop()
        threads[0].join(timeout=10)
        wait_for(lambda: said["b"] == ["b holds the lease rollouts:f"], what="b's lease")
        assert store.lease_holder(lease_name("f")) == "b"
        assert store.rollout(rid).state == "COMPLETED"  # nothing left to run
    finally:
        for c in (a, b):
            c.stop()
        for t in threads:
            if t.is_alive():
                t.join(timeout=10)
        store.close()
