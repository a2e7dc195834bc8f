"""shared.decode.compare: the golden check's rule catches each kind of disagreement."""

from __future__ import annotations

import numpy as np

from shared.contract import Tolerance
from shared.decode import (
    Classification,
    Custom,
    Detection,
    Detections,
    MultiLabel,
    Regression,
    Segmentation,
    compare,
)

TOL = Tolerance(atol=0.02, iou=0.9, mask_agreement=0.98)


def cls(probs: list[float]) -> Classification:
    index = int(np.argmax(probs))
    return Classification(f"c{index}", index, probs, [(f"c{index}", probs[index])])


def test_classification() -> None:
    assert compare(cls([0.7, 0.2, 0.1]), cls([0.71, 0.19, 0.1]), TOL) is None
    problem = compare(cls([0.5, 0.4, 0.1]), cls([0.45, 0.46, 0.09]), TOL)
    assert problem is not None and "top-1 differs: expected 'c0'" in problem
    problem = compare(cls([0.7, 0.2, 0.1]), cls([0.75, 0.15, 0.1]), TOL)
    assert problem is not None and "probabilities differ by 0.05 at index 0" in problem
    problem = compare(cls([0.7, 0.3]), cls([0.7, 0.2, 0.1]), TOL)
    assert problem == "expected 2 classes, got 3"


def ml(probs: list[float]) -> MultiLabel:
    return MultiLabel([(f"l{i}", p) for i, p in enumerate(probs) if p >= 0.5], probs)


def test_multilabel() -> None:
    assert compare(ml([0.9, 0.1, 0.6]), ml([0.91, 0.1, 0.6]), TOL) is None
    # a label on the fence may fall either side
    assert compare(ml([0.9, 0.505]), ml([0.9, 0.495]), TOL) is None
    problem = compare(ml([0.9, 0.1]), ml([0.9, 0.15]), TOL)
    assert problem is not None and "index 1" in problem
    # the same probabilities cannot give other labels, but names can differ
    other = MultiLabel([("x", 0.9)], [0.9, 0.1])
    problem = compare(ml([0.9, 0.1]), other, TOL)
    assert problem is not None and "labels differ" in problem


def det(
    label: str, score: float, box: tuple[float, float, float, float], cid: int = 0
) -> Detection:
    return Detection(label, cid, score, box)


FACE = det("face", 0.9, (10, 10, 50, 50))
CAT = det("cat", 0.8, (60, 60, 100, 100), 1)


def dets(*items: Detection) -> Detections:
    return Detections(list(items), tuple(d.score for d in items), 0.5)


def test_detections_agree_when_matched_both_ways() -> None:
    moved = det("face", 0.88, (10.5, 10, 50.5, 50))  # IoU 0.98
    assert compare(dets(FACE, CAT), dets(CAT, moved), TOL) is None
    assert compare(dets(), dets(), TOL) is None


def test_a_missing_or_moved_detection_is_caught() -> None:
    problem = compare(dets(FACE, CAT), dets(CAT), TOL)
    assert problem is not None and "expected detection 'face' 0.900" in problem
    moved = det("face", 0.9, (20, 10, 60, 50))  # IoU 0.6
    problem = compare(dets(FACE), dets(moved), TOL)
    assert problem is not None and "no match of its class at IoU >= 0.9 (best 0.60)" in problem


def test_a_detection_of_another_class_does_not_match() -> None:
    problem = compare(dets(FACE), dets(det("cat", 0.9, FACE.box, 1)), TOL)
    assert problem is not None and "(best 0.00)" in problem


def test_an_extra_detection_is_caught() -> None:
    problem = compare(dets(FACE), dets(FACE, CAT), TOL)
    assert problem is not None and "unexpected detection 'cat' 0.800 at (60.0, 60.0" in problem
    # two actual boxes cannot both match one expected
    problem = compare(dets(FACE), dets(FACE, det("face", 0.85, FACE.box)), TOL)
    assert problem is not None and "unexpected detection 'face' 0.850" in problem


def test_a_detection_on_the_threshold_may_be_missing() -> None:
    edge = det("cat", 0.51, CAT.box, 1)
    assert compare(dets(FACE, edge), dets(FACE), TOL) is None
    assert compare(dets(FACE), dets(FACE, edge), TOL) is None
    clear = det("cat", 0.6, CAT.box, 1)
    assert compare(dets(FACE, clear), dets(FACE), TOL) is not None


def mask(values: np.ndarray) -> Segmentation:
    return Segmentation(values.astype(np.int32), {})


def test_segmentation() -> None:
    a = np.zeros((10, 10))
    b = a.copy()
    b[0, :1] = 1  # 1% differs
    assert compare(mask(a), mask(b), TOL) is None
    b[0, :5] = 1  # 5% differs
    problem = compare(mask(a), mask(b), TOL)
    assert problem is not None and "masks agree on 95.00% of pixels, less than 98.00%" in problem
    problem = compare(mask(a), mask(np.zeros((10, 11))), TOL)
    assert problem == "mask shape differs: expected [10, 10], got [10, 11]"


def test_regression_and_custom() -> None:
    assert compare(Regression([1.0, 2.0]), Regression([1.01, 2.0]), TOL) is None
    problem = compare(Regression([1.0, 2.0]), Regression([1.0, 2.5]), TOL)
    assert problem is not None and "values differ by 0.5 at index 1" in problem
    problem = compare(Regression([1.0]), Regression([1.0, 2.0]), TOL)
    assert problem == "values: expected shape [1], got [2]"
    problem = compare(Regression([1.0]), Regression([float("nan")]), TOL)
    assert problem is not None and "differ" in problem
    a = Custom({"x": [[1.0, 2.0]], "y": [[0.0]]})
    assert compare(a, Custom({"x": [[1.0, 2.0]], "y": [[0.01]]}), TOL) is None
    problem = compare(a, Custom({"x": [[1.0, 2.0]], "y": [[0.5]]}), TOL)
    assert problem is not None and "output 'y' differ" in problem
    problem = compare(a, Custom({"x": [[1.0, 2.0]]}), TOL)
    assert problem == "outputs differ: expected ['x', 'y'], got ['x']"


def test_results_of_different_tasks_differ() -> None:
    assert compare(Regression([1.0]), cls([1.0]), TOL) == (
        "expected a regression result, got classification"
    )
