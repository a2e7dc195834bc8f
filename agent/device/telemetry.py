"""The telemetry reporter: every ``interval_s`` it takes the agent's request statistics,
adds cloud health, model versions, process RSS, CPU temperature and the bytes on the wire so
far, numbers the message (session, seq) and writes it to the outbox, which sends it when it
can.

A metered link gets a daily byte budget (``DailyBudget``): once the device's own MQTT bytes
of the UTC day reach it, telemetry comes every ``over_budget_interval_s`` instead, until the
day ends. Nothing is lost by that: a message covers its whole interval (the statistics are
swapped at each report), so a longer interval only makes them coarser. Births and job states
do not pass through here and are never held back.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from agent.device.outbox import Outbox
from agent.device.wire import BUDGETED, WireCounter
from agent.inference.core import Agent
from agent.inference.stats import RequestStats
from shared.status import ModelVersion
from shared.telemetry import CloudHealth, Histogram, OutboxState, Telemetry
from shared.utc_day import seconds_to_utc_midnight

log = logging.getLogger(__name__)


def process_rss_bytes() -> int | None:
    """Resident memory now (``/proc``), not the peak ``getrusage`` reports."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def cpu_temperature_c(root: Path = Path("/sys/class/thermal")) -> float | None:
    """The CPU's temperature where ``/sys/class/thermal`` has it (Pi, Jetson), else None."""
    zones = sorted(root.glob("thermal_zone*"))
    preferred = [z for z in zones if _zone_type(z) in ("cpu-thermal", "x86_pkg_temp", "CPU-therm")]
    for zone in preferred + zones:
        try:
            return int((zone / "temp").read_text().strip()) / 1000.0
        except (OSError, ValueError):
            continue
    return None


def _zone_type(zone: Path) -> str:
    try:
        return (zone / "type").read_text().strip()
    except OSError:
        return ""


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class DailyBudget:
    """The device's own MQTT bytes (``wire.BUDGETED``) of the current UTC day, against a
    limit. The day's count starts from the counter's total when the day (or the agent)
    started: bytes of an earlier session on the same day are not known, so a restart
    begins a fresh budget (a device that restarts all day long is not idle)."""

    def __init__(
        self, limit_bytes: int, wire: WireCounter, now: Callable[[], datetime] = _utc_now
    ) -> None:
        self.limit_bytes = limit_bytes
        self.wire = wire
        self._now = now
        self._day: date = now().date()
        self._base = wire.total(BUDGETED)

    def spent(self) -> int:
        """Bytes spent today (a new day starts from zero)."""
        total = self.wire.total(BUDGETED)
        today = self._now().date()
        if today != self._day:
            self._day, self._base = today, total
        return total - self._base

    @property
    def exhausted(self) -> bool:
        return self.spent() >= self.limit_bytes

    def seconds_to_next_day(self) -> float:
        return seconds_to_utc_midnight(self._now())


class TelemetryReporter:
    def __init__(
        self,
        agent: Agent,
        outbox: Outbox,
        topic: str,
        device: str,
        session: int,
        interval_s: float,
        on_put: Callable[[], None] = lambda: None,
        *,
        wire: WireCounter | None = None,
        budget: DailyBudget | None = None,
        over_budget_interval_s: float = 3600.0,
    ) -> None:
        self.agent = agent
        self.outbox = outbox
        self.topic = topic
        self.device = device
        self.session = session
        self.interval_s = interval_s
        self._on_put = on_put
        self.wire = wire
        self.budget = budget
        self.over_budget_interval_s = max(over_budget_interval_s, interval_s)
        #: True while the day's budget is spent: reports come at the longer interval.
        self.backing_off = False
        #: Sections other parts of the device add to each message (the learning loop's
        #: ``capture``, ``audit``, ``shadow``): each returns ``Telemetry`` fields for the
        #: interval that ends now, or ``{}``. One that raises is logged and left out.
        self.extras: list[Callable[[], dict[str, Any]]] = []
        self.seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tandem-telemetry", daemon=True)
        self._thread.start()

    def stop(self, flush: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if flush:
            self.report()

    def next_wait_s(self) -> float:
        """The time to the next report: ``interval_s``, or once the day's budget is spent,
        ``over_budget_interval_s`` (cut short at the end of the UTC day, when a new budget
        begins)."""
        self.backing_off = self.budget is not None and self.budget.exhausted
        if not self.backing_off:
            return self.interval_s
        assert self.budget is not None
        to_next_day = self.budget.seconds_to_next_day() + 1.0
        return max(self.interval_s, min(self.over_budget_interval_s, to_next_day))

    def _run(self) -> None:
        while not self._stop.wait(self.next_wait_s()):
            try:
                self.report()
            except Exception:  # telemetry must never take the agent down
                log.exception("telemetry report failed")

    def build(self, stats: RequestStats, elapsed_s: float) -> Telemetry:
        self.seq += 1
        router = self.agent.router
        m = self.agent.model.manifest
        requests = stats.requests
        return Telemetry(
            device=self.device,
            session=self.session,
            seq=self.seq,
            ts=datetime.now(timezone.utc),
            interval_s=round(elapsed_s, 3),
            requests=requests,
            routes=dict(stats.routes),
            reasons=dict(stats.reasons),
            errors=stats.errors,
            latency_local=Histogram(counts=stats.local),
            latency_cloud=Histogram(counts=stats.remote),
            latency_total=Histogram(counts=stats.total),
            confidence=stats.conf,
            offload_rate=stats.routes["cloud"] / requests if requests else 0.0,
            cloud=CloudHealth(
                breaker=router.breaker.state,
                predicted_ms=round(router.estimator.predicted_ms, 3),
                last_ms=router.estimator.last_ms,
            )
            if self.agent.cloud_configured
            else None,
            models=[ModelVersion(model=m.model, version=m.version)],
            rss_bytes=process_rss_bytes(),
            cpu_temp_c=cpu_temperature_c(),
            outbox=OutboxState(pending=self.outbox.pending, dropped=self.outbox.dropped),
            wire_bytes=self.wire.snapshot() if self.wire is not None else None,
            budget_backoff=True if self.backing_off else None,
            **self._extra_fields(),
        )

    def _extra_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for extra in self.extras:
            try:
                fields.update(extra())
            except Exception:  # a section's failure must not cost the whole message
                log.exception("telemetry section %r failed", getattr(extra, "__name__", extra))
        return fields

    def report(self) -> Telemetry:
        """Close the current interval: one message into the outbox."""
        stats = self.agent.swap_stats()
        message = self.build(stats, time.monotonic() - stats.started)
        # fields at their default (None, an empty histogram) are left out: the schema fills
        # them in again, and a metered link would pay for them for nothing (an idle
        # message: about 0.50 KB instead of 0.63)
        self.outbox.put(self.topic, message.model_dump_json(exclude_defaults=True).encode())
        self._on_put()
        return message
