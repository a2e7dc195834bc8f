"""The upload refusals' counter and its rate-limited log (``SampleMetrics``), on a clock
the test moves."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from cloud.fleet.samples.api import LOG_EVERY_S, SampleMetrics, _RefusalError
from shared.samples import UploadResult
from tests.prometheus import sample


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_refusals_are_counted_every_time_and_logged_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    metrics = SampleMetrics("f", clock=clock)
    bad_token = _RefusalError(401, "unauthenticated", "the token is not device d's")
    caplog.set_level(logging.WARNING, logger="cloud.fleet.samples.api")
    for _ in range(5):
        metrics.refused(bad_token, "d")
    metrics.refused(_RefusalError(429, "quota", "over"), "d")  # another reason: its own line
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "unauthenticated, 401" in lines[0] and "quota" in lines[1]
    clock.now += LOG_EVERY_S + 0.1
    metrics.refused(bad_token, "d")
    assert len(caplog.records) == 3
    assert "(4 more since the last line)" in caplog.records[-1].getMessage()
    metrics.accepted(UploadResult(stored=3, duplicates=1))
    registry = CollectorRegistry()
    registry.register(metrics)
    text = generate_latest(registry).decode()
    rejected = "tandem_samples_rejected_total"
    assert sample(text, rejected, fleet="f", reason="unauthenticated") == 6
    assert sample(text, rejected, fleet="f", reason="quota") == 1
    assert sample(text, rejected, fleet="f", reason="too_large") == 0
    received = "tandem_samples_received_total"
    assert sample(text, received, fleet="f", outcome="stored") == 3
    assert sample(text, received, fleet="f", outcome="duplicate") == 1
