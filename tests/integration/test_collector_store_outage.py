"""The fleet database goes away under a running collector (real PostgreSQL refusing
connections, its sessions terminated) while devices go on sending: nothing the broker
acknowledged to a device is lost. Each message the store cannot take is left
unacknowledged (the collector drops its connection), the broker sends it again from the
collector's persistent MQTT 5 session, and once the database is back every message is
stored once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import psycopg
import pytest

from cloud.fleet.collector import Collector
from cloud.fleet.store import open_store
from shared import topics
from shared.mqtt import MqttClient
from tests.fleet import wait_for
from tests.integration.test_collectors_shared import telemetry
from tests.mosquitto import Mosquitto
from tests.postgres import Postgres

FLEET = "shared"


class Outage:
    """Takes one database of the test server away and brings it back."""

    def __init__(self, server: Postgres, url: str) -> None:
        self.name = urlparse(url).path.lstrip("/")
        self.admin = psycopg.connect(server.url(), autocommit=True)  # the maintenance DB

    def begin(self) -> None:
        self.admin.execute(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false')
        self.admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (self.name,),
        )

    def end(self) -> None:
        self.admin.execute(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')

    def close(self) -> None:
        self.end()
        self.admin.close()


@pytest.fixture
def outage_url(postgres: Postgres) -> Iterator[tuple[str, Outage]]:
    url = postgres.database()
    outage = Outage(postgres, url)
    yield url, outage
    outage.close()


def test_messages_the_store_cannot_take_are_sent_again(
    tmp_path: Path, broker: Mosquitto, outage_url: tuple[str, Outage]
) -> None:
    url, outage = outage_url
    store = open_store(url, tmp_path)
    collector = Collector(store, FLEET, share_group="collectors")
    mqtt = MqttClient(
        broker.settings_for("collector", protocol="5", persistent_session=True),
        "collector-shared-outage",
    )
    collector.attach(mqtt)
    mqtt.start(wait_s=10)
    device = MqttClient(broker.settings_for("dev-1"), "dev-1")
    device.start(wait_s=10)
    try:

        def send(seqs: range) -> None:
            for seq in seqs:
                topic = topics.device_telemetry(FLEET, "dev-1")
                assert device.publish_wait(topic, telemetry("dev-1", seq))

        def seqs() -> list[int] | None:
            try:
                return store.telemetry_seqs(FLEET, "dev-1", 1)
            except psycopg.OperationalError:  # a pooled connection the outage terminated
                return None

        send(range(1, 21))
        wait_for(lambda: seqs() == list(range(1, 21)), what="the first 20 stored")
        outage.begin()
        send(range(21, 41))  # the broker takes them all
        wait_for(
            lambda: collector.counts["store_unavailable"] >= 1 and mqtt.counters.redeliveries >= 1,
            what="the store failing and the collector reconnecting",
        )
        outage.end()
        wait_for(lambda: seqs() == list(range(1, 41)), timeout=60, what="every message stored")
        assert collector.counts["unstorable"] == 0
    finally:
        device.stop()
        mqtt.stop()
        store.close()
