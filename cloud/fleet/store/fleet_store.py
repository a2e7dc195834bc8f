"""``FleetStore``: the fleet's state (devices from their births, update jobs from their
reports, telemetry, rollouts so that a controller restarted mid-rollout carries on where it
stopped, and leases so that one controller acts at a time across instances) on SQLite or
PostgreSQL, with the same SQL on both.

Each method is one statement where it can be (ingest above all: ``record_telemetry`` is one
INSERT, a trigger marks the device seen), so that it is atomic across instances without
locks held in Python. Times the store writes are its clock's, ISO-8601 in UTC with
microseconds (fixed width: they sort as text).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cloud.fleet.store.backend import (
    Backend,
    Dialect,
    SqliteBackend,
    Transaction,
    first_of_each,
    insert_new_sql,
)
from cloud.fleet.store.schema import migrate
from shared.status import DeviceStatus
from shared.telemetry import Telemetry
from shared.update import UpdateReport, UpdateState

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
SQLITE_SCHEME = "sqlite://"


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime) -> str:
    """The one text form of a time in the store: UTC, microseconds always (fixed width), so
    that text order is time order in SQL. ``isoformat()`` drops a zero fraction (one instant,
    two spellings that compare unequal) and keeps a device's UTC offset. Naive times are
    taken as UTC."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _finite(value: float | None) -> float | None:
    return None if value is None or value == float("inf") else value


@dataclass(frozen=True)
class Rollout:
    id: int
    fleet: str
    model: str
    version: int
    target_kind: str  # fleet | group | devices
    target: str | None  # group name, or comma-separated devices
    canary: str  # "2" or "10%"
    waves: int
    max_failure_rate: float
    wave_timeout_s: float
    state: str  # PLANNED | RUNNING | COMPLETED | ABORTED
    current_wave: int
    wave_started: str | None
    detail: str
    # the shadow phase and its gate (cloud/fleet/gate.py); phase: shadow | waves
    shadow: bool = False
    gate_min_samples: int = 300
    gate_margin: float = 0.02
    shadow_timeout_s: float = 3600.0
    phase: str = "waves"
    shadow_started: str | None = None
    gate: str | None = None  # the gate's last decision acted on (GateDecision, JSON)


#: what ``update_rollout`` may set (the names go into SQL)
_ROLLOUT_FIELDS = frozenset(f.name for f in fields(Rollout)) - {"id", "fleet"}

_TELEMETRY_COLUMNS = (
    *("fleet", "device", "session", "seq", "ts", "received", "requests", "edge", "cloud"),
    *("errors", "offload_rate", "p50_ms", "p95_ms", "p99_ms", "local_p50_ms", "cloud_p50_ms"),
    *("rss_bytes", "cpu_temp_c", "dropped", "body"),
)
_TELEMETRY_KEY = ("fleet", "device", "session", "seq")
_INSERT_TELEMETRY = insert_new_sql("telemetry", _TELEMETRY_COLUMNS, _TELEMETRY_KEY)
#: Rows per INSERT of telemetry carrying shadow or audit sections on PostgreSQL, and of
#: their stats rows (as ``postgres.INSERT_ROWS``: psycopg caches the parse of short
#: statements only).
_RETURNING_ROWS = 40

_SHADOW_COLUMNS = (
    *("fleet", "device", "session", "seq", "ts", "received", "model", "version"),
    *("serving_version", "samples", "agree_serving", "labelled", "agree_cloud"),
    *("serving_agree_cloud", "shadow_only_right", "serving_only_right", "would_escalate"),
    "dropped",
)
_AUDIT_COLUMNS = (
    *("fleet", "device", "session", "seq", "ts", "received", "model", "version"),
    *("audited", "wrong", "epsilon", "delta"),
)


def _serving_version(t: Telemetry, model: str) -> int | None:
    """The version serving ``model`` when ``t`` was sent (its first model if none is
    named so)."""
    for m in t.models:
        if m.model == model:
            return m.version
    return t.models[0].version if t.models else None


def _backend(target: Path | str, pool_size: int) -> Backend:
    """A ``Path`` or a plain string is a SQLite file (as before URLs); ``sqlite://PATH``
    (``sqlite:///var/lib/fleet.db`` is absolute) and ``postgresql://...`` are URLs."""
    if isinstance(target, str) and target.startswith(POSTGRES_SCHEMES):
        from cloud.fleet.store.postgres import PostgresBackend

        return PostgresBackend(target, pool_size)
    if isinstance(target, str) and target.startswith(SQLITE_SCHEME):
        rest = target[len(SQLITE_SCHEME) :]
        return SqliteBackend(rest if rest == ":memory:" else Path(rest))
    return SqliteBackend(target)


class FleetStore:
    """The fleet's state. ``clock`` is for tests (lease expiry without waiting)."""

    def __init__(
        self,
        target: Path | str,
        *,
        clock: Callable[[], datetime] = _utc_now,
        pool_size: int = 4,
    ) -> None:
        self._db = _backend(target, pool_size)
        self._clock = clock
        try:
            self.schema_version = migrate(self._db)
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    def _now(self) -> str:
        return _iso(self._clock())

    # ---------------------------------------------------- SQL for read-side queries

    @property
    def dialect(self) -> Dialect:
        return self._db.dialect

    def query(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> list[dict[str, Any]]:
        """Rows as dicts; ``?`` placeholders on both engines."""
        return self._db.query(sql, args)

    def execute(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> int:
        """One statement, committed; the rows it affected."""
        return self._db.execute(sql, args)

    def epoch_sql(self, column: str) -> str:
        """SQL for the seconds since the epoch (a float) of an ISO-8601 text column."""
        return self._db.epoch_sql(column)

    # -------------------------------------------------------------------- devices

    def record_status(self, fleet: str, status: DeviceStatus) -> None:
        models = json.dumps([m.model_dump() for m in status.models])
        self._db.execute(
            "INSERT INTO devices (fleet, device, grp, state, agent_version, session, models,"
            " last_seen) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (fleet, device) DO UPDATE SET"
            " grp=excluded.grp, state=excluded.state, agent_version=excluded.agent_version,"
            " session=excluded.session, models=CASE WHEN excluded.models='[]' THEN devices.models"
            " ELSE excluded.models END, last_seen=excluded.last_seen",
            (
                fleet,
                status.device,
                status.group,
                status.state,
                status.agent_version,
                status.session,
                models,
                self._now(),
            ),
        )

    def devices(self, fleet: str, group: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM devices WHERE fleet=?"
        args: tuple[Any, ...] = (fleet,)
        if group is not None:
            sql += " AND grp=?"
            args += (group,)
        out = []
        for d in self._db.query(sql + " ORDER BY device", args):
            d["models"] = json.loads(d["models"])
            d["group"] = d.pop("grp")
            out.append(d)
        return out

    def groups(self, fleet: str) -> list[str]:
        rows = self._db.query(
            "SELECT DISTINCT grp FROM devices WHERE fleet=? AND grp IS NOT NULL", (fleet,)
        )
        return sorted(r["grp"] for r in rows)

    # ------------------------------------------------------------------------ jobs

    def record_job(self, fleet: str, report: UpdateReport) -> None:
        self._db.execute(
            "INSERT INTO jobs (fleet, device, model, version, state, reason, ts)"
            " VALUES (?,?,?,?,?,?,?) ON CONFLICT (fleet, device, model, version)"
            " DO UPDATE SET state=excluded.state, reason=excluded.reason, ts=excluded.ts"
            " WHERE excluded.ts >= jobs.ts",
            (
                fleet,
                report.device,
                report.model,
                report.version,
                report.state.value,
                report.reason,
                _iso(report.ts),
            ),
        )

    def job_states(
        self, fleet: str, model: str, version: int
    ) -> dict[str, tuple[UpdateState, str]]:
        rows = self._db.query(
            "SELECT device, state, reason FROM jobs WHERE fleet=? AND model=? AND version=?",
            (fleet, model, version),
        )
        return {r["device"]: (UpdateState(r["state"]), r["reason"]) for r in rows}

    def latest_jobs(self, fleet: str) -> dict[str, dict[str, Any]]:
        """Each device's most recent job report (any model)."""
        rows = self._db.query("SELECT * FROM jobs WHERE fleet=? ORDER BY ts", (fleet,))
        return {r["device"]: r for r in rows}

    # ------------------------------------------------------------------- telemetry

    def record_telemetry(self, fleet: str, t: Telemetry) -> bool:
        """Store one message; False if (device, session, seq) was already stored (by this
        instance or another). One statement: the ``telemetry_seen`` trigger marks the
        device seen (a message with shadow or audit figures: as ``record_telemetry_many``)."""
        if t.shadow is not None or t.audit is not None:
            return self.record_telemetry_many(fleet, [t])[0]
        return bool(self._db.execute(_INSERT_TELEMETRY, self._telemetry_row(fleet, t)))

    def record_telemetry_many(self, fleet: str, messages: Sequence[Telemetry]) -> list[bool]:
        """Store several messages in one transaction (one commit; on PostgreSQL one round
        trip): for each, whether it was new, as ``record_telemetry`` says. For a collector
        that drains what arrived since its last write, which a busy broker makes many.

        A message's ``shadow`` and ``audit`` sections go into ``shadow_stats`` and
        ``audit_stats`` in the same transaction, only for the messages that were new: a
        redelivered message adds nothing to the sums a rollout's gate reads."""
        rows = [self._telemetry_row(fleet, t) for t in messages]
        if all(t.shadow is None and t.audit is None for t in messages):
            return self._db.insert_new("telemetry", _TELEMETRY_COLUMNS, _TELEMETRY_KEY, rows)
        with self._db.transaction() as tx:
            new = self._insert_new_in(tx, rows)
            shadow, audit = [], []
            for t, row, stored in zip(messages, rows, new):
                if not stored:
                    continue
                head = row[:6]  # fleet, device, session, seq, ts, received
                if t.shadow is not None:
                    s = t.shadow
                    shadow.append(
                        (
                            *head,
                            s.model,
                            s.version,
                            _serving_version(t, s.model),
                            s.samples,
                            s.agree_serving,
                            s.labelled,
                            s.agree_cloud,
                            s.serving_agree_cloud,
                            s.shadow_only_right,
                            s.serving_only_right,
                            s.would_escalate,
                            s.dropped,
                        )
                    )
                if t.audit is not None:
                    a = t.audit
                    audit.append(
                        (*head, a.model, a.version, a.audited, a.wrong, a.epsilon, a.delta)
                    )
            for table, columns, stats in (
                ("shadow_stats", _SHADOW_COLUMNS, shadow),
                ("audit_stats", _AUDIT_COLUMNS, audit),
            ):
                for at in range(0, len(stats), _RETURNING_ROWS):  # a few rows per statement
                    part = stats[at : at + _RETURNING_ROWS]
                    sql = insert_new_sql(table, columns, _TELEMETRY_KEY, len(part))
                    tx.execute(sql, [v for row in part for v in row])
        return new

    def _insert_new_in(self, tx: Transaction, rows: list[tuple[Any, ...]]) -> list[bool]:
        """``Backend.insert_new`` of telemetry rows inside ``tx``: row by row on SQLite, a
        few rows per INSERT returning the keys stored on PostgreSQL."""
        if self._db.dialect == "sqlite":
            return [bool(tx.execute(_INSERT_TELEMETRY, row)) for row in rows]
        at_key = [_TELEMETRY_COLUMNS.index(k) for k in _TELEMETRY_KEY]
        keys = first_of_each(rows, at_key)
        stored: set[tuple[Any, ...]] = set()
        for at in range(0, len(rows), _RETURNING_ROWS):
            part = rows[at : at + _RETURNING_ROWS]
            sql = insert_new_sql("telemetry", _TELEMETRY_COLUMNS, _TELEMETRY_KEY, len(part))
            returned = tx.query(
                f"{sql} RETURNING {', '.join(_TELEMETRY_KEY)}", [v for row in part for v in row]
            )
            stored.update(tuple(r[k] for k in _TELEMETRY_KEY) for r in returned)
        return [k is not None and k in stored for k in keys]

    def _telemetry_row(self, fleet: str, t: Telemetry) -> tuple[Any, ...]:
        total = t.latency_total
        return (
            fleet,
            t.device,
            t.session,
            t.seq,
            _iso(t.ts),
            self._now(),
            t.requests,
            t.routes.get("edge", 0),
            t.routes.get("cloud", 0),
            t.errors,
            t.offload_rate,
            _finite(total.quantile(0.5)),
            _finite(total.quantile(0.95)),
            _finite(total.quantile(0.99)),
            _finite(t.latency_local.quantile(0.5)),
            _finite(t.latency_cloud.quantile(0.5)),
            t.rss_bytes,
            t.cpu_temp_c,
            t.outbox.dropped if t.outbox else None,
            t.model_dump_json(),
        )

    def telemetry_seqs(self, fleet: str, device: str, session: int) -> list[int]:
        rows = self._db.query(
            "SELECT seq FROM telemetry WHERE fleet=? AND device=? AND session=? ORDER BY seq",
            (fleet, device, session),
        )
        return [int(r["seq"]) for r in rows]

    def series(
        self, fleet: str, device: str | None = None, since: str | None = None, limit: int = 2000
    ) -> list[dict[str, Any]]:
        """Telemetry rows (without the body), oldest first."""
        sql = (
            "SELECT device, session, seq, ts, requests, edge, cloud, errors, offload_rate,"
            " p50_ms, p95_ms, p99_ms, local_p50_ms, cloud_p50_ms, rss_bytes, cpu_temp_c,"
            " dropped FROM telemetry WHERE fleet=?"
        )
        args: tuple[Any, ...] = (fleet,)
        if device is not None:
            sql += " AND device=?"
            args += (device,)
        if since is not None:
            sql += " AND ts>=?"
            args += (since,)
        rows = self._db.query(sql + " ORDER BY ts DESC LIMIT ?", (*args, limit))
        return rows[::-1]

    def latest_telemetry(self, fleet: str) -> dict[str, dict[str, Any]]:
        rows = self._db.query(
            "SELECT t.* FROM telemetry t JOIN (SELECT device, MAX(ts) AS ts FROM telemetry"
            " WHERE fleet=? GROUP BY device) m ON t.device=m.device AND t.ts=m.ts"
            " WHERE t.fleet=?",
            (fleet, fleet),
        )
        out = {}
        for d in rows:
            d.pop("body")
            out[d["device"]] = d
        return out

    def expire_telemetry(self, older_than: str | datetime, batch: int = 5000) -> int:
        """Retention: delete telemetry with ``ts`` before ``older_than`` (every fleet), in
        batches of ``batch`` rows, each its own short statement, so that ingest (and, on
        PostgreSQL, the other instances) goes on between them. The rows deleted."""
        return self._expire("telemetry", older_than, batch)

    def expire_stats(self, older_than: str | datetime, batch: int = 5000) -> int:
        """Retention of the shadow and audit stats stored with telemetry, as
        ``expire_telemetry`` (the collector runs both). The rows deleted."""
        return sum(
            self._expire(table, older_than, batch) for table in ("shadow_stats", "audit_stats")
        )

    def _expire(self, table: str, older_than: str | datetime, batch: int) -> int:
        if batch <= 0:
            raise ValueError("batch must be positive")
        if isinstance(older_than, str):
            older_than = datetime.fromisoformat(older_than)
        cutoff = _iso(older_than)
        sql = self._db.batch_delete_sql(table, "ts < ?")
        total = 0
        while True:
            n = self._db.execute(sql, (cutoff, batch))
            total += n
            if n < batch:
                return total

    # -------------------------------------------------------------------- rollouts

    def create_rollout(
        self,
        fleet: str,
        model: str,
        version: int,
        target_kind: str,
        target: str | None,
        canary: str,
        waves: int,
        max_failure_rate: float,
        wave_timeout_s: float,
        *,
        shadow: bool = False,
        gate_min_samples: int = 300,
        gate_margin: float = 0.02,
        shadow_timeout_s: float = 3600.0,
    ) -> int:
        """A PLANNED rollout; with ``shadow``, it starts in the shadow phase."""
        now = self._now()
        return self._db.insert(
            "INSERT INTO rollouts (fleet, model, version, target_kind, target, canary, waves,"
            " max_failure_rate, wave_timeout_s, state, shadow, gate_min_samples, gate_margin,"
            " shadow_timeout_s, phase, created, updated)"
            " VALUES (?,?,?,?,?,?,?,?,?,'PLANNED',?,?,?,?,?,?,?)",
            (
                fleet,
                model,
                version,
                target_kind,
                target,
                canary,
                waves,
                max_failure_rate,
                wave_timeout_s,
                int(shadow),
                gate_min_samples,
                gate_margin,
                shadow_timeout_s,
                "shadow" if shadow else "waves",
                now,
                now,
            ),
            key="id",
        )

    def rollout(self, rollout_id: int) -> Rollout:
        rows = self._db.query("SELECT * FROM rollouts WHERE id=?", (rollout_id,))
        if not rows:
            raise KeyError(f"no rollout {rollout_id}")
        return self._rollout(rows[0])

    @staticmethod
    def _rollout(row: dict[str, Any]) -> Rollout:
        row.pop("created")
        row.pop("updated")
        row["shadow"] = bool(row["shadow"])
        return Rollout(**row)

    def rollouts(self, fleet: str) -> list[Rollout]:
        rows = self._db.query("SELECT * FROM rollouts WHERE fleet=? ORDER BY id", (fleet,))
        return [self._rollout(r) for r in rows]

    def unfinished_rollout(self, fleet: str, model: str, version: int) -> Rollout | None:
        rows = self._db.query(
            "SELECT * FROM rollouts WHERE fleet=? AND model=? AND version=?"
            " AND state IN ('PLANNED','RUNNING') ORDER BY id DESC LIMIT 1",
            (fleet, model, version),
        )
        return self._rollout(rows[0]) if rows else None

    def update_rollout(self, rollout_id: int, **values: Any) -> None:
        unknown = set(values) - _ROLLOUT_FIELDS
        if unknown:
            raise ValueError(f"not a rollout field: {', '.join(sorted(unknown))}")
        if "shadow" in values:
            values["shadow"] = int(values["shadow"])
        cols = ", ".join(f"{k}=?" for k in values)
        self._db.execute(
            f"UPDATE rollouts SET {cols}, updated=? WHERE id=?",
            (*values.values(), self._now(), rollout_id),
        )

    def plan_waves(self, rollout_id: int, waves: list[list[str]]) -> None:
        """All of a rollout's waves at once (a controller that dies midway leaves none)."""
        with self._db.transaction() as tx:
            tx.execute_many(
                "INSERT INTO rollout_devices (rollout, wave, device) VALUES (?,?,?)"
                " ON CONFLICT (rollout, device) DO NOTHING",
                [(rollout_id, i, d) for i, wave in enumerate(waves) for d in wave],
            )

    def waves(self, rollout_id: int) -> list[list[tuple[str, bool]]]:
        rows = self._db.query(
            "SELECT wave, device, published FROM rollout_devices WHERE rollout=? ORDER BY wave,"
            " device",
            (rollout_id,),
        )
        out: list[list[tuple[str, bool]]] = []
        for r in rows:
            while len(out) <= r["wave"]:
                out.append([])
            out[r["wave"]].append((r["device"], bool(r["published"])))
        return out

    def mark_published(self, rollout_id: int, device: str) -> None:
        self._db.execute(
            "UPDATE rollout_devices SET published=1 WHERE rollout=? AND device=?",
            (rollout_id, device),
        )

    # ---------------------------------------------------------------------- leases

    def try_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take the lease ``name`` for ``ttl_s`` seconds if it is free or expired, or renew
        it if ``holder`` has it; True if ``holder`` holds it now. One conditional upsert:
        of instances asking at once, exactly one wins (SQLite writes one at a time;
        PostgreSQL's ``ON CONFLICT DO UPDATE`` locks the row and re-checks the condition).
        Expiry is by the callers' clocks: instances on several hosts need them in sync
        (NTP) to within a small part of ``ttl_s``."""
        if ttl_s <= 0:
            raise ValueError("a lease's time to live must be positive")
        now = self._clock()
        return bool(
            self._db.execute(
                "INSERT INTO leases (name, holder, expires) VALUES (?,?,?)"
                " ON CONFLICT (name) DO UPDATE SET holder=excluded.holder,"
                " expires=excluded.expires"
                " WHERE leases.holder=excluded.holder OR leases.expires<?",
                (name, holder, _iso(now + timedelta(seconds=ttl_s)), _iso(now)),
            )
        )

    def release_lease(self, name: str, holder: str) -> None:
        """Free the lease at once, if ``holder`` has it (another's is left alone)."""
        self._db.execute("DELETE FROM leases WHERE name=? AND holder=?", (name, holder))

    def lease_holder(self, name: str) -> str | None:
        """Who holds the lease now (None: free or expired)."""
        rows = self._db.query(
            "SELECT holder FROM leases WHERE name=? AND expires>=?", (name, self._now())
        )
        return str(rows[0]["holder"]) if rows else None
