"""shared.decode: regression and custom decoders, and every result's JSON and OIP views."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from shared.decode import (
    Classification,
    Custom,
    Detection,
    Detections,
    MultiLabel,
    Prediction,
    Regression,
    Segmentation,
    build_decoder,
)
from shared.errors import ContractError
from shared.manifest import Manifest
from shared.oip.codec import decode_response, encode_response
from shared.oip.types import InferResponse, InferTensor


def manifest(task: str, outputs: list[dict[str, Any]]) -> Manifest:
    return Manifest.model_validate(
        {
            "schema": "tandem.manifest/v2",
            "model": "demo",
            "version": 1,
            "created": "2025-01-01T00:00:00Z",
            "edge": {"format": "tflite", "file": "m.tflite", "sha256": "0" * 64, "size": 1},
            "task": task,
            "inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32"}],
            "outputs": outputs,
        }
    )


def out(name: str, shape: list[int], role: str) -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": "FP32", "role": role}


def test_regression_reads_every_value_output_in_order() -> None:
    m = manifest(
        "regression", [out("b", [1, 2], "value"), out("raw", [1, 3], "raw"), out("a", [1], "value")]
    )
    dec = build_decoder(m, {}, temperature=3.0)  # no temperature applies to values
    outputs = {
        "a": np.array([0.25], np.float32),
        "b": np.array([[1.5, -2.0]], np.float32),
        "raw": np.zeros((1, 3), np.float32),
    }
    pred = dec.decode(outputs, None)
    assert pred == Regression([1.5, -2.0, 0.25])
    assert dec.confidence(pred) == 1.0
    with pytest.raises(ContractError, match="no output 'a'"):
        dec.decode({"b": outputs["b"]}, None)


def test_custom_passes_every_output_through() -> None:
    m = manifest("custom", [out("landmarks", [1, 3, 2], "raw"), out("presence", [1, 1], "scores")])
    dec = build_decoder(m, {})
    marks = np.arange(6, dtype=np.float32).reshape(1, 3, 2)
    pred = dec.decode({"landmarks": marks, "presence": np.array([[0.7]], np.float32)}, None)
    assert isinstance(pred, Custom) and dec.confidence(pred) == 1.0
    tensors = pred.to_tensors()
    np.testing.assert_array_equal(tensors["landmarks"], marks)
    assert tensors["presence"].shape == (1, 1)


SAMPLES: list[Prediction] = [
    Classification("cat", 1, [0.1, 0.8, 0.1], [("cat", 0.8), ("dog", 0.1)]),
    MultiLabel([("sun", 0.9)], [0.9, 0.2]),
    Detections([Detection("face", 0, 0.91234567, (1.234, 2.0, 30.5, 40.25))], (0.91,), 0.5),
    Detections([]),
    Segmentation(np.array([[0, 1], [1, 1]], np.int32), {"sky": 0.25, "road": 0.75}, 0.6),
    Regression([0.1234567891]),
    Custom({"x": [[1.0, 2.0]]}),
]


@pytest.mark.parametrize("pred", SAMPLES, ids=lambda p: type(p).__name__)
def test_to_dict_is_json_and_names_the_task(pred: Prediction) -> None:
    doc = pred.to_dict()
    assert doc["task"] == pred.task
    assert json.loads(json.dumps(doc)) == doc


def test_to_dict_rounds() -> None:
    assert SAMPLES[2].to_dict()["detections"][0] == {
        "label": "face",
        "class_id": 0,
        "score": 0.912346,
        "box": [1.23, 2.0, 30.5, 40.25],
    }
    assert SAMPLES[5].to_dict()["values"] == [0.123457]
    assert SAMPLES[4].to_dict() == {
        "task": "segmentation",
        "shape": [2, 2],
        "areas": {"sky": 0.25, "road": 0.75},
    }


@pytest.mark.parametrize("pred", SAMPLES, ids=lambda p: type(p).__name__)
def test_to_tensors_go_through_the_oip_codec(pred: Prediction) -> None:
    """Every tensor is one sample (leading 1), strings are BYTES, and the wire keeps them."""
    tensors = pred.to_tensors()
    for name, arr in tensors.items():
        assert arr.shape[0] == 1, name
        if arr.dtype == np.object_:
            assert all(isinstance(v, bytes) for v in arr.ravel())
    response = InferResponse("demo", [InferTensor.of(n, a) for n, a in tensors.items()])
    body, headers = encode_response(response)
    length = headers.get("Inference-Header-Content-Length")
    back = decode_response(body, None if length is None else int(length))
    for name, arr in tensors.items():
        got = back.output(name).data
        assert got.shape == arr.shape
        if arr.dtype != np.object_:
            np.testing.assert_allclose(got, arr)


def test_tensor_shapes_and_types() -> None:
    c = SAMPLES[0].to_tensors()
    assert c["label"].tolist() == [b"cat"] and c["index"].dtype == np.int64
    assert c["probabilities"].shape == (1, 3) and c["top_k_labels"].tolist() == [[b"cat", b"dog"]]
    d = SAMPLES[2].to_tensors()
    assert (
        d["boxes"].shape == (1, 1, 4)
        and d["classes"].tolist() == [[0]]
        and d["count"].tolist() == [1]
    )
    empty = SAMPLES[3].to_tensors()
    assert empty["boxes"].shape == (1, 0, 4) and empty["count"].tolist() == [0]
    s = SAMPLES[4].to_tensors()
    assert s["mask"].shape == (1, 2, 2) and s["mask"].dtype == np.int32
    assert s["area_labels"].tolist() == [[b"sky", b"road"]]
