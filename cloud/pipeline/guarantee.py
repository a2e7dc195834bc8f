"""A threshold with a guarantee: the lowest confidence threshold (the most answers given at
the edge) such that the edge's own answers (confidence at or above it) are wrong at most
``epsilon`` of the time, with probability at least ``1 - delta`` over the draw of the
calibration set.

Learn then Test (Angelopoulos, Bates, Candès, Jordan, Lei, 2021) with fixed-sequence
testing: one null hypothesis per threshold, "the error of the answers at or above it exceeds
``epsilon``", tested with the Clopper-Pearson upper bound (``shared.bounds.upper``, the
function the agent uses for its live check, so both sides compute the same number) from the
most conservative threshold down, stopping at the first that fails. Because the order is
fixed before the data is seen and the scan stops at the first failure, the whole scan is
valid at level ``delta`` with no union bound over the thresholds tried.

Two details keep the scan from stopping on thresholds that say nothing:

- a threshold that nothing reaches (no answers at the edge) makes no error and is passed by;
- a threshold answering fewer samples than ``min_samples(epsilon, delta)`` (the fewest for
  which even zero errors pass) cannot be rejected by any data; it is passed by untested.
  Both depend on the confidences alone, never on which answers were wrong.

Neither is ever chosen: the threshold returned is one whose test passed, or, if none did,
``ESCALATE_ALL`` (1.0, the highest threshold a manifest holds: everything escalates except a
confidence of exactly 1.0) with ``met`` false.

NumPy and ``shared.bounds`` only: no TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from cloud.pipeline.calibrate import THRESHOLDS
from shared import bounds
from shared.manifest import Guarantee

#: When no threshold carries the guarantee: escalate (nearly) everything.
ESCALATE_ALL = 1.0
METHOD = "clopper-pearson fixed-sequence"
Reference = Literal["labels", "cloud"]


@dataclass(frozen=True)
class GuaranteedThreshold:
    """The chosen threshold and what it gives on the calibration set: ``coverage`` (share
    answered at the edge), ``error`` (observed error of those answers), ``bound`` (its
    Clopper-Pearson upper bound at ``1 - delta``), ``n_answered``; ``met``: a threshold
    passed the test."""

    threshold: float
    coverage: float
    error: float
    bound: float
    n_answered: int
    met: bool
    epsilon: float
    delta: float
    n: int

    def manifest(self, reference: Reference) -> Guarantee:
        """The manifest's ``routing.guarantee``, for ``reference`` ("cloud": wrong means not
        the cloud model's answer; "labels": not the true label)."""
        return Guarantee(
            epsilon=self.epsilon,
            delta=self.delta,
            reference=reference,
            method=METHOD,
            calibration_samples=self.n,
            calibration_error=self.error,
            coverage=self.coverage,
        )


def min_samples(epsilon: float, delta: float) -> int:
    """The fewest answers for which zero errors pass: ``(1 - epsilon)^n <= delta``."""
    n = int(np.ceil(np.log(delta) / np.log1p(-epsilon)))
    while n > 1 and bounds.upper(0, n - 1, delta) <= epsilon:
        n -= 1
    while bounds.upper(0, n, delta) > epsilon:
        n += 1
    return n


def choose_guaranteed_threshold(
    confidence: np.ndarray,
    wrong: np.ndarray,
    epsilon: float,
    delta: float,
    thresholds: np.ndarray = THRESHOLDS,
) -> GuaranteedThreshold:
    """The lowest threshold in ``thresholds`` passing the fixed-sequence test (see the module
    docstring); ``confidence`` is the edge's calibrated confidence per calibration sample,
    ``wrong`` whether its answer was wrong (against labels or the cloud's answers)."""
    if not (0.0 < epsilon < 1.0 and 0.0 < delta < 1.0):
        raise ValueError(f"epsilon and delta must be in (0, 1), got {epsilon}, {delta}")
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    bad = np.asarray(wrong, dtype=bool).ravel()
    if conf.shape != bad.shape:
        raise ValueError(f"confidence {conf.shape} and wrong {bad.shape} differ in length")
    n_min = min_samples(epsilon, delta)
    best: tuple[float, int, int, float] | None = None  # threshold, answered, errors, bound
    for t in sorted({float(v) for v in np.asarray(thresholds).ravel()}, reverse=True):
        answered = conf >= t
        n = int(answered.sum())
        if n < n_min:
            continue  # no data could reject it: not tested, never chosen
        k = int(bad[answered].sum())
        bound = bounds.upper(k, n, delta)
        if bound > epsilon:
            break
        best = (t, n, k, bound)
    if best is None:
        answered = conf >= ESCALATE_ALL
        n, k = int(answered.sum()), int(bad[answered].sum())
        best = (ESCALATE_ALL, n, k, bounds.upper(k, n, delta))
        met = False
    else:
        met = True
    t, n, k, bound = best
    return GuaranteedThreshold(
        threshold=t,
        coverage=n / len(conf) if len(conf) else 0.0,
        error=k / n if n else 0.0,
        bound=bound,
        n_answered=n,
        met=met,
        epsilon=epsilon,
        delta=delta,
        n=len(conf),
    )
