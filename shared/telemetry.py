"""The telemetry message an agent publishes every interval, and its histograms.

Each message carries the device, its session (the birth's counter, which increases at every
start) and a sequence number that increases within the session: consumers deduplicate on
(device, session, seq), which makes at-least-once delivery exactly-once in storage.

Latency histograms use fixed bucket bounds (milliseconds), so that histograms from many
devices and intervals add up; percentiles are estimated from the buckets.

Agents leave out fields at their schema default (a ``None``, an empty histogram as ``{}``):
parse a message with ``Telemetry`` and they are there again.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.identifiers import Identifier
from shared.status import ModelVersion

#: Upper bounds (ms) of the latency buckets; a last bucket catches everything above.
LATENCY_BOUNDS_MS: tuple[float, ...] = (
    0.05,
    0.1,
    0.2,
    0.5,
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    500,
    1000,
    2000,
    5000,
)
#: Confidence histogram: ten buckets of width 0.1 over [0, 1].
CONFIDENCE_BUCKETS = 10
#: Largest telemetry payload a collector accepts.
MAX_TELEMETRY_BYTES = 64 * 1024


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Histogram(_Msg):
    """Counts per bucket of ``LATENCY_BOUNDS_MS`` (plus one overflow bucket)."""

    counts: list[int] = Field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_MS) + 1))

    @model_validator(mode="after")
    def _check(self) -> Histogram:
        if len(self.counts) != len(LATENCY_BOUNDS_MS) + 1 or min(self.counts, default=0) < 0:
            raise ValueError("histogram must have one non-negative count per bucket")
        return self

    @property
    def total(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding the ``q`` quantile (None if empty)."""
        total = self.total
        if not total:
            return None
        rank = q * total
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank and n:
                return LATENCY_BOUNDS_MS[i] if i < len(LATENCY_BOUNDS_MS) else float("inf")
        return float("inf")


class CloudHealth(_Msg):
    breaker: str
    predicted_ms: float
    last_ms: float | None = None


class OutboxState(_Msg):
    pending: int = Field(ge=0)
    dropped: int = Field(ge=0, description="telemetry dropped because the outbox was full")


class WireBytes(_Msg):
    """Bytes one category of the device's traffic sent and received (see
    ``agent.device.wire`` for what is counted)."""

    sent: int = Field(ge=0)
    received: int = Field(ge=0)


class ShadowStats(_Msg):
    """A shadow candidate beside the serving model over one interval (``agent.inference.
    shadow``): on the requests it was run on, how often it agreed with the serving model,
    and on those with a cloud label (escalations and audits), how often it and the serving
    model each agreed with the cloud. The counts add up across intervals and devices: the
    rollout's gate sums them (``cloud.fleet.gate``)."""

    model: Identifier
    version: int = Field(ge=1)
    samples: int = Field(ge=0, description="requests the shadow ran on")
    agree_serving: int = Field(ge=0, description="of those, same top-1 as the serving model")
    labelled: int = Field(ge=0, description="shadow runs with a cloud label")
    agree_cloud: int = Field(ge=0, description="of those, the shadow's top-1 is the cloud's")
    serving_agree_cloud: int = Field(
        ge=0, description="of the same labelled runs, the serving model's top-1 is the cloud's"
    )
    shadow_only_right: int = Field(
        default=0,
        ge=0,
        description="labelled runs where the shadow matched the cloud and serving did not",
    )
    serving_only_right: int = Field(
        default=0,
        ge=0,
        description="labelled runs where serving matched the cloud and the shadow did not",
    )
    would_escalate: int = Field(
        ge=0, description="shadow runs whose confidence is below the shadow's own threshold"
    )
    dropped: int = Field(default=0, ge=0, description="sampled but not run (queue full)")

    @model_validator(mode="after")
    def _consistent(self) -> ShadowStats:
        """Subsets no larger than their sets: the gate sums these counts."""
        if max(self.agree_serving, self.would_escalate, self.labelled) > self.samples:
            raise ValueError("agreement, escalation and label counts exceed the shadow's runs")
        if max(self.agree_cloud, self.serving_agree_cloud) > self.labelled:
            raise ValueError("agreement with the cloud exceeds the labelled runs")
        if self.shadow_only_right > self.agree_cloud or self.serving_only_right > (
            self.serving_agree_cloud
        ):
            raise ValueError("discordant counts exceed the agreements they are part of")
        return self


class FieldAccuracy(_Msg):
    """The serving edge model checked against the cloud on field data: the audit sample of
    confident answers (those the edge answered itself), asked of the cloud off the request
    path. ``audited``/``wrong`` are this interval's; the session's totals give the measured
    error of the edge's own answers with its ``1 - delta`` confidence interval
    (Clopper-Pearson, ``shared.bounds``), to hold against the manifest's guarantee."""

    model: Identifier
    version: int = Field(ge=1)
    audited: int = Field(ge=0)
    wrong: int = Field(ge=0)
    session_audited: int = Field(ge=0)
    session_wrong: int = Field(ge=0)
    error: float | None = Field(default=None, ge=0, le=1, description="session_wrong/audited")
    error_low: float | None = Field(default=None, ge=0, le=1)
    error_high: float | None = Field(default=None, ge=0, le=1)
    epsilon: float | None = Field(default=None, description="the manifest's promised error")
    delta: float | None = None
    violated: bool | None = Field(
        default=None, description="true: even the interval's lower end is above epsilon"
    )
    dropped: int = Field(
        default=0, ge=0, description="picked, not audited: the audit queue was full (session)"
    )
    failed: int = Field(
        default=0, ge=0, description="picked, not audited: the cloud did not answer (session)"
    )
    skipped: int = Field(
        default=0,
        ge=0,
        description="picked, not auditable: an image model, or a model swapped since (session)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> FieldAccuracy:
        """Counts that cannot happen are the message's fault, refused at the collector (a
        sum of them would otherwise reach the gate and the fleet's figures)."""
        if self.wrong > self.audited or self.session_wrong > self.session_audited:
            raise ValueError("more wrong answers than audited ones")
        if self.delta is not None and not 0.0 < self.delta < 1.0:
            raise ValueError("delta must be in (0, 1)")
        if self.epsilon is not None and not 0.0 < self.epsilon < 1.0:
            raise ValueError("epsilon must be in (0, 1)")
        return self


class CaptureState(_Msg):
    """Field-data capture on the device (``agent.device.capture``), cumulative for the
    session except the spool's present size."""

    enabled: bool
    captured: int = Field(default=0, ge=0, description="samples written to the spool")
    duplicates: int = Field(default=0, ge=0, description="not written: already captured")
    skipped_budget: int = Field(default=0, ge=0, description="not written: byte budget spent")
    skipped_rate: int = Field(
        default=0, ge=0, description="not written: capture.max_samples_per_hour reached"
    )
    observations_dropped: int = Field(
        default=0,
        ge=0,
        description="answers not looked at: the hand-over queue from requests was full",
    )
    dropped_full: int = Field(default=0, ge=0, description="oldest dropped: spool full")
    pending: int = Field(default=0, ge=0, description="in the spool, not yet uploaded")
    pending_bytes: int = Field(default=0, ge=0)
    uploaded: int = Field(default=0, ge=0, description="accepted by the cloud")
    rejected: int = Field(default=0, ge=0, description="refused by the cloud for good (4xx)")


class Telemetry(_Msg):
    device: Identifier
    session: int = Field(ge=1)
    seq: int = Field(ge=1)
    ts: datetime
    interval_s: float = Field(ge=0)
    requests: int = Field(ge=0)
    routes: dict[str, int] = Field(description="answers by source: edge, cloud")
    reasons: dict[str, int] = Field(description="answers by reason (confident, low_confidence...)")
    errors: int = Field(ge=0)
    latency_local: Histogram
    latency_cloud: Histogram
    latency_total: Histogram
    confidence: list[int] = Field(min_length=CONFIDENCE_BUCKETS, max_length=CONFIDENCE_BUCKETS)
    offload_rate: float = Field(ge=0, le=1)
    cloud: CloudHealth | None = None
    models: list[ModelVersion] = []
    rss_bytes: int | None = None
    cpu_temp_c: float | None = None
    outbox: OutboxState | None = None
    wire_bytes: dict[str, WireBytes] | None = Field(
        default=None,
        description="bytes on the wire by category (births, telemetry, job_states, manifests, "
        "session, downloads, escalations, audits, samples), cumulative for the session; the "
        "telemetry "
        "category holds the messages sent before this one",
    )
    shadow: ShadowStats | None = None
    audit: FieldAccuracy | None = None
    capture: CaptureState | None = None
    budget_backoff: bool | None = Field(
        default=None,
        description="true: the day's byte budget is spent and telemetry comes at the "
        "longer over-budget interval (each message covers all of it)",
    )
