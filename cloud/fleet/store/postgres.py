"""The fleet store's PostgreSQL backend (psycopg 3): the choice when several ``tandem-cloud``
instances share one fleet.

A few autocommit connections in a small pool of its own (psycopg_pool would be one more
package for a dozen lines): paho's thread, the controller and the API's threads each take
one for a statement and give it back, so ingest and reads run side by side. The store's SQL
uses ``?`` placeholders; psycopg wants ``%s`` (and a literal ``%`` doubled), translated once
per distinct statement. Sessions run in UTC, so that ISO-8601 text read as ``timestamptz``
means the same on every instance.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Any, TypeVar

from cloud.fleet.store.backend import Dialect, Transaction, first_of_each, insert_new_sql
from shared.settings_files import SettingsError

if TYPE_CHECKING:
    import psycopg

    _Connection = psycopg.Connection[dict[str, Any]]

_T = TypeVar("_T")
log = logging.getLogger(__name__)

#: Rows per INSERT of ``insert_new``. psycopg caches its parse of a query only up to 4 kB
#: of text: longer ones (more rows) are parsed again at every call, which costs more than
#: the round trips they save (measured: 40 rows ~11,000 msg/s, 500 rows ~7,000).
INSERT_ROWS = 40
#: ``pg_advisory_xact_lock`` key of the schema migrations (any constant; "tandem" in ASCII)
MIGRATION_LOCK = 0x74616E64656D


@lru_cache(maxsize=1024)
def to_psycopg(sql: str) -> str:
    """``?`` placeholders to ``%s``, and ``%`` to ``%%`` (psycopg reads ``%`` everywhere,
    quoted or not); a ``?`` inside a quoted literal or identifier stays."""
    out: list[str] = []
    quote = ""
    for ch in sql:
        if ch == "%":
            out.append("%%")
            continue
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "?":
            out.append("%s")
            continue
        out.append(ch)
    return "".join(out)


def _args(sql: str, args: Sequence[Any]) -> tuple[str, Sequence[Any] | None]:
    """Without arguments psycopg leaves the text alone (a ``$$`` function body, a ``%``)."""
    return (to_psycopg(sql), args) if args else (sql, None)


class _Pool:
    """Up to ``size`` connections, opened when first needed; one is given back only if it
    is idle and healthy (a broken one is closed and replaced on next use). ``connection()``
    also says whether the connection was reused: one that waited in the pool may have been
    cut meanwhile (the server restarted), which only a statement finds out."""

    def __init__(self, url: str, size: int) -> None:
        from psycopg.conninfo import conninfo_to_dict

        self._url = url
        # the URL's own server options (``?options=-c ...``) kept, UTC added
        given = str(conninfo_to_dict(url).get("options") or "")
        self._options = f"{given} -c timezone=UTC".strip()
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[psycopg.Connection[dict[str, Any]]] = []
        self._closed = False

    def _connect(self) -> psycopg.Connection[dict[str, Any]]:
        import psycopg
        from psycopg.rows import dict_row

        try:
            return psycopg.connect(
                self._url, autocommit=True, row_factory=dict_row, options=self._options
            )
        except psycopg.OperationalError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SettingsError(f"cannot connect to the fleet database: {first}") from exc

    @contextmanager
    def connection(self) -> Iterator[tuple[psycopg.Connection[dict[str, Any]], bool]]:
        from psycopg.pq import TransactionStatus

        with self._slots:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the fleet store is closed")
                conn = self._idle.pop() if self._idle else None
            reused = conn is not None and not conn.closed
            if conn is None or not reused:
                conn = self._connect()
            try:
                yield conn, reused
            finally:
                healthy = not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE
                with self._lock:
                    if healthy and not self._closed:
                        self._idle.append(conn)
                        conn = None
                if conn is not None:
                    conn.close()

    def discard_idle(self) -> None:
        """Close the waiting connections (one of them was found cut: so were the others)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.discard_idle()


class _PostgresTransaction:
    def __init__(self, conn: psycopg.Connection[dict[str, Any]]) -> None:
        self._conn = conn

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return self._conn.execute(*_args(sql, args)).fetchall()

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._conn.execute(*_args(sql, args)).rowcount

    def execute_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(to_psycopg(sql), rows)


class PostgresBackend:
    dialect: Dialect = "postgres"
    serial_key = "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"

    def __init__(self, url: str, pool_size: int = 4) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError as exc:
            raise SettingsError(
                "a postgresql:// fleet database needs psycopg: pip install 'tandem[cloud]'"
            ) from exc
        self._pool = _Pool(url, pool_size)

    def _run(self, work: Callable[[_Connection], _T], *, again: bool = True) -> _T:
        """``work`` on a pooled connection; once more on a fresh one if a reused one turns
        out cut (``again``: for statements that may run twice, as all but ``insert``'s do:
        upserts, conditional updates, reads)."""
        import psycopg

        for attempt in range(2):
            with self._pool.connection() as (conn, reused):
                try:
                    return work(conn)
                except psycopg.OperationalError:
                    if attempt or not again or not reused or not conn.broken:
                        raise
                    log.warning("the fleet database connection was cut: reconnecting")
                    self._pool.discard_idle()
        raise AssertionError("unreachable")

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return self._run(lambda conn: conn.execute(*_args(sql, args)).fetchall())

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._run(lambda conn: conn.execute(*_args(sql, args)).rowcount)

    def insert(self, sql: str, args: Sequence[Any], key: str) -> int:
        returning = to_psycopg(f"{sql} RETURNING {key}")
        row = self._run(lambda conn: conn.execute(returning, args).fetchone(), again=False)
        assert row is not None
        return int(row[key])

    def insert_new(
        self, table: str, columns: Sequence[str], key: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> list[bool]:
        """Multi-row INSERTs returning the keys they stored: one round trip per
        ``INSERT_ROWS`` rows, one commit."""
        keys = first_of_each(rows, [columns.index(k) for k in key])

        def work(conn: _Connection) -> set[tuple[Any, ...]]:
            stored: set[tuple[Any, ...]] = set()
            with conn.transaction():
                for at in range(0, len(rows), INSERT_ROWS):
                    part = rows[at : at + INSERT_ROWS]
                    sql = insert_new_sql(table, columns, key, len(part))
                    args = [v for row in part for v in row]
                    returned = conn.execute(to_psycopg(f"{sql} RETURNING {', '.join(key)}"), args)
                    stored.update(tuple(r[k] for k in key) for r in returned.fetchall())
            return stored

        stored = self._run(work)
        return [k is not None and k in stored for k in keys]

    @contextmanager
    def transaction(self, *, exclusive: bool = False) -> Iterator[Transaction]:
        """``exclusive``: holding the migration lock (an advisory lock, freed at the
        transaction's end), so that instances starting at once migrate one after the other,
        each seeing what the previous one committed."""
        with self._pool.connection() as (conn, _), conn.transaction():
            if exclusive:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            yield _PostgresTransaction(conn)

    def epoch_sql(self, column: str) -> str:
        # EXTRACT returns numeric (a Decimal in Python): cast to a float like SQLite's
        return f"CAST(EXTRACT(EPOCH FROM CAST({column} AS TIMESTAMPTZ)) AS DOUBLE PRECISION)"

    def batch_delete_sql(self, table: str, where: str) -> str:
        # = ANY(ARRAY(...)) plans as a TID scan; ctid IN (subquery) would scan the table
        return (
            f"DELETE FROM {table} WHERE ctid = ANY(ARRAY("
            f"SELECT ctid FROM {table} WHERE {where} LIMIT ?))"
        )

    def close(self) -> None:
        self._pool.close()
