"""shared.decode: detection in its three layouts, NMS, SSD anchors, placement, confidence."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from shared.contract import Anchors
from shared.decode import Detections, build_decoder
from shared.decode.anchors import ssd_anchors
from shared.decode.nms import iou, nms
from shared.errors import ContractError
from shared.manifest import Manifest
from shared.placement import Placement


def image_in(h: int = 100, w: int = 200) -> dict[str, Any]:
    return {
        "name": "image",
        "shape": [1, h, w, 3],
        "datatype": "FP32",
        "kind": "image",
        "image": {},
    }


def out(name: str, shape: list[int], role: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": "FP32", "role": role, **extra}


def manifest(
    outputs: list[dict[str, Any]], inputs: list[dict[str, Any]] | None = None, **extra: Any
) -> Manifest:
    return Manifest.model_validate(
        {
            "schema": "tandem.manifest/v2",
            "model": "demo",
            "version": 1,
            "created": "2025-01-01T00:00:00Z",
            "edge": {"format": "tflite", "file": "m.tflite", "sha256": "0" * 64, "size": 1},
            "task": "detection",
            "inputs": inputs or [image_in()],
            "outputs": outputs,
            **extra,
        }
    )


def batch(values: Any) -> np.ndarray:
    return np.asarray([values], dtype=np.float32)


def detections(pred: Any) -> Detections:
    assert isinstance(pred, Detections)
    return pred


# --- NMS -----------------------------------------------------------------------------


def test_iou_of_known_boxes() -> None:
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]], float)
    np.testing.assert_allclose(iou(boxes[0], boxes), [1.0, 50 / 150, 0.0, 1.0])
    # a degenerate box overlaps nothing (no division by zero)
    assert iou(np.array([3.0, 3, 3, 3]), boxes[:1]).tolist() == [0.0]


def test_nms_keeps_the_best_of_each_cluster_per_class() -> None:
    boxes = np.array(
        [
            [0, 0, 10, 10],  # 0: best of cluster A
            [1, 0, 11, 10],  # 1: A again (IoU 0.82): dropped
            [30, 30, 40, 40],  # 2: cluster B
            [31, 31, 41, 41],  # 3: B, better than 2: keeps, 2 dropped
            [0, 0, 10, 10],  # 4: on A but another class: kept
            [6, 0, 16, 10],  # 5: overlaps A by 0.25: kept at threshold 0.5
        ],
        dtype=np.float32,
    )
    scores = np.array([0.9, 0.8, 0.6, 0.7, 0.5, 0.65], dtype=np.float32)
    classes = np.array([0, 0, 0, 0, 1, 0])
    kept = nms(boxes, scores, classes, 0.5)
    assert kept.tolist() == [0, 3, 5, 4]  # best first
    assert nms(boxes, scores, classes, 0.2).tolist() == [0, 3, 4]  # 5 now overlaps too much


@pytest.mark.parametrize("matrix_max", [0, 10_000])  # one box at a time, or all pairs at once
def test_nms_ways_agree_with_a_reference(monkeypatch: pytest.MonkeyPatch, matrix_max: int) -> None:
    import shared.decode.nms as nms_module

    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 80, size=(300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, size=(300, 2))], axis=1)
    scores = rng.uniform(size=300)
    classes = rng.integers(0, 3, size=300)
    expected = []  # the textbook loop
    for i in np.argsort(-scores):
        same = [k for k in expected if classes[k] == classes[i]]
        if all(iou(boxes[k], boxes[i : i + 1])[0] <= 0.4 for k in same):
            expected.append(int(i))
    monkeypatch.setattr(nms_module, "MATRIX_MAX", matrix_max)
    assert nms(boxes, scores, classes, 0.4).tolist() == expected


# --- boxes + per-class scores ----------------------------------------------------------


def boxes_scores(classes: int = 3, **extra: Any) -> Manifest:
    return manifest(
        [
            out("boxes", [1, -1, 4], "boxes", box_format="yxyx"),
            out("scores", [1, -1, classes], "scores", activation="sigmoid"),
        ],
        **extra,
    )


def logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def test_boxes_and_scores_decode_threshold_and_suppress() -> None:
    # yxyx normalised boxes over a 100 x 200 input
    raw_boxes = [
        [0.1, 0.1, 0.5, 0.3],  # class 2, 0.9
        [0.1, 0.11, 0.5, 0.31],  # duplicate of it, 0.8: suppressed
        [0.6, 0.6, 0.9, 0.9],  # class 0, 0.7
        [0.6, 0.6, 0.9, 0.9],  # same box but class 1, 0.6: kept (class-wise NMS)
        [0.2, 0.7, 0.3, 0.8],  # 0.3: under the threshold, a candidate for confidence
    ]
    z = -20.0
    raw_scores = [[z, z, logit(0.9)], [z, z, logit(0.8)], [logit(0.7), z, z], [z, logit(0.6), z]]
    raw_scores.append([logit(0.3), z, z])
    dec = build_decoder(boxes_scores(), {"scores": {0: "a", 1: "b", 2: "c"}})
    pred = detections(dec.decode({"boxes": batch(raw_boxes), "scores": batch(raw_scores)}, None))
    assert [(d.label, round(d.score, 4)) for d in pred.items] == [
        ("c", 0.9),
        ("a", 0.7),
        ("b", 0.6),
    ]
    # no placement: the model input's pixels (x = 0.1 * 200, y = 0.1 * 100)
    np.testing.assert_allclose(pred.items[0].box, [20, 10, 60, 50], atol=1e-4)
    assert sorted(round(s, 4) for s in pred.candidate_scores) == [0.3, 0.6, 0.7, 0.9]
    assert dec.confidence(pred) == pytest.approx(abs(2 * 0.6 - 1), abs=1e-5)


def test_max_detections_keeps_the_best() -> None:
    m = boxes_scores(1, decoding={"max_detections": 2})
    rows = [[0.0, i * 0.1, 0.05, i * 0.1 + 0.05] for i in range(5)]
    probs = [[logit(0.6 + 0.05 * i)] for i in range(5)]
    pred = detections(
        build_decoder(m, {}).decode({"boxes": batch(rows), "scores": batch(probs)}, None)
    )
    assert [round(d.score, 3) for d in pred.items] == [0.8, 0.75]


@pytest.mark.parametrize(
    ("fmt", "raw"),
    [
        ("yxyx", [0.2, 0.1, 0.6, 0.5]),
        ("xyxy", [0.1, 0.2, 0.5, 0.6]),
        ("xywh", [0.1, 0.2, 0.4, 0.4]),
        ("cxcywh", [0.3, 0.4, 0.4, 0.4]),
    ],
)
def test_box_formats(fmt: str, raw: list[float]) -> None:
    m = manifest(
        [
            out("boxes", [1, 1, 4], "boxes", box_format=fmt),
            out("scores", [1, 1], "scores", activation="probabilities"),
        ]
    )
    pred = detections(
        build_decoder(m, {}).decode({"boxes": batch([raw]), "scores": batch([0.9])}, None)
    )
    np.testing.assert_allclose(pred.items[0].box, [20, 20, 100, 60], atol=1e-4)  # 200 x 100 input


def test_placement_maps_boxes_into_the_frame() -> None:
    m = manifest(
        [
            out("boxes", [1, 1, 4], "boxes", box_format="xyxy", normalized=False),
            out("scores", [1, 1], "scores", activation="probabilities"),
        ]
    )
    dec = build_decoder(m, {})
    outputs = {"boxes": batch([[20, 10, 60, 50]]), "scores": batch([0.9])}
    # squash: a 400 x 300 (h x w) frame into the 100 x 200 model
    squash = Placement(400, 300, 100, 200, 300 / 200, 400 / 100)
    np.testing.assert_allclose(
        detections(dec.decode(outputs, squash)).items[0].box, [30, 40, 90, 200], atol=1e-4
    )
    # letterbox: a 100 x 100 frame fitted into 100 x 200 is padded 50 px left and right
    letterbox = Placement(100, 100, 100, 200, 1.0, 1.0, -50.0, 0.0)
    box = detections(dec.decode(outputs, letterbox)).items[0].box
    np.testing.assert_allclose(box, [0, 10, 10, 50], atol=1e-4)  # clipped to the frame


def test_normalised_boxes_stay_normalised_without_an_image_input() -> None:
    tensor_in = {"name": "x", "shape": [1, 8], "datatype": "FP32"}
    m = manifest(
        [out("boxes", [1, 1, 4], "boxes", box_format="xyxy"), out("scores", [1, 1], "scores")],
        inputs=[tensor_in],
    )
    pred = build_decoder(m, {}).decode(
        {"boxes": batch([[0.1, 0.2, 0.3, 0.4]]), "scores": batch([0.9])}, None
    )
    np.testing.assert_allclose(detections(pred).items[0].box, [0.1, 0.2, 0.3, 0.4], atol=1e-6)


def test_logits_over_several_classes_go_through_a_softmax() -> None:
    m = manifest(
        [out("boxes", [1, 1, 4], "boxes"), out("scores", [1, 1, 2], "scores", activation="logits")]
    )
    pred = detections(
        build_decoder(m, {}).decode(
            {"boxes": batch([[0, 0, 1, 1]]), "scores": batch([[0.0, np.log(3.0)]])}, None
        )
    )
    assert (pred.items[0].class_id, pred.items[0].score) == (1, pytest.approx(0.75))


# --- TFLite_Detection_PostProcess -----------------------------------------------------


def postprocess() -> Manifest:
    return manifest(
        [
            out("boxes", [1, 4, 4], "boxes"),
            out("classes", [1, 4], "classes"),
            out("scores", [1, 4], "scores"),
            out("count", [1], "count"),
        ]
    )


def test_postprocess_takes_the_first_count_rows_without_nms() -> None:
    coco = {0: "person", 2: "car", 17: "cat"}  # a label map with gaps
    outputs = {
        "boxes": batch(
            [[0.1, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.52], [0.5, 0.5, 0.9, 0.9], [0, 0, 1, 1]]
        ),
        "classes": batch([2.0, 2.0, 5.0, 0.0]),
        "scores": batch([0.9, 0.8, 0.55, 0.99]),
        "count": np.array([3.0], dtype=np.float32),  # the 4th row is padding
    }
    dec = build_decoder(postprocess(), {"classes": coco})
    pred = detections(dec.decode(outputs, None))
    # the model did its NMS: two overlapping cars both stay; class 5 has no label
    assert [(d.label, d.class_id) for d in pred.items] == [("car", 2), ("car", 2), ("class 5", 5)]
    np.testing.assert_allclose(pred.items[0].box, [20, 10, 100, 50], atol=1e-4)  # yxyx -> xyxy
    assert dec.confidence(pred) == pytest.approx(0.1, abs=1e-5)  # 0.55 is the least decisive


def test_a_count_past_the_rows_is_bounded() -> None:
    outputs = {
        "boxes": batch([[0, 0, 1, 1]] * 4),
        "classes": batch([0.0] * 4),
        "scores": batch([0.9] * 4),
        "count": np.array([1e9], dtype=np.float32),
    }
    assert len(detections(build_decoder(postprocess(), {}).decode(outputs, None)).items) == 4
    outputs["count"] = np.array([np.nan], dtype=np.float32)
    assert detections(build_decoder(postprocess(), {}).decode(outputs, None)).items == []


# --- confidence ------------------------------------------------------------------------


def conf_manifest(**confidence: Any) -> Manifest:
    return manifest(
        [out("boxes", [1, 3, 4], "boxes", box_format="xyxy"), out("scores", [1, 3, 2], "scores")],
        confidence=confidence,
    )


def conf_outputs(p: list[list[float]]) -> dict[str, np.ndarray]:
    boxes = [[0.0, 0.0, 0.1, 0.1], [0.5, 0.5, 0.6, 0.6], [0.0, 0.0, 0.1, 0.1]]
    return {"boxes": batch(boxes), "scores": batch(p)}


def test_confidence_is_the_least_decisive_candidate_above_the_floor() -> None:
    dec = build_decoder(conf_manifest(floor=0.2), {})
    # box 1 at 0.3 is unsure; box 2 at 0.4 overlaps box 0 (0.95) and is suppressed
    pred = dec.decode(conf_outputs([[0.95, 0], [0.3, 0], [0.4, 0]]), None)
    assert dec.confidence(pred) == pytest.approx(abs(2 * 0.3 - 1))
    # under the floor, box 1 no longer counts: 0.95 alone
    pred = dec.decode(conf_outputs([[0.95, 0], [0.15, 0], [0.4, 0]]), None)
    assert dec.confidence(pred) == pytest.approx(0.9)


def test_a_floor_above_the_threshold_leaves_reported_detections_out() -> None:
    dec = build_decoder(conf_manifest(floor=0.6), {})
    pred = detections(dec.decode(conf_outputs([[0.95, 0], [0.55, 0], [0, 0]]), None))
    assert [round(d.score, 2) for d in pred.items] == [0.95, 0.55]
    assert dec.confidence(pred) == pytest.approx(0.9)


def test_confidence_is_one_when_there_is_no_candidate() -> None:
    dec = build_decoder(conf_manifest(), {})
    pred = detections(dec.decode(conf_outputs([[0.01, 0.0]] * 3), None))
    assert pred.items == [] and dec.confidence(pred) == 1.0


def test_confidence_reads_only_the_classes_of_interest() -> None:
    dec = build_decoder(conf_manifest(classes_of_interest=[0]), {})
    pred = dec.decode(conf_outputs([[0.95, 0], [0, 0.5], [0, 0]]), None)
    assert dec.confidence(pred) == pytest.approx(0.9)  # the unsure class-1 box is ignored
    everyone = build_decoder(conf_manifest(), {})
    assert (
        everyone.confidence(everyone.decode(conf_outputs([[0.95, 0], [0, 0.5], [0, 0]]), None))
        == 0.0
    )


# --- SSD anchors (MediaPipe) -----------------------------------------------------------

FACE_ANCHORS = {"strides": [8, 16, 16, 16], "anchors_per_cell": [2, 2, 2, 2]}


def test_blazeface_anchors() -> None:
    a = ssd_anchors(Anchors.model_validate(FACE_ANCHORS), 128, 128)
    assert a.shape == (896, 2)
    # stride 8: a 16 x 16 map, 2 anchors per cell, row by row
    np.testing.assert_allclose(a[:3], [[1 / 32, 1 / 32]] * 2 + [[3 / 32, 1 / 32]])
    np.testing.assert_allclose(a[32], [1 / 32, 3 / 32])  # second row
    # strides 16 merged: an 8 x 8 map, 6 anchors per cell
    np.testing.assert_allclose(a[512:518], [[1 / 16, 1 / 16]] * 6)
    np.testing.assert_allclose(a[518], [3 / 16, 1 / 16])
    np.testing.assert_allclose(a[-1], [15 / 16, 15 / 16])


def test_other_mediapipe_anchor_layouts() -> None:
    """Palm (192, 2016 anchors), pose (224, 2254), full-range face (192, 2304)."""
    palm = Anchors(strides=[8, 16, 16, 16], anchors_per_cell=[2, 2, 2, 2])
    pose = Anchors(strides=[8, 16, 32, 32, 32], anchors_per_cell=[2] * 5)
    full = Anchors(strides=[4], anchors_per_cell=[1])
    assert len(ssd_anchors(palm, 192, 192)) == 2016
    assert len(ssd_anchors(pose, 224, 224)) == 2254
    assert len(ssd_anchors(full, 192, 192)) == 2304
    # a non-square input: ceil(100 / 16) x ceil(60 / 16) cells
    assert len(ssd_anchors(Anchors(strides=[16], anchors_per_cell=[1]), 100, 60)) == 7 * 4


def face_manifest(**overrides: Any) -> Manifest:
    decoding = {
        "decoder": "ssd_anchors",
        "anchors": FACE_ANCHORS,
        "box_scale": 128.0,
        "iou": 0.3,
        **overrides.pop("decoding", {}),
    }
    outputs = overrides.pop(
        "outputs",
        [
            out("regressors", [1, 896, 16], "anchors", box_format="cxcywh"),
            out("classificators", [1, 896, 1], "scores", activation="sigmoid"),
        ],
    )
    return manifest(
        outputs, inputs=overrides.pop("inputs", [image_in(128, 128)]), decoding=decoding
    )


def test_anchor_regressors_decode_to_boxes() -> None:
    regressors = np.zeros((1, 896, 16), np.float32)
    scores = np.full((1, 896, 1), -1e4, np.float32)  # clipped before the sigmoid: no overflow
    # anchor 518 is centred at (3/16, 1/16) = (24, 8) px; move it by (+4, +2) px, 32 x 16 px
    regressors[0, 518, :4] = [4, 2, 32, 16]
    scores[0, 518, 0] = 3.0
    regressors[0, 519, :4] = [5, 2, 32, 16]  # a near duplicate, suppressed
    scores[0, 519, 0] = 2.0
    dec = build_decoder(face_manifest(), {"classificators": {0: "face"}})
    pred = detections(dec.decode({"regressors": regressors, "classificators": scores}, None))
    assert len(pred.items) == 1
    face = pred.items[0]
    assert face.label == "face" and face.score == pytest.approx(1 / (1 + np.exp(-3.0)))
    np.testing.assert_allclose(face.box, [12, 2, 44, 18], atol=1e-3)
    # into a 512 x 256 (h x w) frame squashed to 128 x 128
    frame = Placement(512, 256, 128, 128, 2.0, 4.0)
    box = (
        detections(dec.decode({"regressors": regressors, "classificators": scores}, frame))
        .items[0]
        .box
    )
    np.testing.assert_allclose(box, [24, 8, 88, 72], atol=1e-3)


def test_anchor_contract_errors() -> None:
    with pytest.raises(ContractError, match=r"generate 896 anchors.*gives 900 rows"):
        build_decoder(
            face_manifest(
                outputs=[
                    out("regressors", [1, 900, 16], "anchors", box_format="cxcywh"),
                    out("classificators", [1, 900, 1], "scores", activation="sigmoid"),
                ]
            ),
            {},
        )
    with pytest.raises(ContractError, match="generate 2016 anchors over a 192x192"):
        build_decoder(face_manifest(inputs=[image_in(192, 192)]), {})
    with pytest.raises(ContractError, match="box_format 'cxcywh'"):
        build_decoder(
            face_manifest(
                outputs=[
                    out("regressors", [1, 896, 16], "anchors"),
                    out("classificators", [1, 896, 1], "scores", activation="sigmoid"),
                ]
            ),
            {},
        )
    with pytest.raises(ContractError, match="image input"):
        build_decoder(
            face_manifest(inputs=[{"name": "x", "shape": [1, 128], "datatype": "FP32"}]), {}
        )
    with pytest.raises(ContractError, match="at least 4 values"):
        build_decoder(
            face_manifest(
                outputs=[
                    out("regressors", [1, 896, 2], "anchors", box_format="cxcywh"),
                    out("classificators", [1, 896, 1], "scores", activation="sigmoid"),
                ]
            ),
            {},
        )


def test_dynamic_anchor_rows_are_checked_at_decode() -> None:
    m = face_manifest(
        outputs=[
            out("regressors", [1, -1, 16], "anchors", box_format="cxcywh"),
            out("classificators", [1, -1, 1], "scores", activation="sigmoid"),
        ]
    )
    dec = build_decoder(m, {})
    with pytest.raises(ContractError, match="896 anchors, but 10 regressor rows"):
        dec.decode(
            {
                "regressors": np.zeros((1, 10, 16), np.float32),
                "classificators": np.zeros((1, 10, 1), np.float32),
            },
            None,
        )


# --- other contract errors -------------------------------------------------------------


def test_detection_contract_errors() -> None:
    with pytest.raises(ContractError, match=r"\[1, N, 4\]"):
        build_decoder(
            manifest([out("boxes", [1, 5, 5], "boxes"), out("scores", [1, 5], "scores")]), {}
        )
    with pytest.raises(ContractError, match="number of rows"):
        build_decoder(
            manifest([out("boxes", [1, 5, 4], "boxes"), out("scores", [1, 6, 2], "scores")]), {}
        )
    with pytest.raises(ContractError, match=r"class ids \[3\]"):
        build_decoder(
            manifest([out("boxes", [1, 5, 4], "boxes"), out("scores", [1, 5, 3], "scores")]),
            {"scores": {0: "a", 3: "d"}},
        )
    with pytest.raises(ContractError, match="exactly one output with role 'boxes'"):
        build_decoder(
            manifest(
                [
                    out("b1", [1, 5, 4], "boxes"),
                    out("b2", [1, 5, 4], "boxes"),
                    out("scores", [1, 5], "scores"),
                ]
            ),
            {},
        )
    with pytest.raises(ContractError, match=r"must be 2-D \[1, N\] class ids"):
        build_decoder(
            manifest(
                [
                    out("boxes", [1, 5, 4], "boxes"),
                    out("classes", [1, 5, 1], "classes"),
                    out("scores", [1, 5], "scores"),
                ]
            ),
            {},
        )
    # at decode: the runtime disagrees with itself
    dec = build_decoder(
        manifest([out("boxes", [1, -1, 4], "boxes"), out("scores", [1, -1], "scores")]), {}
    )
    with pytest.raises(ContractError, match="3 boxes but 2 rows"):
        dec.decode(
            {"boxes": np.zeros((1, 3, 4), np.float32), "scores": np.zeros((1, 2), np.float32)}, None
        )
