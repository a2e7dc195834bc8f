"""The shared MQTT client against a real Mosquitto: auth, ACL, retained messages, reconnect."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from shared import topics
from shared.mqtt import MqttClient, MqttError, MqttSettings
from tests.fleet import wait_for
from tests.mosquitto import Mosquitto


def client(broker: Mosquitto, user: str, password: str | None = None) -> MqttClient:
    settings = broker.settings_for(user)
    if password is not None:
        settings = settings.model_copy(update={"password": SecretStr(password)})
    return MqttClient(settings, f"{user}-{time.monotonic_ns()}")


class Inbox:
    def __init__(self) -> None:
        self.items: list[tuple[str, bytes, bool]] = []
        self.event = threading.Event()

    def __call__(self, topic: str, payload: bytes, retained: bool) -> None:
        self.items.append((topic, payload, retained))
        self.event.set()

    def wait(self, n: int, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.items) >= n:
                return True
            time.sleep(0.01)
        return False


def test_wrong_password_is_refused(broker: Mosquitto) -> None:
    with pytest.raises(MqttError, match="no connection"):
        client(broker, "dev-0", "wrong").start(wait_s=1.5)


def test_retained_manifest_reaches_a_device(broker: Mosquitto) -> None:
    ctl = client(broker, "controller")
    ctl.start(wait_s=5)
    topic = topics.manifest("fleet1", "digits")
    assert ctl.publish_wait(topic, b'{"x": 1}')
    dev = client(broker, "dev-1")
    inbox = Inbox()
    for f in topics.agent_manifest_filters("fleet1", "dev-1", "g1"):
        dev.subscribe(f, inbox)
    dev.start(wait_s=5)
    assert inbox.wait(1)
    assert inbox.items[0] == (topic.name, b'{"x": 1}', True)
    ctl.stop()
    dev.stop()


def test_acl_confines_devices_to_their_own_subtree(broker: Mosquitto) -> None:
    """dev-1 cannot publish dev-2's telemetry, nor any manifest, nor its own manifest."""
    watcher = client(broker, "collector")
    inbox = Inbox()
    watcher.subscribe("tandem/v1/#", inbox)
    watcher.start(wait_s=5)
    dev = client(broker, "dev-1")
    dev.start(wait_s=5)
    dev.publish_wait(topics.device_telemetry("f", "dev-2"), b"forged")
    dev.publish_wait(topics.manifest("f", "digits"), b"forged")
    dev.publish_wait(topics.manifest("f", "digits", device="dev-1"), b"forged")
    dev.publish_wait(topics.manifest("f", "digits", group="g"), b"forged")
    dev.publish_wait(topics.device_telemetry("f", "dev-1"), b"mine")
    # each publish was acknowledged before the next went out, and the broker forwards a
    # client's messages in order: a forged one that got through would arrive before "mine"
    assert inbox.wait(1)
    assert [(t, p) for t, p, _ in inbox.items] == [
        (topics.device_telemetry("f", "dev-1").name, b"mine")
    ]
    watcher.stop()
    dev.stop()


def test_a_device_cannot_take_over_another_devices_client_id(broker: Mosquitto) -> None:
    """dev-1 logs in with dev-0's client id: the broker names it after its username instead,
    so dev-0 stays connected and its Last Will does not fire."""
    watcher = client(broker, "collector")
    inbox = Inbox()
    watcher.subscribe(topics.fleet_device_filter("f", "status"), inbox)
    watcher.start(wait_s=5)
    victim = MqttClient(
        broker.settings_for("dev-0"),
        "dev-0",
        will=(topics.device_status("f", "dev-0"), b"offline"),
    )
    victim.start(wait_s=5)
    assert victim.publish_wait(topics.device_status("f", "dev-0"), b"online")
    assert inbox.wait(1)
    intruder = MqttClient(broker.settings_for("dev-1"), "dev-0")
    intruder.start(wait_s=5)
    # the intruder is connected (as dev-1: it may publish dev-1's status) ...
    assert intruder.publish_wait(topics.device_status("f", "dev-1"), b"intruder")
    assert inbox.wait(2)
    # ... and the victim was never pushed off: still connected, no Last Will on its topic
    assert victim.publish_wait(topics.device_status("f", "dev-0"), b"still here")
    assert inbox.wait(3)
    assert victim.counters.disconnects == 0 and victim.connected.is_set()
    assert [p for t, p, _ in inbox.items if t.endswith("/dev-0/status")] == [
        b"online",
        b"still here",
    ]
    intruder.stop()
    victim.stop()
    watcher.stop()


def test_last_will_marks_a_vanished_device_and_reconnect_resubscribes(broker: Mosquitto) -> None:
    watcher = client(broker, "collector")
    inbox = Inbox()
    watcher.subscribe(topics.fleet_device_filter("f", "status"), inbox)
    watcher.start(wait_s=5)
    settings = MqttSettings(
        url=broker.url, username="dev-3", password=SecretStr("pw-3"), keepalive_s=5
    )
    dev = MqttClient(settings, "dev-3", will=(topics.device_status("f", "dev-3"), b"offline"))
    dev.start(wait_s=5)
    broker.stop()  # the broker goes away and comes back: both clients reconnect
    broker.start()
    assert watcher.connected.wait(10) and dev.connected.wait(10)
    dev._client._sock.close()  # type: ignore[union-attr]  # the process vanishes: no goodbye
    dev._client.loop_stop()
    assert inbox.wait(1, timeout=15)
    assert inbox.items[-1][1] == b"offline"
    watcher.stop()
    dev.stop()


def test_a_handler_that_raises_does_not_kill_the_client(broker: Mosquitto) -> None:
    dev = client(broker, "collector")
    calls = Inbox()

    def bad(topic: str, payload: bytes, retained: bool) -> None:
        calls(topic, payload, retained)
        raise ValueError("boom")

    dev.subscribe("tandem/v1/#", bad)
    dev.start(wait_s=5)
    ctl = client(broker, "controller")
    ctl.start(wait_s=5)
    ctl.publish_wait(topics.device_telemetry("f", "dev-1"), b"1")
    ctl.publish_wait(topics.device_telemetry("f", "dev-1"), b"2")
    assert calls.wait(2)
    assert dev.counters.handler_errors == 2 and dev.connected.is_set()
    ctl.stop()
    dev.stop()


def test_hooks_that_raise_do_not_kill_the_network_thread(broker: Mosquitto) -> None:
    """No watchdog restarts paho's thread: it must outlive every callback. Connect, ack and
    disconnect hooks that raise are counted, and the client still reconnects and publishes."""

    def boom(*_: object) -> None:
        raise RuntimeError("hook failed")

    c = MqttClient(
        broker.settings_for("collector"),
        f"collector-{time.monotonic_ns()}",
        on_connect=boom,
        on_ack=boom,
        on_disconnect=boom,
    )
    c.start(wait_s=5)
    assert c.publish_wait(topics.device_telemetry("f", "dev-1"), b"1")
    broker.stop()
    broker.start()
    assert c.connected.wait(10)
    assert c.publish_wait(topics.device_telemetry("f", "dev-1"), b"2")
    # connect, ack, disconnect, connect, ack: each raised in paho's thread, none escaped
    assert c.counters.handler_errors == 5
    c.stop()


def _open_fds() -> int:
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


def test_stop_closes_every_socket(broker: Mosquitto) -> None:
    """paho leaves its wake-up socket pair to its ``__del__``; a client in a reference cycle
    is finalised by the garbage collector, in no fixed order with its sockets, which then
    warn as unclosed. ``stop`` closes them all."""
    c = client(broker, "collector")
    before = _open_fds()
    c.start(wait_s=5)
    assert _open_fds() >= before + 3  # the broker connection and the wake-up pair
    c.stop()
    assert _open_fds() <= before


def test_the_test_broker_moves_off_a_port_taken_before_its_first_start(
    tmp_path: Path,
) -> None:
    """``free_port`` chooses a port that another process may bind before Mosquitto does
    (the suite runs many servers): the first start moves to fresh ports instead of
    failing the test that wanted a broker."""
    from tests.conftest import BROKER_USERS

    broker = Mosquitto(tmp_path / "mosquitto", BROKER_USERS)
    taken = socket.socket()
    taken.bind(("127.0.0.1", broker.port))
    taken.listen()
    try:
        broker.start()
        assert broker.port != taken.getsockname()[1]
        with socket.create_connection(("127.0.0.1", broker.port), timeout=1):
            pass
    finally:
        broker.stop()
        taken.close()


def _member(
    broker: Mosquitto,
    client_id: str,
    inbox: Inbox,
    *,
    status: Inbox | None = None,
    group: str | None = "g",
    **settings: Any,
) -> MqttClient:
    """A collector account's client in share group ``group`` (None: a plain subscription)
    on every device's telemetry (and on their status, if given an inbox for it)."""
    c = MqttClient(broker.settings_for("collector", **settings), client_id)
    c.subscribe(topics.fleet_device_filter("f", "telemetry"), inbox, share_group=group)
    if status is not None:
        c.subscribe(topics.fleet_device_filter("f", "status"), status, share_group="g")
    c.start(wait_s=5)
    return c


def _vanish(c: MqttClient) -> None:
    """The process dies: no DISCONNECT, the broker sees the socket close."""
    c._client._sock.close()  # type: ignore[union-attr]
    c._client.loop_stop()


def test_a_shared_group_hands_each_message_to_one_member(broker: Mosquitto) -> None:
    """An MQTT 5 member and a 3.1.1 one (Mosquitto 2.0 takes ``$share`` from both) split the
    stream: every message reaches exactly one of them, under its real topic. Mosquitto also
    sends the retained messages to each member as it subscribes (MQTT 5 says a shared
    subscription gets none; other brokers follow that)."""
    ctl = client(broker, "controller")
    ctl.start(wait_s=5)
    assert ctl.publish_wait(topics.device_status("f", "dev-1"), b"retained")  # not telemetry
    a, b, status = Inbox(), Inbox(), Inbox()
    member_a = _member(broker, "collector-a", a, protocol="5", status=status)
    member_b = _member(broker, "collector-b", b, status=status)
    assert status.wait(2)  # the retained status, to each member
    assert [p for _, p, r in status.items if r] == [b"retained", b"retained"]
    sent = [f"m{i}".encode() for i in range(20)]
    for payload in sent:
        assert ctl.publish_wait(topics.device_telemetry("f", "dev-1"), payload)
    assert a.wait(1) and b.wait(1)
    wait_for(lambda: len(a.items) + len(b.items) >= len(sent), 5, "the whole stream")
    got = [p for _, p, _ in a.items + b.items]
    assert sorted(got) == sorted(sent)  # each once
    assert {t for t, _, _ in a.items + b.items} == {topics.device_telemetry("f", "dev-1").name}
    assert member_a.counters.subscribe_refused == member_b.counters.subscribe_refused == 0
    for c in (member_a, member_b, ctl):
        c.stop()


def test_a_vanished_persistent_member_keeps_its_share_queued_until_it_returns(
    broker: Mosquitto,
) -> None:
    """Mosquitto 2.0.11 goes on handing a member whose process died its turn of the round
    robin: with a persistent session (MQTT 5, session expiry) the broker queues those
    messages, and the member drains them when it comes back under the same client id; the
    other member never sees them. (With a clean session they would be dropped.)"""
    ctl = client(broker, "controller")
    ctl.start(wait_s=5)
    a, b = Inbox(), Inbox()
    persistent: dict[str, Any] = {
        "protocol": "5",
        "persistent_session": True,
        "session_expiry_s": 300,
    }
    member_a = _member(broker, "collector-a", a, **persistent)
    member_b = _member(broker, "collector-b", b, **persistent)
    _vanish(member_a)
    sent = [f"m{i}".encode() for i in range(20)]
    for payload in sent:
        assert ctl.publish_wait(topics.device_telemetry("f", "dev-1"), payload)
    # a marker pair after the stream: b gets one of the two, and a member receives its
    # messages in order, so once b has it, b has had everything the broker gave it
    markers = [b"end-1", b"end-2"]
    for payload in markers:
        assert ctl.publish_wait(topics.device_telemetry("f", "dev-1"), payload)
    wait_for(lambda: any(p in markers for _, p, _ in b.items), 5, "a marker at b")
    seen_by_b = [p for _, p, _ in b.items if p not in markers]
    assert 0 < len(seen_by_b) < len(sent)  # the rest waits in a's session
    member_a.stop()
    back = Inbox()
    member_a = _member(broker, "collector-a", back, **persistent)
    assert back.wait(len(sent) + len(markers) - len(b.items))
    assert sorted(seen_by_b + [p for _, p, _ in back.items if p not in markers]) == sorted(sent)
    for c in (member_a, member_b, ctl):
        c.stop()


def test_a_persistent_mqtt5_session_and_its_queue_survive_a_broker_restart(
    broker: Mosquitto,
) -> None:
    """With ``persistence true`` Mosquitto writes MQTT 5 sessions (expiry, subscriptions,
    queued messages) to disk: what was queued for an instance that was away is delivered
    after the broker restarted, under the same client id."""
    ctl = client(broker, "controller")
    ctl.start(wait_s=5)
    persistent: dict[str, Any] = {"protocol": "5", "persistent_session": True}
    first = Inbox()
    member = _member(broker, "collector-a", first, **persistent)
    assert ctl.publish_wait(topics.device_telemetry("f", "dev-1"), b"probe")
    assert first.wait(1)  # live delivery first
    _vanish(member)
    sent = [f"m{i}".encode() for i in range(5)]
    for payload in sent:
        assert ctl.publish_wait(topics.device_telemetry("f", "dev-1"), payload)
    ctl.stop()
    member.stop()
    broker.stop()
    broker.start()
    back = Inbox()
    member = _member(broker, "collector-a", back, **persistent)
    # the probe too, if the member vanished between taking it and acknowledging it
    wait_for(
        lambda: len([p for _, p, _ in back.items if p != b"probe"]) >= len(sent),
        5,
        "the queued messages",
    )
    assert [p for _, p, _ in back.items if p != b"probe"] == sent
    member.stop()


@pytest.mark.parametrize("group", [None, "g"], ids=["plain", "shared"])
def test_what_a_restarted_broker_keeps_for_a_persistent_collector_that_is_not_back_yet(
    broker: Mosquitto, group: str | None
) -> None:
    """Why ``collector_share_group`` is off by default: after a restart, Mosquitto 2.0.11
    restores a persistent MQTT 5 session's plain subscriptions, so what devices send before
    the collector is back is queued for it; its ``$share`` subscriptions it does not
    restore, so the same messages reach no one (acknowledged to the devices all the same).
    If a later Mosquitto restores them, the shared case fails here: revisit the default."""
    persistent: dict[str, Any] = {"protocol": "5", "persistent_session": True}
    first = Inbox()
    member = _member(broker, "collector-a", first, group=group, **persistent)
    member.stop()  # a clean DISCONNECT: the session (expiry a day) stays on the broker
    broker.stop()
    broker.start()
    ctl = client(broker, "controller")
    ctl.start(wait_s=5)
    sent = [f"m{i}".encode() for i in range(5)]
    for payload in sent:
        assert ctl.publish_wait(topics.device_telemetry("f", "dev-1"), payload)
    back = Inbox()
    member = _member(broker, "collector-a", back, group=group, **persistent)
    # a marker sent now reaches the member live: once it is in, anything queued came first
    assert ctl.publish_wait(topics.device_telemetry("f", "dev-1"), b"end")
    wait_for(lambda: b"end" in [p for _, p, _ in back.items], 5, "the live marker")
    queued = [p for _, p, _ in back.items if p != b"end"]
    assert queued == (sent if group is None else [])
    member.stop()
    ctl.stop()
