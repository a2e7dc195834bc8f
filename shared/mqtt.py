"""One MQTT client wrapper (paho-mqtt 2.x) for agent, controller and collector.

paho's callbacks run on its network thread, and an exception there kills the thread: every
callback paho is given here (``on_connect``, ``on_disconnect``, ``on_publish``, ``on_message``
and each ``message_callback_add`` handler; no others are set) is wrapped, logs and counts
what it catches, and never raises, so the thread needs no watchdog. Handlers must be quick
(hand work to a queue). Subscriptions are remembered and re-made on every
(re)connect; reconnects back off between ``reconnect_min_s`` and ``reconnect_max_s``.
``publish`` takes a ``shared.topics.Topic``, so QoS and retain always follow the design.

Devices speak MQTT 3.1.1 (``protocol="3.1.1"``, the default: every broker and managed service
takes it); the cloud's clients speak MQTT 5 for session expiry. A subscription may join a
shared group (``$share/<group>/<filter>``: the broker hands each message to one member), so
several cloud instances split telemetry ingest. paho reports reason codes of both versions as
``ReasonCode`` (a v3.1.1 CONNACK code or SUBACK 0x80 is converted), so one check fits both.

A batched subscription (``subscribe_batched``) hands messages to one writer thread in
batches and acknowledges each only after its handler took the batch (paho's manual
acknowledgements, client-wide: the client then acknowledges every other message itself,
once all its handlers returned). See ``subscribe_batched`` for the window and the queue.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.matcher import MQTTMatcher
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from shared.errors import TandemError
from shared.identifiers import check_identifier
from shared.settings_files import SettingsError
from shared.tls import TlsFiles
from shared.topics import Topic

log = logging.getLogger(__name__)

#: ``handler(topic, payload, retained)``
Handler = Callable[[str, bytes, bool], None]


@dataclass(frozen=True)
class Received:
    """One message of a batch."""

    topic: str
    payload: bytes
    retained: bool


#: ``handler_many(messages)``: returns once it has them all (they are acknowledged then);
#: raises if it could keep none of them now (none is acknowledged: they come again)
BatchHandler = Callable[[Sequence[Received]], None]


class MqttError(TandemError):
    """The broker refused, or could not be reached in time."""


class MqttSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(default="mqtt://127.0.0.1:1883", description="mqtt:// or mqtts://")
    username: str | None = None
    password: SecretStr | None = None
    ca_file: Path | None = Field(
        default=None, description="CA bundle for mqtts://; None: the system's CAs"
    )
    cert_file: Path | None = Field(
        default=None,
        description="client certificate (PEM) for mqtts://: the device's X.509 identity, "
        "for brokers that take the certificate's CN as the username (AWS IoT Core: required)",
    )
    key_file: Path | None = Field(
        default=None, description="cert_file's private key (PEM); None: in cert_file"
    )
    keepalive_s: int = Field(default=30, ge=5)
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    persistent_session: bool = Field(
        default=False,
        description="keep the session (subscriptions, queued QoS 1 messages) while offline: "
        "for collectors, which must not miss telemetry; needs a stable client id",
    )
    protocol: Literal["3.1.1", "5"] = Field(
        default="3.1.1",
        description="MQTT version; 5 for session expiry and shared subscriptions (the cloud's "
        "clients), 3.1.1 for devices and brokers that need it",
    )
    session_expiry_s: int = Field(
        default=86400,
        ge=0,
        le=0xFFFFFFFF,
        description="MQTT 5 Session Expiry Interval of a persistent session: how long the "
        "broker keeps it (and queues its messages) while the client is away; when it expires "
        "the queued messages are dropped. 3.1.1 sessions follow the broker's "
        "persistent_client_expiration",
    )

    @property
    def host_port(self) -> tuple[str, int, bool]:
        parsed = urlparse(self.url)
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise MqttError(f"broker URL must be mqtt://host[:port] or mqtts://, got {self.url}")
        tls = parsed.scheme == "mqtts"
        return parsed.hostname, parsed.port or (8883 if tls else 1883), tls


@dataclass
class MqttCounters:
    handler_errors: int = 0
    subscribe_refused: int = 0
    redeliveries: int = 0  # connections dropped so that the broker sends a message again
    publish_refused: int = 0
    connects: int = 0
    disconnects: int = 0


@dataclass(frozen=True)
class _Plain:
    handler: Handler
    redeliver_on_error: bool


@dataclass(frozen=True)
class _Pending:
    """A message of a batched subscription, waiting for the writer; acknowledged on the
    connection it came on (``generation``) or not at all."""

    generation: int
    mid: int
    qos: int
    message: Received


class _Batched:
    """A batched subscription: its handler, its bounded queue and its writer thread."""

    def __init__(
        self, handler: BatchHandler, max_batch: int, max_delay_s: float, queue_size: int
    ) -> None:
        self.handler = handler
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.queue: queue.Queue[_Pending | None] = queue.Queue(maxsize=queue_size)
        self.thread: threading.Thread | None = None

    def take(self) -> list[_Pending] | None:
        """The next batch: what waits, up to ``max_batch``, once the first message has waited
        ``max_delay_s`` for company; None when stopped."""
        first = self.queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_delay_s
        while len(batch) < self.max_batch:
            try:
                item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self.queue.put(None)  # seen by the next take(), after this batch
                break
            batch.append(item)
        return batch


class MqttClient:
    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        *,
        will: tuple[Topic, bytes] | None = None,
        on_connect: Callable[[], None] | None = None,
        on_ack: Callable[[int], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.counters = MqttCounters()
        self.connected = threading.Event()
        #: set once the broker acknowledged the subscriptions made at the latest connect
        #: (a message published before that may miss them)
        self.subscribed = threading.Event()
        self._pending_subacks: set[int] = set()
        self._on_connect_hook = on_connect
        self._on_ack = on_ack
        self._on_disconnect_hook = on_disconnect
        self._subs: dict[str, None] = {}  # the filters as subscribed ($share/...), in order
        # by the plain filter (messages carry their real topic): _Plain or _Batched
        self._routes = MQTTMatcher()  # type: ignore[no-untyped-call]
        self._batched: _Batched | None = None
        self._receive_maximum: int | None = None
        #: the connection a message came on: bumped at each disconnect, under _ack_lock, so
        #: that no message is acknowledged on a later connection (where its id may be another's)
        self._generation = 0
        self._ack_lock = threading.Lock()
        self._started = False
        self._v5 = settings.protocol == "5"
        self._lock = threading.Lock()
        self._client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if self._v5 else paho.MQTTv311,
            # MQTT 5 has no clean session: clean start and the session expiry (at connect)
            clean_session=None if self._v5 else not settings.persistent_session,
        )
        if settings.username:
            password = settings.password.get_secret_value() if settings.password else None
            self._client.username_pw_set(settings.username, password)
        _, _, tls = settings.host_port
        tls_files = TlsFiles(settings.ca_file, settings.cert_file, settings.key_file)
        if tls:
            self._client.tls_set_context(tls_files.context())
        elif tls_files.has_identity:
            raise SettingsError(f"a client certificate needs an mqtts:// URL, not {settings.url}")
        if will is not None:
            topic, payload = will
            self._client.will_set(topic.name, payload, qos=topic.qos, retain=topic.retain)
        # paho annotates the delays as int but computes with them as numbers: a fraction of
        # a second is kept (rounding made 0.2 s and 0.5 s a whole second)
        self._client.reconnect_delay_set(
            min_delay=settings.reconnect_min_s,  # type: ignore[arg-type]
            max_delay=max(settings.reconnect_min_s, settings.reconnect_max_s),  # type: ignore[arg-type]
        )
        self._client.on_connect = self._safe(self._handle_connect)
        self._client.on_disconnect = self._safe(self._handle_disconnect)
        self._client.on_publish = self._safe(self._handle_publish)
        self._client.on_subscribe = self._safe(self._handle_subscribe)
        self._client.on_message = self._safe(self._dispatch)

    # --------------------------------------------------------------- wrapped callbacks

    def _safe(self, fn: Callable[..., None]) -> Callable[..., None]:
        def wrapper(*args: Any) -> None:
            try:
                fn(*args)
            except Exception:  # paho's thread must survive anything
                self.counters.handler_errors += 1
                log.exception("MQTT callback %s failed", getattr(fn, "__name__", fn))

        return wrapper

    def _handle_connect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:  # a ReasonCode in both versions (paho converts v3.1.1's)
            log.warning("broker refused %s: %s", self.client_id, reason)
            return
        if self.settings.persistent_session and not flags.session_present:
            log.info("%s: the broker had no session for it (new, or expired)", self.client_id)
        self.counters.connects += 1
        with self._lock:  # no SUBACK can come in between: it is read on this thread
            self.subscribed.clear()
            self._pending_subacks.clear()
            for f in self._subs:
                _, mid = self._client.subscribe(f, qos=1)
                if mid is not None:
                    self._pending_subacks.add(mid)
            if not self._pending_subacks:
                self.subscribed.set()
        self.connected.set()
        log.info("%s connected to %s", self.client_id, self.settings.url)
        if self._on_connect_hook is not None:
            self._on_connect_hook()

    def _handle_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        with self._ack_lock:  # before paho's reconnect() drops what waits to be written
            self._generation += 1
        self.connected.clear()
        self.subscribed.clear()
        self.counters.disconnects += 1
        log.info("%s disconnected: %s", self.client_id, reason)
        if self._on_disconnect_hook is not None:
            self._on_disconnect_hook()

    def _handle_publish(
        self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:  # MQTT 5 only: a v3.1.1 broker acknowledges even what it drops
            self.counters.publish_refused += 1
            log.warning("broker refused message %d from %s: %s", mid, self.client_id, reason)
        if self._on_ack is not None:
            self._on_ack(mid)

    def _handle_subscribe(
        self, client: Any, userdata: Any, mid: int, reasons: list[Any], properties: Any
    ) -> None:
        # v3.1.1's failure (0x80) and v5's codes (0x87 not authorised, 0x9E shared
        # subscriptions not supported, ...) all arrive as ReasonCode
        for reason in reasons:
            if reason.is_failure:
                self.counters.subscribe_refused += 1
                log.warning("broker refused a subscription of %s: %s", self.client_id, reason)
        with self._lock:
            self._pending_subacks.discard(mid)
            if not self._pending_subacks:
                self.subscribed.set()

    def _dispatch(self, client: Any, userdata: Any, msg: Any) -> None:
        """Every message, from paho's thread: to each matching handler, then acknowledged
        (by paho, or here with manual acknowledgements) unless a handler that raised asks
        for it again; a batched subscription's writer acknowledges what it hands on."""
        routes = list(self._routes.iter_match(msg.topic))  # type: ignore[no-untyped-call]
        if not routes:
            log.debug("message on %s matched no handler", msg.topic)
        batched: _Batched | None = None
        for route in routes:
            if isinstance(route, _Batched):
                batched = route  # after the others: it acknowledges once it has it
                continue
            try:
                route.handler(msg.topic, bytes(msg.payload), bool(msg.retain))
            except Exception:
                self.counters.handler_errors += 1
                log.exception("MQTT handler for %s failed", msg.topic)
                if route.redeliver_on_error and msg.qos > 0:
                    self._drop_unacknowledged(msg.topic)
                    return  # not acknowledged
        if batched is not None:
            message = Received(msg.topic, bytes(msg.payload), bool(msg.retain))
            # blocks only past the broker's inflight window (see subscribe_batched): paho's
            # thread then waits for the writer, which never waits for paho's thread
            batched.queue.put(_Pending(self._generation, msg.mid, msg.qos, message))
        elif self._batched is not None and msg.qos > 0:  # manual acknowledgements
            self._client.ack(msg.mid, msg.qos)

    # ----------------------------------------------------------------------- public

    def subscribe(
        self,
        topic_filter: str,
        handler: Handler,
        *,
        share_group: str | None = None,
        redeliver_on_error: bool = False,
    ) -> None:
        """Deliver messages matching ``topic_filter`` to ``handler`` (from the network
        thread; keep it quick). Kept across reconnects. With ``share_group`` the client joins
        ``$share/<group>/<filter>``: each message goes to one member of the group (MQTT 5;
        Mosquitto 2.0 also takes it from 3.1.1 clients). Messages carry their real topic, so
        the handler is matched on the plain filter.

        paho acknowledges a QoS 1 message when the handler returns, even if it raised: the
        message is gone. With ``redeliver_on_error`` a handler that raises (its store is
        down) drops the connection before paho can acknowledge, and the broker sends the
        message again after the reconnect: from the session of a persistent client, as a
        retained message to any. For handlers that raise only when they could not keep
        the message; one that always raises on it would have it sent forever."""

        self._route(topic_filter, _Plain(handler, redeliver_on_error), share_group)

    def subscribe_batched(
        self,
        topic_filter: str,
        handler_many: BatchHandler,
        *,
        share_group: str | None = None,
        max_batch: int = 200,
        max_delay_s: float = 0.005,
        inflight: int = 1000,
    ) -> None:
        """Deliver messages matching ``topic_filter`` to ``handler_many`` in batches, from a
        writer thread of this subscription: up to ``max_batch`` messages, those that came
        within ``max_delay_s`` of the first. Each is acknowledged to the broker only after
        ``handler_many`` returned; if it raises, none of the batch is, the connection is
        dropped, and the broker sends them again (from a persistent session; a clean one
        loses them). One per client, made before ``start``: paho's manual acknowledgements
        are client-wide, so from then on this client acknowledges every message itself.

        The broker stops sending at its window of unacknowledged messages: with MQTT 5 the
        Receive Maximum this client asks for at connect (``inflight``; Mosquitto's
        ``max_inflight_messages``, 20 by default, for 3.1.1 clients); batches can fill only
        if it is larger than ``max_batch``. The window bounds the queue: it holds at most
        ``inflight`` messages of the current connection (and some of a lost one), so its
        bound of twice that never blocks paho's thread with a broker that keeps the window.
        Messages of a lost connection are never acknowledged on a later one: a persistent
        session gets them again, so they are skipped; a clean one would not, so they are
        still handed on."""
        if self._started:
            raise MqttError("subscribe_batched must come before start()")
        if self._batched is not None:
            raise MqttError("one batched subscription per client")
        batched = _Batched(handler_many, max_batch, max_delay_s, queue_size=2 * inflight)
        self._batched = batched
        self._receive_maximum = inflight
        self._client.manual_ack_set(True)
        self._route(topic_filter, batched, share_group)

    @property
    def batch_backlog(self) -> int:
        """Messages of the batched subscription received and waiting for its writer (none
        of them acknowledged yet)."""
        return 0 if self._batched is None else self._batched.queue.qsize()

    def _route(self, topic_filter: str, route: _Plain | _Batched, share_group: str | None) -> None:
        wire = topic_filter
        if share_group is not None:
            wire = "/".join(("$share", check_identifier(share_group, "share group"), topic_filter))
        with self._lock:
            self._subs[wire] = None
            self._routes[topic_filter] = route
        if self.connected.is_set():
            self._client.subscribe(wire, qos=1)

    def _write_batches(self, batched: _Batched) -> None:
        """The writer thread of the batched subscription."""
        while (batch := batched.take()) is not None:
            for generation, group in itertools.groupby(batch, key=lambda p: p.generation):
                try:
                    self._hand_on(batched, generation, list(group))
                except Exception:  # the writer must survive anything
                    self.counters.handler_errors += 1
                    log.exception("batched MQTT handler failed")

    def _hand_on(self, batched: _Batched, generation: int, pending: list[_Pending]) -> None:
        stale = generation != self._generation
        if stale and self.settings.persistent_session:
            return  # the broker sends them again in the session
        try:
            batched.handler([p.message for p in pending])
        except Exception:
            if not stale:  # a lost connection is down already
                self._drop_unacknowledged(pending[0].message.topic)
            raise
        with self._ack_lock:
            if generation != self._generation:
                return  # the connection they came on is gone: so are their ids
            for p in pending:
                if p.qos > 0:
                    self._client.ack(p.mid, p.qos)  # queued for paho's thread to write

    def _drop_unacknowledged(self, topic: str) -> None:
        """Shut the connection down from paho's thread, before paho queues the PUBACK: it is
        never sent, paho reconnects (backing off), and the broker sends the message again."""
        self.counters.redeliveries += 1
        log.warning("%s could not take a message on %s: reconnecting", self.client_id, topic)
        sock = self._client.socket()
        if isinstance(sock, socket.socket):  # ssl.SSLSocket too
            with contextlib.suppress(OSError):  # already gone
                sock.shutdown(socket.SHUT_RDWR)

    def publish(self, topic: Topic, payload: bytes) -> paho.MQTTMessageInfo:
        """Queue a message (paho keeps QoS 1 messages in memory until PUBACK)."""
        return self._client.publish(topic.name, payload, qos=topic.qos, retain=topic.retain)

    def publish_wait(self, topic: Topic, payload: bytes, timeout_s: float = 5.0) -> bool:
        """Publish and wait for the broker's acknowledgement; False on timeout."""
        info = self.publish(topic, payload)
        try:
            info.wait_for_publish(timeout=timeout_s)
        except (RuntimeError, ValueError):  # not connected / queue full
            return False
        return info.is_published()

    def start(self, wait_s: float | None = None) -> None:
        """Connect in the background (retrying forever); optionally wait for the first
        connection and the broker's acknowledgement of its subscriptions, and raise
        ``MqttError`` if they do not come in ``wait_s``."""
        host, port, _ = self.settings.host_port
        self._started = True
        batched = self._batched
        if batched is not None and batched.thread is None:
            batched.thread = threading.Thread(
                target=self._write_batches,
                args=(batched,),
                name=f"mqtt-batches-{self.client_id}",
                daemon=True,
            )
            batched.thread.start()
        if self._v5:
            # clean start unless persistent: paho's default (clean on the first connect only)
            # would drop the session a restarted collector comes back for
            persistent = self.settings.persistent_session
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self.settings.session_expiry_s if persistent else 0
            if self._receive_maximum is not None:  # unset: Mosquitto's window of 20
                properties.ReceiveMaximum = self._receive_maximum
            self._client.connect_async(
                host,
                port,
                keepalive=self.settings.keepalive_s,
                clean_start=not persistent,
                properties=properties,
            )
        else:
            self._client.connect_async(host, port, keepalive=self.settings.keepalive_s)
        self._client.loop_start()
        if wait_s is None:
            return
        deadline = time.monotonic() + wait_s
        if not (
            self.connected.wait(wait_s)
            and self.subscribed.wait(max(0.0, deadline - time.monotonic()))
        ):
            self.stop()
            raise MqttError(f"{self.client_id}: no connection to {self.settings.url} in {wait_s}s")

    def stop(self) -> None:
        """Disconnect cleanly (no Last Will) and stop the network thread. A stopped client
        is done with: make a new one to connect again."""
        try:
            batched = self._batched
            if batched is not None and batched.thread is not None:
                # the writer hands on what came before this and acknowledges it before the
                # goodbye; what comes after stays unacknowledged, and the broker keeps it
                with contextlib.suppress(queue.Full):
                    batched.queue.put(None, timeout=1.0)
                    batched.thread.join(timeout=10.0)
            self._client.disconnect()
        finally:
            self._client.loop_stop()
            self.connected.clear()
            self.subscribed.clear()
            # closes every socket, paho's wake-up pair included, which paho otherwise leaves
            # to its __del__: in a reference cycle the collector may finalise the sockets
            # first, and they warn as unclosed
            self._client.reinitialise(self.client_id)
