"""Bytes on the wire against real parts: a real Mosquitto, the real cloud server and registry,
a real agent (``AgentService``) with TFLite. Counting proxies sit between the agent and the
broker, and between the agent and the cloud, so the agent's own counts are checked against
the bytes that crossed the sockets; a real subscriber checks what each category carried; and
the day's byte budget holds telemetry back while births and job states still go out."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from agent.device.service import AgentService
from agent.device.wire import BUDGETED, PUBACK_BYTES, publish_bytes
from cloud.pipeline.data import SplitData
from shared import topics
from shared.mqtt import MqttClient
from shared.telemetry import Telemetry
from tests.counting_proxy import CountingProxy
from tests.fleet import FLEET, Fleet, last_state, wait_for

MQTT_CATEGORIES = ("births", "telemetry", "job_states", "manifests", "session")
HTTP_CATEGORIES = ("downloads", "escalations", "audits", "samples")


class Subscriber:
    """Every message of one device's status, telemetry and update topics, in order."""

    def __init__(self, fleet: Fleet, device: str) -> None:
        self.device = device
        self.got: list[tuple[str, str, bytes]] = []  # (leaf, topic, payload)
        self._lock = threading.Lock()
        self.mqtt = MqttClient(
            fleet.broker.settings_for("collector"), client_id=f"wire-sub-{device}"
        )
        for leaf in ("status", "telemetry", "update"):
            self.mqtt.subscribe(topics.fleet_device_filter(FLEET, leaf), self._on)
        self.mqtt.start(wait_s=10)

    def _on(self, topic: str, payload: bytes, retained: bool) -> None:
        parsed = topics.parse_device(topic)
        if parsed is not None and parsed.device == self.device and not retained:
            with self._lock:
                self.got.append((parsed.leaf, topic, payload))

    def messages(self, leaf: str) -> list[tuple[str, bytes]]:
        with self._lock:
            return [(t, p) for lf, t, p in self.got if lf == leaf]

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.mqtt.stop()

    def telemetry(self) -> list[Telemetry]:
        return [Telemetry.model_validate_json(p) for _, p in self.messages("telemetry")]


def _bytes(messages: list[tuple[str, bytes]]) -> int:
    """What the device paid for these QoS 1 messages: each PUBLISH and its PUBACK."""
    return sum(publish_bytes(t, p, 1) + PUBACK_BYTES for t, p in messages)


def _states(sub: Subscriber) -> list[str]:
    return [json.loads(p)["state"] for _, p in sub.messages("status")]


@contextmanager
def proxied_agent(
    fleet: Fleet, device: str, **telemetry: Any
) -> Iterator[tuple[AgentService, CountingProxy, CountingProxy]]:
    """An agent whose broker and cloud connections pass through counting proxies."""
    host, port = "127.0.0.1", int(fleet.broker.url.rsplit(":", 1)[1])
    cloud_port = int(fleet.url.rsplit(":", 1)[1])
    with CountingProxy(host, port) as mqtt_proxy, CountingProxy(host, cloud_port) as http_proxy:
        base = fleet.agent_settings(device)
        assert base.mqtt is not None
        settings = base.model_copy(
            update={
                "mqtt": base.mqtt.model_copy(update={"url": f"mqtt://{host}:{mqtt_proxy.port}"}),
                "cloud": base.cloud.model_copy(update={"url": f"http://{host}:{http_proxy.port}"}),
                "telemetry": base.telemetry.model_copy(update={"interval_s": 0.1, **telemetry}),
            }
        )
        service = AgentService(settings)
        service.start(wait_s=10)
        fleet.agents[device] = service  # stopped by the fleet if the test does not
        yield service, mqtt_proxy, http_proxy


def test_counts_match_the_sockets_and_what_a_subscriber_receives(
    fleet: Fleet, digits: SplitData
) -> None:
    sub = Subscriber(fleet, "dev-1")
    with sub, proxied_agent(fleet, "dev-1", daily_budget_bytes=None) as (service, mqtt, http):
        wait_for(lambda: len(sub.messages("telemetry")) >= 5, what="telemetry")
        release = fleet.release()
        fleet.publish(release, device="dev-1")
        wait_for(lambda: last_state(fleet, "dev-1", 2) == ("ACTIVE", ""), what="ACTIVE")
        for x in digits.test.x[:3]:
            assert service.agent.infer(x, mode="cloud").source == "cloud"
        service.stop()
        wait_for(lambda: _states(sub)[-1:] == ["offline"], what="the goodbye")
        wire = service.wire.snapshot()
        # the sockets carried exactly what the agent counted: every MQTT packet, each way
        sent = sum(wire[c].sent for c in MQTT_CATEGORIES)
        received = sum(wire[c].received for c in MQTT_CATEGORIES)
        wait_for(lambda: mqtt.counts() == (sent, received), what=f"{(sent, received)} on MQTT")
        # HTTP: headers and bodies as sent and received (chunked framing aside)
        http_sent, http_received = http.counts()
        counted_sent = sum(wire[c].sent for c in HTTP_CATEGORIES if c in wire)
        counted_received = sum(wire[c].received for c in HTTP_CATEGORIES if c in wire)
        assert counted_sent == http_sent
        assert 0.98 * http_received <= counted_received <= http_received
    # each category holds what a subscriber saw of it
    births, job_states = sub.messages("status"), sub.messages("update")
    assert _states(sub) == ["online", "online", "offline"]
    assert wire["births"].sent + wire["births"].received == _bytes(births)
    assert wire["job_states"].sent + wire["job_states"].received == _bytes(job_states)
    assert wire["telemetry"].sent + wire["telemetry"].received == _bytes(sub.messages("telemetry"))
    assert wire["manifests"].received > len(release.to_json())
    artifact = release.edge.size
    assert artifact < wire["downloads"].received < artifact + 4096
    assert wire["escalations"].sent > 3 * digits.test.x[0].nbytes
    # and the cloud sees them: each message carries the counts of the messages before it
    messages = sub.messages("telemetry")
    last = Telemetry.model_validate_json(messages[-1][1])
    assert last.wire_bytes is not None
    reported = last.wire_bytes["telemetry"]
    assert reported.sent + reported.received == _bytes(messages[:-1])
    assert last.wire_bytes["downloads"] == wire["downloads"]


def test_a_spent_budget_holds_telemetry_back_never_births_or_job_states(fleet: Fleet) -> None:
    sub = Subscriber(fleet, "dev-2")
    budget = 6000
    with (
        sub,
        proxied_agent(fleet, "dev-2", daily_budget_bytes=budget, over_budget_interval_s=3600) as (
            service,
            mqtt,
            _,
        ),
    ):
        reporter = service.telemetry
        assert reporter is not None
        wait_for(lambda: reporter.backing_off, what="the budget spent")
        held_at = reporter.seq
        # births and job states still go out: an update runs to the end
        fleet.publish(fleet.release(), device="dev-2")
        wait_for(lambda: last_state(fleet, "dev-2", 2) == ("ACTIVE", ""), what="ACTIVE")
        wait_for(lambda: len(sub.messages("status")) >= 2, what="the refreshed birth")
        # positive control above (the update's messages arrived); telemetry did not move
        assert reporter.seq == held_at
        spent = service.wire.total(BUDGETED)
        service.stop()  # flushes one last message, covering the whole held-back interval
        wait_for(lambda: _states(sub)[-1:] == ["offline"], what="the goodbye")
    normal = [t for t in sub.telemetry() if not t.budget_backoff]
    assert [t.seq for t in normal] == list(range(1, held_at + 1))
    # the budget held to within the messages under way when it ran out
    one = max(publish_bytes(t, p, 1) for t, p in sub.messages("telemetry"))
    at_hold = _bytes(sub.messages("telemetry")[:held_at]) + _bytes(sub.messages("status")[:1])
    assert at_hold <= budget + 2 * one
    assert spent > budget
    last = sub.telemetry()[-1]
    assert last.seq == held_at + 1 and last.budget_backoff is True
    assert (
        last.wire_bytes is not None
        and sum(last.wire_bytes[c].sent + last.wire_bytes[c].received for c in BUDGETED) >= budget
    )
    assert mqtt.connections == 1
