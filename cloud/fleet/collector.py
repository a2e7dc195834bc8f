"""The telemetry collector: every device topic of a fleet into the fleet store.

It validates every payload with the shared schemas. A malformed, oversized or unexpected
message is counted (per kind of problem) and logged at most once per device per
``log_interval_s``; it never stops the collector. Telemetry is stored once per
(device, session, seq): at-least-once delivery from the agents' outboxes becomes
exactly-once here. A message's ``shadow`` and ``audit`` sections (a shadow candidate's
agreement, the audit of confident answers) are stored beside it, in the same transaction and
only when the message itself was new, so the sums a rollout's gate reads
(``cloud/fleet/gate.py``) count each interval once. Old telemetry is deleted after
``retention_days``.

Several instances of the cloud split a fleet's telemetry through a shared subscription
(``share_group``): the broker hands each message to one of them, and the store's key on
(device, session, seq) keeps a redelivered message (an instance killed before its PUBACK)
stored once across all of them. Telemetry comes in batches (``MqttClient.subscribe_batched``):
one transaction per batch (``record_telemetry_many``: one commit instead of one per message,
the difference between ~675 and thousands of messages/s on PostgreSQL with fsync), and a
message is acknowledged to the broker only once its batch is stored. A store that cannot
take a batch now raises: nothing of it is acknowledged, the client drops the connection, and
the broker sends it all again (counted ``store_unavailable``, once per batch). A batch the
store refuses is stored message by message, and each one it refuses for good is counted
``unstorable`` and dropped. Invalid messages are counted and acknowledged: they never become
valid.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

from pydantic import ValidationError

from cloud.fleet.listener import FleetListener, store_unavailable
from cloud.fleet.store import FleetStore
from shared import topics
from shared.mqtt import MqttClient, Received
from shared.telemetry import MAX_TELEMETRY_BYTES, Telemetry

log = logging.getLogger(__name__)


class Collector:
    def __init__(
        self,
        store: FleetStore,
        fleet: str,
        *,
        retention_days: float = 30.0,
        log_interval_s: float = 60.0,
        share_group: str | None = None,
        max_batch: int = 200,
    ) -> None:
        self.store = store
        self.fleet = fleet
        self.retention_days = retention_days
        self.log_interval_s = log_interval_s
        self.share_group = share_group
        self.max_batch = max_batch
        self.listener = FleetListener(store, fleet)
        self.counts: Counter[str] = Counter()  # stored, duplicate, malformed, oversized, ...
        self.batches = 0  # record_telemetry_many calls that went through
        self._logged: dict[str, float] = {}
        self._lock = threading.Lock()
        self._last_expiry = 0.0

    def attach(self, mqtt: MqttClient) -> None:
        self.listener.attach(mqtt)
        mqtt.subscribe_batched(
            topics.fleet_device_filter(self.fleet, "telemetry"),
            self._on_batch,
            share_group=self.share_group,
            max_batch=self.max_batch,
            # the broker's window of unacknowledged messages (MQTT 5 Receive Maximum): wide
            # enough for several full batches, so the next one fills while one is stored
            inflight=5 * self.max_batch,
        )

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def _complain(self, device: str, what: str, detail: str) -> None:
        self._count(what)
        now = time.monotonic()
        key = f"{device}:{what}"
        if now - self._logged.get(key, -1e9) >= self.log_interval_s:
            self._logged[key] = now
            log.warning(
                "%s telemetry from %s: %s (further ones counted, not logged)", what, device, detail
            )

    def _valid(self, topic: str, payload: bytes) -> Telemetry | None:
        """The message, or None (counted and logged) if it can never be stored."""
        parsed = topics.parse_device(topic)
        if parsed is None or parsed.leaf != "telemetry":
            self._complain("?", "unexpected", topic)
            return None
        if len(payload) > MAX_TELEMETRY_BYTES:
            self._complain(parsed.device, "oversized", f"{len(payload)} bytes")
            return None
        try:
            message = Telemetry.model_validate_json(payload)
        except ValidationError as exc:
            self._complain(parsed.device, "malformed", str(exc.errors()[:1]))
            return None
        if message.device != parsed.device:
            self._complain(parsed.device, "unexpected", f"claims to be {message.device}")
            return None
        return message

    def _on_batch(self, received: Sequence[Received]) -> None:
        """Store a batch (from the client's writer thread); raise if the store cannot take it
        now, so that none of it is acknowledged."""
        messages = [m for r in received if (m := self._valid(r.topic, r.payload)) is not None]
        if not messages:
            return
        try:
            stored = self.store.record_telemetry_many(self.fleet, messages)
        except Exception as exc:
            if store_unavailable(exc):
                self._count("store_unavailable")
                raise  # not acknowledged: sent again after the reconnect
            stored = self._one_by_one(messages)  # find the ones it refuses
        with self._lock:
            self.counts["stored"] += sum(stored)
            self.counts["duplicate"] += len(stored) - sum(stored)
            self.batches += 1
        try:
            self._expire()
        except Exception:  # the messages are stored: retention tries again in a minute
            log.exception("retention failed")

    def _one_by_one(self, messages: list[Telemetry]) -> list[bool]:
        """After the store refused a batch: each message alone; those it refuses for good
        are counted ``unstorable`` and left out."""
        stored: list[bool] = []
        for message in messages:
            try:
                stored.append(self.store.record_telemetry(self.fleet, message))
            except Exception as exc:
                if store_unavailable(exc):
                    self._count("store_unavailable")
                    raise
                self._complain(message.device, "unstorable", f"{type(exc).__name__}: {exc}")
        return stored

    def _expire(self) -> None:
        now = time.monotonic()
        if now - self._last_expiry < 60.0:
            return
        self._last_expiry = now
        cutoff = datetime.now(timezone.utc) - timedelta(days=self.retention_days)
        removed = self.store.expire_telemetry(cutoff.isoformat())
        if removed:
            log.info("retention: removed %d telemetry rows older than %s", removed, cutoff)
        removed = self.store.expire_stats(cutoff.isoformat())
        if removed:
            log.info("retention: removed %d shadow and audit rows older than %s", removed, cutoff)

    @property
    def malformed_total(self) -> int:
        return self.listener.malformed + sum(
            self.counts[k] for k in ("malformed", "oversized", "unexpected")
        )
