"""A running estimate of the cloud round trip, from recent calls.

The router escalates only when the remaining deadline exceeds the *predicted* cloud latency,
so the prediction is deliberately pessimistic: a high quantile (default p90) of the last
``window`` calls, not the mean. It is recomputed when a call is recorded (rare, and already
after a network round trip), so reading it on the hot path costs nothing.
"""

from __future__ import annotations

import threading
from collections import deque


class LatencyEstimator:
    def __init__(self, initial_ms: float, window: int = 50, quantile: float = 0.9) -> None:
        self._samples: deque[float] = deque(maxlen=window)
        self._quantile = quantile
        self._lock = threading.Lock()
        self.predicted_ms = initial_ms
        self.last_ms: float | None = None

    def record(self, latency_ms: float) -> None:
        with self._lock:
            self._samples.append(latency_ms)
            ordered = sorted(self._samples)
            self.predicted_ms = ordered[min(len(ordered) - 1, int(self._quantile * len(ordered)))]
            self.last_ms = latency_ms

    def __len__(self) -> int:
        return len(self._samples)
