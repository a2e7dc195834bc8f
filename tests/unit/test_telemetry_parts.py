"""Telemetry's parts on their own: histograms, request stats, the outbox, /sys readings."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.device.outbox import Outbox
from agent.device.telemetry import cpu_temperature_c, process_rss_bytes
from agent.inference.stats import RequestStats
from shared.telemetry import LATENCY_BOUNDS_MS, Histogram


def test_histogram_quantiles() -> None:
    h = Histogram()
    assert h.quantile(0.5) is None
    counts = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    counts[2], counts[8], counts[-1] = 90, 9, 1  # 0.2 ms, 20 ms, overflow
    h = Histogram(counts=counts)
    assert h.quantile(0.5) == 0.2 and h.quantile(0.95) == 20 and h.quantile(1.0) == float("inf")
    assert h.total == 100
    with pytest.raises(ValueError):
        Histogram(counts=[1, 2])


def test_request_stats() -> None:
    s = RequestStats()
    s.add("edge", "confident", 0.07, 0.06, None, 0.97)
    s.add("cloud", "low_confidence", 45.0, 0.06, 44.9, 1.0)
    assert s.requests == 2 and s.routes == {"edge": 1, "cloud": 1}
    assert s.reasons == {"confident": 1, "low_confidence": 1}
    assert sum(s.local) == 2 and sum(s.remote) == 1 and s.conf[9] == 2


def test_outbox_bounds_drop_oldest_and_persist(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_rows=3, max_bytes=10_000)
    for i in range(5):
        box.put("t", f"m{i}".encode())
    assert box.pending == 3 and box.dropped == 2
    rows = box.after(0, 10)
    assert [p for _, _, p in rows] == [b"m2", b"m3", b"m4"]
    box.delete(rows[0][0])
    box.close()
    again = Outbox(tmp_path / "o.db", max_rows=3, max_bytes=10_000)
    assert again.pending == 2 and again.dropped == 2  # survives a restart
    again.put("t", b"x" * 9_999)  # the byte bound drops the oldest too
    assert again.size_bytes <= 10_000 and again.dropped == 4


def test_readings_from_proc_and_sys(tmp_path: Path) -> None:
    rss = process_rss_bytes()
    assert rss is not None and rss > 10_000_000
    assert cpu_temperature_c(tmp_path) is None
    zone = tmp_path / "thermal_zone0"
    zone.mkdir()
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("48312\n")
    assert cpu_temperature_c(tmp_path) == pytest.approx(48.312)
