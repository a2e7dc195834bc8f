"""The rollout gate: does a candidate release do as well in the field as the model it would
replace? Decided from counts the agents report (telemetry's ``shadow`` and ``audit``
sections, summed by ``queries.gate_stats``), never from a single device.

The rule (``decide``):

- **wait** until the candidate has run, as a shadow, on at least ``min_samples`` requests
  with a cloud label (escalations and audits): fewer say too little either way;
- then **pass** when the candidate's agreement with the cloud is at least the serving
  model's minus ``margin``, both measured *on the same labelled requests*, else **fail**.

Why paired: the shadow and the serving model answer the very same inputs, so the requests
both get right or both get wrong say nothing about which is better, and the difference of
the two agreements is exactly ``(shadow_only_right - serving_only_right) / labelled``. Its
spread comes from the discordant requests alone (McNemar's view), much narrower than two
independent proportions' would be: a candidate 5 points worse is told apart on a few hundred
labelled requests. The decision is the point estimate against the margin, made once there
are ``min_samples``; the 95 % interval of the difference (normal approximation on the
discordant counts, ``diff_low``/``diff_high``) says how sure it is, and sizing
``min_samples`` so that the interval's half-width (about ``1.96 * sqrt(discordant share /
labelled)``) is below the margin keeps both errors rare. An agent that does not report the
discordant counts gets the worst case their sums allow (the interval is wider, the decision
the same).

Which requests are labelled matters as much as how many. Escalations label only the requests
the serving model doubts, where two small models differ on a fifth to a third of them; a
candidate's confident mistakes fall on the others, which only audits label. So while a shadow
is installed the agent audits confident answers at ``[shadow] audit_rate`` (default 1: every
one), which makes the labelled requests the device's stream itself: the paired difference
then estimates the field's difference, and the confident requests, rarely discordant, narrow
its spread. The phase's cloud calls stay about ``min_samples`` in all (it ends when they
are labelled); the rate only decides how many of them are audits rather than escalations.
With it, ``DEFAULT_MIN_SAMPLES`` 500 and ``DEFAULT_MARGIN`` 1 point stop a candidate 4.7
points worse on the shifted digits in 96 % of shadow phases (docs/benchmarks.md).

After the canary (devices now serve the candidate and report ``audit``, the check of their
confident answers against the cloud), the audit errors join in: when the candidate and the
serving versions each have ``min_samples`` audited answers, a candidate whose audit error is
above the serving versions' by more than ``margin`` fails. Those are two independent
samples (different devices, different requests), so only a clear gap counts; with fewer
audits the shadow figures decide alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

GateState = Literal["pass", "fail", "wait"]

#: two-sided 95 % normal quantile, for the reported interval of the difference
Z95 = 1.959963984540054

#: The rollout's defaults (``tandem-cloud fleet rollout --shadow``), chosen with
#: ``scripts/bench_gate.py`` (docs/benchmarks.md, "The gate").
DEFAULT_MIN_SAMPLES = 500
DEFAULT_MARGIN = 0.01


@dataclass(frozen=True)
class GateStats:
    """Summed counts of a candidate version: its shadow runs (``ShadowStats`` fields, over
    every interval and device counted) and the audits of the candidate and of the serving
    versions it is compared with (``FieldAccuracy``)."""

    samples: int = 0
    agree_serving: int = 0
    labelled: int = 0
    agree_cloud: int = 0
    serving_agree_cloud: int = 0
    shadow_only_right: int = 0
    serving_only_right: int = 0
    would_escalate: int = 0
    dropped: int = 0
    devices: int = 0  # devices that reported shadow runs
    candidate_audited: int = 0
    candidate_wrong: int = 0
    serving_audited: int = 0
    serving_wrong: int = 0

    def discordant(self) -> tuple[int, bool]:
        """Labelled requests the two models answered differently as to the cloud, and
        whether that is the agents' own count (True) or the largest the sums allow."""
        reported = self.shadow_only_right + self.serving_only_right
        consistent = (
            self.shadow_only_right - self.serving_only_right
            == self.agree_cloud - self.serving_agree_cloud
        )
        if consistent and (reported > 0 or self.agree_serving >= self.samples):
            return reported, True
        n, a, b = self.labelled, self.agree_cloud, self.serving_agree_cloud
        # both right at least a + b - n times; discordance needs the two to disagree
        most = min(a + b, 2 * n - a - b, max(0, self.samples - self.agree_serving))
        return max(most, abs(a - b)), False


@dataclass(frozen=True)
class GateDecision:
    state: GateState
    candidate_agreement: float | None  # with the cloud, on the labelled shadow runs
    serving_agreement: float | None  # the serving model's, on the same runs
    diff: float | None  # candidate - serving
    labelled: int
    detail: str
    diff_low: float | None = None  # 95 % interval of ``diff``
    diff_high: float | None = None
    paired: bool = True  # the interval from the agents' discordant counts (else worst case)
    candidate_audit_error: float | None = None
    serving_audit_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateDecision:
        return cls(**data)


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


def decide(stats: GateStats, min_samples: int, margin: float) -> GateDecision:
    """The gate's state on ``stats`` (see the module's docstring for the rule)."""
    n = stats.labelled
    cand = _rate(stats.agree_cloud, n)
    serv = _rate(stats.serving_agree_cloud, n)
    cand_err = _rate(stats.candidate_wrong, stats.candidate_audited)
    serv_err = _rate(stats.serving_wrong, stats.serving_audited)
    if n < max(1, min_samples):
        return GateDecision(
            "wait",
            cand,
            serv,
            None if cand is None or serv is None else cand - serv,
            n,
            f"{n} of {min_samples} labelled shadow samples",
            candidate_audit_error=cand_err,
            serving_audit_error=serv_err,
        )
    assert cand is not None and serv is not None
    diff = cand - serv
    discordant, paired = stats.discordant()
    half = Z95 * math.sqrt(max(0.0, discordant / n - diff * diff) / n)
    figures = (
        f"candidate {cand:.1%} vs serving {serv:.1%} agreement with the cloud on {n} "
        f"labelled requests (difference {diff:+.1%}, 95% interval {diff - half:+.1%} to "
        f"{diff + half:+.1%}{'' if paired else ', worst case'}; margin {margin:.1%})"
    )
    # on the counts, so that a difference of exactly the margin passes (no rounding)
    gap = stats.agree_cloud - stats.serving_agree_cloud
    state: GateState = "pass" if gap >= -margin * n - 1e-9 else "fail"
    detail = f"gate {state}: {figures}"
    if (
        state == "pass"
        and cand_err is not None
        and serv_err is not None
        and min(stats.candidate_audited, stats.serving_audited) >= min_samples
        and cand_err > serv_err + margin
    ):
        state = "fail"
        detail = (
            f"gate fail: audit error {cand_err:.1%} on {stats.candidate_audited} answers of "
            f"the candidate vs {serv_err:.1%} on {stats.serving_audited} of the serving "
            f"versions (margin {margin:.1%}); shadow: {figures}"
        )
    return GateDecision(
        state,
        cand,
        serv,
        diff,
        n,
        detail,
        diff - half,
        diff + half,
        paired,
        candidate_audit_error=cand_err,
        serving_audit_error=serv_err,
    )
