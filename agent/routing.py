"""The routing policy: answer locally, or escalate to the cloud? Knows no transport.

Modes: ``edge`` never escalates, ``cloud`` always tries the cloud first, ``auto`` escalates
when the local confidence is below the threshold *and* the remaining deadline exceeds the
predicted cloud latency (plus a safety margin) *and* the circuit breaker lets a call through.
With ``prefer_cloud_above_ms`` set, ``auto`` also escalates confident answers whenever that
much budget remains (the caller said it can wait, so take the better model).

Every decision carries a ``reason``; results and telemetry report it, so an operator can see
why the cloud was or was not asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.breaker import CircuitBreaker
from agent.latency import LatencyEstimator

RouteMode = Literal["edge", "cloud", "auto"]
ROUTE_MODES: tuple[RouteMode, ...] = ("edge", "cloud", "auto")


class Reason:
    """Why a request was answered where it was. Stable strings: telemetry counts by them."""

    # answered at the edge by choice
    CONFIDENT = "confident"
    FORCED_EDGE = "forced_edge"
    # wanted the cloud but did not ask it
    NO_CLOUD = "no_cloud"
    NO_BUDGET = "no_budget"
    BREAKER_OPEN = "breaker_open"
    # escalated
    LOW_CONFIDENCE = "low_confidence"
    LOOSE_BUDGET = "loose_budget"
    FORCED_CLOUD = "forced_cloud"
    # escalated, but the cloud failed: the local answer stands (CloudError.reason)
    CLOUD_TIMEOUT = "cloud_timeout"
    CLOUD_UNAVAILABLE = "cloud_unavailable"
    CLOUD_ERROR = "cloud_error"


@dataclass(frozen=True, slots=True)
class Decision:
    escalate: bool
    reason: str


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    """The knobs of a decision; resolved from settings and the manifest's defaults."""

    threshold: float
    prefer_cloud_above_ms: float | None = None
    safety_margin_ms: float = 1.0


_FORCED_EDGE = Decision(False, Reason.FORCED_EDGE)
_CONFIDENT = Decision(False, Reason.CONFIDENT)


class Router:
    """Makes decisions with the cloud's health (breaker, latency estimate) it tracks;
    thread-safe (the breaker and estimator lock themselves). The policy comes with each call
    because it belongs to the serving model and changes when a model is swapped."""

    def __init__(
        self, breaker: CircuitBreaker, estimator: LatencyEstimator, cloud_configured: bool
    ) -> None:
        self.breaker = breaker
        self.estimator = estimator
        self.cloud_configured = cloud_configured

    def decide(
        self, mode: RouteMode, confidence: float, remaining_ms: float, policy: RoutingPolicy
    ) -> Decision:
        """Decide for a request whose local answer has ``confidence`` (ignored in ``cloud``
        mode) with ``remaining_ms`` of its deadline left."""
        if mode == "edge":
            return _FORCED_EDGE
        if mode == "cloud":
            return self._gate(Reason.FORCED_CLOUD, remaining_ms, need=0.0)
        loose = (
            policy.prefer_cloud_above_ms is not None
            and remaining_ms >= policy.prefer_cloud_above_ms
        )
        if confidence >= policy.threshold and not loose:
            return _CONFIDENT
        want = Reason.LOW_CONFIDENCE if confidence < policy.threshold else Reason.LOOSE_BUDGET
        need = self.estimator.predicted_ms + policy.safety_margin_ms
        return self._gate(want, remaining_ms, need)

    def _gate(self, want: str, remaining_ms: float, need: float) -> Decision:
        if not self.cloud_configured:
            return Decision(False, Reason.NO_CLOUD)
        if remaining_ms <= need:
            return Decision(False, Reason.NO_BUDGET)
        if not self.breaker.allow():  # last: allow() may hand out the half-open probe
            return Decision(False, Reason.BREAKER_OPEN)
        return Decision(True, want)

    def record_cloud(self, ok: bool, latency_ms: float | None) -> None:
        """Feed the outcome of every call ``decide`` let through back. ``latency_ms`` is None
        when the call says nothing about the round trip (refused at once)."""
        if latency_ms is not None:
            self.estimator.record(latency_ms)
        if ok:
            self.breaker.record_success()
        else:
            self.breaker.record_failure()
