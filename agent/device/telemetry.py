"""The telemetry reporter: every ``interval_s`` it takes the agent's request statistics,
adds cloud health, model versions, process RSS and CPU temperature, numbers the message
(session, seq) and writes it to the outbox, which sends it when it can.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from agent.device.outbox import Outbox
from agent.inference.core import Agent
from agent.inference.stats import RequestStats
from shared.status import ModelVersion
from shared.telemetry import CloudHealth, Histogram, OutboxState, Telemetry

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
    ) -> None:
        self.agent = agent
        self.outbox = outbox
        self.topic = topic
        self.device = device
        self.session = session
        self.interval_s = interval_s
        self._on_put = on_put
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

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
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
        )

    def report(self) -> Telemetry:
        """Close the current interval: one message into the outbox."""
        stats = self.agent.swap_stats()
        message = self.build(stats, time.monotonic() - stats.started)
        self.outbox.put(self.topic, message.model_dump_json().encode())
        self._on_put()
        return message
