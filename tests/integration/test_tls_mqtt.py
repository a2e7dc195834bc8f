"""Devices on MQTT over TLS with X.509 client certificates, against a real Mosquitto set up
as docs/operations.md says (``require_certificate``, ``use_identity_as_username``, the
fleet's ACL with ``%u``), certificates made by ``tests/certs.py``.

What an attacker with a device of its own (dev-2, its certificate and key) tries: publish
another device's status, read another device's manifest, claim another username or client
id in CONNECT, use a leaked pair of another device's, present a certificate it made itself
(unknown CA), an expired one, or none. Another device's certificate without its key
cannot even be loaded (tests/unit/test_tls.py). "Refused" is concrete: the connection
fails, or the client acts as its certificate's CN, confined to that device's subtree.
Nothing-arrived checks have a positive control that must arrive after.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import topics
from shared.mqtt import MqttClient, MqttError
from shared.tls import client_context
from tests.certs import Pki
from tests.mosquitto import Mosquitto, TlsListener

FLEET = "f"


class Inbox:
    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()

    def __call__(self, topic: str, payload: bytes, retained: bool) -> None:
        with self._cond:
            self.items.append((topic, payload))
            self._cond.notify_all()

    def wait_for(self, item: tuple[str, bytes], timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: item in self.items, timeout)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Mosquitto]:
    """A fresh Mosquitto with the TLS listener beside the usual two (the cloud's accounts
    log in on the service listener, with passwords)."""
    users = {"controller": "ctl-pw", "collector": "col-pw"}
    listener = TlsListener(pki.ca_file, pki.server.cert, pki.server.key)
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto-tls"), users, tls=listener)
    b.start()
    try:
        yield b
    finally:
        b.stop()


def device_client(broker: Mosquitto, pki: Pki, device: str, **overrides: object) -> MqttClient:
    files = pki.device(device)
    client_id = str(overrides.pop("client_id", device))
    return MqttClient(broker.tls_settings(files.cert, files.key, **overrides), client_id)


def watch(broker: Mosquitto, topic_filter: str) -> tuple[MqttClient, Inbox]:
    """The collector, subscribed to ``topic_filter``: what really reaches the cloud."""
    inbox = Inbox()
    c = MqttClient(broker.settings_for("collector"), f"collector-{time.monotonic_ns()}")
    c.subscribe(topic_filter, inbox)
    c.start(wait_s=5)
    return c, inbox


def status(device: str) -> topics.Topic:
    return topics.device_status(FLEET, device)


def test_a_device_with_its_certificate_connects_and_publishes_only_as_itself(
    tls_broker: Mosquitto, pki: Pki
) -> None:
    watcher, inbox = watch(tls_broker, topics.fleet_device_filter(FLEET, "status"))
    dev = device_client(tls_broker, pki, "dev-2")
    dev.start(wait_s=5)
    assert dev.publish_wait(status("dev-1"), b"forged")
    assert dev.publish_wait(topics.device_telemetry(FLEET, "dev-1"), b"forged")
    assert dev.publish_wait(topics.manifest(FLEET, "digits", device="dev-2"), b"forged")
    assert dev.publish_wait(status("dev-2"), b"mine")
    # acknowledged one by one, forwarded in order: a forged message would be in first
    assert inbox.wait_for((status("dev-2").name, b"mine"))
    assert inbox.items == [(status("dev-2").name, b"mine")]
    dev.stop()
    watcher.stop()


def test_a_device_reads_its_own_manifest_and_not_another_devices(
    tls_broker: Mosquitto, pki: Pki
) -> None:
    ctl = MqttClient(tls_broker.settings_for("controller"), "controller")
    ctl.start(wait_s=5)
    theirs = topics.manifest(FLEET, "digits", device="dev-1")
    mine = topics.manifest(FLEET, "digits", device="dev-2")
    assert ctl.publish_wait(theirs, b"dev-1's")
    assert ctl.publish_wait(mine, b"dev-2's")
    dev = device_client(tls_broker, pki, "dev-2")
    inbox = Inbox()
    dev.subscribe(theirs.name, inbox)  # subscribed first: its retained copy would come first
    dev.subscribe("tandem/v1/+/devices/+/models/+/manifest", inbox)
    dev.subscribe(mine.name, inbox)
    dev.start(wait_s=5)
    assert inbox.wait_for((mine.name, b"dev-2's"))
    assert ctl.publish_wait(theirs, b"dev-1's again")  # live, not only retained
    assert ctl.publish_wait(mine, b"dev-2's again")
    assert inbox.wait_for((mine.name, b"dev-2's again"))
    assert {t for t, _ in inbox.items} == {mine.name}
    dev.stop()
    ctl.stop()


def test_a_username_or_client_id_claimed_in_connect_does_not_override_the_certificate(
    tls_broker: Mosquitto, pki: Pki
) -> None:
    """dev-2 connects with its own certificate claiming to be dev-1 (username, password,
    client id): the broker names it after the certificate, so dev-1 stays connected and
    dev-2 still may publish only dev-2's topics."""
    watcher, inbox = watch(tls_broker, topics.fleet_device_filter(FLEET, "status"))
    victim = device_client(tls_broker, pki, "dev-1")
    victim.start(wait_s=5)
    assert victim.publish_wait(status("dev-1"), b"online")
    assert inbox.wait_for((status("dev-1").name, b"online"))
    intruder = device_client(
        tls_broker, pki, "dev-2", client_id="dev-1", username="dev-1", password="x"
    )
    intruder.start(wait_s=5)
    assert intruder.publish_wait(status("dev-1"), b"forged")
    assert intruder.publish_wait(status("dev-2"), b"intruder as itself")
    assert inbox.wait_for((status("dev-2").name, b"intruder as itself"))
    assert victim.publish_wait(status("dev-1"), b"still here")
    assert inbox.wait_for((status("dev-1").name, b"still here"))
    assert [p for t, p in inbox.items if t == status("dev-1").name] == [b"online", b"still here"]
    assert victim.counters.disconnects == 0
    intruder.stop()
    victim.stop()
    watcher.stop()


def test_another_devices_stolen_certificate_and_key_act_as_that_device_only(
    tls_broker: Mosquitto, pki: Pki
) -> None:
    """dev-2 configured with dev-1's certificate and key (a leaked pair): it is dev-1 to
    the broker, confined to dev-1's subtree; it cannot speak for dev-2, whose id it uses."""
    watcher, inbox = watch(tls_broker, topics.fleet_device_filter(FLEET, "status"))
    stolen = pki.device("dev-1")
    dev = MqttClient(tls_broker.tls_settings(stolen.cert, stolen.key), "dev-2")
    dev.start(wait_s=5)
    assert dev.publish_wait(status("dev-2"), b"as dev-2")
    assert dev.publish_wait(status("dev-1"), b"as dev-1")
    assert inbox.wait_for((status("dev-1").name, b"as dev-1"))
    assert inbox.items == [(status("dev-1").name, b"as dev-1")]
    dev.stop()
    watcher.stop()


def _cert_for(pki: Pki, kind: str) -> tuple[Path | None, Path | None]:
    if kind == "none":
        return None, None
    files = pki.expired("dev-2") if kind == "expired" else pki.stranger("dev-2")
    return files.cert, files.key


def broker_alert(broker: Mosquitto, pki: Pki, cert: Path | None, key: Path | None) -> str:
    """Why the broker ends a handshake with this certificate: the TLS alert it sends (TLS
    1.2, where the client's certificate is judged inside the handshake), or "accepted"."""
    context = client_context(pki.ca_file, cert, key)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", broker.tls_port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="127.0.0.1"):
                return "accepted"
        except ssl.SSLError as exc:
            return str(exc.reason)


@pytest.mark.parametrize(
    ("kind", "alert"),
    [
        ("expired", "SSLV3_ALERT_CERTIFICATE_EXPIRED"),
        ("unknown-ca", "TLSV1_ALERT_UNKNOWN_CA"),
        ("none", "SSLV3_ALERT_HANDSHAKE_FAILURE"),
    ],
)
def test_a_device_without_a_valid_fleet_certificate_is_refused(
    tls_broker: Mosquitto, pki: Pki, kind: str, alert: str
) -> None:
    good = device_client(tls_broker, pki, "dev-1")
    good.start(wait_s=5)  # the positive control: the listener takes a valid certificate
    files = pki.device("dev-1")
    assert broker_alert(tls_broker, pki, files.cert, files.key) == "accepted"
    cert, key = _cert_for(pki, kind)
    bad = MqttClient(tls_broker.tls_settings(cert, key), "dev-2")
    with pytest.raises(MqttError, match="no connection"):
        bad.start(wait_s=2)
    assert broker_alert(tls_broker, pki, cert, key) == alert
    good.stop()


def test_a_broker_certificate_from_another_ca_is_refused_by_the_device(
    tls_broker: Mosquitto, pki: Pki
) -> None:
    """The device verifies the broker too: trusting another CA, it does not connect."""
    files = pki.device("dev-2")
    settings = tls_broker.tls_settings(files.cert, files.key, ca_file=pki.other.ca_file)
    with pytest.raises(MqttError, match="no connection"):
        MqttClient(settings, "dev-2").start(wait_s=2)
