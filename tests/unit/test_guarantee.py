"""The guaranteed threshold (``cloud.pipeline.guarantee``) on synthetic data whose error
rates are known: over repeated calibration draws the promise holds at least ``1 - delta``
of the time, and the edges behave (nothing passes, everything passes, bad input)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cloud.pipeline.calibrate import THRESHOLDS
from cloud.pipeline.guarantee import ESCALATE_ALL, choose_guaranteed_threshold, min_samples
from shared import bounds


def _error_rate(c: np.ndarray) -> np.ndarray:
    """P(wrong | confidence c) for the synthetic model: 40% wrong at c = 0, none at c = 1."""
    return 0.4 * (1.0 - c) ** 2


def _true_selective_error(t: float) -> float:
    """E[wrong | c >= t] for c ~ U(0, 1): the mean of 0.4 (1 - c)^2 over [t, 1]."""
    return 0.4 * (1.0 - t) ** 2 / 3.0 if t < 1.0 else 0.0


def _draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    c = rng.uniform(0.0, 1.0, n)
    return c, rng.uniform(0.0, 1.0, n) < _error_rate(c)


def test_the_guarantee_holds_over_repeated_draws() -> None:
    rng = np.random.default_rng(15)
    epsilon, delta, draws = 0.03, 0.1, 200
    violations, met, naive_violations = 0, 0, 0
    for _ in range(draws):
        c, wrong = _draw(rng, 600)
        g = choose_guaranteed_threshold(c, wrong, epsilon, delta)
        met += g.met
        violations += g.met and _true_selective_error(g.threshold) > epsilon
        # the control: the lowest threshold whose observed error is within epsilon
        naive = min(t for t in THRESHOLDS if wrong[c >= t].sum() <= epsilon * (c >= t).sum())
        naive_violations += _true_selective_error(naive) > epsilon
    assert naive_violations > 2 * delta * draws  # the draw's noise matters: the bound is needed
    # fixed-sequence testing stops at its first failure: an error among the most confident
    # answers (this model makes some) ends the scan early, sometimes before any threshold
    # passed; it is met in most draws, and where met it holds
    assert met >= 0.7 * draws
    assert violations <= delta * draws
    # and it is not trivially conservative: the best threshold is 1 - sqrt(3 eps / 0.4) = 0.53
    g = choose_guaranteed_threshold(*_draw(rng, 600), epsilon, delta)
    assert 0.5 < g.threshold < 0.8 and g.coverage > 0.2


def test_the_chosen_threshold_passes_its_own_bound() -> None:
    c, wrong = _draw(np.random.default_rng(1), 2000)
    g = choose_guaranteed_threshold(c, wrong, 0.05, 0.05)
    answered = c >= g.threshold
    assert g.met and g.n_answered == int(answered.sum())
    assert g.error == pytest.approx(wrong[answered].mean())
    assert g.bound == pytest.approx(bounds.upper(int(wrong[answered].sum()), g.n_answered, 0.05))
    assert g.bound <= 0.05 and g.coverage == pytest.approx(answered.mean())
    manifest = g.manifest("cloud")
    assert manifest.reference == "cloud" and manifest.calibration_samples == 2000
    assert manifest.epsilon == 0.05 and manifest.coverage == g.coverage


def test_a_looser_epsilon_never_answers_less() -> None:
    c, wrong = _draw(np.random.default_rng(2), 1500)
    picks = [choose_guaranteed_threshold(c, wrong, e, 0.1) for e in (0.01, 0.02, 0.05, 0.1, 0.3)]
    assert all(a.threshold >= b.threshold for a, b in itertools.pairwise(picks))
    assert picks[-1].threshold == 0.0 and picks[-1].coverage == 1.0  # 13% wrong overall


def test_nothing_meets_it_then_everything_escalates() -> None:
    rng = np.random.default_rng(3)
    c = rng.uniform(0.0, 0.999, 500)
    wrong = rng.uniform(size=500) < 0.5  # half wrong at every confidence
    g = choose_guaranteed_threshold(c, wrong, 0.05, 0.1)
    assert not g.met and g.threshold == ESCALATE_ALL
    assert g.coverage == 0.0 and g.n_answered == 0


def test_too_few_samples_cannot_carry_it() -> None:
    assert bounds.upper(0, min_samples(0.01, 0.1), 0.1) <= 0.01
    assert bounds.upper(0, min_samples(0.01, 0.1) - 1, 0.1) > 0.01
    c = np.full(min_samples(0.01, 0.1) - 1, 0.99)
    g = choose_guaranteed_threshold(c, np.zeros(len(c), bool), 0.01, 0.1)
    assert not g.met  # no errors at all, but too few to promise 1%


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="differ"):
        choose_guaranteed_threshold(np.ones(3), np.zeros(4, bool), 0.1, 0.1)
    with pytest.raises(ValueError, match="epsilon"):
        choose_guaranteed_threshold(np.ones(3), np.zeros(3, bool), 0.0, 0.1)
