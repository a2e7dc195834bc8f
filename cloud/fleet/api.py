"""The fleet API and Prometheus ``/metrics`` of the cloud server, read from the fleet store.

- ``GET /fleet/devices``: a page of devices in id order (``?limit=`` up to 1000, ``?after=``
  the previous page's ``next``; filters ``?group=``, ``?state=online|offline``) with the
  total that match, each with its online state, last seen, model versions, last job, and key
  figures of its latest telemetry;
- ``GET /fleet/devices/{device}``: one device, with its time series (``?since=`` ISO time);
- ``GET /fleet/summary``: online/offline counts, model version distribution, fleet offload
  rate and latency over time, the same per device for the devices with the worst p95
  (``?per_device=``), rollouts with per-wave progress;
- ``GET /fleet/rollouts/{id}/gate``: a rollout's phase and its field-accuracy gate (the
  decision on the evidence now, and the one the controller last acted on);
- ``GET /fleet/loop?model=M``: the learning loop of ``M`` per version (shadow agreement
  figures, audit error with its Clopper-Pearson interval) and its latest rollouts with
  their gate: the dashboard's panel;
- ``FleetMetrics``: fleet figures for ``/metrics`` (Prometheus).

Every answer is computed in SQL (``cloud/fleet/queries.py``): its cost follows the page or
the window asked for, not the size of the fleet.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi import Path as FastApiPath
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from cloud.fleet import queries
from cloud.fleet.collector import Collector
from cloud.fleet.rollout import gate_view
from cloud.fleet.store import FleetStore
from shared.errors import ModelNotFoundError
from shared.identifiers import IDENTIFIER_RE

#: The dashboard's static page, served at ``/dashboard/`` beside this API.
DASHBOARD_DIR = Path(__file__).parent / "dashboard"

#: ``/fleet/summary``'s window, at most (a year: ``timedelta`` overflows past 10^9 days) and
#: its buckets' width (at least a second: each bucket is a row of the answer).
MAX_MINUTES = 366 * 24 * 60
MAX_BUCKET_S = 24 * 3600
#: ``/fleet/devices``' page size, by default and at most.
DEFAULT_PAGE = 100
MAX_PAGE = 1000
#: Rollout ids are the store's 64-bit keys.
MAX_ROLLOUT_ID = 2**63 - 1
#: ``/fleet/loop``'s latest rollouts of the model, by default and at most.
DEFAULT_LOOP_ROLLOUTS = 5
MAX_LOOP_ROLLOUTS = 50
#: ``/fleet/summary``'s per-device lines (the worst p95 first), by default and at most.
DEFAULT_PER_DEVICE = 8
MAX_PER_DEVICE = 50


def fleet_router(store: FleetStore, fleet: str, collector: Collector | None) -> APIRouter:
    router = APIRouter(tags=["fleet"])

    @router.get("/fleet/devices")
    def devices(
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
        after: Annotated[str | None, Query(pattern=IDENTIFIER_RE.pattern)] = None,
        group: Annotated[str | None, Query(pattern=IDENTIFIER_RE.pattern)] = None,
        state: Literal["online", "offline"] | None = None,
    ) -> dict[str, Any]:
        page = queries.device_page(store, fleet, limit=limit, after=after, group=group, state=state)
        return {"devices": page.devices, "total": page.total, "next": page.next}

    @router.get("/fleet/devices/{device}")
    def device(device: str, since: datetime | None = None) -> dict[str, Any]:
        view = queries.device(store, fleet, device) if IDENTIFIER_RE.match(device) else None
        if view is None:
            raise ModelNotFoundError(f"unknown device {device!r}")
        after = queries.utc_text(since) if since is not None else None
        return {**view, "series": store.series(fleet, device, after)}

    @router.get("/fleet/summary")
    def summary(
        minutes: Annotated[float, Query(gt=0, le=MAX_MINUTES, allow_inf_nan=False)] = 30.0,
        bucket_s: Annotated[float, Query(ge=1, le=MAX_BUCKET_S, allow_inf_nan=False)] = 10.0,
        per_device: Annotated[int, Query(ge=0, le=MAX_PER_DEVICE)] = DEFAULT_PER_DEVICE,
    ) -> dict[str, Any]:
        total, online = queries.online_counts(store, fleet)
        since = queries.utc_text(datetime.now(timezone.utc) - timedelta(minutes=minutes))
        return {
            "fleet": fleet,
            "devices": total,
            "online": online,
            "versions": {
                f"{model}:{version}": n
                for (model, version), n in sorted(queries.versions(store, fleet).items())
            },
            "series": queries.fleet_series(store, fleet, since, bucket_s),
            "per_device": queries.worst_devices_series(store, fleet, since, bucket_s, per_device),
            "rollouts": queries.recent_rollouts(store, fleet),
            "collector": dict(collector.counts) if collector else {},
        }

    @router.get("/fleet/rollouts/{rollout_id}/gate")
    def rollout_gate(
        rollout_id: Annotated[int, FastApiPath(ge=1, le=MAX_ROLLOUT_ID)],
    ) -> dict[str, Any]:
        try:
            r = store.rollout(rollout_id)
        except KeyError:
            r = None
        if r is None or r.fleet != fleet:
            raise ModelNotFoundError(f"unknown rollout {rollout_id}")
        return gate_view(store, r)

    @router.get("/fleet/loop")
    def learning_loop(
        model: Annotated[str, Query(pattern=IDENTIFIER_RE.pattern)],
        rollouts: Annotated[int, Query(ge=0, le=MAX_LOOP_ROLLOUTS)] = DEFAULT_LOOP_ROLLOUTS,
    ) -> dict[str, Any]:
        view = queries.loop(store, fleet, model)
        view["rollouts"] = [
            gate_view(store, store.rollout(i))
            for i in queries.model_rollouts(store, fleet, model, rollouts)
        ]
        return view

    return router


class FleetMetrics:
    """The fleet's Prometheus figures, computed from the store at each scrape (a
    ``prometheus_client`` custom collector): devices by state, devices per model version,
    each device's offload rate, and the collector's message counts."""

    def __init__(self, store: FleetStore, fleet: str, collector: Collector | None) -> None:
        self.store, self.fleet, self.collector = store, fleet, collector

    def collect(self) -> Iterator[Metric]:
        fleet = self.fleet
        total, online = queries.online_counts(self.store, fleet)
        devices = GaugeMetricFamily(
            "tandem_fleet_devices", "Devices by online state.", labels=["fleet", "state"]
        )
        devices.add_metric([fleet, "online"], online)
        devices.add_metric([fleet, "offline"], total - online)
        yield devices
        versions = queries.versions(self.store, fleet)
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
        for device, rate in queries.latest_offload(self.store, fleet).items():
            offload.add_metric([fleet, device], rate)
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
