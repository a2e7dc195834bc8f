"""shared.decode: classification and multilabel outputs into results, and their confidence."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from agent.inference.confidence import confidence as flat_confidence
from agent.inference.confidence import to_probabilities
from shared.decode import Classification, MultiLabel, build_decoder
from shared.errors import ContractError
from shared.manifest import Manifest

TENSOR_IN = {"name": "x", "shape": [1, 4], "datatype": "FP32"}


def manifest(task: str, outputs: list[dict[str, Any]], **extra: Any) -> Manifest:
    return Manifest.model_validate(
        {
            "schema": "tandem.manifest/v2",
            "model": "demo",
            "version": 1,
            "created": "2025-01-01T00:00:00Z",
            "edge": {"format": "tflite", "file": "m.tflite", "sha256": "0" * 64, "size": 1},
            "task": task,
            "inputs": [TENSOR_IN],
            "outputs": outputs,
            **extra,
        }
    )


def scores(classes: int, activation: str = "logits", **extra: Any) -> dict[str, Any]:
    return {
        "name": "scores",
        "shape": [1, classes],
        "datatype": "FP32",
        "role": "scores",
        "activation": activation,
        **extra,
    }


def one(row: list[float]) -> dict[str, np.ndarray]:
    return {"scores": np.asarray([row], dtype=np.float32)}


@pytest.mark.parametrize("activation", ["logits", "probabilities"])
@pytest.mark.parametrize("metric", ["max_prob", "margin", "entropy"])
@pytest.mark.parametrize("temperature", [1.0, 1.7, 0.5])
def test_probabilities_and_confidence_match_the_flat_path(
    activation: str, metric: Any, temperature: float
) -> None:
    """The same numbers as agent.inference.confidence, which the flat path serves."""
    rng = np.random.default_rng(7)
    raw = rng.normal(size=6).astype(np.float32)
    if activation == "probabilities":
        raw = to_probabilities(raw, "logits")
    dec = build_decoder(
        manifest("classification", [scores(6, activation)]),
        {"scores": {i: f"c{i}" for i in range(6)}},
        temperature=temperature,
        metric=metric,
    )
    pred = dec.decode(one(raw.tolist()), None)
    assert isinstance(pred, Classification)
    ref = to_probabilities(raw, activation, temperature)  # type: ignore[arg-type]
    np.testing.assert_allclose(pred.probs, ref, rtol=1e-5, atol=1e-6)
    assert pred.index == int(ref.argmax()) and pred.label == f"c{pred.index}"
    assert dec.confidence(pred) == pytest.approx(flat_confidence(ref, metric), abs=1e-5)


def test_temperature_flattens_the_distribution() -> None:
    m = manifest("classification", [scores(3)])
    cold = build_decoder(m, {}).decode(one([2.0, 1.0, 0.0]), None)
    hot = build_decoder(m, {}, temperature=3.0).decode(one([2.0, 1.0, 0.0]), None)
    assert isinstance(cold, Classification) and isinstance(hot, Classification)
    assert hot.probs[0] < cold.probs[0] and hot.index == cold.index == 0


def test_top_k_is_best_first_and_as_long_as_decoding_says() -> None:
    m = manifest("classification", [scores(5)], decoding={"top_k": 3})
    pred = build_decoder(m, {"scores": dict(enumerate("abcde"))}).decode(
        one([0.0, 3.0, 1.0, 2.0, -1.0]), None
    )
    assert isinstance(pred, Classification)
    assert [label for label, _ in pred.top_k] == ["b", "d", "c"]
    assert pred.top_k[0][1] == pytest.approx(pred.probs[1])


def test_label_map_with_gaps_names_missing_ids() -> None:
    dec = build_decoder(manifest("classification", [scores(4)]), {"scores": {0: "cat", 3: "dog"}})
    pred = dec.decode(one([0.0, 5.0, 0.0, 1.0]), None)
    assert isinstance(pred, Classification)
    assert (pred.label, pred.index) == ("class 1", 1)
    assert [label for label, _ in pred.top_k][:2] == ["class 1", "dog"]


def test_labels_beyond_the_class_axis_are_refused() -> None:
    with pytest.raises(ContractError, match=r"class ids \[4\].*4 classes"):
        build_decoder(manifest("classification", [scores(4)]), {"scores": {0: "a", 4: "e"}})


def test_one_score_reads_as_two_classes() -> None:
    """A keyword spotter's single probability: the class or not, margin |2p - 1|."""
    m = manifest("classification", [scores(1, "probabilities")])
    dec = build_decoder(m, {"scores": {0: "okay_nabu"}}, metric="margin")
    yes = dec.decode(one([0.8]), None)
    no = dec.decode(one([0.3]), None)
    assert isinstance(yes, Classification) and isinstance(no, Classification)
    assert (yes.label, yes.index) == ("okay_nabu", 0)
    assert (no.label, no.index) == ("not okay_nabu", 1)
    np.testing.assert_allclose(yes.probs, [0.8, 0.2], rtol=1e-6)
    assert dec.confidence(yes) == pytest.approx(0.6) and dec.confidence(no) == pytest.approx(0.4)
    # a single logit goes through a sigmoid (a softmax of one value is always 1)
    logit = build_decoder(manifest("classification", [scores(1, "logits")]), {})
    pred = logit.decode(one([0.0]), None)
    assert isinstance(pred, Classification) and pred.probs == pytest.approx([0.5, 0.5])


def test_scores_of_more_than_one_row_are_refused() -> None:
    out = {**scores(3), "shape": [1, 5, 3]}
    with pytest.raises(ContractError, match="last axis"):
        build_decoder(manifest("classification", [out]), {})


def test_a_v1_manifest_serves_its_inline_labels() -> None:
    m = Manifest.model_validate(
        {
            "schema": "tandem.manifest/v1",
            "model": "demo",
            "version": 1,
            "created": "2025-01-01T00:00:00Z",
            "edge": {"format": "tflite", "file": "m.tflite", "sha256": "0" * 64, "size": 1},
            "input": {"name": "x", "shape": [-1, 4], "datatype": "FP32"},
            "output": {"name": "logits", "shape": [-1, 3], "datatype": "FP32"},
            "output_kind": "logits",
            "labels": ["a", "b", "c"],
        }
    )
    pred = build_decoder(m, {}).decode({"logits": np.array([[0, 0, 4]], np.float32)}, None)
    assert isinstance(pred, Classification) and pred.label == "c"


def test_the_runtime_output_is_checked_against_the_contract() -> None:
    dec = build_decoder(manifest("classification", [scores(3)]), {})
    with pytest.raises(ContractError, match="no output 'scores'"):
        dec.decode({"other": np.zeros((1, 3), np.float32)}, None)
    with pytest.raises(ContractError, match=r"shape \[1, 4\]"):
        dec.decode(one([0, 0, 0, 0]), None)
    with pytest.raises(ContractError, match="one sample"):
        dec.decode({"scores": np.zeros((2, 3), np.float32)}, None)


def test_multilabel_least_decisive_label() -> None:
    dec = build_decoder(
        manifest("multilabel", [scores(4, "sigmoid")]), {"scores": dict(enumerate("abcd"))}
    )
    logits = [3.0, -4.0, 0.2, 1.0]
    pred = dec.decode(one(logits), None)
    assert isinstance(pred, MultiLabel)
    probs = [1 / (1 + math.exp(-z)) for z in logits]
    assert pred.probs == pytest.approx(probs, rel=1e-6)
    assert [label for label, _ in pred.labels] == ["a", "d", "c"]  # >= 0.5, best first
    assert dec.confidence(pred) == pytest.approx(abs(2 * probs[2] - 1), rel=1e-5)


def test_multilabel_temperature_on_probabilities_goes_through_the_logit() -> None:
    m = manifest("multilabel", [scores(2, "probabilities")])
    pred = build_decoder(m, {}, temperature=2.0).decode(one([0.9, 0.1]), None)
    assert isinstance(pred, MultiLabel)
    expected = 1 / (1 + math.exp(-math.log(9) / 2))  # logit(0.9) = log 9
    assert pred.probs == pytest.approx([expected, 1 - expected], rel=1e-5)
    assert pred.labels == [("class 0", pytest.approx(expected, rel=1e-5))]


def test_a_prediction_of_another_task_is_a_bug() -> None:
    dec = build_decoder(manifest("multilabel", [scores(2, "sigmoid")]), {})
    with pytest.raises(TypeError, match="expected a MultiLabel"):
        dec.confidence(Classification("a", 0, [1.0], [("a", 1.0)]))


def test_temperature_must_be_positive() -> None:
    with pytest.raises(ContractError, match="temperature"):
        build_decoder(manifest("classification", [scores(2)]), {}, temperature=0.0)
