"""The fleet's state in SQLite: devices (from their births), update jobs (from their reports),
and rollouts (so a controller restarted mid-rollout carries on where it stopped).

One connection per store, guarded by a lock: writes come from paho's thread and from the
controller's loop. WAL mode, so readers (``fleet status``, the API) never wait for writers.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from shared.status import DeviceStatus
from shared.telemetry import Telemetry
from shared.update import UpdateReport, UpdateState

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    fleet TEXT NOT NULL, device TEXT NOT NULL, grp TEXT, state TEXT NOT NULL,
    agent_version TEXT, session INTEGER, models TEXT NOT NULL DEFAULT '[]',
    last_seen TEXT NOT NULL, PRIMARY KEY (fleet, device));
CREATE TABLE IF NOT EXISTS jobs (
    fleet TEXT NOT NULL, device TEXT NOT NULL, model TEXT NOT NULL, version INTEGER NOT NULL,
    state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', ts TEXT NOT NULL,
    PRIMARY KEY (fleet, device, model, version));
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, fleet TEXT NOT NULL, model TEXT NOT NULL,
    version INTEGER NOT NULL, target_kind TEXT NOT NULL, target TEXT,
    canary TEXT NOT NULL, waves INTEGER NOT NULL, max_failure_rate REAL NOT NULL,
    wave_timeout_s REAL NOT NULL, state TEXT NOT NULL, current_wave INTEGER NOT NULL DEFAULT 0,
    wave_started TEXT, detail TEXT NOT NULL DEFAULT '', created TEXT NOT NULL,
    updated TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS telemetry (
    fleet TEXT NOT NULL, device TEXT NOT NULL, session INTEGER NOT NULL, seq INTEGER NOT NULL,
    ts TEXT NOT NULL, received TEXT NOT NULL, requests INTEGER NOT NULL, edge INTEGER NOT NULL,
    cloud INTEGER NOT NULL, errors INTEGER NOT NULL, offload_rate REAL NOT NULL,
    p50_ms REAL, p95_ms REAL, p99_ms REAL, local_p50_ms REAL, cloud_p50_ms REAL,
    rss_bytes INTEGER, cpu_temp_c REAL, dropped INTEGER, body TEXT NOT NULL,
    PRIMARY KEY (fleet, device, session, seq));
CREATE INDEX IF NOT EXISTS telemetry_ts ON telemetry (fleet, ts);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout INTEGER NOT NULL, wave INTEGER NOT NULL, device TEXT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (rollout, device));
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


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


class FleetStore:
    def __init__(self, path: Path | str) -> None:
        if isinstance(path, Path):
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -------------------------------------------------------------------- devices

    def record_status(self, fleet: str, status: DeviceStatus) -> None:
        models = json.dumps([m.model_dump() for m in status.models])
        self._exec(
            "INSERT INTO devices VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(fleet, device) DO UPDATE SET"
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
                _now(),
            ),
        )

    def devices(self, fleet: str, group: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM devices WHERE fleet=?"
        args: tuple[Any, ...] = (fleet,)
        if group is not None:
            sql += " AND grp=?"
            args += (group,)
        out = []
        for row in self._rows(sql + " ORDER BY device", args):
            d = dict(row)
            d["models"] = json.loads(d["models"])
            d["group"] = d.pop("grp")
            out.append(d)
        return out

    def groups(self, fleet: str) -> list[str]:
        rows = self._rows(
            "SELECT DISTINCT grp FROM devices WHERE fleet=? AND grp IS NOT NULL", (fleet,)
        )
        return sorted(r["grp"] for r in rows)

    # ------------------------------------------------------------------------ jobs

    def record_job(self, fleet: str, report: UpdateReport) -> None:
        self._exec(
            "INSERT INTO jobs VALUES (?,?,?,?,?,?,?) ON CONFLICT(fleet, device, model, version)"
            " DO UPDATE SET state=excluded.state, reason=excluded.reason, ts=excluded.ts"
            " WHERE excluded.ts >= jobs.ts",
            (
                fleet,
                report.device,
                report.model,
                report.version,
                report.state.value,
                report.reason,
                report.ts.isoformat(),
            ),
        )

    def job_states(
        self, fleet: str, model: str, version: int
    ) -> dict[str, tuple[UpdateState, str]]:
        rows = self._rows(
            "SELECT device, state, reason FROM jobs WHERE fleet=? AND model=? AND version=?",
            (fleet, model, version),
        )
        return {r["device"]: (UpdateState(r["state"]), r["reason"]) for r in rows}

    def latest_jobs(self, fleet: str) -> dict[str, dict[str, Any]]:
        """Each device's most recent job report (any model)."""
        rows = self._rows("SELECT * FROM jobs WHERE fleet=? ORDER BY ts", (fleet,))
        return {r["device"]: dict(r) for r in rows}

    # ------------------------------------------------------------------- telemetry

    def record_telemetry(self, fleet: str, t: Telemetry) -> bool:
        """Store one message; False if (device, session, seq) was already stored."""
        total = t.latency_total
        cur = self._exec(
            "INSERT OR IGNORE INTO telemetry VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                fleet,
                t.device,
                t.session,
                t.seq,
                t.ts.isoformat(),
                _now(),
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
            ),
        )
        if cur.rowcount:
            self._exec(
                "UPDATE devices SET last_seen=? WHERE fleet=? AND device=?",
                (_now(), fleet, t.device),
            )
        return bool(cur.rowcount)

    def telemetry_seqs(self, fleet: str, device: str, session: int) -> list[int]:
        rows = self._rows(
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
        rows = self._rows(sql + " ORDER BY ts DESC LIMIT ?", (*args, limit))
        return [dict(r) for r in reversed(rows)]

    def latest_telemetry(self, fleet: str) -> dict[str, dict[str, Any]]:
        rows = self._rows(
            "SELECT t.* FROM telemetry t JOIN (SELECT device, MAX(ts) AS ts FROM telemetry"
            " WHERE fleet=? GROUP BY device) m ON t.device=m.device AND t.ts=m.ts"
            " WHERE t.fleet=?",
            (fleet, fleet),
        )
        out = {}
        for r in rows:
            d = dict(r)
            d.pop("body")
            out[d["device"]] = d
        return out

    def expire_telemetry(self, older_than: str) -> int:
        """Retention: delete telemetry with ``ts`` before ``older_than`` (ISO time)."""
        return self._exec("DELETE FROM telemetry WHERE ts < ?", (older_than,)).rowcount

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
    ) -> int:
        cur = self._exec(
            "INSERT INTO rollouts (fleet, model, version, target_kind, target, canary, waves,"
            " max_failure_rate, wave_timeout_s, state, created, updated)"
            " VALUES (?,?,?,?,?,?,?,?,?,'PLANNED',?,?)",
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
                _now(),
                _now(),
            ),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def rollout(self, rollout_id: int) -> Rollout:
        rows = self._rows("SELECT * FROM rollouts WHERE id=?", (rollout_id,))
        if not rows:
            raise KeyError(f"no rollout {rollout_id}")
        r = dict(rows[0])
        r.pop("created")
        r.pop("updated")
        return Rollout(**r)

    def rollouts(self, fleet: str) -> list[Rollout]:
        ids = self._rows("SELECT id FROM rollouts WHERE fleet=? ORDER BY id", (fleet,))
        return [self.rollout(r["id"]) for r in ids]

    def unfinished_rollout(self, fleet: str, model: str, version: int) -> Rollout | None:
        rows = self._rows(
            "SELECT id FROM rollouts WHERE fleet=? AND model=? AND version=?"
            " AND state IN ('PLANNED','RUNNING') ORDER BY id DESC LIMIT 1",
            (fleet, model, version),
        )
        return self.rollout(rows[0]["id"]) if rows else None

    def update_rollout(self, rollout_id: int, **fields: Any) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        self._exec(
            f"UPDATE rollouts SET {cols}, updated=? WHERE id=?",
            (*fields.values(), _now(), rollout_id),
        )

    def plan_waves(self, rollout_id: int, waves: list[list[str]]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR IGNORE INTO rollout_devices (rollout, wave, device) VALUES (?,?,?)",
                [(rollout_id, i, d) for i, wave in enumerate(waves) for d in wave],
            )
            self._db.execute("COMMIT")

    def waves(self, rollout_id: int) -> list[list[tuple[str, bool]]]:
        rows = self._rows(
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
        self._exec(
            "UPDATE rollout_devices SET published=1 WHERE rollout=? AND device=?",
            (rollout_id, device),
        )
