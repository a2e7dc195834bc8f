"""Bytes on the wire, counted by category in the agent: what a device on a metered link
pays for, reported in its own telemetry (``Telemetry.wire_bytes``).

Categories (``CATEGORIES``): ``births`` (the retained status, online and offline),
``telemetry``, ``job_states`` (update reports), ``manifests`` (received), ``session`` (the
MQTT connection itself: CONNECT with its Last Will, CONNACK, SUBSCRIBE/SUBACK,
PINGREQ/PINGRESP, DISCONNECT), ``downloads`` (artifacts and bundle files) and
``escalations`` (every request to the cloud fallback, its ``GET /v2`` probe included),
``audits`` (the learning loop's audit calls to the cloud, on a client of their own) and
``samples`` (field-data uploads, ``POST /fleet/samples``). The capture switch's retained
commands are received on subscriptions and counted with ``manifests``.

What is counted, and how exactly:

- MQTT: the MQTT 3.1.1 packet as encoded (fixed header with its remaining-length bytes,
  topic, packet id, payload), plus the 4-byte PUBACK of each QoS 1 message, counted when
  the message is handed to the client (a message paho sends again after a reconnect is
  counted once). Session packets are counted as paho reports them (its ``on_log`` events).
- HTTP: the request line, headers and body as sent; the status line, headers and body (as
  transferred: compressed if the server compressed it) as received, the body counted while
  it is read.
- Not counted: TCP/IP and TLS framing below the application protocols (about 40-52 bytes a
  segment, 22-29 a TLS record); ``scripts/bench_idle_bytes.py`` measures the socket bytes.

The counts are cumulative for the session (since the agent started).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from shared.mqtt import Handler, MqttClient, MqttSettings
from shared.telemetry import WireBytes
from shared.topics import Topic

log = logging.getLogger(__name__)

CATEGORIES = (
    "births",
    "telemetry",
    "job_states",
    "manifests",
    "session",
    "downloads",
    "escalations",
    "audits",
    "samples",
)
#: The device's own MQTT chatter: what ``telemetry.daily_budget_bytes`` is a budget for.
#: Downloads and escalations are work an operator or a caller asked for; audits go with
#: escalations; samples share the budget's remainder (``agent.device.uploader``).
BUDGETED = ("births", "telemetry", "job_states", "manifests", "session")

PUBACK_BYTES = 4
PING_BYTES = 2  # PINGREQ and PINGRESP: a fixed header and no body
DISCONNECT_BYTES = 2
CONNACK_BYTES = 4


class WireCounter:
    """Bytes sent and received per category; thread-safe (paho's, httpx's and the
    telemetry thread all add to it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent = dict.fromkeys(CATEGORIES, 0)
        self._received = dict.fromkeys(CATEGORIES, 0)

    def add(self, category: str, sent: int = 0, received: int = 0) -> None:
        if category not in self._sent:
            raise ValueError(f"unknown wire category {category!r}")
        with self._lock:
            self._sent[category] += sent
            self._received[category] += received

    def snapshot(self) -> dict[str, WireBytes]:
        """The categories that carried anything, so far."""
        with self._lock:
            return {
                c: WireBytes(sent=self._sent[c], received=self._received[c])
                for c in CATEGORIES
                if self._sent[c] or self._received[c]
            }

    def total(self, categories: tuple[str, ...] = CATEGORIES) -> int:
        with self._lock:
            return sum(self._sent[c] + self._received[c] for c in categories)


# ----------------------------------------------------------------------------- MQTT


def _remaining_length_bytes(n: int) -> int:
    """How many bytes MQTT's variable-length encoding takes for ``n``."""
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def _packet(body: int) -> int:
    """A whole packet: type byte, remaining length, ``body``."""
    return 1 + _remaining_length_bytes(body) + body


def publish_bytes(topic: str, payload: bytes, qos: int) -> int:
    """A PUBLISH packet as MQTT 3.1.1 encodes it."""
    return _packet(2 + len(topic.encode()) + (2 if qos else 0) + len(payload))


def connect_bytes(settings: MqttSettings, client_id: str, will: tuple[Topic, bytes] | None) -> int:
    """A CONNECT packet (MQTT 3.1.1): protocol name and level, flags, keepalive, then the
    client id, the Will, user name and password, each length-prefixed."""
    body = 10 + 2 + len(client_id.encode())
    if will is not None:
        body += 2 + len(will[0].name.encode()) + 2 + len(will[1])
    if settings.username:
        body += 2 + len(settings.username.encode())
        if settings.password is not None:
            body += 2 + len(settings.password.get_secret_value().encode())
    return _packet(body)


def subscribe_bytes(topic_filter: str) -> tuple[int, int]:
    """SUBSCRIBE of one filter at QoS 1, and its SUBACK."""
    return _packet(2 + 2 + len(topic_filter.encode()) + 1), _packet(2 + 1)


#: A device topic's last level -> its category.
_LEAF_CATEGORY = {"status": "births", "telemetry": "telemetry", "update": "job_states"}
_FILTERS = re.compile(r"\(b'([^']*)', ")


class CountingMqttClient(MqttClient):
    """The agent's ``MqttClient``, counting what it sends and receives. Publishes are
    sorted by the topic's leaf (``status``, ``telemetry``, ``update``); every subscription
    of the agent is to manifests."""

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        wire: WireCounter,
        *,
        will: tuple[Topic, bytes] | None = None,
        **hooks: Any,
    ) -> None:
        super().__init__(settings, client_id, will=will, **hooks)
        self.wire = wire
        self._connect_bytes = connect_bytes(settings, client_id, will)
        self._subacks: list[int] = []  # filters per SUBSCRIBE sent, oldest first
        # paho reports every control packet it sends or receives to on_log (MqttClient
        # sets no on_log of its own); it runs on paho's thread and must never raise
        self._client.on_log = self._on_log

    def _on_log(self, client: Any, userdata: Any, level: int, message: str) -> None:
        try:
            self._count_control(message)
        except Exception:  # paho's thread must survive anything
            log.exception("wire count failed on %r", message)

    def _count_control(self, message: str) -> None:
        add = self.wire.add
        if message.startswith("Sending CONNECT"):
            add("session", sent=self._connect_bytes)
        elif message.startswith("Received CONNACK"):
            add("session", received=CONNACK_BYTES)
        elif message.startswith("Sending SUBSCRIBE"):
            # "Sending SUBSCRIBE (d0, m3) [(b'filter', 1), ...]"
            filters = _FILTERS.findall(message)
            add("session", sent=_packet(2 + sum(2 + len(f.encode()) + 1 for f in filters)))
            self._subacks.append(len(filters))
        elif message.startswith("Received SUBACK"):
            granted = self._subacks.pop(0) if self._subacks else 1
            add("session", received=_packet(2 + granted))
        elif message == "Sending PINGREQ":
            add("session", sent=PING_BYTES)
        elif message == "Received PINGRESP":
            add("session", received=PING_BYTES)
        elif message.startswith("Sending DISCONNECT"):
            add("session", sent=DISCONNECT_BYTES)

    def publish(self, topic: Topic, payload: bytes) -> Any:
        category = _LEAF_CATEGORY.get(topic.name.rsplit("/", 1)[-1], "session")
        self.wire.add(
            category,
            sent=publish_bytes(topic.name, payload, topic.qos),
            received=PUBACK_BYTES if topic.qos else 0,
        )
        return super().publish(topic, payload)

    def subscribe(self, topic_filter: str, handler: Handler, **options: Any) -> None:
        def counted(topic: str, payload: bytes, retained: bool) -> None:
            # the agent's subscriptions are at QoS 1: a PUBLISH in, a PUBACK out
            self.wire.add("manifests", sent=PUBACK_BYTES, received=publish_bytes(topic, payload, 1))
            handler(topic, payload, retained)

        super().subscribe(topic_filter, counted, **options)


# ----------------------------------------------------------------------------- HTTP


def _header_bytes(headers: httpx.Headers) -> int:
    return sum(len(k) + 2 + len(v) + 2 for k, v in headers.raw) + 2  # "k: v\r\n", blank line


class _CountingStream(httpx.SyncByteStream):
    """A response body that counts its bytes as they are read."""

    def __init__(self, inner: Any, wire: WireCounter, category: str) -> None:
        self._inner = inner
        self._wire = wire
        self._category = category

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._wire.add(self._category, received=len(chunk))
            yield chunk

    def close(self) -> None:
        self._inner.close()


def http_hooks(wire: WireCounter, category: str) -> dict[str, list[Callable[..., None]]]:
    """httpx event hooks that count every request a client sends, and its response, under
    ``category``."""

    def on_request(request: httpx.Request) -> None:
        target = request.url.raw_path.decode("ascii", "replace")
        line = len(request.method) + 1 + len(target) + len(" HTTP/1.1\r\n")
        body = len(request.content) if isinstance(request.stream, httpx.ByteStream) else 0
        wire.add(category, sent=line + _header_bytes(request.headers) + body)

    def on_response(response: httpx.Response) -> None:
        line = len("HTTP/1.1 000 ") + len(response.reason_phrase) + 2
        wire.add(category, received=line + _header_bytes(response.headers))
        response.stream = _CountingStream(response.stream, wire, category)

    return {"request": [on_request], "response": [on_response]}


def count_http(client: httpx.Client, wire: WireCounter, category: str) -> None:
    """Count ``client``'s traffic under ``category`` (hooks added after any it has)."""
    ours = http_hooks(wire, category)
    hooks = client.event_hooks
    client.event_hooks = {k: [*hooks.get(k, []), *ours[k]] for k in ("request", "response")}
