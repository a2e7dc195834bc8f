from __future__ import annotations

import math

import numpy as np
import pytest

from agent.inference.confidence import confidence, to_probabilities


def test_softmax_of_logits_with_temperature() -> None:
    z = np.array([2.0, 1.0, 0.0], dtype=np.float32)
    p = to_probabilities(z, "logits")
    np.testing.assert_allclose(p, np.exp(z) / np.exp(z).sum(), rtol=1e-6)
    hot = to_probabilities(z, "logits", temperature=2.0)
    assert hot.sum() == pytest.approx(1.0) and hot.max() < p.max()  # flatter


def test_probabilities_pass_through_and_rescale() -> None:
    p = np.array([0.7, 0.2, 0.1], dtype=np.float32)
    assert to_probabilities(p, "probabilities") is p
    sharper = to_probabilities(p, "probabilities", temperature=0.5)
    np.testing.assert_allclose(sharper, p**2 / (p**2).sum(), rtol=1e-5)


def test_metrics() -> None:
    p = np.array([0.6, 0.3, 0.1, 0.0])
    assert confidence(p, "max_prob") == pytest.approx(0.6)
    assert confidence(p, "margin") == pytest.approx(0.3)
    uniform = np.full(4, 0.25)
    assert confidence(uniform, "entropy") == pytest.approx(0.0, abs=1e-9)
    assert confidence(np.array([1.0, 0, 0, 0]), "entropy") == pytest.approx(1.0)
    h = -(0.6 * math.log(0.6) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1))
    assert confidence(p, "entropy") == pytest.approx(1 - h / math.log(4), rel=1e-6)


@pytest.mark.parametrize("kind", ["logits", "probabilities"])
@pytest.mark.parametrize("metric", ["max_prob", "margin", "entropy"])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("classes", [10, 100])  # the pure-Python and the NumPy path
def test_score_matches_the_reference(
    kind: str, metric: str, temperature: float, classes: int
) -> None:
    from agent.inference.confidence import score

    rng = np.random.default_rng(classes)
    raw = rng.normal(size=classes).astype(np.float32)
    out = raw if kind == "logits" else to_probabilities(raw, "logits")
    probs, conf, index = score(out, kind, temperature, metric)  # type: ignore[arg-type]
    ref = to_probabilities(out, kind, temperature)  # type: ignore[arg-type]
    np.testing.assert_allclose(np.asarray(probs), ref, rtol=1e-4, atol=1e-6)
    assert conf == pytest.approx(confidence(ref, metric), rel=1e-4, abs=1e-6)  # type: ignore[arg-type]
    assert index == int(ref.argmax())


@pytest.mark.parametrize("kind", ["logits", "probabilities"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_score_of_a_quantized_row_equals_score_of_its_real_values(
    kind: str, temperature: float
) -> None:
    from agent.inference.confidence import score

    q = np.array([-100, 20, 3, -128, 127, 0, 5, 9, -7, 44], dtype=np.int8)
    scale, zero = 0.05, -25.0
    real = ((q.astype(np.float32) - zero) * scale).astype(np.float32)
    if kind == "probabilities":
        scale, zero = 1 / 256, -128.0
        real = ((q.astype(np.float32) - zero) * scale).astype(np.float32)
    a = score(q, kind, temperature, "margin", scale, zero)  # type: ignore[arg-type]
    b = score(real, kind, temperature, "margin")  # type: ignore[arg-type]
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-7)
    assert a[1] == pytest.approx(b[1], rel=1e-5, abs=1e-7) and a[2] == b[2]
