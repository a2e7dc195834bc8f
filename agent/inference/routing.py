"""The routing policy: answer locally, or escalate to the cloud? Knows no transport.

Modes: ``edge`` never escalates, ``cloud`` always tries the cloud first, ``auto`` escalates
when the local confidence is below the threshold *and* the remaining deadline exceeds the
predicted cloud latency (plus a safety margin) *and* the circuit breaker lets a call through.
With ``prefer_cloud_above_ms`` set, ``auto`` also escalates confident answers whenever that
much budget remains (the caller said it can wait, so take the better model).

Every decision carries a ``reason`` (``agent.inference.result.Reason``); results and
telemetry report it, so an operator can see why the cloud was or was not asked.

A batch (``decide_batch``) shares one deadline and at most one cloud call: each row wants the
cloud or not as a lone request would, and one gate (cloud configured, budget, breaker)
decides for all the rows that want it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from agent.inference.breaker import CircuitBreaker
from agent.inference.latency import LatencyEstimator
from agent.inference.result import Reason

RouteMode = Literal["edge", "cloud", "auto"]
#: The modes as values: what requests and the command line are checked against.
ROUTE_MODES: tuple[RouteMode, ...] = get_args(RouteMode)


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

    def decide_batch(
        self,
        mode: RouteMode,
        confidences: list[float],
        remaining_ms: float,
        policy: RoutingPolicy,
    ) -> list[Decision]:
        """One decision per row of a batch whose local answers have ``confidences``, with
        ``remaining_ms`` of the batch's deadline left. The breaker is asked once (it may hand
        out its half-open probe, which the whole batch's call then is)."""
        if mode == "edge":
            return [_FORCED_EDGE] * len(confidences)
        if mode == "cloud":
            return [self._gate(Reason.FORCED_CLOUD, remaining_ms, need=0.0)] * len(confidences)
        loose = (
            policy.prefer_cloud_above_ms is not None
            and remaining_ms >= policy.prefer_cloud_above_ms
        )
        threshold = policy.threshold
        wants = [
            Reason.LOW_CONFIDENCE if c < threshold else Reason.LOOSE_BUDGET if loose else None
            for c in confidences
        ]
        if not any(wants):
            return [_CONFIDENT] * len(confidences)
        need = self.estimator.predicted_ms + policy.safety_margin_ms
        gate = self._gate("", remaining_ms, need)
        return [
            _CONFIDENT if want is None else Decision(True, want) if gate.escalate else gate
            for want in wants
        ]

    def _gate(self, want: str, remaining_ms: float, need: float) -> Decision:
        if not self.cloud_configured:
            return Decision(False, Reason.NO_CLOUD)
        if remaining_ms <= need:
            return Decision(False, Reason.NO_BUDGET)
        if not self.breaker.allow():  # last: allow() may hand out the half-open probe
            return Decision(False, Reason.BREAKER_OPEN)
        return Decision(True, want)

    def record_cloud(self, ok: bool, latency_ms: float | None) -> bool:
        """Feed the outcome of every call ``decide`` let through back: ``ok`` when the cloud
        is up (it answered, or refused that one request). ``latency_ms`` is None when the
        call says nothing about the round trip (refused at once). True when this changed
        whether the cloud is considered down (the breaker opened, or closed again)."""
        if latency_ms is not None:
            self.estimator.record(latency_ms)
        if ok:
            return self.breaker.record_success()
        return self.breaker.record_failure()
