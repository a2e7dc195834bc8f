"""The fleet API over a store of 10,000 devices, on SQLite and on PostgreSQL: every page,
count and summary the database computes (``cloud/fleet/queries.py``) against the same figures
computed here in Python from the rows inserted. Correctness only: the timings are the fleet
simulator's (``scripts/fleet_sim.py``)."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest

from cloud.fleet.api import FleetMetrics, fleet_router
from cloud.fleet.store import FleetStore, open_store
from shared.oip.http import install_error_handlers
from tests.helpers import serve_in_thread
from tests.prometheus import sample

FLEET = "bigfleet"
N = 10_000
WIDTH_S = 60.0
#: the summary's window starts at the start of a bucket this many buckets ago (telemetry
#: timestamps sit in the middle of their buckets: no rounding at an edge)
BUCKETS = 5


def _dev(i: int) -> str:
    return f"dev-{i:05d}"


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="microseconds")


@dataclass
class Expected:
    """What the store holds, computed while it was filled."""

    devices: list[dict[str, Any]] = field(default_factory=list)  # device order
    versions: Counter[str] = field(default_factory=Counter)
    latest: dict[str, dict[str, Any]] = field(default_factory=dict)  # device -> telemetry
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)  # device -> latest job
    buckets: dict[int, dict[str, Any]] = field(default_factory=dict)
    per_device_p95: dict[str, float] = field(default_factory=dict)
    rollout: int = 0
    waves: list[dict[str, int]] = field(default_factory=list)


def _insert(store: FleetStore, table: str, columns: str, rows: list[tuple[Any, ...]]) -> None:
    """Multi-row INSERTs through the store's own ``execute``: 500 rows a statement."""
    width = len(rows[0])
    one = "(" + ",".join("?" * width) + ")"
    for start in range(0, len(rows), 500):
        chunk = rows[start : start + 500]
        sql = f"INSERT INTO {table} ({columns}) VALUES " + ",".join(one for _ in chunk)
        assert store.execute(sql, [v for row in chunk for v in row]) == len(chunk)


def _fill(store: FleetStore, now: datetime) -> Expected:
    exp = Expected()
    start = now.timestamp() // WIDTH_S * WIDTH_S - (BUCKETS - 1) * WIDTH_S
    devices, telemetry, jobs = [], [], []
    for i in range(N):
        device = _dev(i)
        models = [{"model": "digits", "version": 1 + i % 3}] if i % 7 else []
        if i % 5 == 0:
            models.append({"model": "faces", "version": 2})
        for m in models:
            exp.versions[f"{m['model']}:{m['version']}"] += 1
        group = f"g{i % 4}"
        state = "offline" if i % 3 == 0 else "online"
        seen = _iso(now - timedelta(seconds=i))
        devices.append((FLEET, device, group, state, "1.0", 1, json.dumps(models), seen))
        exp.devices.append({"device": device, "group": group, "online": state == "online"})
        # two messages in session 1 and, for half the devices, one in session 2 (lower seq,
        # later session: the latest is by (session, seq)), in buckets that depend on i
        msgs = [(1, 1), (1, 2)] + ([(2, 1)] if i % 2 == 0 else [])
        for k, (session, seq) in enumerate(msgs):
            b = (i + k) % BUCKETS
            ts = datetime.fromtimestamp(start + b * WIDTH_S + WIDTH_S / 2 + i % 7, timezone.utc)
            requests, cloud = 10 + i % 11, (i + k) % 5
            p95 = None if (i + k) % 13 == 0 else float((i * 7 + k) % 1000) / 10
            row = {
                "requests": requests,
                "offload_rate": cloud / requests,
                "p95_ms": p95,
                "rss_bytes": 1000 + i,
            }
            edge = requests - cloud
            key = (FLEET, device, session, seq, _iso(ts), _iso(now))
            figures = (requests, edge, cloud, 0, row["offload_rate"], p95, p95, row["rss_bytes"])
            telemetry.append((*key, *figures, "{}"))
            exp.latest[device] = row  # the messages are in (session, seq) order
            index = int((start + b * WIDTH_S) // WIDTH_S)
            agg = exp.buckets.setdefault(index, {"requests": 0, "cloud": 0, "p95_ms": None})
            agg["requests"] += requests
            agg["cloud"] += cloud
            if p95 is not None:
                agg["p95_ms"] = max(agg["p95_ms"] or 0.0, p95)
                exp.per_device_p95[device] = max(exp.per_device_p95.get(device, 0.0), p95)
            else:
                exp.per_device_p95.setdefault(device, 0.0)
        if i % 10 == 0:  # an older and a newer job report
            for version, state_, minutes in ((1, "ACTIVE", 10), (2, "FAILED", 1 + i % 3)):
                ts = _iso(now - timedelta(minutes=minutes))
                jobs.append((FLEET, device, "digits", version, state_, f"r{version}", ts))
            exp.jobs[device] = {"model": "digits", "version": 2, "state": "FAILED"}
    _insert(
        store,
        "devices",
        "fleet, device, grp, state, agent_version, session, models, last_seen",
        devices,
    )
    _insert(
        store,
        "telemetry",
        "fleet, device, session, seq, ts, received, requests, edge, cloud, errors,"
        " offload_rate, p95_ms, p50_ms, rss_bytes, body",
        telemetry,
    )
    _insert(store, "jobs", "fleet, device, model, version, state, reason, ts", jobs)
    # a rollout of digits@2 over every device: canary 10, three waves
    exp.rollout = store.create_rollout(FLEET, "digits", 2, "fleet", None, "10", 3, 0.0, 60.0)
    names = [d["device"] for d in exp.devices]
    waves = [names[:10], names[10:3340], names[3340:6670], names[6670:]]
    store.plan_waves(exp.rollout, waves)
    failed = {d for d, j in exp.jobs.items() if j["state"] == "FAILED"}
    exp.waves = [
        {"devices": len(w), "active": 0, "failed": len(failed.intersection(w))} for w in waves
    ]
    return exp


@pytest.fixture
def big(store_url: str, tmp_path: Path) -> Iterator[tuple[httpx.Client, FleetStore, Expected]]:
    store = open_store(store_url, tmp_path)
    try:
        exp = _fill(store, datetime.now(timezone.utc))
        app = FastAPI()
        install_error_handlers(app)
        app.include_router(fleet_router(store, FLEET, None))
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
            yield http, store, exp
    finally:
        store.close()


def _walk(http: httpx.Client, **params: Any) -> tuple[list[dict[str, Any]], set[int]]:
    """Every page from the first; the rows, and the totals the pages gave."""
    rows: list[dict[str, Any]] = []
    totals: set[int] = set()
    after = None
    while True:
        r = http.get("/fleet/devices", params={**params, **({"after": after} if after else {})})
        assert r.status_code == 200, r.text
        page = r.json()
        rows += page["devices"]
        totals.add(page["total"])
        if page["next"] is None:
            return rows, totals
        assert page["next"] == page["devices"][-1]["device"]
        after = page["next"]


def test_paging_covers_every_device_once_in_order(
    big: tuple[httpx.Client, FleetStore, Expected],
) -> None:
    http, _, exp = big
    first = http.get("/fleet/devices").json()
    assert first["total"] == N and len(first["devices"]) == 100  # the default page
    assert [d["device"] for d in first["devices"]] == [_dev(i) for i in range(100)]
    rows, totals = _walk(http, limit=1000)
    assert totals == {N}
    assert [d["device"] for d in rows] == [d["device"] for d in exp.devices]
    again, _ = _walk(http, limit=1000)
    assert again == rows  # stable
    for d in rows[:50] + rows[-50:]:
        i = int(d["device"][4:])
        assert (d["group"], d["online"]) == (exp.devices[i]["group"], exp.devices[i]["online"])
        latest = exp.latest[d["device"]]
        assert d["requests"] == latest["requests"] and d["p95_ms"] == latest["p95_ms"]
        assert math.isclose(d["offload_rate"], latest["offload_rate"])
        job = exp.jobs.get(d["device"])
        assert (d["job"] and {k: d["job"][k] for k in ("model", "version", "state")}) == job
    # filters: group and state together, an odd page size
    rows, totals = _walk(http, limit=777, group="g1", state="online")
    want = [d["device"] for d in exp.devices if d["group"] == "g1" and d["online"]]
    assert [d["device"] for d in rows] == want and totals == {len(want)}
    rows, totals = _walk(http, limit=1000, state="offline")
    assert len(rows) == sum(not d["online"] for d in exp.devices) and totals == {len(rows)}
    assert http.get("/fleet/devices", params={"group": "nobody"}).json() == {
        "devices": [],
        "total": 0,
        "next": None,
    }


def test_one_device_is_looked_up(big: tuple[httpx.Client, FleetStore, Expected]) -> None:
    http = big[0]
    page = http.get("/fleet/devices", params={"after": _dev(4999), "limit": 1}).json()
    one = http.get(f"/fleet/devices/{_dev(5000)}").json()
    detail_only = {"series", "wire_bytes", "budget_backoff"}
    assert {k: v for k, v in one.items() if k not in detail_only} == page["devices"][0]
    assert len(one["series"]) == 3  # device 5000: two messages in session 1, one in 2
    assert one["job"]["state"] == "FAILED" and one["job"]["version"] == 2
    assert http.get("/fleet/devices/dev-10000").status_code == 404
    # since: an instant in any ISO spelling ("Z", another offset) means the same rows
    times = sorted(datetime.fromisoformat(r["ts"]) for r in one["series"])
    for since in (
        times[1].strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        times[1].astimezone(timezone(timedelta(hours=-5))).isoformat(),
    ):
        later = http.get(f"/fleet/devices/{_dev(5000)}", params={"since": since}).json()
        assert [datetime.fromisoformat(r["ts"]) for r in later["series"]] == times[1:], since


def test_summary_counts_in_sql(big: tuple[httpx.Client, FleetStore, Expected]) -> None:
    http, store, exp = big
    minutes = (BUCKETS + 1) * WIDTH_S / 60
    s = http.get("/fleet/summary", params={"minutes": minutes, "bucket_s": WIDTH_S}).json()
    assert s["devices"] == N and s["online"] == sum(d["online"] for d in exp.devices)
    assert s["versions"] == dict(exp.versions)
    assert len(s["series"]) == BUCKETS
    for bucket in s["series"]:
        index = int(datetime.fromisoformat(bucket["ts"]).timestamp() // WIDTH_S)
        want = exp.buckets[index]
        assert (bucket["requests"], bucket["cloud"]) == (want["requests"], want["cloud"])
        assert bucket["p95_ms"] == want["p95_ms"]
        assert math.isclose(bucket["offload_rate"], want["cloud"] / want["requests"])
    assert sum(b["requests"] for b in s["series"]) == sum(
        b["requests"] for b in exp.buckets.values()
    )
    worst = sorted(exp.per_device_p95, key=lambda d: (-exp.per_device_p95[d], d))[:8]
    assert sorted(s["per_device"]) == sorted(worst)
    for device, points in s["per_device"].items():
        assert max(p["p95_ms"] or 0.0 for p in points) == exp.per_device_p95[device]
    assert [r["id"] for r in s["rollouts"]] == [exp.rollout]
    assert s["rollouts"][0]["waves"] == exp.waves
    assert s["rollouts"][0]["release"] == "digits@2" and s["rollouts"][0]["state"] == "PLANNED"
    none = http.get("/fleet/summary", params={"per_device": 0}).json()
    assert none["per_device"] == {}

    registry = CollectorRegistry()
    registry.register(FleetMetrics(store, FLEET, None))
    text = generate_latest(registry).decode()
    assert sample(text, "tandem_fleet_devices", fleet=FLEET, state="online") == s["online"]
    assert sample(text, "tandem_fleet_devices", fleet=FLEET, state="offline") == N - s["online"]
    for label, n in exp.versions.items():
        model, version = label.split(":")
        assert (
            sample(text, "tandem_fleet_model_devices", fleet=FLEET, model=model, version=version)
            == n
        )
    for device in (_dev(0), _dev(1), _dev(9999)):
        rate = sample(text, "tandem_device_offload_rate", fleet=FLEET, device=device)
        assert rate is not None and math.isclose(rate, exp.latest[device]["offload_rate"])
