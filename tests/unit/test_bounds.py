"""Clopper-Pearson bounds (shared/bounds.py): known values, the exact tail sum, and that
the bound covers the true rate as often as it promises."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from shared import bounds


def _cdf_all_terms(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def test_known_values() -> None:
    # 0 of 100: the "rule of three" bound 1 - 0.05 ** (1/100)
    assert bounds.upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100), abs=1e-8)
    # 5 of 100, two-sided 95%: the textbook (0.0164, 0.1128)
    low, high = bounds.interval(5, 100, 0.05)
    assert low == pytest.approx(0.01643, abs=1e-4)
    assert high == pytest.approx(0.11283, abs=1e-4)
    assert bounds.upper(10, 10, 0.05) == 1.0 and bounds.lower(0, 10, 0.05) == 0.0
    assert bounds.upper(0, 0, 0.05) == 1.0


def test_tail_sum_matches_the_full_sum() -> None:
    rng = random.Random(3)
    for _ in range(500):
        n = rng.choice([1, 2, 7, 40, 150, 400])
        k, p = rng.randint(0, n), rng.random()
        assert bounds.binomial_cdf(k, n, p) == pytest.approx(_cdf_all_terms(k, n, p), abs=1e-12)


def test_large_counts_stay_consistent() -> None:
    low, high = bounds.interval(10_000, 200_000, 0.05)
    assert low < 0.05 < high and high - low < 0.003


@pytest.mark.parametrize("bad", [(-1, 10, 0.05), (11, 10, 0.05), (1, 10, 0.0), (1, 10, 1.0)])
def test_refuses_nonsense(bad: tuple[int, int, float]) -> None:
    with pytest.raises(ValueError):
        bounds.upper(*bad)


def test_upper_bound_covers_the_true_rate() -> None:
    rng = np.random.default_rng(11)
    p, n, delta = 0.03, 400, 0.1
    misses = sum(bounds.upper(int(k), n, delta) < p for k in rng.binomial(n, p, 400))
    assert misses <= 1.5 * delta * 400  # promised at most delta; exact tests are conservative
