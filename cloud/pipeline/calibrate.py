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


@dataclass(frozen=True)
class MatchPart:
    """One part of the calibration data on which a candidate must keep the serving model's
    hybrid accuracy: both models' probabilities as a device computes them (each with its
    own temperature), the serving model's own threshold, the cloud model's probabilities
    (an escalated request gets its answer), the labels to score against and, optionally, a
    weight per sample (what share of the field each stands for)."""

    name: str
    candidate: np.ndarray
    serving: np.ndarray
    serving_threshold: float
    cloud: np.ndarray
    labels: np.ndarray
    weights: np.ndarray | None = None


@dataclass(frozen=True)
class PartFigures:
    name: str
    n: int
    weight: float
    serving_hybrid: float
    serving_escalation: float
    candidate_hybrid: float
    candidate_escalation: float


@dataclass(frozen=True)
class MatchedThreshold:
    """The threshold ``choose_matching_threshold`` chose, whether every part was matched
    there (``met``), and each part's figures at it."""

    threshold: float
    met: bool
    tolerance: float
    parts: list[PartFigures]


def weighted_hybrid(
    probs: np.ndarray,
    threshold: float,
    cloud: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray | None = None,
) -> tuple[float, float]:
    """Hybrid accuracy and escalation rate at ``threshold``, each sample counted ``weights``
    times (once without)."""
    w = np.ones(len(labels)) if weights is None else np.asarray(weights, dtype=np.float64)
    total = float(w.sum())
    if total <= 0:
        return 0.0, 0.0
    esc = probs.max(axis=1) < threshold
    ok = np.where(esc, cloud.argmax(axis=1) == labels, probs.argmax(axis=1) == labels)
    return float((w * ok).sum() / total), float((w * esc).sum() / total)


def choose_matching_threshold(
    parts: list[MatchPart], tolerance: float = 0.0, thresholds: np.ndarray = THRESHOLDS
) -> MatchedThreshold:
    """The lowest threshold (so the fewest escalations, on any data) at which the
    candidate's hybrid accuracy on every part is at least the serving model's on that part,
    at its own threshold, less ``tolerance``; the candidate then escalates as little as it
    can without giving up accuracy the fleet has today.

    Why each part on its own rather than pooled: the parts are different populations (the
    clean calibration split, and field samples that are mostly the serving model's hard
    cases), and a gain on one must not pay for a loss on the other. Why a paired comparison
    with the serving model rather than an absolute target: both models are scored on the
    same samples against the same labels, so the way field samples were captured (mostly
    escalations) biases both alike.

    If no threshold matches every part: the one whose worst part falls short the least
    (ties: the lowest), with ``met`` false. Parts without samples are left out.
    """
    used = [p for p in parts if len(p.labels)]
    if not used:
        raise ValueError("matching the serving model needs calibration samples")
    targets = [
        weighted_hybrid(p.serving, p.serving_threshold, p.cloud, p.labels, p.weights)[0]
        for p in used
    ]
    grid = sorted({float(t) for t in np.asarray(thresholds).ravel()})
    best: tuple[float, float] | None = None  # (worst shortfall, threshold)
    chosen = None
    for t in grid:
        worst = max(
            target - weighted_hybrid(p.candidate, t, p.cloud, p.labels, p.weights)[0]
            for p, target in zip(used, targets, strict=True)
        )
        if worst <= tolerance + 1e-12:
            chosen = t
            break
        if best is None or worst < best[0] - 1e-12:
            best = (worst, t)
    met = chosen is not None
    if chosen is None:
        assert best is not None
        chosen = best[1]
    figures = []
    for p, target in zip(used, targets, strict=True):
        s_esc = weighted_hybrid(p.serving, p.serving_threshold, p.cloud, p.labels, p.weights)[1]
        c_acc, c_esc = weighted_hybrid(p.candidate, chosen, p.cloud, p.labels, p.weights)
        figures.append(
            PartFigures(
                name=p.name,
                n=len(p.labels),
                weight=float(len(p.labels) if p.weights is None else np.sum(p.weights)),
                serving_hybrid=target,
                serving_escalation=s_esc,
                candidate_hybrid=c_acc,
                candidate_escalation=c_esc,
            )
        )
    return MatchedThreshold(threshold=chosen, met=met, tolerance=tolerance, parts=figures)
