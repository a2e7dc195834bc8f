"""shared.decode on a real detector: MediaPipe's BlazeFace (face_detection_short_range,
896 SSD anchors) run by the TFLite interpreter on scikit-image's ``astronaut``.

The reference box is what MediaPipe 0.10.14's own pipeline (``solutions.face_detection``,
model 0) reports for this photo: score 0.9217, x 177.6-272.9, y 82.9-178.2 of the 512 x 512
image. Our decoder runs plain NMS where MediaPipe blends overlapping boxes (its WEIGHTED
NMS) and resizes with Pillow, so the boxes agree closely, not exactly.

These manifest fields are what make the model decode; the packager writes the same.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest

from shared.contract import Tolerance
from shared.decode import Detections, build_decoder, compare
from shared.decode.nms import iou
from shared.manifest import Manifest
from shared.placement import Placement
from tests.real_models import photo, real_model

FACE_CONTRACT: dict[str, Any] = {
    "task": "detection",
    "inputs": [
        {
            "name": "input",
            "shape": [1, 128, 128, 3],
            "datatype": "FP32",
            "kind": "image",
            "image": {"colour": "RGB", "resize": "squash", "mean": [127.5], "std": [127.5]},
        }
    ],
    "outputs": [
        {
            "name": "regressors",
            "shape": [1, 896, 16],
            "datatype": "FP32",
            "role": "anchors",
            "box_format": "cxcywh",
        },
        {
            "name": "classificators",
            "shape": [1, 896, 1],
            "datatype": "FP32",
            "role": "scores",
            "activation": "sigmoid",
        },
    ],
    "decoding": {
        "decoder": "ssd_anchors",
        "anchors": {"strides": [8, 16, 16, 16], "anchors_per_cell": [2, 2, 2, 2]},
        "box_scale": 128.0,
        "score_threshold": 0.5,
        "iou": 0.3,
    },
}
MEDIAPIPE_BOX = np.array([177.6, 82.9, 272.9, 178.2])


def _interpreter(path: str) -> Any:
    """The runtime the agent finds (a base dependency: its absence is a failure here)."""
    from agent.inference.backends.tflite import find_interpreter_class

    _, interpreter = find_interpreter_class()
    return interpreter(model_path=path)


def _run(path: str, image: np.ndarray) -> dict[str, np.ndarray]:
    from PIL import Image

    x = np.asarray(Image.fromarray(image).resize((128, 128), Image.Resampling.BILINEAR))
    x = ((x.astype(np.float32) - 127.5) / 127.5)[None]
    it = _interpreter(path)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return {d["name"]: it.get_tensor(d["index"]) for d in it.get_output_details()}


def test_blazeface_finds_the_astronaut_face() -> None:
    model = real_model("face_detection_short_range")
    data = model.read_bytes()
    manifest = Manifest.model_validate(
        {
            "schema": "tandem.manifest/v2",
            "model": "face",
            "version": 1,
            "created": "2025-01-01T00:00:00Z",
            "edge": {
                "format": "tflite",
                "file": "face.tflite",
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
            },
            **FACE_CONTRACT,
        }
    )
    image = photo("astronaut")
    h, w = image.shape[:2]
    outputs = _run(str(model), image)
    dec = build_decoder(manifest, {"classificators": {0: "face"}})
    pred = dec.decode(outputs, Placement(h, w, 128, 128, w / 128, h / 128))
    assert isinstance(pred, Detections)
    assert [d.label for d in pred.items] == ["face"]
    face = pred.items[0]
    assert face.score == pytest.approx(0.92, abs=0.02)
    box = np.asarray(face.box)
    assert iou(box, MEDIAPIPE_BOX[None])[0] > 0.9, box
    # an unsure candidate or two sit above the 0.1 floor: confidence is theirs, not the face's
    assert 0.0 <= dec.confidence(pred) < abs(2 * face.score - 1)
    assert compare(pred, pred, Tolerance()) is None
