"""The v2 model contract: what a manifest may say, v1 documents read through the v2 view
with their own JSON and signed bytes, and what the updater counts as a contract change."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.device.updater import contract_change
from shared.errors import ContractError
from shared.manifest import MANIFEST_SCHEMA_V1, Manifest
from shared.signing import SignatureError, SigningKey, TrustStore, manifest_signing_bytes
from tests.fakes import manifest as v1_manifest

DIGEST = hashlib.sha256(b"x").hexdigest()


def v2_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": "tandem.manifest/v2",
        "model": "faces",
        "version": 1,
        "created": "2026-12-01T00:00:00Z",
        "edge": {"format": "tflite", "file": "model.tflite", "sha256": DIGEST, "size": 1},
        "task": "detection",
        "inputs": [
            {
                "name": "input",
                "shape": [1, 128, 128, 3],
                "datatype": "FP32",
                "kind": "image",
                "image": {"mean": [127.5], "std": [127.5]},
            }
        ],
        "outputs": [
            {"name": "regressors", "shape": [1, 896, 16], "datatype": "FP32", "role": "anchors"},
            {
                "name": "classificators",
                "shape": [1, 896, 1],
                "datatype": "FP32",
                "role": "scores",
                "activation": "sigmoid",
                "labels": "labels.txt",
            },
        ],
        "files": [{"name": "labels.txt", "sha256": DIGEST, "size": 5}],
        "decoding": {
            "decoder": "ssd_anchors",
            "anchors": {"strides": [8, 16, 16, 16], "anchors_per_cell": [2, 2, 2, 2]},
            "box_scale": 128,
        },
    }
    doc.update(changes)
    return doc


def test_a_v2_detector_manifest_round_trips() -> None:
    m = Manifest.model_validate(v2_doc())
    assert m.task == "detection" and not m.is_v1
    assert [o.role for o in m.outputs] == ["anchors", "scores"]
    assert m.inputs[0].image_dims == (128, 128, 3)
    assert Manifest.from_json(m.to_json()) == m
    assert len(m.to_json()) < 4096  # labels and golden samples are files, not inline


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": "segmentation"}, "needs outputs with roles"),
        ({"files": []}, "not listed in files"),
        ({"decoding": {}}, "anchors output needs decoding.decoder"),
        ({"labels": ["a", "b"]}, "v1 fields"),
        ({"inputs": []}, "at least one input"),
        (
            {"files": [{"name": "model.tflite", "sha256": DIGEST, "size": 1}]},
            "not listed in files|may not be named",
        ),
    ],
)
def test_v2_contract_checks(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Manifest.model_validate(v2_doc(**change))


def test_image_inputs_must_fit_their_colour_and_layout() -> None:
    gray = v2_doc()
    gray["inputs"][0]["image"]["colour"] = "GRAY"
    with pytest.raises(ValidationError, match="3 channels, GRAY has 1"):
        Manifest.model_validate(gray)
    nchw = v2_doc()
    nchw["inputs"][0] |= {"shape": [1, 3, 128, 128], "image": {"layout": "NCHW"}}
    assert Manifest.model_validate(nchw).inputs[0].image_dims == (128, 128, 3)
    flat = v2_doc()
    flat["inputs"][0]["shape"] = [1, 128]
    with pytest.raises(ValidationError, match="4-D shape"):
        Manifest.model_validate(flat)


def test_a_v1_document_reads_through_the_v2_view_and_keeps_its_own_shape() -> None:
    m = v1_manifest()
    assert m.is_v1 and m.task == "classification"
    assert [(t.name, t.kind, t.shape) for t in m.inputs] == [("input", "tensor", [-1, 4])]
    assert [(o.name, o.role, o.activation) for o in m.outputs] == [("logits", "scores", "logits")]
    doc = json.loads(m.to_json())
    assert doc["schema"] == MANIFEST_SCHEMA_V1
    assert not {"inputs", "outputs", "task", "files", "decoding"} & doc.keys()
    assert set(doc["cloud"]) == {"model", "version", "input", "output", "output_kind"}
    signed = json.loads(manifest_signing_bytes(m))
    assert signed.keys() == {k for k in m.document() if k != "signature"}
    assert "inputs" not in signed and "send" not in signed["cloud"]


def test_v2_fields_cannot_ride_unsigned_in_a_v1_document() -> None:
    """A v1 signature does not cover v2 fields, so a v1 document may not carry them: else
    anyone could add ``send`` or ``outputs`` to a signed v1 release."""
    key = SigningKey.generate()
    signed = key.sign(v1_manifest())
    TrustStore({key.key_id: key.public_raw}).verify(Manifest.from_json(signed.to_json()))
    for field, value in (("task", "detection"), ("streaming", True)):
        doc = json.loads(signed.to_json()) | {field: value}
        with pytest.raises(ContractError, match="a v1 manifest has no"):
            Manifest.from_json(json.dumps(doc))
    doc = json.loads(signed.to_json())
    doc["cloud"]["send"] = "encoded"
    with pytest.raises(ContractError, match="send/outputs"):
        Manifest.from_json(json.dumps(doc))


def test_contract_changes_the_updater_refuses() -> None:
    served = Manifest.model_validate(v2_doc())
    assert contract_change(served, served) is None
    smaller = v2_doc()
    smaller["inputs"][0]["shape"] = [1, 96, 96, 3]
    assert "input 'input'" in str(contract_change(served, Manifest.model_validate(smaller)))
    renamed = v2_doc()
    renamed["inputs"][0]["name"] = "image"
    assert "inputs" in str(contract_change(served, Manifest.model_validate(renamed)))
    renormalised = v2_doc()
    renormalised["inputs"][0] |= {"datatype": "UINT8", "image": {"mean": [0], "std": [1]}}
    assert contract_change(served, Manifest.model_validate(renormalised)) is None
    other_task = v2_doc(task="custom")
    assert "task" in str(contract_change(served, Manifest.model_validate(other_task)))
    v1 = v1_manifest()
    wider = v1.model_copy(update={"inputs": [v1.inputs[0].model_copy(update={"shape": [-1, 5]})]})
    assert "5 features" in str(contract_change(v1, wider))


def test_a_v1_release_signed_before_v2_existed_still_verifies() -> None:
    """``tests/data/v1_signed_manifest.json`` was signed by the code before the v2 contract
    (commit 810abc9): devices in the field hold such releases."""
    data = Path(__file__).parent.parent / "data"
    trust = TrustStore()
    trust.add((data / "v1_signed_manifest.pub").read_text().strip())
    m = Manifest.from_json((data / "v1_signed_manifest.json").read_text())
    trust.verify(m)
    assert m.is_v1 and m.labels == ["a", "b", "c"]
    with pytest.raises(SignatureError):
        trust.verify(m.model_copy(update={"version": 2}))


def test_a_quantized_uint8_image_input_takes_raw_pixels_by_default() -> None:
    """With no mean/std in the contract file, a quantized uint8 image input gets mean =
    zero point, std = 1/scale: the quantized value is the pixel, and the frame goes in as
    it is. Mean 0, std 1 (the float default) saturated every pixel above 0 at 255 on a
    (1/128, 128) input; the metadata's normalisation is for float inputs."""
    import numpy as np

    from cloud.releases.contract_builder import _pixel_normalisation
    from shared.contract import ImageSpec, InputSpec, Quantization, TensorSpec
    from shared.preprocess import Preprocessor

    t = TensorSpec(
        name="x",
        shape=[1, 8, 8, 3],
        datatype="UINT8",
        quantization=Quantization(scale=1 / 128, zero_point=128),
    )
    mean, std = _pixel_normalisation(t, None, None, [127.5], [127.5])
    assert (mean, std) == ([128.0], [128.0])
    assert _pixel_normalisation(t, [0.0], [255.0], None, None) == ([0.0], [255.0])
    float_input = t.model_copy(update={"datatype": "FP32", "quantization": None})
    assert _pixel_normalisation(float_input, None, None, [127.5], [127.5]) == ([127.5], [127.5])
    spec = InputSpec(**t.model_dump(), kind="image", image=ImageSpec(mean=mean, std=std))
    frame = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    (tensor,) = Preprocessor([spec], 1_000_000).prepare(frame).tensors.values()
    assert np.array_equal(tensor[0], frame) and np.shares_memory(tensor, frame)
