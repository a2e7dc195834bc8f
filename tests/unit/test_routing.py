"""The routing policy on its own: every mode and reason, no transport."""

from __future__ import annotations

import pytest

from agent.inference.breaker import CircuitBreaker
from agent.inference.latency import LatencyEstimator
from agent.inference.result import Reason
from agent.inference.routing import Router, RoutingPolicy

POLICY = RoutingPolicy(threshold=0.8, safety_margin_ms=1.0)


def router(cloud: bool = True, predicted_ms: float = 40.0) -> Router:
    return Router(CircuitBreaker(2, 60.0), LatencyEstimator(predicted_ms), cloud_configured=cloud)


@pytest.mark.parametrize(
    ("mode", "conf", "remaining", "escalate", "reason"),
    [
        ("edge", 0.1, 1000, False, Reason.FORCED_EDGE),
        ("cloud", 0.99, 1000, True, Reason.FORCED_CLOUD),
        ("auto", 0.9, 1000, False, Reason.CONFIDENT),
        ("auto", 0.8, 1000, False, Reason.CONFIDENT),  # threshold itself is confident
        ("auto", 0.5, 1000, True, Reason.LOW_CONFIDENCE),
        ("auto", 0.5, 41.0, False, Reason.NO_BUDGET),  # needs predicted 40 + margin 1
        ("auto", 0.5, 41.5, True, Reason.LOW_CONFIDENCE),
    ],
)
def test_decisions(mode: str, conf: float, remaining: float, escalate: bool, reason: str) -> None:
    d = router().decide(mode, conf, remaining, POLICY)  # type: ignore[arg-type]
    assert (d.escalate, d.reason) == (escalate, reason)


def test_no_cloud_configured() -> None:
    r = router(cloud=False)
    assert r.decide("auto", 0.1, 1000, POLICY).reason == Reason.NO_CLOUD
    assert r.decide("cloud", 0.1, 1000, POLICY).reason == Reason.NO_CLOUD
    assert r.decide("auto", 0.9, 1000, POLICY).reason == Reason.CONFIDENT


def test_loose_budget_prefers_cloud() -> None:
    policy = RoutingPolicy(threshold=0.8, prefer_cloud_above_ms=500)
    r = router()
    assert r.decide("auto", 0.99, 600, policy) == r.decide("auto", 0.99, 500, policy)
    assert r.decide("auto", 0.99, 600, policy).reason == Reason.LOOSE_BUDGET
    assert r.decide("auto", 0.99, 499, policy).reason == Reason.CONFIDENT


def test_breaker_open_keeps_requests_local_and_estimate_follows_calls() -> None:
    r = router()
    r.record_cloud(False, None)
    r.record_cloud(False, 120.0)
    d = r.decide("auto", 0.1, 1000, POLICY)
    assert (d.escalate, d.reason) == (False, Reason.BREAKER_OPEN)
    assert r.estimator.predicted_ms == 120.0  # refused calls (None) say nothing of latency


def test_estimator_predicts_a_high_quantile() -> None:
    e = LatencyEstimator(initial_ms=50, window=10, quantile=0.9)
    assert e.predicted_ms == 50
    for ms in [10, 10, 10, 10, 10, 10, 10, 10, 10, 100]:
        e.record(ms)
    assert e.predicted_ms == 100
    for ms in [10] * 10:
        e.record(ms)
    assert e.predicted_ms == 10 and len(e) == 10


def test_a_batch_wants_per_row_and_is_gated_once() -> None:
    r = router()
    confs = [0.9, 0.5, 0.99, 0.1]
    decisions = r.decide_batch("auto", confs, 1000, POLICY)
    assert [(d.escalate, d.reason) for d in decisions] == [
        (False, Reason.CONFIDENT),
        (True, Reason.LOW_CONFIDENCE),
        (False, Reason.CONFIDENT),
        (True, Reason.LOW_CONFIDENCE),
    ]
    assert [d.reason for d in r.decide_batch("auto", confs, 41.0, POLICY)] == [
        Reason.CONFIDENT,
        Reason.NO_BUDGET,
        Reason.CONFIDENT,
        Reason.NO_BUDGET,
    ]
    assert all(d.reason == Reason.FORCED_EDGE for d in r.decide_batch("edge", confs, 1e3, POLICY))
    assert all(d.escalate for d in r.decide_batch("cloud", confs, 1.0, POLICY))
    assert not any(
        d.escalate for d in router(cloud=False).decide_batch("cloud", confs, 1e3, POLICY)
    )
    loose = RoutingPolicy(threshold=0.8, prefer_cloud_above_ms=500)
    assert [d.reason for d in r.decide_batch("auto", [0.9, 0.5], 600, loose)] == [
        Reason.LOOSE_BUDGET,
        Reason.LOW_CONFIDENCE,
    ]


def test_a_batch_is_the_half_open_probe_as_a_whole() -> None:
    """In half-open state the breaker lets one call through: the batch's, for all its unsure
    rows (asking it per row would send one row and keep the others local)."""
    clock = [0.0]
    r = Router(CircuitBreaker(1, 5.0, clock=lambda: clock[0]), LatencyEstimator(1.0), True)
    r.record_cloud(False, None)
    assert r.decide_batch("auto", [0.1, 0.2], 1000, POLICY)[0].reason == Reason.BREAKER_OPEN
    clock[0] = 5.0
    assert [d.escalate for d in r.decide_batch("auto", [0.1, 0.9, 0.2], 1000, POLICY)] == [
        True,
        False,
        True,
    ]
    assert r.decide("auto", 0.1, 1000, POLICY).reason == Reason.BREAKER_OPEN  # probe taken
