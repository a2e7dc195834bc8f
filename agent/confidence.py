"""Turning a model's output into probabilities and one confidence number in [0, 1].

Logits go through a softmax with a temperature; probabilities pass through unchanged unless a
temperature other than 1 asks for re-scaling (done on their logarithms). Three confidence
metrics are offered because they fail differently: ``max_prob`` is the usual one,
``margin`` (top-1 minus top-2) flags two-way confusions, ``entropy`` (1 minus the normalised
entropy) flags spread-out outputs.
"""

from __future__ import annotations

import math

import numpy as np

from shared.manifest import ConfidenceMetric, OutputKind

_TINY = 1e-12


def to_probabilities(output: np.ndarray, kind: OutputKind, temperature: float = 1.0) -> np.ndarray:
    """Probabilities along the last axis of ``output``."""
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
