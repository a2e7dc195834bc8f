"""The MQTT client wrapper's settings reach paho as given (no broker needed)."""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as paho
import pytest

from shared.mqtt import MqttClient, MqttError, MqttSettings


def test_reconnect_delays_keep_their_fractions(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def spy(self: paho.Client, min_delay: float = 1, max_delay: float = 120) -> None:
        seen.update(min=min_delay, max=max_delay)

    monkeypatch.setattr(paho.Client, "reconnect_delay_set", spy)
    MqttClient(MqttSettings(reconnect_min_s=0.2, reconnect_max_s=1.5), "c1")
    assert seen == {"min": 0.2, "max": 1.5}
    MqttClient(MqttSettings(reconnect_min_s=3.0, reconnect_max_s=1.0), "c2")
    assert seen == {"min": 3.0, "max": 3.0}  # the ceiling is never below the floor


class _Spy:
    """Records what the wrapper hands paho: the client's protocol, the connect call and the
    subscriptions made on (re)connect."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.init: dict[str, Any] = {}
        self.connect: dict[str, Any] = {}
        self.subscribed: list[tuple[str, int]] = []
        real_init = paho.Client.__init__
        spy = self

        def init(self: paho.Client, *args: Any, **kwargs: Any) -> None:
            spy.init = kwargs
            real_init(self, *args, **kwargs)

        def connect_async(self: paho.Client, host: str, port: int, **kwargs: Any) -> None:
            spy.connect = kwargs

        def subscribe(self: paho.Client, topic: str, qos: int = 0) -> tuple[int, int]:
            spy.subscribed.append((topic, qos))
            return (0, len(spy.subscribed))  # the message id

        monkeypatch.setattr(paho.Client, "__init__", init)
        monkeypatch.setattr(paho.Client, "connect_async", connect_async)
        monkeypatch.setattr(paho.Client, "loop_start", lambda self: None)
        monkeypatch.setattr(paho.Client, "subscribe", subscribe)


def test_mqtt5_persistent_session_resumes_with_its_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    """MQTT 5 has no clean session: a persistent client connects without clean start every
    time (paho's default would start clean on the first connect and lose the session a
    restarted collector comes back for) and asks the broker to keep it for the expiry."""
    spy = _Spy(monkeypatch)
    settings = MqttSettings(protocol="5", persistent_session=True, session_expiry_s=600)
    MqttClient(settings, "collector-a").start()
    assert spy.init["protocol"] == paho.MQTTv5 and spy.init["clean_session"] is None
    assert spy.connect["clean_start"] is False
    assert spy.connect["properties"].SessionExpiryInterval == 600


def test_mqtt5_clean_client_starts_clean_and_its_session_ends_with_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = _Spy(monkeypatch)
    MqttClient(MqttSettings(protocol="5"), "controller-1").start()
    assert spy.connect["clean_start"] is True
    assert spy.connect["properties"].SessionExpiryInterval == 0


def test_mqtt311_stays_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Devices and brokers that need 3.1.1 keep it: clean session as before, no properties."""
    spy = _Spy(monkeypatch)
    MqttClient(MqttSettings(persistent_session=True), "dev-1").start()
    assert spy.init["protocol"] == paho.MQTTv311 and spy.init["clean_session"] is False
    assert "clean_start" not in spy.connect and "properties" not in spy.connect


def test_a_shared_subscription_joins_the_group_and_matches_the_real_topic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = _Spy(monkeypatch)
    got: list[str] = []
    c = MqttClient(MqttSettings(protocol="5"), "collector-a")
    c.subscribe("tandem/v1/f/devices/+/telemetry", lambda t, p, r: got.append(t), share_group="g")
    c.subscribe("tandem/v1/f/devices/+/status", lambda t, p, r: got.append(t))
    c._handle_connect(None, None, _Flags(False), _Reason(0), None)  # what paho calls
    assert spy.subscribed == [
        ("$share/g/tandem/v1/f/devices/+/telemetry", 1),
        ("tandem/v1/f/devices/+/status", 1),
    ]
    message = paho.MQTTMessage(topic=b"tandem/v1/f/devices/dev-1/telemetry")
    message.payload = b"{}"
    c._client._handle_on_message(message)  # paho's dispatch on the message's real topic
    assert got == ["tandem/v1/f/devices/dev-1/telemetry"]
    with pytest.raises(ValueError, match="share group"):
        c.subscribe("tandem/v1/#", lambda t, p, r: None, share_group="a/b")


class _Flags:
    def __init__(self, session_present: bool) -> None:
        self.session_present = session_present


class _Reason:
    def __init__(self, value: int) -> None:
        self.value = value
        self.is_failure = value >= 0x80


def test_refused_subscriptions_and_publishes_are_counted_in_both_versions() -> None:
    """paho hands SUBACK and PUBACK codes of both versions as ReasonCode: 3.1.1's 0x80 and
    MQTT 5's 0x87 (not authorised) count as refused; granted QoS 1 does not."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    acked: list[int] = []
    c = MqttClient(MqttSettings(protocol="5"), "c", on_ack=acked.append)
    on_subscribe: Any = c._client.on_subscribe  # as paho calls them (VERSION2)
    on_publish: Any = c._client.on_publish
    suback = [ReasonCode(PacketTypes.SUBACK, identifier=i) for i in (0x01, 0x80, 0x87, 0x9E)]
    on_subscribe(c._client, None, 1, suback, None)
    assert c.counters.subscribe_refused == 3
    on_publish(c._client, None, 7, ReasonCode(PacketTypes.PUBACK, identifier=0x87), None)
    on_publish(c._client, None, 8, ReasonCode(PacketTypes.PUBACK, identifier=0x10), None)
    assert c.counters.publish_refused == 1 and acked == [7, 8]  # dropped, not to be retried
    assert c.counters.handler_errors == 0


def test_a_failed_handler_can_leave_its_message_unacknowledged() -> None:
    """``redeliver_on_error``: the handler raised, so the connection is shut down before paho
    sends the PUBACK (the broker sends the message again after the reconnect); without it,
    or for QoS 0, the error is only counted."""
    import socket

    def failing(topic: str, payload: bytes, retained: bool) -> None:
        raise OSError("store down")

    c = MqttClient(MqttSettings(protocol="5"), "collector-a")
    c.subscribe("t/redeliver", failing, redeliver_on_error=True)
    c.subscribe("t/once", failing)
    ours, broker_side = socket.socketpair()
    c._client._sock = ours
    try:
        for topic, qos in (("t/once", 1), ("t/redeliver", 0)):
            message = paho.MQTTMessage(mid=1, topic=topic.encode())
            message.qos = qos
            c._client._handle_on_message(message)
        assert c.counters.redeliveries == 0 and c.counters.handler_errors == 2
        message = paho.MQTTMessage(mid=2, topic=b"t/redeliver")
        message.qos = 1
        c._client._handle_on_message(message)
        assert c.counters.redeliveries == 1 and c.counters.handler_errors == 3
        assert broker_side.recv(1) == b""  # the connection is down: no PUBACK can follow
        with pytest.raises(OSError):
            ours.send(b"x")
    finally:
        c._client._sock = None
        ours.close()
        broker_side.close()


def test_subscribed_waits_for_every_suback_of_the_latest_connect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``start(wait_s)`` returns only once the broker acknowledged the subscriptions (a
    message published before could miss them): a refused one counts as acknowledged."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    _Spy(monkeypatch)
    c = MqttClient(MqttSettings(protocol="5"), "collector-a")
    c.subscribe("a/#", lambda t, p, r: None, share_group="g")
    c.subscribe("b/#", lambda t, p, r: None)
    c._handle_connect(None, None, _Flags(False), _Reason(0), None)
    assert c.connected.is_set() and not c.subscribed.is_set()
    c._handle_subscribe(None, None, 1, [ReasonCode(PacketTypes.SUBACK, identifier=1)], None)
    assert not c.subscribed.is_set()
    c._handle_subscribe(None, None, 2, [ReasonCode(PacketTypes.SUBACK, identifier=0x87)], None)
    assert c.subscribed.is_set()
    c._handle_disconnect(None, None, None, _Reason(0), None)
    assert not c.subscribed.is_set()
    bare = MqttClient(MqttSettings(), "dev-1")  # nothing to subscribe: ready at connect
    bare._handle_connect(None, None, _Flags(False), _Reason(0), None)
    assert bare.subscribed.is_set()


def test_with_a_batched_subscription_the_client_acknowledges_each_other_message_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """paho's manual acknowledgements are client-wide: a message of the other subscriptions
    is acknowledged once all its handlers returned (once, even if two filters match it), and
    not at all when a handler that asks for redelivery raised; one of the batched
    subscription waits for its writer."""
    acked: list[int] = []
    monkeypatch.setattr(paho.Client, "ack", lambda self, mid, qos: acked.append(mid))
    got: list[str] = []

    def failing(topic: str, payload: bytes, retained: bool) -> None:
        raise OSError("store down")

    c = MqttClient(MqttSettings(protocol="5"), "collector-a")
    c.subscribe_batched("f/+/telemetry", lambda batch: None)
    c.subscribe("f/+/status", lambda t, p, r: got.append(t))
    c.subscribe("f/#", lambda t, p, r: got.append(t))
    c.subscribe("g/redeliver", failing, redeliver_on_error=True)
    for mid, topic in enumerate(("f/d/status", "g/redeliver", "f/d/telemetry", "h/none"), 1):
        message = paho.MQTTMessage(mid=mid, topic=topic.encode())
        message.qos = 1
        c._client._handle_on_message(message)
    assert got == ["f/d/status", "f/d/status", "f/d/telemetry"]
    assert acked == [1, 4]  # not 2 (to be sent again), not 3 (the writer's)
    assert c.batch_backlog == 1
    with pytest.raises(MqttError, match="one batched"):
        c.subscribe_batched("x/#", lambda batch: None)
