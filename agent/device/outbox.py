"""Store-and-forward for telemetry: a bounded SQLite outbox (WAL) and the sender draining it.

Every message is written to the outbox first; a row is deleted only when the broker's PUBACK
for it arrives. After a reconnect the backlog is sent again from the oldest row, at most
``replay_per_s`` messages a second so that a long backlog does not starve live traffic, with
at most ``window`` unacknowledged at a time. When a bound (rows or bytes) is hit, the oldest
rows are dropped and the drop is counted (persisted, and reported in the telemetry itself).
Delivery is at-least-once; consumers deduplicate on (device, session, seq).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from agent.device.sqlite_queue import drop_oldest, open_queue
from shared.mqtt import MqttClient
from shared.topics import Topic

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,
    size INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Outbox:
    def __init__(
        self, path: Path, max_rows: int = 10_000, max_bytes: int = 16 * 1024 * 1024
    ) -> None:
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._db, self._rows, self._bytes = open_queue(path, SCHEMA, "outbox")
        self._lock = threading.Lock()
        row = self._db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()
        self._dropped = int(row[0]) if row else 0
        self._last_warning = -1e9

    def put(self, topic: str, payload: bytes) -> None:
        """Store a message; drop the oldest rows if a bound would be passed."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO outbox (topic, payload, size, created) VALUES (?,?,?,?)",
                (topic, payload, len(payload), time.time()),
            )
            self._rows, self._bytes, dropped = drop_oldest(
                self._db,
                "outbox",
                "id",
                self._rows + 1,
                self._bytes + len(payload),
                self.max_rows,
                self.max_bytes,
            )
            if dropped:
                self._dropped += dropped
                self._db.execute(
                    "INSERT INTO meta VALUES ('dropped', ?) ON CONFLICT(key) DO UPDATE SET"
                    " value = value + excluded.value",
                    (dropped,),
                )
            self._db.execute("COMMIT")
        if dropped and time.monotonic() - self._last_warning > 60.0:
            self._last_warning = time.monotonic()
            log.warning("outbox full: dropping the oldest messages (counted in telemetry)")

    def after(self, last_id: int, limit: int) -> list[tuple[int, str, bytes]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (last_id, limit),
            ).fetchall()
        return [(int(i), str(t), bytes(p)) for i, t, p in rows]

    def delete(self, row_id: int) -> None:
        with self._lock:
            cur = self._db.execute("DELETE FROM outbox WHERE id=? RETURNING size", (row_id,))
            row = cur.fetchone()
            if row is not None:
                self._rows -= 1
                self._bytes -= int(row[0])

    @property
    def pending(self) -> int:
        return self._rows

    @property
    def size_bytes(self) -> int:
        return self._bytes

    @property
    def dropped(self) -> int:
        """Messages dropped because the outbox was full, since it was created (persisted)."""
        return self._dropped

    def close(self) -> None:
        with self._lock:
            self._db.close()


class OutboxSender:
    """Drains an outbox into MQTT (QoS 1), deleting rows on PUBACK. Runs its own thread."""

    def __init__(
        self, outbox: Outbox, mqtt: MqttClient, window: int = 32, replay_per_s: float = 50.0
    ) -> None:
        self.outbox = outbox
        self.mqtt = mqtt
        self.window = window
        self.replay_per_s = replay_per_s
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # mid -> row id
        # PUBACKs that beat us to recording their mid (paho's thread is fast), with the time
        # they came; other publishes' acks land here too and age out
        self._early: dict[int, float] = {}
        self._last_sent = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # called from paho's thread
    def on_ack(self, mid: int) -> None:
        with self._lock:
            row = self._inflight.pop(mid, None)
            if row is None:
                now = time.monotonic()
                self._early[mid] = now
                if len(self._early) > 256:
                    self._early = {m: t for m, t in self._early.items() if now - t < 5.0}
        if row is not None:
            self._acked(row)

    def _acked(self, row: int) -> None:
        self.outbox.delete(row)
        self._wake.set()

    def on_disconnect(self) -> None:
        """Whatever was in flight is sent again after the reconnect (at-least-once)."""
        with self._lock:
            self._inflight.clear()
            self._early.clear()
            self._last_sent = 0

    def notify(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tandem-outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        budget = float(self.window)
        last = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(timeout=0.2)
            self._wake.clear()
            if not self.mqtt.connected.is_set():
                continue
            now = time.monotonic()
            budget = min(float(self.window), budget + (now - last) * self.replay_per_s)
            last = now
            with self._lock:
                room = min(self.window - len(self._inflight), int(budget))
                after = self._last_sent
            if room <= 0:
                continue
            for row_id, topic, payload in self.outbox.after(after, room):
                if not self.mqtt.connected.is_set():
                    break
                info = self.mqtt.publish(Topic(topic, 1, False), payload)
                with self._lock:
                    early = self._early.pop(info.mid, None)
                    if early is None or time.monotonic() - early > 5.0:
                        self._inflight[info.mid] = row_id
                    self._last_sent = max(self._last_sent, row_id)
                if early is not None and time.monotonic() - early <= 5.0:
                    self._acked(row_id)
                budget -= 1
            if self.outbox.pending > len(self._inflight):
                self._wake.set()
