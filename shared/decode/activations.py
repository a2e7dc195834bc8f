"""Scores to probabilities, with a temperature, the way every task reads them.

Two families, after the contract's ``activation``:

- across classes (``class_probs``): ``logits`` through a softmax of ``z / T``;
  ``probabilities`` as given, or, when ``T != 1``, re-scaled on their logarithms (a softmax
  of ``log p / T``, what ``agent.inference.confidence`` does for the flat path);
  ``sigmoid`` each value through ``sigmoid(z / T)``;
- each value on its own (``each_probs``: multilabel, a one-score classifier, detection
  scores, a one-channel mask): ``logits`` and ``sigmoid`` through ``sigmoid(z / T)``;
  ``probabilities`` as given, or re-scaled through their logit, ``sigmoid(logit(p) / T)``.

Raw values are clipped to ±100 before a sigmoid (MediaPipe's ``score_clipping_thresh``),
and the sigmoid is computed on ``exp(-|z|)`` so no value overflows. Probabilities are
clipped to [0, 1]: a dequantized uint8 score can land a hair outside.
"""

from __future__ import annotations

import numpy as np

from shared.contract import Activation

_TINY = 1e-12
#: Raw scores are clipped to this magnitude before a sigmoid.
CLIP = 100.0


def softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax along the last axis of ``z / temperature``."""
    z = np.asarray(z, dtype=np.float32)
    if temperature != 1.0:
        z = z / np.float32(temperature)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    p: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return p


def sigmoid(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``sigmoid(clip(z) / temperature)``, elementwise, without overflow."""
    z = np.clip(np.asarray(z, dtype=np.float32), -CLIP, CLIP)
    if temperature != 1.0:
        z = z / np.float32(temperature)
    e = np.exp(-np.abs(z))
    p: np.ndarray = np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)
    return p


def _clipped(p: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(p, dtype=np.float32), 0.0, 1.0)


def class_probs(raw: np.ndarray, activation: Activation, temperature: float) -> np.ndarray:
    """Probabilities along the last (class) axis of ``raw``."""
    if activation == "logits":
        return softmax(raw, temperature)
    if activation == "sigmoid":
        return sigmoid(raw, temperature)
    if temperature == 1.0:
        return _clipped(raw)
    return softmax(np.log(np.maximum(_clipped(raw), _TINY)), temperature)


def each_probs(raw: np.ndarray, activation: Activation, temperature: float) -> np.ndarray:
    """A probability for each value of ``raw`` on its own."""
    if activation != "probabilities":
        return sigmoid(raw, temperature)
    p = _clipped(raw)
    if temperature == 1.0:
        return p
    p = np.clip(p, _TINY, 1.0 - 1e-7)
    return sigmoid(np.log(p) - np.log1p(-p), temperature)
