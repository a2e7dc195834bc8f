"""``FleetListener``: keeps the fleet store current from the devices' retained ``status``
and ``update`` topics. The collector and the rollout controller each attach one to their
MQTT connection.

Not through a shared subscription, unlike telemetry: every instance takes every status and
job report. MQTT 5 sends no retained messages to a shared subscription (Mosquitto 2.0 does,
other brokers do not), and the retained ones are how a new instance or database learns the
fleet; the writes are idempotent upserts, and these topics are few next to telemetry.

A store that cannot take a message now (``store_unavailable``: its database is down or
locked) raises into ``MqttClient``, which drops the connection before the message is
acknowledged, so the broker sends it again; a message the store refuses for good is counted
and dropped, so that it cannot come back forever."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from cloud.fleet.store import FleetStore
from shared import topics
from shared.mqtt import MqttClient
from shared.status import DeviceStatus
from shared.update import UpdateReport

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


def store_unavailable(exc: BaseException) -> bool:
    """Whether a store error may pass: DB-API's ``OperationalError`` (sqlite3's and
    psycopg's: locked, connection lost, server gone), also as the cause of a store error.
    Others (a value the database refuses) would fail again on every delivery."""
    seen: BaseException | None = exc
    while seen is not None:
        if any(c.__name__ == "OperationalError" for c in type(seen).__mro__):
            return True
        seen = seen.__cause__
    return False


class FleetListener:
    """Keeps the fleet store current from the retained ``status`` and ``update`` topics.
    Malformed payloads are counted and logged, never raised into paho's thread."""

    def __init__(self, store: FleetStore, fleet: str) -> None:
        self.store = store
        self.fleet = fleet
        self.malformed = 0
        self.unstorable = 0

    def attach(self, mqtt: MqttClient) -> None:
        mqtt.subscribe(
            topics.fleet_device_filter(self.fleet, "status"),
            lambda t, p, r: self._take(t, p, DeviceStatus, self.store.record_status),
            redeliver_on_error=True,
        )
        mqtt.subscribe(
            topics.fleet_device_filter(self.fleet, "update"),
            lambda t, p, r: self._take(t, p, UpdateReport, self.store.record_job),
            redeliver_on_error=True,
        )

    def _take(
        self, topic: str, payload: bytes, kind: type[M], record: Callable[[str, M], None]
    ) -> None:
        if not payload:  # a cleared retained message
            return
        try:
            message = kind.model_validate_json(payload)
        except ValidationError as exc:
            self.malformed += 1
            log.warning("malformed %s on %s: %s", kind.__name__, topic, exc.errors()[:1])
            return
        try:
            record(self.fleet, message)
        except Exception as exc:
            if store_unavailable(exc):
                raise  # sent again after the reconnect
            self.unstorable += 1
            log.exception("the store refused %s from %s", kind.__name__, topic)
