"""Calibration and routing, in NumPy: temperature scaling of the edge model's logits, how
reliable its confidence is, and the threshold that meets an operator's target.

The agent escalates a request when the edge model's max probability (after the manifest's
temperature) is below the threshold; everything here measures exactly that rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Thresholds tried, finest where they matter (most confidences sit near 1).
THRESHOLDS = np.unique(
    np.round(np.concatenate([np.linspace(0, 0.9, 91), np.linspace(0.9, 1, 101)]), 4)
)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    p = softmax(logits, temperature)
    return float(-np.log(np.maximum(p[np.arange(len(y)), y], 1e-12)).mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of ``y`` (Guo et al., 2017):
    a coarse log-spaced grid, then a golden-section search around its best point."""
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 60))
    losses = [nll(logits, y, float(t)) for t in grid]
    i = int(np.argmin(losses))
    lo, hi = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, len(grid) - 1)])
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll(logits, y, a) < nll(logits, y, b):
            hi = b
        else:
            lo = a
    return round((lo + hi) / 2, 4)


@dataclass(frozen=True)
class Reliability:
    """Confidence against accuracy in equal-width bins, and the expected calibration error."""

    bin_edges: list[float]
    confidence: list[float | None]
    accuracy: list[float | None]
    counts: list[int]
    ece: float


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> Reliability:
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    confidence: list[float | None] = []
    accuracy: list[float | None] = []
    counts, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        counts.append(n)
        if n == 0:
            confidence.append(None)
            accuracy.append(None)
            continue
        c, a = float(conf[mask].mean()), float(correct[mask].mean())
        confidence.append(c)
        accuracy.append(a)
        ece += n / len(y) * abs(c - a)
    return Reliability([float(e) for e in edges], confidence, accuracy, counts, float(ece))


@dataclass(frozen=True)
class CurvePoint:
    threshold: float
    escalation: float
    accuracy: float


def hybrid_curve(
    edge_probs: np.ndarray, cloud_probs: np.ndarray, y: np.ndarray
) -> list[CurvePoint]:
    """Hybrid accuracy and escalation rate for every threshold in ``THRESHOLDS``."""
    conf = edge_probs.max(axis=1)
    edge_ok = edge_probs.argmax(axis=1) == y
    cloud_ok = cloud_probs.argmax(axis=1) == y
    points = []
    for t in THRESHOLDS:
        esc = conf < t
        points.append(
            CurvePoint(float(t), float(esc.mean()), float(np.where(esc, cloud_ok, edge_ok).mean()))
        )
    return points


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    max_escalation: float | None
    min_relative_accuracy: float | None
    met_on_calib: bool
    calib: CurvePoint
    test: CurvePoint


def choose_threshold(
    calib_curve: list[CurvePoint],
    cloud_calib_accuracy: float,
    max_escalation: float | None,
    min_relative_accuracy: float | None,
) -> tuple[float, bool]:
    """The threshold for an operator's target, on the calibration split, and whether the
    target is met there.

    With an escalation budget: the most accurate threshold within it (ties: the one
    escalating least), so the accuracy target gets what margin the budget allows; the
    target is met if that point also reaches ``min_relative_accuracy`` times the cloud
    model's accuracy. With an accuracy target alone: the threshold escalating least that
    reaches it, or failing that the most accurate one.
    """
    need = None if min_relative_accuracy is None else min_relative_accuracy * cloud_calib_accuracy
    if max_escalation is not None:
        within = [p for p in calib_curve if p.escalation <= max_escalation + 1e-12]
        best = max(within, key=lambda p: (p.accuracy, -p.escalation))
        return best.threshold, need is None or best.accuracy >= need - 1e-12
    if need is None:
        raise ValueError("a target needs max_escalation, min_relative_accuracy or both")
    ok = [p for p in calib_curve if p.accuracy >= need - 1e-12]
    if ok:
        return min(ok, key=lambda p: (p.escalation, -p.accuracy)).threshold, True
    return max(calib_curve, key=lambda p: (p.accuracy, -p.escalation)).threshold, False


def point_at(curve: list[CurvePoint], threshold: float) -> CurvePoint:
    return min(curve, key=lambda p: abs(p.threshold - threshold))
