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
    output: np.ndarray,
    kind: OutputKind,
    temperature: float,
    metric: ConfidenceMetric,
    scale: float = 1.0,
    zero_point: float = 0.0,
) -> tuple[list[float], float, int]:
    """Probabilities (a list), confidence and top-1 index of one output row, fast.

    ``output`` may still be quantized (``real = scale * (q - zero_point)``): for logits the
    zero point cancels in the softmax and the scale joins the temperature, so an int8
    output row costs no dequantization step at all."""
    if len(output) > SMALL_OUTPUT or (kind == "probabilities" and scale != 1.0):
        real = output if scale == 1.0 else (output.astype(np.float32) - zero_point) * scale
        probs = to_probabilities(real, kind, temperature)
        return probs.tolist(), confidence(probs, metric), int(probs.argmax())
    values: list[float] = output.tolist()
    if kind == "logits" or temperature != 1.0:
        if kind == "probabilities":
            values = [math.log(max(v, _TINY)) for v in values]
        top = max(values)
        factor = scale / temperature
        if factor == 1.0:
            e = [math.exp(v - top) for v in values]
        else:
            e = [math.exp((v - top) * factor) for v in values]
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
