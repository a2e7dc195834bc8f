"""The collector stores telemetry in batches and acknowledges a message to the broker only
once its batch is stored, against a real Mosquitto (and SQLite, then PostgreSQL): a
collector whose store hangs holds the broker's messages unacknowledged (more than
Mosquitto's default window of 20: the collector's MQTT 5 Receive Maximum), and when it
dies a new one under its session gets them all; a burst is stored in batches of more than
one; the status and update subscriptions of the same client are still acknowledged."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from cloud.fleet.collector import Collector
from cloud.fleet.store import FleetStore
from shared import topics
from shared.mqtt import MqttClient
from shared.telemetry import Telemetry
from tests.fleet import wait_for
from tests.integration.test_collectors_shared import telemetry
from tests.mosquitto import Mosquitto

FLEET = "batches"
SESSION_ID = "collector-batches"


class GatedStore(FleetStore):
    """A real store whose batch writes wait at a gate (a database that hangs), recording
    each batch; ``fail`` makes a write that passes the gate raise as a lost database."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.gate = threading.Event()
        self.fail = False
        self.batches: list[int] = []  # sizes, as they reach the store

    def record_telemetry_many(self, fleet: str, messages: Sequence[Telemetry]) -> list[bool]:
        self.batches.append(len(messages))
        self.gate.wait()
        if self.fail:
            raise sqlite3.OperationalError("the database went away")
        return super().record_telemetry_many(fleet, messages)

    def reached(self) -> int:
        return sum(self.batches)


def collector_client(broker: Mosquitto) -> MqttClient:
    """The collector's connection as ``tandem-cloud serve`` makes it: MQTT 5, persistent."""
    return MqttClient(
        broker.settings_for("collector", protocol="5", persistent_session=True), SESSION_ID
    )


def vanish(c: MqttClient) -> None:
    """The process dies (kill -9): no DISCONNECT, the broker sees the socket close."""
    c._client._sock.close()  # type: ignore[union-attr]
    c._client.loop_stop()


@pytest.fixture
def device(broker: Mosquitto) -> Iterator[MqttClient]:
    d = MqttClient(broker.settings_for("dev-1"), "dev-1")
    d.start(wait_s=10)
    yield d
    d.stop()


def send(device: MqttClient, seqs: range) -> None:
    for seq in seqs:
        assert device.publish_wait(topics.device_telemetry(FLEET, "dev-1"), telemetry("dev-1", seq))


def test_a_hung_store_leaves_the_batch_unacknowledged_for_the_next_collector(
    broker: Mosquitto, device: MqttClient, store_url: str
) -> None:
    hung = GatedStore(store_url)
    first_mqtt = collector_client(broker)
    Collector(hung, FLEET).attach(first_mqtt)
    first_mqtt.start(wait_s=10)
    store = FleetStore(store_url)
    second_mqtt = collector_client(broker)
    try:
        send(device, range(1, 101))
        # all 100 reached the collector (one batch in the hung store, the rest queued
        # behind it): more than 20 in flight, none acknowledged
        wait_for(
            lambda: hung.batches and hung.reached() + first_mqtt.batch_backlog == 100,
            what="every message in flight to the hung collector",
        )
        assert store.telemetry_seqs(FLEET, "dev-1", 1) == []
        vanish(first_mqtt)  # kill -9

        second = Collector(store, FLEET)
        second.attach(second_mqtt)
        second_mqtt.start(wait_s=10)
        wait_for(
            lambda: store.telemetry_seqs(FLEET, "dev-1", 1) == list(range(1, 101)),
            what="the new collector storing them all",
        )
        assert second.counts["stored"] == 100
    finally:
        hung.fail = True
        hung.gate.set()
        first_mqtt.stop()
        second_mqtt.stop()
        hung.close()
        store.close()


def test_a_burst_is_stored_in_batches_and_acknowledged(
    broker: Mosquitto, device: MqttClient, store_url: str
) -> None:
    store = GatedStore(store_url)  # the first write waits until the burst has arrived
    mqtt = collector_client(broker)
    collector = Collector(store, FLEET)
    collector.attach(mqtt)
    mqtt.start(wait_s=10)
    again = collector_client(broker)
    try:
        send(device, range(1, 101))
        wait_for(
            lambda: store.batches and store.reached() + mqtt.batch_backlog == 100,
            what="the burst at the collector",
        )
        store.gate.set()
        wait_for(lambda: collector.counts["stored"] == 100, what="the burst stored")
        assert store.telemetry_seqs(FLEET, "dev-1", 1) == list(range(1, 101))
        assert len(store.batches) < 100 and max(store.batches) > 1
        mqtt.stop()  # acknowledged: the session has nothing to send again ...
        later = Collector(store, FLEET)
        later.attach(again)
        again.start(wait_s=10)
        send(device, range(101, 102))  # ... but what comes next
        wait_for(lambda: later.counts["stored"] == 1, what="the next message")
        assert later.counts["duplicate"] == 0
    finally:
        store.gate.set()
        mqtt.stop()
        again.stop()
        store.close()


def test_status_and_update_messages_are_acknowledged_too(
    broker: Mosquitto, device: MqttClient, tmp_path: Path
) -> None:
    """With manual acknowledgements for telemetry, the client acknowledges the listener's
    messages itself: were it not to, 20 of them (the window this collector asks for) would
    stop the broker sending anything, the telemetry behind them too."""
    store = FleetStore(tmp_path / "fleet.db")
    mqtt = collector_client(broker)
    collector = Collector(store, FLEET, max_batch=4)  # a window of 20
    collector.attach(mqtt)
    mqtt.start(wait_s=10)
    try:
        for _ in range(25):
            assert device.publish_wait(topics.device_status(FLEET, "dev-1"), b'{"state": 3}')
            assert device.publish_wait(topics.device_update(FLEET, "dev-1"), b"nonsense")
        wait_for(lambda: collector.listener.malformed == 50, what="every status and update")
        send(device, range(1, 2))
        wait_for(lambda: collector.counts["stored"] == 1, what="telemetry behind them")
    finally:
        mqtt.stop()
        store.close()
