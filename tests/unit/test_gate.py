"""The rollout gate's rule (``cloud.fleet.gate.decide``) on summed counts: wait below the
minimum, the paired comparison against the margin, its interval, the audit check."""

from __future__ import annotations

import random

import pytest

from cloud.fleet.gate import GateDecision, GateStats, decide


def paired(n: int, both: int, shadow_only: int, serving_only: int, **kw: int) -> GateStats:
    """``n`` labelled shadow runs: ``both`` right for both models, ``shadow_only`` and
    ``serving_only`` right for one of them (the rest wrong for both)."""
    disagree = shadow_only + serving_only
    return GateStats(
        samples=n,
        agree_serving=n - disagree,
        labelled=n,
        agree_cloud=both + shadow_only,
        serving_agree_cloud=both + serving_only,
        shadow_only_right=shadow_only,
        serving_only_right=serving_only,
        **kw,
    )


def test_waits_until_the_minimum_of_labelled_samples() -> None:
    d = decide(paired(299, 280, 0, 19), min_samples=300, margin=0.02)
    assert d.state == "wait" and d.labelled == 299
    assert "299 of 300 labelled" in d.detail
    assert decide(GateStats(), 300, 0.02).state == "wait"
    assert decide(GateStats(), 0, 0.02).state == "wait"  # nothing at all never passes


def test_passes_an_equal_candidate_and_fails_a_worse_one() -> None:
    equal = decide(paired(400, 360, 6, 6), 300, 0.02)
    assert equal.state == "pass" and equal.diff == 0.0
    assert equal.candidate_agreement == equal.serving_agreement == 366 / 400
    # 10 points worse: 40 more requests right for serving only
    worse = decide(paired(400, 320, 2, 42), 300, 0.02)
    assert worse.state == "fail"
    assert worse.diff == pytest.approx(-0.10)
    assert "candidate 80.5% vs serving 90.5%" in worse.detail and "margin 2.0%" in worse.detail


def test_the_margin_is_inclusive() -> None:
    # exactly 2 points worse on 500: passes at margin 0.02, fails at 0.019
    s = paired(500, 450, 0, 10)
    assert decide(s, 300, 0.02).state == "pass"
    assert decide(s, 300, 0.019).state == "fail"


def test_the_paired_interval_comes_from_the_discordant_requests() -> None:
    d = decide(paired(400, 350, 10, 14), 300, 0.02)
    assert d.paired
    n, diff = 400, -4 / 400
    half = 1.959963984540054 * ((24 / n - diff * diff) / n) ** 0.5
    assert d.diff_low == pytest.approx(diff - half) and d.diff_high == pytest.approx(diff + half)
    # no discordance at all and the models always agree: a zero-width interval
    same = decide(paired(300, 270, 0, 0), 300, 0.02)
    assert same.paired and same.diff_low == same.diff_high == 0.0


def test_without_the_discordant_counts_the_interval_is_the_worst_case() -> None:
    full = paired(400, 350, 10, 14)
    # what an agent without the discordant counts says: 1,000 shadow runs (400 labelled),
    # 100 of them answered differently from the serving model
    bare = GateStats(
        samples=1000,
        agree_serving=900,
        labelled=full.labelled,
        agree_cloud=full.agree_cloud,
        serving_agree_cloud=full.serving_agree_cloud,
    )
    told, worst = decide(full, 300, 0.02), decide(bare, 300, 0.02)
    assert worst.state == told.state and worst.diff == told.diff  # the decision is the same
    assert not worst.paired and "worst case" in worst.detail
    assert worst.diff_low is not None and told.diff_low is not None
    assert worst.diff_low < told.diff_low  # only the interval is wider
    # the largest discordance the sums allow: both wrong at most 400 - 364 times
    assert bare.discordant() == (2 * 400 - 360 - 364, False)
    # or the runs the two disagreed on, when fewer
    assert GateStats(**{**bare.__dict__, "agree_serving": 970}).discordant() == (30, False)


def test_audit_error_after_the_canary() -> None:
    shadow = paired(400, 360, 6, 6)
    # too few audits on either side: the shadow figures decide alone
    few = decide(
        GateStats(**{**shadow.__dict__, "candidate_audited": 50, "candidate_wrong": 40}), 300, 0.02
    )
    assert few.state == "pass" and few.candidate_audit_error == 0.8
    worse = GateStats(
        **{
            **shadow.__dict__,
            "candidate_audited": 300,
            "candidate_wrong": 30,
            "serving_audited": 600,
            "serving_wrong": 30,
        }
    )
    d = decide(worse, 300, 0.02)
    assert d.state == "fail" and "audit error 10.0%" in d.detail and "5.0%" in d.detail
    close = GateStats(**{**worse.__dict__, "candidate_wrong": 20})  # 6.7% vs 5%: in margin
    assert decide(close, 300, 0.02).state == "pass"


def test_a_decision_round_trips_through_its_stored_form() -> None:
    d = decide(paired(400, 320, 2, 42), 300, 0.02)
    assert GateDecision.from_dict(d.to_dict()) == d


def _trial(rng: random.Random, n: int, p_serving: float, gap: float, overlap: float) -> GateStats:
    """``n`` labelled requests; serving right with ``p_serving``; the candidate ``gap``
    worse, wrong where serving is with ``overlap``."""
    right_alone = (1 - p_serving) * (1 - overlap)  # the candidate right, serving wrong
    both = shadow_only = serving_only = 0
    for _ in range(n):
        serving = rng.random() < p_serving
        if serving:
            shadow = rng.random() >= (gap + right_alone) / p_serving
        else:
            shadow = rng.random() >= overlap
        both += serving and shadow
        shadow_only += shadow and not serving
        serving_only += serving and not shadow
    return paired(n, both, shadow_only, serving_only)


def test_a_candidate_five_points_worse_is_stopped_at_500_samples_nearly_always() -> None:
    """The issue's figure, on simulated counts (seeded): 5 points worse, 500 labelled,
    margin 2 points: stopped in at least 95 % of trials; an equal one mostly passes."""
    rng = random.Random(15)
    worse = [decide(_trial(rng, 500, 0.9, 0.05, 0.9), 500, 0.02).state for _ in range(200)]
    assert worse.count("fail") / len(worse) >= 0.95
    equal = [decide(_trial(rng, 500, 0.9, 0.0, 0.9), 500, 0.02).state for _ in range(200)]
    assert equal.count("pass") / len(equal) >= 0.8
