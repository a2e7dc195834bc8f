"""The retrain's default threshold rule (``calibrate.choose_matching_threshold``, through
``operating.fit_routing`` with ``rule="match"``): the threshold escalating least at which
the candidate keeps the serving model's hybrid accuracy on each part of the calibration
data, where the escalation budget's threshold can give accuracy away."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.pipeline import calibrate
from cloud.pipeline.field import capture_weights
from cloud.pipeline.operating import RoutingTarget, ServingReference, fit_routing

CLASSES = 3


def probs_of(pred: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """Probabilities with ``conf`` on ``pred`` and the rest shared by the other classes."""
    p = np.repeat(((1 - conf) / (CLASSES - 1))[:, None], CLASSES, axis=1)
    p[np.arange(len(pred)), pred] = conf
    return p


def one_hot(y: np.ndarray) -> np.ndarray:
    return np.eye(CLASSES)[y]


def shifted_part(n: int = 200) -> tuple[calibrate.MatchPart, np.ndarray]:
    """A field like the benchmark's: 30% hard inputs the candidate gets wrong with middling
    confidence (0.70-0.85), the rest right and sure (0.96-1.0); the cloud is right on all.
    The serving model escalates 35% at its threshold 0.9, every hard one among them."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, CLASSES, n)
    hard = np.arange(n) < int(0.3 * n)
    wrong = (y + 1) % CLASSES
    c_conf = np.where(hard, rng.uniform(0.70, 0.85, n), rng.uniform(0.96, 1.0, n))
    candidate = probs_of(np.where(hard, wrong, y), c_conf)
    s_conf = np.where(np.arange(n) < int(0.35 * n), 0.5, 0.99)
    serving = probs_of(y, s_conf)  # right on all it answers
    return calibrate.MatchPart("field", candidate, serving, 0.9, one_hot(y), y), y


def test_the_budget_loses_hybrid_accuracy_the_match_rule_keeps_it() -> None:
    part, y = shifted_part()
    curve = calibrate.hybrid_curve(part.candidate, part.cloud, y)
    budget, _ = calibrate.choose_threshold(curve, 1.0, 0.20, None)
    serving = calibrate.weighted_hybrid(part.serving, 0.9, part.cloud, y)
    at_budget = calibrate.weighted_hybrid(part.candidate, budget, part.cloud, y)
    assert at_budget[0] < serving[0] - 0.05  # the budget answers hard inputs wrongly

    matched = calibrate.choose_matching_threshold([part])
    hybrid, escalation = calibrate.weighted_hybrid(part.candidate, matched.threshold, part.cloud, y)
    assert matched.met and hybrid >= serving[0]
    assert escalation == pytest.approx(0.30)  # every hard one, nothing more: < serving's 35%
    assert matched.parts[0].serving_hybrid == serving[0] == 1.0
    assert matched.parts[0].candidate_escalation == pytest.approx(0.30)


def test_each_part_is_matched_on_its_own() -> None:
    """A gain on one part does not pay for a loss on another (pooled, it would)."""
    field, y = shifted_part()
    # a clean part where the serving model is wrong on 20 sure answers the candidate gets
    # right: pooled, those 20 would pay for 20 of the field's hard answers at the edge
    n = 100
    yc = np.arange(n) % CLASSES
    serving = probs_of(np.where(np.arange(n) < 20, (yc + 1) % CLASSES, yc), np.full(n, 0.99))
    clean = calibrate.MatchPart(
        "clean", probs_of(yc, np.full(n, 0.99)), serving, 0.9, one_hot(yc), yc
    )
    pooled = calibrate.MatchPart(
        "pooled",
        np.concatenate([field.candidate, clean.candidate]),
        np.concatenate([field.serving, clean.serving]),
        0.9,
        np.concatenate([field.cloud, clean.cloud]),
        np.concatenate([y, yc]),
    )
    apart = calibrate.choose_matching_threshold([field, clean])
    together = calibrate.choose_matching_threshold([pooled])
    assert together.threshold < apart.threshold
    assert calibrate.weighted_hybrid(field.candidate, together.threshold, field.cloud, y)[0] < 1
    assert calibrate.weighted_hybrid(field.candidate, apart.threshold, field.cloud, y)[0] == 1


def test_importance_weights_count_an_audit_for_the_requests_it_stands_for() -> None:
    w = capture_weights(np.array(["escalation", "audit", ""]), 0.02)
    assert w.tolist() == [1.0, 50.0, 1.0]
    y = np.array([0, 1])
    cand = probs_of(np.array([1, 1]), np.array([0.8, 0.99]))  # first: sure-ish and wrong
    part = calibrate.MatchPart(
        "w", cand, probs_of(y, np.array([0.5, 0.99])), 0.9, one_hot(y), y, np.array([1.0, 50.0])
    )
    assert calibrate.weighted_hybrid(cand, 0.0, part.cloud, y, part.weights) == (50 / 51, 0.0)
    with pytest.raises(ValueError):
        capture_weights(np.array(["audit"]), 0.0)


def test_when_nothing_matches_the_smallest_shortfall_is_chosen_and_said_so() -> None:
    y = np.zeros(10, dtype=np.int64)
    cand = probs_of(np.ones(10, dtype=np.int64), np.full(10, 0.99))  # always wrong, sure
    cloud = one_hot(np.ones(10, dtype=np.int64))  # the cloud wrong too: nothing helps...
    cloud[:5] = one_hot(np.zeros(5, dtype=np.int64))  # ...except escalating the first half
    part = calibrate.MatchPart("p", cand, probs_of(y, np.full(10, 0.99)), 0.9, cloud, y)
    matched = calibrate.choose_matching_threshold([part])
    assert not matched.met
    assert matched.threshold > 0.99  # escalating all gives 50%, the best there is
    assert matched.parts[0].candidate_hybrid == 0.5


def test_fit_routing_ships_the_matching_threshold_and_reports_the_budgets() -> None:
    part, y = shifted_part()
    logits = np.log(part.candidate)
    rows = np.arange(len(y))
    target = RoutingTarget(max_escalation=0.20, min_relative_accuracy=None, rule="match")
    fitted = fit_routing(
        {"calib": logits, "test": logits},
        {"calib": part.cloud, "test": part.cloud},
        {"calib": y, "test": y},
        target,
        [ServingReference("field", rows, part.serving, 0.9)],
    )
    assert fitted.chosen_by == "match" and fitted.matched is not None and fitted.matched.met
    probs = calibrate.softmax(logits, fitted.temperature)
    kept = calibrate.weighted_hybrid(probs, fitted.routing.threshold, part.cloud, y)[0]
    lost = calibrate.weighted_hybrid(probs, fitted.budget_threshold, part.cloud, y)[0]
    assert kept == 1.0 > lost
    assert fitted.section()["match"]["parts"][0]["name"] == "field"

    budget = fit_routing(
        {"calib": logits, "test": logits},
        {"calib": part.cloud, "test": part.cloud},
        {"calib": y, "test": y},
        RoutingTarget(max_escalation=0.20, min_relative_accuracy=None),
        [ServingReference("field", rows, part.serving, 0.9)],
    )
    assert budget.chosen_by == "budget"
    assert budget.routing.threshold == fitted.budget_threshold
    with pytest.raises(ValueError, match="serving"):
        fit_routing(
            {"calib": logits, "test": logits},
            {"calib": part.cloud, "test": part.cloud},
            {"calib": y, "test": y},
            target,
        )
