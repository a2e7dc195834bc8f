"""The capture spool: field samples waiting for upload, in a bounded SQLite file (WAL),
with the outbox's discipline (``agent.device.outbox``): written before anything else
happens to them, deleted only once the cloud has them, the oldest dropped (and counted)
when the byte bound would be passed. It survives restarts and ``kill -9``: what was
committed is uploaded by the next process.

A sample's id (the SHA-256 of its payload) is the primary key: the same input captured
twice is stored once. Each row holds the sample's complete metadata as JSON
(``shared.samples.SampleMeta``, nulls left out) beside its payload bytes; the uploader
makes each batch's compact wire form from them (``shared.samples.encode_upload``).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from agent.device.sqlite_queue import drop_oldest, open_queue

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, meta BLOB NOT NULL,
    payload BLOB NOT NULL, size INTEGER NOT NULL, created REAL NOT NULL);
"""


class Spool:
    def __init__(self, path: Path, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._db, self._rows, self._bytes = open_queue(path, SCHEMA, "samples")
        self._lock = threading.Lock()

    def put(self, sample_id: str, meta: bytes, payload: bytes) -> tuple[bool, int]:
        """Store one sample. Returns (stored, how many of the oldest were dropped to make
        room); not stored when ``sample_id`` is already in the spool."""
        size = len(meta) + len(payload)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO samples (id, meta, payload, size, created)"
                    " VALUES (?,?,?,?,?)",
                    (sample_id, meta, payload, size, time.time()),
                )
                if cur.rowcount == 0:
                    self._db.execute("COMMIT")
                    return False, 0
                rows, total, dropped = drop_oldest(
                    self._db,
                    "samples",
                    "seq",
                    self._rows + 1,
                    self._bytes + size,
                    2**62,
                    self.max_bytes,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._rows, self._bytes = rows, total
        return True, dropped

    def contains(self, sample_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM samples WHERE id=?", (sample_id,)).fetchone()
        return row is not None

    def oldest(self, limit: int) -> list[tuple[str, bytes, bytes]]:
        """Up to ``limit`` samples, oldest first: (id, meta, payload)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, meta, payload FROM samples ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [(str(i), bytes(m), bytes(p)) for i, m, p in rows]

    def delete(self, ids: list[str]) -> int:
        """Remove samples (uploaded, or refused for good); returns how many were there."""
        removed = 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            for sample_id in ids:
                row = self._db.execute(
                    "DELETE FROM samples WHERE id=? RETURNING size", (sample_id,)
                ).fetchone()
                if row is not None:
                    removed += 1
                    self._rows -= 1
                    self._bytes -= int(row[0])
            self._db.execute("COMMIT")
        return removed

    @property
    def pending(self) -> int:
        return self._rows

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        with self._lock:
            self._db.close()
