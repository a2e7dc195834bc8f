"""Prometheus metrics of the inference server, in the text exposition format, with no
dependency: counters and histograms keyed by label values, thread-safe."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import defaultdict

LATENCY_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    return ",".join(f'{n}="{v}"' for n, v in zip(names, values))


class Counter:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...]) -> None:
        self.name, self.help, self.labels = name, help_text, labels
        self._values: dict[tuple[str, ...], float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, *values: str, by: float = 1.0) -> None:
        with self._lock:
            self._values[values] += by

    def value(self, *values: str) -> float:
        return self._values.get(values, 0.0)

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            for values, v in sorted(self._values.items()):
                out.append(f"{self.name}{{{_labels(self.labels, values)}}} {v:g}")
        return out


class Gauge(Counter):
    def set(self, *values: str, to: float) -> None:
        with self._lock:
            self._values[values] = to

    def render(self) -> list[str]:
        lines = super().render()
        lines[1] = f"# TYPE {self.name} gauge"
        return lines


class Histogram:
    def __init__(
        self, name: str, help_text: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ) -> None:
        self.name, self.help, self.labels, self.buckets = name, help_text, labels, buckets
        self._counts: dict[tuple[str, ...], list[int]] = {}
        self._sums: dict[tuple[str, ...], float] = defaultdict(float)
        self._lock = threading.Lock()

    def observe(self, value: float, *values: str) -> None:
        with self._lock:
            counts = self._counts.setdefault(values, [0] * (len(self.buckets) + 1))
            counts[bisect_left(self.buckets, value)] += 1
            self._sums[values] += value

    def observe_many(self, observed: list[float], *values: str) -> None:
        """Several observations under one lock (a batch's queue times)."""
        with self._lock:
            counts = self._counts.setdefault(values, [0] * (len(self.buckets) + 1))
            for value in observed:
                counts[bisect_left(self.buckets, value)] += 1
            self._sums[values] += sum(observed)

    def count(self, *values: str) -> int:
        return sum(self._counts.get(values, []))

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            for values, counts in sorted(self._counts.items()):
                base = _labels(self.labels, values)
                cumulative = 0
                for bound, n in zip([*map(str, self.buckets), "+Inf"], counts):
                    cumulative += n
                    out.append(f'{self.name}_bucket{{{base},le="{bound}"}} {cumulative}')
                out.append(f"{self.name}_sum{{{base}}} {self._sums[values]:g}")
                out.append(f"{self.name}_count{{{base}}} {cumulative}")
        return out


class ServerMetrics:
    def __init__(self) -> None:
        mv = ("model", "version")
        self.requests = Counter(
            "tandem_inference_requests_total",
            "Inference requests by model, version and HTTP status.",
            ("model", "version", "status"),
        )
        self.queue_depth = Gauge(
            "tandem_queue_depth", "Requests waiting, as of the last batch formed.", mv
        )
        self.batch_size = Histogram(
            "tandem_batch_size", "Requests merged into one run.", mv, BATCH_BUCKETS
        )
        self.queue_seconds = Histogram(
            "tandem_queue_seconds", "Time waiting in the queue.", mv, LATENCY_BUCKETS_S
        )
        self.compute_seconds = Histogram(
            "tandem_compute_seconds", "ONNX Runtime time per batch.", mv, LATENCY_BUCKETS_S
        )

    def render(self) -> str:
        lines: list[str] = []
        for metric in (
            self.requests,
            self.queue_depth,
            self.batch_size,
            self.queue_seconds,
            self.compute_seconds,
        ):
            lines += metric.render()
        return "\n".join(lines) + "\n"
