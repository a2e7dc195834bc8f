"""The cloud's Prometheus metrics through prometheus_client: exact counts past a million,
escaped label values, read back with prometheus_client's own parser."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from cloud.fleet.api import FleetMetrics
from cloud.fleet.collector import Collector
from cloud.fleet.store import FleetStore
from cloud.serving.metrics import ServerMetrics
from tests.prometheus import sample


def test_counts_past_a_million_are_exact_and_label_values_escaped() -> None:
    metrics = ServerMetrics()
    odd = 'quote " backslash \\ newline \n end'
    version = metrics.version(odd, "1")
    version.served.inc(1_234_567)  # formatted with {:g}, this read 1.23457e+06
    version.served.inc(1)
    version.failed(503)
    version.failed(503)
    metrics.failed("", "", 404)
    for value in (0.0003, 0.7, 3.0):
        version.compute_seconds.observe(value)
    text = generate_latest(metrics.registry).decode()
    requests = "tandem_inference_requests_total"
    assert sample(text, requests, model=odd, version="1", status="200") == 1_234_568
    assert sample(text, requests, model=odd, version="1", status="503") == 2
    assert sample(text, requests, model="", version="", status="404") == 1
    le = {"model": odd, "version": "1"}
    assert sample(text, "tandem_compute_seconds_bucket", **le, le="0.0005") == 1
    assert sample(text, "tandem_compute_seconds_bucket", **le, le="1.0") == 2
    assert sample(text, "tandem_compute_seconds_bucket", **le, le="+Inf") == 3
    assert sample(text, "tandem_compute_seconds_sum", **le) == 0.0003 + 0.7 + 3.0


def test_fleet_metrics_are_computed_at_scrape_time(tmp_path: Path) -> None:
    store = FleetStore(tmp_path / "fleet.db")
    try:
        collector = Collector(store, "f")
        collector.counts["stored"] = 12_345_678
        registry = CollectorRegistry()
        registry.register(ServerMetrics())  # beside the server's, in one registry
        registry.register(FleetMetrics(store, "f", collector))
        text = generate_latest(registry).decode()
        assert sample(text, "tandem_fleet_devices", fleet="f", state="online") == 0
        stored = sample(text, "tandem_collector_messages_total", fleet="f", outcome="stored")
        assert stored == 12_345_678
        collector.counts["stored"] += 1  # read at each scrape
        text = generate_latest(registry).decode()
        stored = sample(text, "tandem_collector_messages_total", fleet="f", outcome="stored")
        assert stored == 12_345_679
    finally:
        store.close()
