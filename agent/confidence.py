"""Turning a model's output into probabilities and one confidence number in [0, 1].

Logits go through a softmax with a temperature; probabilities pass through unchanged unless a
temperature other than 1 asks for re-scaling (done on their logarithms). Three confidence
metrics are offered because they fail differently: ``max_prob`` is the usual one,
``margin`` (top-1 minus top-2) flags two-way confusions, ``entropy`` (1 minus the normalised
entropy) flags spread-out outputs.

``score`` is on every request's path. For the small outputs edge classifiers have it works on
a Python list: a dozen NumPy calls on a 10-element array cost more than the arithmetic.
"""

from __future__ import annotations

import math

import numpy as np

from shared.manifest import ConfidenceMetric, OutputKind

_TINY = 1e-12
#: Up to this many classes, ``score`` computes in pure Python; above it, in NumPy.
SMALL_OUTPUT = 64


def to_probabilities(output: np.ndarray, kind: OutputKind, temperature: float = 1.0) -> np.ndarray:
    """Probabilities along the last axis of ``output`` (any shape)."""
    if kind == "probabilities":
        if temperature == 1.0:
            return output
        z = np.log(np.maximum(output, _TINY)) / temperature
    else:
        z = output / temperature if temperature != 1.0 else output
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    p: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return p


def confidence(probs: np.ndarray, metric: ConfidenceMetric) -> float:
    """Confidence of one probability vector (1-D)."""
    if metric == "max_prob":
        return float(probs.max())
    if metric == "margin":
        top2 = np.partition(probs, -2)[-2:]
        return float(top2[1] - top2[0])
    p = np.maximum(probs, _TINY)
    entropy = float(-(p * np.log(p)).sum())
    return max(0.0, 1.0 - entropy / math.log(len(probs)))


def score(
    output: np.ndarray, kind: OutputKind, temperature: float, metric: ConfidenceMetric
) -> tuple[list[float], float, int]:
    """Probabilities (a list), confidence and top-1 index of one output row, fast."""
    if len(output) > SMALL_OUTPUT:
        probs = to_probabilities(output, kind, temperature)
        return probs.tolist(), confidence(probs, metric), int(probs.argmax())
    values: list[float] = output.tolist()
    if kind == "logits" or temperature != 1.0:
        if kind == "probabilities":
            values = [math.log(max(v, _TINY)) for v in values]
        top = max(values)
        if temperature == 1.0:
            e = [math.exp(v - top) for v in values]
        else:
            inv = 1.0 / temperature
            e = [math.exp((v - top) * inv) for v in values]
        total = sum(e)
        values = [v / total for v in e]
    best = max(values)
    index = values.index(best)
    if metric == "max_prob":
        conf = best
    elif metric == "margin":
        conf = best - sorted(values)[-2]
    else:
        h = -sum(v * math.log(v) for v in values if v > _TINY)
        conf = max(0.0, 1.0 - h / math.log(len(values)))
    return values, conf, index
