"""The fleet API and Prometheus ``/metrics`` of the cloud server, read from the fleet store.

- ``GET /fleet/devices``: every device with its online state, last seen, model versions, last
  job, and key figures of its latest telemetry;
- ``GET /fleet/devices/{device}``: one device, with its time series (``?since=`` ISO time);
- ``GET /fleet/summary``: online/offline counts, model version distribution, fleet offload
  rate and latency over time, rollouts with per-wave progress;
- ``FleetMetrics``: fleet figures for ``/metrics`` (Prometheus).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from cloud.fleet.collector import Collector
from cloud.fleet.store import FleetStore
from shared.errors import ModelNotFoundError

#: The dashboard's static page, served at ``/dashboard/`` beside this API.
DASHBOARD_DIR = Path(__file__).parent / "dashboard"

#: ``/fleet/summary``'s window, at most (a year: ``timedelta`` overflows past 10^9 days) and
#: its buckets' width (at least a second: each bucket is a row of the answer).
MAX_MINUTES = 366 * 24 * 60
MAX_BUCKET_S = 24 * 3600


def _device_view(store: FleetStore, fleet: str) -> list[dict[str, Any]]:
    jobs = store.latest_jobs(fleet)
    latest = store.latest_telemetry(fleet)
    out = []
    for d in store.devices(fleet):
        t = latest.get(d["device"], {})
        job = jobs.get(d["device"])
        out.append(
            {
                "device": d["device"],
                "group": d["group"],
                "online": d["state"] == "online",
                "last_seen": d["last_seen"],
                "agent_version": d["agent_version"],
                "session": d["session"],
                "models": d["models"],
                "job": None
                if job is None
                else {k: job[k] for k in ("model", "version", "state", "reason", "ts")},
                "requests": t.get("requests"),
                "offload_rate": t.get("offload_rate"),
                "p50_ms": t.get("p50_ms"),
                "p95_ms": t.get("p95_ms"),
                "rss_bytes": t.get("rss_bytes"),
                "cpu_temp_c": t.get("cpu_temp_c"),
                "dropped": t.get("dropped"),
            }
        )
    return out


def _buckets(rows: list[dict[str, Any]], width_s: float) -> list[dict[str, Any]]:
    """Fleet aggregates per time bucket: requests, offload rate, worst p95."""
    agg: dict[str, dict[str, Any]] = {}
    for r in rows:
        ts = datetime.fromisoformat(r["ts"]).timestamp()
        key = datetime.fromtimestamp(ts - ts % width_s, timezone.utc).isoformat()
        a = agg.setdefault(key, {"ts": key, "requests": 0, "cloud": 0, "p95_ms": None})
        a["requests"] += r["requests"]
        a["cloud"] += r["cloud"]
        if r["p95_ms"] is not None:
            a["p95_ms"] = max(a["p95_ms"] or 0.0, r["p95_ms"])
    for a in agg.values():
        a["offload_rate"] = a["cloud"] / a["requests"] if a["requests"] else 0.0
    return [agg[k] for k in sorted(agg)]


def fleet_router(store: FleetStore, fleet: str, collector: Collector | None) -> APIRouter:
    router = APIRouter(tags=["fleet"])

    @router.get("/fleet/devices")
    def devices() -> list[dict[str, Any]]:
        return _device_view(store, fleet)

    @router.get("/fleet/devices/{device}")
    def device(device: str, since: str | None = None) -> dict[str, Any]:
        view = [d for d in _device_view(store, fleet) if d["device"] == device]
        if not view:
            raise ModelNotFoundError(f"unknown device {device!r}")
        return {**view[0], "series": store.series(fleet, device, since)}

    @router.get("/fleet/summary")
    def summary(
        minutes: Annotated[float, Query(gt=0, le=MAX_MINUTES, allow_inf_nan=False)] = 30.0,
        bucket_s: Annotated[float, Query(ge=1, le=MAX_BUCKET_S, allow_inf_nan=False)] = 10.0,
    ) -> dict[str, Any]:
        view = _device_view(store, fleet)
        versions: Counter[str] = Counter()
        for d in view:
            for m in d["models"]:
                versions[f"{m['model']}:{m['version']}"] += 1
        since = (datetime.now(timezone.utc) - timedelta(minutes=minutes)).isoformat()
        rows = store.series(fleet, since=since, limit=100_000)
        rollouts = []
        for r in store.rollouts(fleet)[-5:]:
            states = store.job_states(fleet, r.model, r.version)
            waves = [
                {
                    "devices": len(w),
                    "active": sum(
                        1 for d, _ in w if d in states and states[d][0].value == "ACTIVE"
                    ),
                    "failed": sum(1 for d, _ in w if d in states and states[d][0].failure),
                }
                for w in store.waves(r.id)
            ]
            rollouts.append(
                {
                    "id": r.id,
                    "release": f"{r.model}@{r.version}",
                    "state": r.state,
                    "target": r.target_kind,
                    "current_wave": r.current_wave,
                    "detail": r.detail,
                    "waves": waves,
                }
            )
        return {
            "fleet": fleet,
            "devices": len(view),
            "online": sum(d["online"] for d in view),
            "versions": dict(versions),
            "series": _buckets(rows, bucket_s),
            "per_device": {
                d["device"]: [
                    {
                        "ts": r["ts"],
                        "offload_rate": r["offload_rate"],
                        "p95_ms": r["p95_ms"],
                        "requests": r["requests"],
                    }
                    for r in rows
                    if r["device"] == d["device"]
                ]
                for d in view
            },
            "rollouts": rollouts,
            "collector": dict(collector.counts) if collector else {},
        }

    return router


class FleetMetrics:
    """The fleet's Prometheus figures, computed from the store at each scrape (a
    ``prometheus_client`` custom collector): devices by state, devices per model version,
    each device's offload rate, and the collector's message counts."""

    def __init__(self, store: FleetStore, fleet: str, collector: Collector | None) -> None:
        self.store, self.fleet, self.collector = store, fleet, collector

    def collect(self) -> Iterator[Metric]:
        fleet = self.fleet
        view = _device_view(self.store, fleet)
        devices = GaugeMetricFamily(
            "tandem_fleet_devices", "Devices by online state.", labels=["fleet", "state"]
        )
        online = sum(d["online"] for d in view)
        devices.add_metric([fleet, "online"], online)
        devices.add_metric([fleet, "offline"], len(view) - online)
        yield devices
        versions: Counter[tuple[str, int]] = Counter()
        for d in view:
            for m in d["models"]:
                versions[(m["model"], m["version"])] += 1
        per_version = GaugeMetricFamily(
            "tandem_fleet_model_devices",
            "Devices serving each model version.",
            labels=["fleet", "model", "version"],
        )
        for (model, version), n in sorted(versions.items()):
            per_version.add_metric([fleet, model, str(version)], n)
        yield per_version
        offload = GaugeMetricFamily(
            "tandem_device_offload_rate",
            "Share of requests escalated, last interval.",
            labels=["fleet", "device"],
        )
        for d in view:
            if d["offload_rate"] is not None:
                offload.add_metric([fleet, d["device"]], d["offload_rate"])
        yield offload
        if self.collector is not None:
            messages = CounterMetricFamily(
                "tandem_collector_messages_total",
                "Telemetry messages by outcome.",
                labels=["fleet", "outcome"],
            )
            for outcome, n in sorted(self.collector.counts.items()):
                messages.add_metric([fleet, outcome], n)
            yield messages
