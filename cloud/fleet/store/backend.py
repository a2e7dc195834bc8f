"""The database under the fleet store: a small adapter per engine, so that the store's SQL
is written once.

The store writes standard SQL that SQLite and PostgreSQL both run (``ON CONFLICT ... DO
NOTHING/UPDATE``, ``?`` placeholders); a backend connects, translates placeholders where its
driver wants others, and supplies the few fragments the engines spell differently: an
auto-numbered key, the epoch of an ISO-8601 text timestamp, a batched delete. SQLite's backend
is here (the embedded default, standard library only); PostgreSQL's is in ``postgres``, which
imports psycopg only when a PostgreSQL URL is opened.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol

Dialect = Literal["sqlite", "postgres"]

#: how long a SQLite write waits for another process's to finish
BUSY_TIMEOUT_S = 30.0


class Transaction(Protocol):
    """Statements on one connection, committed together (or not at all)."""

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]: ...

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int: ...

    def execute_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...


def insert_new_sql(table: str, columns: Sequence[str], key: Sequence[str], n_rows: int = 1) -> str:
    """INSERT of ``n_rows`` rows that skips each whose ``key`` is stored already."""
    row = "(" + ",".join("?" * len(columns)) + ")"
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES {','.join([row] * n_rows)}"
        f" ON CONFLICT ({', '.join(key)}) DO NOTHING"
    )


def first_of_each(rows: Sequence[Sequence[Any]], at: Sequence[int]) -> list[tuple[Any, ...] | None]:
    """Each row's key (its values at ``at``), None for a repeat of an earlier row's key."""
    seen: set[tuple[Any, ...]] = set()
    keys: list[tuple[Any, ...] | None] = []
    for row in rows:
        k = tuple(row[i] for i in at)
        keys.append(None if k in seen else k)
        seen.add(k)
    return keys


class Backend(Protocol):
    """One engine. Every method is safe to call from any thread; each statement outside
    ``transaction()`` commits on its own."""

    dialect: Dialect
    #: DDL of an auto-numbered integer primary key column (without the column's name)
    serial_key: str

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]: ...

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Rows affected."""
        ...

    def insert(self, sql: str, args: Sequence[Any], key: str) -> int:
        """Run an INSERT of one row and return its auto-numbered ``key``."""
        ...

    def insert_new(
        self, table: str, columns: Sequence[str], key: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> list[bool]:
        """Insert the rows whose ``key`` is not stored yet, in one transaction; for each row,
        whether it was inserted (of rows repeating a key, the first only)."""
        ...

    def transaction(self, *, exclusive: bool = False) -> Any:
        """A context manager yielding a ``Transaction``; ``exclusive``: holding the
        database's migration lock as well, so that instances starting at once migrate one
        after the other."""
        ...

    def epoch_sql(self, column: str) -> str: ...

    def batch_delete_sql(self, table: str, where: str) -> str:
        """DELETE of at most ``?`` rows of ``table`` matching ``where`` (its own ``?``s come
        first), picked by the engine's row address: no sort, no row-by-row round trips."""
        ...

    def close(self) -> None: ...


class _SqliteTransaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self._db.execute(sql, args)]

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._db.execute(sql, args).rowcount

    def execute_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)


class SqliteBackend:
    """One connection guarded by a lock (paho's thread, the controller and the API's threads
    share it). WAL mode, so readers in other processes (``fleet status``) never wait for
    writers; a busy timeout, so that two processes writing one file take turns."""

    dialect: Dialect = "sqlite"
    serial_key = "INTEGER PRIMARY KEY AUTOINCREMENT"

    def __init__(self, path: Path | str) -> None:
        if isinstance(path, Path):
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            str(path), check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S
        )
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._wal()
            self._db.execute("PRAGMA synchronous=NORMAL")

    def _wal(self) -> None:
        """Switch to WAL. A switch needs the file to itself and SQLite answers "locked" at
        once, without waiting for the busy timeout, while another process opens it at the
        same time: try again until the busy timeout's worth of time has passed."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args)]

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def insert(self, sql: str, args: Sequence[Any], key: str) -> int:
        with self._lock:
            rowid = self._db.execute(sql, args).lastrowid
        assert rowid is not None  # an INSERT of one row into a rowid table
        return rowid

    def insert_new(
        self, table: str, columns: Sequence[str], key: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> list[bool]:
        # row by row in one transaction: in-process calls, one commit (no RETURNING, which
        # would need SQLite 3.35)
        sql = insert_new_sql(table, columns, key)
        with self.transaction() as tx:
            return [bool(tx.execute(sql, row)) for row in rows]

    @contextmanager
    def transaction(self, *, exclusive: bool = False) -> Iterator[Transaction]:
        """``BEGIN IMMEDIATE`` (exclusive or not: SQLite has one writer): the write lock is
        taken at the start, so two processes migrating one file run one after the other
        instead of failing at their first write."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteTransaction(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def epoch_sql(self, column: str) -> str:
        # julianday() reads ISO-8601 with a UTC offset and fractional seconds; unixepoch()
        # would need SQLite 3.38
        return f"((julianday({column}) - 2440587.5) * 86400.0)"

    def batch_delete_sql(self, table: str, where: str) -> str:
        return (
            f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE {where} LIMIT ?)"
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()
