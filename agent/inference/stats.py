"""Request statistics for telemetry: counters by route and reason, latency and confidence
histograms. ``add`` is on every request's path, so it is a handful of dict and list
increments (about a microsecond); the telemetry thread swaps in a fresh ``RequestStats``
each interval and summarises the old one off the hot path. Increments are not locked: under
a race an increment can be lost, which shifts a rate by a hair, never corrupts it.
"""

from __future__ import annotations

import time
from bisect import bisect_left

from shared.telemetry import CONFIDENCE_BUCKETS, LATENCY_BOUNDS_MS

_BUCKETS = len(LATENCY_BOUNDS_MS) + 1


class RequestStats:
    __slots__ = ("conf", "errors", "local", "reasons", "remote", "routes", "started", "total")

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.routes = {"edge": 0, "cloud": 0}
        self.reasons: dict[str, int] = {}
        self.errors = 0
        self.local = [0] * _BUCKETS
        self.remote = [0] * _BUCKETS
        self.total = [0] * _BUCKETS
        self.conf = [0] * CONFIDENCE_BUCKETS

    def add(
        self,
        source: str,
        reason: str,
        total_ms: float,
        local_ms: float | None,
        cloud_ms: float | None,
        confidence: float,
    ) -> None:
        self.routes[source] += 1
        reasons = self.reasons
        reasons[reason] = reasons.get(reason, 0) + 1
        self.total[bisect_left(LATENCY_BOUNDS_MS, total_ms)] += 1
        if local_ms is not None:
            self.local[bisect_left(LATENCY_BOUNDS_MS, local_ms)] += 1
        if cloud_ms is not None:
            self.remote[bisect_left(LATENCY_BOUNDS_MS, cloud_ms)] += 1
        bucket = int(confidence * CONFIDENCE_BUCKETS)
        self.conf[bucket if bucket < CONFIDENCE_BUCKETS else CONFIDENCE_BUCKETS - 1] += 1

    @property
    def requests(self) -> int:
        return self.routes["edge"] + self.routes["cloud"]
