"""mAP@0.5, the detections it scores and the hybrid curve (cloud/pipeline/detection_eval.py),
on hand-made boxes whose answers are known."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from cloud.pipeline.detection_eval import (
    Detections,
    average_precision,
    confidence,
    hybrid_curve,
    mean_average_precision,
    postprocess,
)

A = np.array([[0.1, 0.1, 0.4, 0.4]], dtype=np.float32)
B = np.array([[0.5, 0.5, 0.9, 0.8]], dtype=np.float32)


def _dets(boxes: Any, scores: list[float], classes: list[int]) -> Detections:
    return Detections(
        np.array(boxes, dtype=np.float32).reshape(-1, 4),
        np.array(scores, dtype=np.float32),
        np.array(classes, dtype=np.int64),
    )


def test_perfect_detections_score_one_and_misses_zero() -> None:
    truths = [(np.concatenate([A, B]), np.array([1, 2]))]
    perfect = _dets([A[0].tolist(), B[0].tolist()], [0.9, 0.8], [1, 2])
    assert mean_average_precision([perfect], truths) == (1.0, {1: 1.0, 2: 1.0})
    wrong_class = _dets([A[0].tolist(), B[0].tolist()], [0.9, 0.8], [2, 1])
    assert mean_average_precision([wrong_class], truths)[0] == 0.0
    shifted = _dets([[0.3, 0.3, 0.6, 0.6], B[0].tolist()], [0.9, 0.8], [1, 2])  # IoU < 0.5
    assert mean_average_precision([shifted], truths) == (0.5, {1: 0.0, 2: 1.0})


def test_a_duplicate_counts_once_and_ranks_decide_the_area() -> None:
    truths = [(A, np.array([0])), (B, np.array([0]))]
    # picture 0: a duplicate of its box scored above the true hit of picture 1
    preds = [_dets([A[0].tolist(), A[0].tolist()], [0.9, 0.8], [0, 0]), _dets(B, [0.7], [0])]
    # ranked: hit (p=1, r=.5), duplicate (p=.5), hit (p=2/3, r=1): area .5*1 + .5*2/3
    ap = mean_average_precision(preds, truths)[0]
    assert ap == pytest.approx(0.5 + 0.5 * 2 / 3)
    preds[1] = _dets(B, [0.95], [0])  # the second hit ranked first: the duplicate comes last
    assert mean_average_precision(preds, truths)[0] == pytest.approx(1.0)


def test_average_precision_is_the_monotone_area() -> None:
    assert average_precision(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == (
        pytest.approx(0.5 + 0.5 * 2 / 3)
    )
    # a miss, then two hits: precision .5 at recall .5 counts as the 2/3 reached later
    assert average_precision(np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.5, 2 / 3])) == (
        pytest.approx(2 / 3)
    )
    assert average_precision(np.array([]), np.array([])) == 0.0


def test_postprocess_takes_best_classes_and_suppresses_overlaps() -> None:
    boxes = np.array([A[0], A[0] + 0.01, B[0], [0, 0, 0.1, 0.1]], dtype=np.float32)
    scores = np.zeros((4, 3), dtype=np.float32)
    scores[0, 1], scores[1, 1], scores[2, 2], scores[3, 0] = 0.9, 0.6, 0.7, 0.01
    got = postprocess(boxes, scores, floor=0.05, iou=0.5)
    assert got.classes.tolist() == [1, 2] and got.scores.tolist() == pytest.approx([0.9, 0.7])
    np.testing.assert_array_equal(got.boxes, boxes[[0, 2]])


def test_confidence_and_the_hybrid_curve() -> None:
    assert confidence(np.array([0.95, 0.55, 0.05]), floor=0.1) == pytest.approx(0.1)
    assert confidence(np.array([0.05]), floor=0.1) == 1.0  # nothing above the floor
    truths = [(A, np.array([0])), (B, np.array([0]))]
    unsure_miss = _dets([[0.6, 0.0, 0.7, 0.1]], [0.5], [0])  # confidence 0, and wrong
    sure_hit = _dets(B, [0.99], [0])
    cloud = [_dets(A, [0.9], [0]), _dets(B, [0.9], [0])]
    low, high = hybrid_curve([unsure_miss, sure_hit], cloud, truths, 0.1, [0.0, 0.5])
    assert (low.escalated, high.escalated) == (0.0, 0.5)
    assert low.map50 == pytest.approx(0.5) and high.map50 == pytest.approx(1.0)
