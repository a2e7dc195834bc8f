"""Read-side SQL of the fleet API, the dashboard and ``/metrics``: each answer computed by the
database from indexed rows, never by Python over every device or every telemetry row, so
that a fleet of 10,000 costs a page of rows per request.

Written once for both engines through ``FleetStore.query`` (``?`` placeholders); the two
things they spell differently (reading the JSON list of a device's models, rounding down)
are the small helpers below. "A device's latest telemetry" is its message with the highest
(session, seq): the primary key's own order, so finding it is one index lookup per device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from cloud.fleet.gate import GateStats, decide
from cloud.fleet.store import FleetStore
from shared import bounds
from shared.update import UpdateState

FAILED_STATES = tuple(s.value for s in UpdateState if s.failure)

#: The columns of a device row in the API, from ``devices`` (d), its latest telemetry (t)
#: and its latest job (j).
_DEVICE_COLUMNS = (
    "d.device, d.grp, d.state, d.agent_version, d.session, d.models, d.last_seen,"
    " t.requests, t.offload_rate, t.p50_ms, t.p95_ms, t.rss_bytes, t.cpu_temp_c, t.dropped,"
    " j.model AS job_model, j.version AS job_version, j.state AS job_state,"
    " j.reason AS job_reason, j.ts AS job_ts"
)
#: Joins a CTE ``page(device)`` of devices to their latest telemetry and latest job.
_LATEST_JOINS = (
    " JOIN devices d ON d.fleet = ? AND d.device = page.device"
    " LEFT JOIN telemetry t ON t.fleet = d.fleet AND t.device = d.device"
    " AND (t.session, t.seq) = (SELECT x.session, x.seq FROM telemetry x"
    "  WHERE x.fleet = d.fleet AND x.device = d.device ORDER BY x.session DESC, x.seq DESC"
    "  LIMIT 1)"
    " LEFT JOIN (SELECT device, model, version, state, reason, ts, ROW_NUMBER() OVER"
    "  (PARTITION BY device ORDER BY ts DESC, model DESC, version DESC) AS n FROM jobs"
    "  WHERE fleet = ? AND device IN (SELECT device FROM page)) j"
    " ON j.device = d.device AND j.n = 1"
)


def utc_text(t: datetime) -> str:
    """A time in the store's one text form (UTC, microseconds always: text order is time
    order in SQL); a naive time is taken as UTC."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _floor(store: FleetStore, expr: str) -> str:
    """``expr`` (a non-negative number) rounded down to an integer: PostgreSQL's CAST rounds
    to the nearest, SQLite's truncates."""
    return f"FLOOR({expr})" if store.dialect == "postgres" else f"CAST({expr} AS INTEGER)"


def _models_of(store: FleetStore) -> tuple[str, str, str]:
    """FROM-clause item and the model and version expressions of each entry of
    ``devices.models`` (a JSON list of ``{"model", "version"}``), for alias ``d``."""
    if store.dialect == "postgres":
        return (
            "jsonb_array_elements(CAST(d.models AS JSONB)) AS m(value)",
            "m.value->>'model'",
            "CAST(m.value->>'version' AS BIGINT)",
        )
    return (
        "json_each(d.models) AS m",
        "json_extract(m.value, '$.model')",
        "CAST(json_extract(m.value, '$.version') AS INTEGER)",
    )


def _device_view(row: dict[str, Any]) -> dict[str, Any]:
    job = None
    if row["job_model"] is not None:
        job = {
            "model": row["job_model"],
            "version": int(row["job_version"]),
            "state": row["job_state"],
            "reason": row["job_reason"],
            "ts": row["job_ts"],
        }
    return {
        "device": row["device"],
        "group": row["grp"],
        "online": row["state"] == "online",
        "last_seen": row["last_seen"],
        "agent_version": row["agent_version"],
        "session": row["session"],
        "models": json.loads(row["models"]),
        "job": job,
        "requests": row["requests"],
        "offload_rate": row["offload_rate"],
        "p50_ms": row["p50_ms"],
        "p95_ms": row["p95_ms"],
        "rss_bytes": row["rss_bytes"],
        "cpu_temp_c": row["cpu_temp_c"],
        "dropped": row["dropped"],
    }


@dataclass(frozen=True)
class DevicePage:
    devices: list[dict[str, Any]]
    total: int  # devices matching the filters, on every page
    next: str | None  # the cursor of the next page (``after=``), None on the last


def device_page(
    store: FleetStore,
    fleet: str,
    *,
    limit: int,
    after: str | None = None,
    group: str | None = None,
    state: str | None = None,
) -> DevicePage:
    """Devices in id order, ``limit`` at most, those after ``after`` (the previous page's
    ``next``): a cursor stays right while devices come and go, which an offset would not."""
    where = "fleet = ?"
    args: list[Any] = [fleet]
    if group is not None:
        where += " AND grp = ?"
        args.append(group)
    if state is not None:
        where += " AND state = ?"
        args.append(state)
    total = int(store.query(f"SELECT COUNT(*) AS n FROM devices WHERE {where}", args)[0]["n"])
    page_where, page_args = where, list(args)
    if after is not None:
        page_where += " AND device > ?"
        page_args.append(after)
    rows = store.query(
        f"WITH page AS (SELECT device FROM devices WHERE {page_where} ORDER BY device LIMIT ?)"
        f" SELECT {_DEVICE_COLUMNS} FROM page{_LATEST_JOINS} ORDER BY d.device",
        [*page_args, limit + 1, fleet, fleet],
    )
    devices = [_device_view(r) for r in rows[:limit]]
    return DevicePage(devices, total, devices[-1]["device"] if len(rows) > limit else None)


def device(store: FleetStore, fleet: str, device_id: str) -> dict[str, Any] | None:
    """One device as in ``device_page``, or None; with what its latest telemetry says of its
    bytes on the wire (``wire_bytes`` by category, cumulative over its session, and whether
    it is holding telemetry back for its daily budget), which a page leaves out."""
    rows = store.query(
        "WITH page AS (SELECT device FROM devices WHERE fleet = ? AND device = ?)"
        f" SELECT {_DEVICE_COLUMNS} FROM page{_LATEST_JOINS}",
        [fleet, device_id, fleet, fleet],
    )
    if not rows:
        return None
    view = _device_view(rows[0])
    latest = store.query(
        "SELECT body FROM telemetry WHERE fleet = ? AND device = ?"
        " ORDER BY session DESC, seq DESC LIMIT 1",
        [fleet, device_id],
    )
    body = json.loads(latest[0]["body"]) if latest else {}
    view["wire_bytes"] = body.get("wire_bytes")
    view["budget_backoff"] = bool(body.get("budget_backoff"))
    return view


def online_counts(store: FleetStore, fleet: str) -> tuple[int, int]:
    """(devices, online)."""
    row = store.query(
        "SELECT COUNT(*) AS n, COALESCE(SUM(CASE WHEN state = 'online' THEN 1 ELSE 0 END), 0)"
        " AS online FROM devices WHERE fleet = ?",
        [fleet],
    )[0]
    return int(row["n"]), int(row["online"])


def versions(store: FleetStore, fleet: str) -> dict[tuple[str, int], int]:
    """Devices serving each (model, version)."""
    source, model, version = _models_of(store)
    rows = store.query(
        f"SELECT {model} AS model, {version} AS version, COUNT(*) AS n"
        f" FROM devices d, {source} WHERE d.fleet = ? GROUP BY 1, 2",
        [fleet],
    )
    return {(r["model"], int(r["version"])): int(r["n"]) for r in rows}


def _bucket_ts(index: int, width_s: float) -> str:
    return datetime.fromtimestamp(index * width_s, timezone.utc).isoformat()


def fleet_series(store: FleetStore, fleet: str, since: str, width_s: float) -> list[dict[str, Any]]:
    """The fleet's telemetry since ``since`` (ISO time) per ``width_s`` bucket: requests,
    offload rate (cloud / requests) and the worst p95, oldest first."""
    bucket = _floor(store, f"{store.epoch_sql('ts')} / ?")
    rows = store.query(
        f"SELECT {bucket} AS b, CAST(SUM(requests) AS BIGINT) AS requests,"
        " CAST(SUM(cloud) AS BIGINT) AS cloud, MAX(p95_ms) AS p95_ms"
        " FROM telemetry WHERE fleet = ? AND ts >= ? GROUP BY 1 ORDER BY 1",
        [width_s, fleet, since],
    )
    return [
        {
            "ts": _bucket_ts(int(r["b"]), width_s),
            "requests": int(r["requests"]),
            "cloud": int(r["cloud"]),
            "p95_ms": r["p95_ms"],
            "offload_rate": int(r["cloud"]) / int(r["requests"]) if r["requests"] else 0.0,
        }
        for r in rows
    ]


def worst_devices_series(
    store: FleetStore, fleet: str, since: str, width_s: float, top: int
) -> dict[str, list[dict[str, Any]]]:
    """Per-device buckets (as ``fleet_series``) of the ``top`` devices with the worst p95
    since ``since``: the lines a chart can still show, and the devices worth a look."""
    if top <= 0:
        return {}
    bucket = _floor(store, f"{store.epoch_sql('t.ts')} / ?")
    rows = store.query(
        "WITH worst AS (SELECT device FROM telemetry WHERE fleet = ? AND ts >= ?"
        " GROUP BY device ORDER BY MAX(COALESCE(p95_ms, 0)) DESC, device LIMIT ?)"
        f" SELECT t.device, {bucket} AS b, CAST(SUM(t.requests) AS BIGINT) AS requests,"
        " CAST(SUM(t.cloud) AS BIGINT) AS cloud, MAX(t.p95_ms) AS p95_ms"
        " FROM telemetry t JOIN worst w ON w.device = t.device"
        " WHERE t.fleet = ? AND t.ts >= ? GROUP BY 1, 2 ORDER BY 1, 2",
        [fleet, since, top, width_s, fleet, since],
    )
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        requests, cloud = int(r["requests"]), int(r["cloud"])
        out.setdefault(r["device"], []).append(
            {
                "ts": _bucket_ts(int(r["b"]), width_s),
                "requests": requests,
                "offload_rate": cloud / requests if requests else 0.0,
                "p95_ms": r["p95_ms"],
            }
        )
    return out


def recent_rollouts(store: FleetStore, fleet: str, last: int = 5) -> list[dict[str, Any]]:
    """The ``last`` rollouts, oldest first, each with its waves' progress: devices, how
    many report the release ACTIVE, how many a failure."""
    rollouts = store.query(
        "SELECT id, model, version, state, target_kind, current_wave, detail FROM rollouts"
        " WHERE fleet = ? ORDER BY id DESC LIMIT ?",
        [fleet, last],
    )
    if not rollouts:
        return []
    ids = [int(r["id"]) for r in rollouts]
    marks = ", ".join("?" for _ in FAILED_STATES)
    waves = store.query(
        "SELECT rd.rollout, rd.wave, COUNT(*) AS devices,"
        " COALESCE(SUM(CASE WHEN j.state = 'ACTIVE' THEN 1 ELSE 0 END), 0) AS active,"
        f" COALESCE(SUM(CASE WHEN j.state IN ({marks}) THEN 1 ELSE 0 END), 0) AS failed"
        " FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout"
        " LEFT JOIN jobs j ON j.fleet = r.fleet AND j.device = rd.device AND j.model = r.model"
        " AND j.version = r.version"
        f" WHERE rd.rollout IN ({', '.join('?' for _ in ids)})"
        " GROUP BY rd.rollout, rd.wave ORDER BY rd.rollout, rd.wave",
        [*FAILED_STATES, *ids],
    )
    per: dict[int, list[dict[str, int]]] = {}
    for w in waves:
        per.setdefault(int(w["rollout"]), []).append(
            {"devices": int(w["devices"]), "active": int(w["active"]), "failed": int(w["failed"])}
        )
    return [
        {
            "id": int(r["id"]),
            "release": f"{r['model']}@{r['version']}",
            "state": r["state"],
            "target": r["target_kind"],
            "current_wave": int(r["current_wave"]),
            "detail": r["detail"],
            "waves": per.get(int(r["id"]), []),
        }
        for r in reversed(rollouts)
    ]


def latest_offload(store: FleetStore, fleet: str) -> dict[str, float]:
    """Each device's offload rate in its latest telemetry (devices without any: absent)."""
    rows = store.query(
        "SELECT d.device, t.offload_rate FROM devices d JOIN telemetry t"
        " ON t.fleet = d.fleet AND t.device = d.device"
        " AND (t.session, t.seq) = (SELECT x.session, x.seq FROM telemetry x"
        "  WHERE x.fleet = d.fleet AND x.device = d.device"
        "  ORDER BY x.session DESC, x.seq DESC LIMIT 1)"
        " WHERE d.fleet = ? ORDER BY d.device",
        [fleet],
    )
    return {r["device"]: float(r["offload_rate"]) for r in rows}


def unfinished_rollouts(store: FleetStore, fleet: str) -> list[int]:
    """PLANNED and RUNNING rollouts of ``fleet``, oldest first."""
    rows = store.query(
        "SELECT id FROM rollouts WHERE fleet = ? AND state IN ('PLANNED', 'RUNNING') ORDER BY id",
        [fleet],
    )
    return [int(r["id"]) for r in rows]


# ------------------------------------------------------------------ the learning loop

_SHADOW_SUMS = (
    "samples",
    "agree_serving",
    "labelled",
    "agree_cloud",
    "serving_agree_cloud",
    "shadow_only_right",
    "serving_only_right",
    "would_escalate",
    "dropped",
)
_SHADOW_SELECT = ", ".join(f"COALESCE(SUM({c}), 0) AS {c}" for c in _SHADOW_SUMS)


def _marks(values: list[Any]) -> str:
    return ", ".join("?" for _ in values)


def gate_stats(
    store: FleetStore,
    fleet: str,
    model: str,
    version: int,
    devices: list[str] | None = None,
    since: str | None = None,
) -> GateStats:
    """The counts a rollout's gate decides on (``cloud.fleet.gate``): the shadow runs of
    ``model@version`` (on ``devices`` only, if given; received since ``since``, the store's
    clock, if given), the audits of the devices serving that version (same filters), and
    the audits of the versions the shadow was compared with (``serving_version``) on any
    device: three summing queries on the version's index."""
    where, args = "fleet = ? AND model = ? AND version = ?", [fleet, model, version]
    if devices is not None:
        if not devices:
            return GateStats()
        where += f" AND device IN ({_marks(devices)})"
        args += devices
    if since is not None:
        where += " AND received >= ?"
        args.append(since)
    row = store.query(
        f"SELECT {_SHADOW_SELECT}, COUNT(DISTINCT device) AS devices FROM shadow_stats"
        f" WHERE {where}",
        args,
    )[0]
    shadow = {c: int(row[c]) for c in (*_SHADOW_SUMS, "devices")}
    serving = [
        int(r["v"])
        for r in store.query(
            f"SELECT DISTINCT serving_version AS v FROM shadow_stats WHERE {where}"
            " AND serving_version IS NOT NULL AND serving_version <> ?",
            [*args, version],
        )
    ]
    audit_sql = (
        "SELECT COALESCE(SUM(audited), 0) AS n, COALESCE(SUM(wrong), 0) AS k FROM audit_stats"
    )
    cand = store.query(f"{audit_sql} WHERE {where}", args)[0]
    serv = {"n": 0, "k": 0}
    if serving:
        other = "fleet = ? AND model = ?" + f" AND version IN ({_marks(serving)})"
        other_args: list[Any] = [fleet, model, *serving]
        if since is not None:
            other += " AND received >= ?"
            other_args.append(since)
        serv = store.query(f"{audit_sql} WHERE {other}", other_args)[0]
    return GateStats(
        **shadow,
        candidate_audited=int(cand["n"]),
        candidate_wrong=int(cand["k"]),
        serving_audited=int(serv["n"]),
        serving_wrong=int(serv["k"]),
    )


def loop(store: FleetStore, fleet: str, model: str, delta: float = 0.05) -> dict[str, Any]:
    """The learning loop of ``model`` per version, for the dashboard: its shadow figures
    (summed counts, agreements, the paired difference with its 95 % interval) and its audit
    figures (audited answers, wrong ones, the manifest's ``epsilon`` and ``delta`` the
    devices checked against, and the error with its ``1 - delta`` Clopper-Pearson interval,
    as the agents compute it; ``delta`` when the release promises nothing). Rollouts are
    added by the API (``rollout.gate_view``).

    A release's manifest is signed and never changes, so every device reports the same
    guarantee for a version; MAX only skips the messages that carry none (an older agent)."""
    per: dict[int, dict[str, Any]] = {}
    for r in store.query(
        f"SELECT version, {_SHADOW_SELECT}, COUNT(DISTINCT device) AS devices"
        " FROM shadow_stats WHERE fleet = ? AND model = ? GROUP BY version",
        [fleet, model],
    ):
        stats = GateStats(**{c: int(r[c]) for c in (*_SHADOW_SUMS, "devices")})
        figures = decide(stats, 1, 0.0)
        per.setdefault(int(r["version"]), {})["shadow"] = {
            **{c: int(r[c]) for c in (*_SHADOW_SUMS, "devices")},
            "agreement_serving": stats.agree_serving / stats.samples if stats.samples else None,
            "candidate_agreement": figures.candidate_agreement,
            "serving_agreement": figures.serving_agreement,
            "diff": figures.diff,
            "diff_low": figures.diff_low,
            "diff_high": figures.diff_high,
            "would_escalate_rate": stats.would_escalate / stats.samples if stats.samples else None,
        }
    for r in store.query(
        "SELECT version, COALESCE(SUM(audited), 0) AS n, COALESCE(SUM(wrong), 0) AS k,"
        " COUNT(DISTINCT device) AS devices, MAX(epsilon) AS epsilon, MAX(delta) AS delta"
        " FROM audit_stats WHERE fleet = ? AND model = ? GROUP BY version",
        [fleet, model],
    ):
        # telemetry does not hold a device to wrong <= audited: counted as all wrong, not a 500
        n, k = int(r["n"]), min(int(r["k"]), int(r["n"]))
        # telemetry's delta is the device's word: one out of (0, 1) would make no interval
        reported = float(r["delta"]) if r["delta"] is not None else None
        at = reported if reported is not None and 0 < reported < 1 else delta
        low, high = bounds.interval(k, n, at) if n else (None, None)
        per.setdefault(int(r["version"]), {})["audit"] = {
            "audited": n,
            "wrong": k,
            "devices": int(r["devices"]),
            "error": k / n if n else None,
            "error_low": low,
            "error_high": high,
            "epsilon": float(r["epsilon"]) if r["epsilon"] is not None else None,
            "delta": at,
        }
    return {
        "model": model,
        "versions": [
            {"version": v, "shadow": per[v].get("shadow"), "audit": per[v].get("audit")}
            for v in sorted(per)
        ],
    }


def model_rollouts(store: FleetStore, fleet: str, model: str, last: int) -> list[int]:
    """The ids of ``model``'s ``last`` rollouts, newest first."""
    rows = store.query(
        "SELECT id FROM rollouts WHERE fleet = ? AND model = ? ORDER BY id DESC LIMIT ?",
        [fleet, model, last],
    )
    return [int(r["id"]) for r in rows]
