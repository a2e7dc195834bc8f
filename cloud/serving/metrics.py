"""Prometheus metrics of the inference server, through ``prometheus_client``: request counts
by model, version and status, queue depth, batch sizes, queue and compute time.

Each ``ServerMetrics`` has a registry of its own (tests make many servers in one process), and
is itself a collector, so an app can serve it beside others from one registry. The batcher
takes its version's labelled children once (``VersionMetrics``): looking them up by label
values costs more than the observation, on every batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

LATENCY_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(slots=True)
class VersionMetrics:
    """One model version's children of the server's metrics."""

    model: str
    version: str
    served: Counter  # requests answered 200
    queue_depth: Gauge
    batch_size: Histogram
    queue_seconds: Histogram
    compute_seconds: Histogram
    _requests: Counter
    _failures: dict[int, Counter] = field(default_factory=dict)

    def failed(self, status: int) -> None:
        """A request of this version answered ``status`` (an error)."""
        child = self._failures.get(status)
        if child is None:
            child = self._failures[status] = self._requests.labels(
                self.model, self.version, str(status)
            )
        child.inc()


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        mv = ("model", "version")
        self.requests = Counter(
            "tandem_inference_requests_total",
            "Inference requests by model, version and HTTP status.",
            ("model", "version", "status"),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "tandem_queue_depth",
            "Requests waiting, as of the last batch formed.",
            mv,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "tandem_batch_size",
            "Requests merged into one run.",
            mv,
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "tandem_queue_seconds",
            "Time waiting in the queue.",
            mv,
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.compute_seconds = Histogram(
            "tandem_compute_seconds",
            "ONNX Runtime time per batch.",
            mv,
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )

    def version(self, model: str, version: str) -> VersionMetrics:
        """The children of one model version (made once per batcher)."""
        return VersionMetrics(
            model,
            version,
            self.requests.labels(model, version, "200"),
            self.queue_depth.labels(model, version),
            self.batch_size.labels(model, version),
            self.queue_seconds.labels(model, version),
            self.compute_seconds.labels(model, version),
            self.requests,
        )

    def failed(self, model: str, version: str, status: int) -> None:
        """A request no batcher saw, answered ``status`` (no such or no ready version)."""
        self.requests.labels(model, version, str(status)).inc()

    def sample(self, name: str, **labels: str) -> float:
        """A sample's value (0 if absent), e.g. ``sample("tandem_batch_size_count", ...)``."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def collect(self) -> Iterable[Metric]:
        """As a collector: every metric of this server (for an app's registry)."""
        return self.registry.collect()
