"""The demo's brokers (``scripts/local_broker.py``, loaded from its file): clients connecting
while others subscribe, with retained messages to deliver, are never dropped (amqtt 0.12.1
dropped them: ``dictionary changed size during iteration``)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

from shared.mqtt import MqttClient, MqttSettings
from shared.topics import Topic
from tests.helpers import load_script

local_broker = load_script("local_broker")

# amqtt leaves its closed clients' stream writers to the garbage collector (collected below,
# so that its warnings land in these tests and not in a later one)
pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(params=["embedded", "mosquitto"])
def local(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The script's ``EmbeddedBroker`` or ``LocalMosquitto``, started."""
    if request.param == "mosquitto" and local_broker.mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    if request.param == "embedded":
        broker = local_broker.EmbeddedBroker()
    else:
        broker = local_broker.LocalMosquitto()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
        gc.collect()


def _client(url: str, client_id: str) -> MqttClient:
    return MqttClient(MqttSettings(url=url, reconnect_min_s=0.1, reconnect_max_s=0.5), client_id)


def test_clients_connecting_while_others_subscribe_stay_connected(local: Any) -> None:
    publisher = _client(local.url, "publisher")
    publisher.start(wait_s=5)
    for i in range(6):
        for f in range(10):  # retained messages make every connect yield while it delivers
            assert publisher.publish_wait(Topic(f"t/{i}/{f}/x", 1, True), b"x" * 1000)
    dropped = []
    for round_ in range(5):
        batch = [_client(local.url, f"c{round_}-{i}") for i in range(6)]
        for i, c in enumerate(batch):
            for f in range(10):
                c.subscribe(f"t/{i}/{f}/#", lambda t, p, r: None)
        for c in batch:
            c.start()
        for c in batch:
            assert c.connected.wait(5)
        assert publisher.publish_wait(Topic("t/round/done", 1, False), b"")
        for c in batch:
            dropped += [c.client_id] if c.counters.disconnects or c.counters.connects > 1 else []
        for c in batch:
            c.stop()
    publisher.stop()
    assert dropped == []
