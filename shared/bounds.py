"""Exact binomial confidence bounds (Clopper-Pearson), in pure Python: the pipeline picks a
threshold with them (``cloud.pipeline.guarantee``) and the agent checks that threshold live
on its audit sample, so both sides must compute the same number, and the agent may not pull
in SciPy.

``upper(k, n, delta)`` is the largest error rate ``p`` for which seeing ``k`` or fewer errors
in ``n`` trials still has probability at least ``delta``: the true rate is below it with
probability at least ``1 - delta``. Found by bisection on the binomial tail, computed in log
space (``lgamma``), exact to 1e-9 for any ``n`` a device or a calibration set reaches.
"""

from __future__ import annotations

import math

_TOL = 1e-9
#: A term this far below the largest one ends the sum on its side (the rest are smaller).
_NEGLIGIBLE = 1e-20


def _log_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return (
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + k * math.log(p)
        + (n - k) * math.log1p(-p)
    )


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P[X <= k] for X ~ Binomial(n, p). The terms are summed outward from the largest one
    in 0..k (the pmf is unimodal, its peak at ``floor((n + 1) p)``), stopping on each side
    once a term is below ``_NEGLIGIBLE`` of it: a few hundred terms however large ``n`` is
    (200,000 audits: 23 ms an interval instead of 3.8 s), the same result to 1e-15."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    start = min(k, int((n + 1) * p))
    top = _log_pmf(start, n, p)
    total = 1.0
    for step in (-1, 1):
        i = start + step
        while 0 <= i <= k:
            ratio = math.exp(_log_pmf(i, n, p) - top)
            if ratio < _NEGLIGIBLE:
                break
            total += ratio
            i += step
    return min(1.0, math.exp(top) * total)


def _check(k: int, n: int, delta: float) -> None:
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def upper(k: int, n: int, delta: float) -> float:
    """One-sided upper bound on the rate at confidence ``1 - delta`` (1.0 when n == 0)."""
    _check(k, n, delta)
    if n == 0 or k == n:
        return 1.0
    lo, hi = k / n, 1.0
    while hi - lo > _TOL:
        mid = (lo + hi) / 2
        if binomial_cdf(k, n, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def lower(k: int, n: int, delta: float) -> float:
    """One-sided lower bound on the rate at confidence ``1 - delta`` (0.0 when k == 0)."""
    _check(k, n, delta)
    if n == 0 or k == 0:
        return 0.0
    return 1.0 - upper(n - k, n, delta)


def interval(k: int, n: int, delta: float) -> tuple[float, float]:
    """Two-sided ``1 - delta`` interval (``delta / 2`` on each side)."""
    return lower(k, n, delta / 2), upper(k, n, delta / 2)
