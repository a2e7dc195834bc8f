"""What the device's two on-disk queues (the telemetry outbox, the capture spool) share: a
SQLite file in WAL mode opened for use from several threads, and the rule that keeps one
within its bounds by dropping its oldest rows. Each queue keeps its own table and its own
idea of what a row is."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_queue(path: Path, schema: str, table: str) -> tuple[sqlite3.Connection, int, int]:
    """The database at ``path`` (created with ``schema``), in autocommit mode (callers
    open their own transactions), WAL with ``synchronous=NORMAL`` (a committed row survives
    ``kill -9``; a power cut may lose the last ones), and ``table``'s row count and total
    ``size``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(schema)
    rows, size = db.execute(f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM {table}").fetchone()
    return db, int(rows), int(size)


def drop_oldest(
    db: sqlite3.Connection,
    table: str,
    key: str,
    rows: int,
    size: int,
    max_rows: int,
    max_bytes: int,
) -> tuple[int, int, int]:
    """Inside the caller's transaction: delete the oldest rows (lowest ``key``) while more
    than ``max_rows`` or, keeping at least one, more than ``max_bytes``. Returns the rows,
    bytes and drops after."""
    dropped = 0
    while rows > max_rows or (size > max_bytes and rows > 1):
        oldest, old_size = db.execute(
            f"SELECT {key}, size FROM {table} ORDER BY {key} LIMIT 1"
        ).fetchone()
        db.execute(f"DELETE FROM {table} WHERE {key}=?", (oldest,))
        rows, size, dropped = rows - 1, size - int(old_size), dropped + 1
    return rows, size, dropped
