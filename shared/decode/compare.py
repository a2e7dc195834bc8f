"""Whether two decoded results agree within a task's tolerance: the golden check's rule.

The agent decodes a golden sample's expected outputs and this runtime's outputs with the
same decoder and asks ``compare``: the runtime may round differently (another TFLite
build, XNNPACK or not, ONNX Runtime), but it must give the same answer.

- classification: the same top-1, every probability within ``atol``;
- multilabel: every probability within ``atol`` and the same labels present (a label
  within ``atol`` of 0.5 may fall either side);
- detection: each detection matched one to one by one of the same class with IoU at
  least ``iou``, both ways; one whose score is within ``atol`` of the threshold may be
  missing on the other side;
- segmentation: the masks agree on at least ``mask_agreement`` of their pixels;
- regression and custom: every value within ``atol``.
"""

from __future__ import annotations

import numpy as np

from shared.contract import Tolerance

from .nms import iou
from .predictions import (
    Classification,
    Custom,
    Detection,
    Detections,
    MultiLabel,
    Prediction,
    Regression,
    Segmentation,
)


def compare(expected: Prediction, actual: Prediction, tol: Tolerance) -> str | None:
    """None when ``actual`` agrees with ``expected``, else what differs."""
    if type(expected) is not type(actual):
        return f"expected a {expected.task} result, got {actual.task}"
    if isinstance(expected, Classification):
        assert isinstance(actual, Classification)
        return _classification(expected, actual, tol)
    if isinstance(expected, MultiLabel):
        assert isinstance(actual, MultiLabel)
        return _multilabel(expected, actual, tol)
    if isinstance(expected, Detections):
        assert isinstance(actual, Detections)
        return _detections(expected, actual, tol)
    if isinstance(expected, Segmentation):
        assert isinstance(actual, Segmentation)
        return _segmentation(expected, actual, tol)
    if isinstance(expected, Regression):
        assert isinstance(actual, Regression)
        return _values("values", expected.values, actual.values, tol.atol)
    assert isinstance(expected, Custom) and isinstance(actual, Custom)
    if expected.outputs.keys() != actual.outputs.keys():
        return f"outputs differ: expected {sorted(expected.outputs)}, got {sorted(actual.outputs)}"
    for name, want in expected.outputs.items():
        problem = _values(f"output {name!r}", want, actual.outputs[name], tol.atol)
        if problem:
            return problem
    return None


def _values(what: str, expected: object, actual: object, atol: float) -> str | None:
    want = np.asarray(expected, dtype=np.float64)
    have = np.asarray(actual, dtype=np.float64)
    if want.shape != have.shape:
        return f"{what}: expected shape {list(want.shape)}, got {list(have.shape)}"
    if want.size == 0:
        return None
    diff = np.abs(want - have)
    worst = int(np.nanargmax(diff)) if not np.isnan(diff).all() else 0
    if np.isnan(diff).any() or diff.flat[worst] > atol:
        return (
            f"{what} differ by {float(diff.flat[worst]):.4g} at index {worst} "
            f"(expected {float(want.flat[worst]):.6g}, got {float(have.flat[worst]):.6g}; "
            f"atol {atol:g})"
        )
    return None


def _classification(expected: Classification, actual: Classification, tol: Tolerance) -> str | None:
    if len(expected.probs) != len(actual.probs):
        return f"expected {len(expected.probs)} classes, got {len(actual.probs)}"
    if expected.index != actual.index:
        return (
            f"top-1 differs: expected {expected.label!r} ({expected.probs[expected.index]:.4f}), "
            f"got {actual.label!r} ({actual.probs[actual.index]:.4f})"
        )
    return _values("probabilities", expected.probs, actual.probs, tol.atol)


def _multilabel(expected: MultiLabel, actual: MultiLabel, tol: Tolerance) -> str | None:
    problem = _values("probabilities", expected.probs, actual.probs, tol.atol)
    if problem:
        return problem
    scores = dict(expected.labels) | dict(actual.labels)
    differ = {name for name, _ in expected.labels} ^ {name for name, _ in actual.labels}
    differ = {name for name in differ if abs(scores[name] - 0.5) > tol.atol}
    if differ:
        return (
            f"labels differ: expected {[n for n, _ in expected.labels]}, "
            f"got {[n for n, _ in actual.labels]}"
        )
    return None


def _describe(d: Detection) -> str:
    box = ", ".join(f"{v:.1f}" for v in d.box)
    return f"{d.label!r} {d.score:.3f} at ({box})"


def _unmatched(
    ours: list[Detection], theirs: list[Detection], threshold: float, tol: Tolerance
) -> tuple[Detection, float] | None:
    """The first of ``ours`` (best first) with no match among ``theirs`` (each of theirs
    matches at most one), and its best IoU; None when all are matched or forgiven."""
    free = list(range(len(theirs)))
    boxes = np.asarray([d.box for d in theirs], dtype=np.float64).reshape(-1, 4)
    for d in sorted(ours, key=lambda x: -x.score):
        same = [j for j in free if theirs[j].class_id == d.class_id]
        overlaps = iou(np.asarray(d.box, dtype=np.float64), boxes[same]) if same else np.zeros(0)
        best = int(np.argmax(overlaps)) if len(same) else -1
        if best >= 0 and overlaps[best] >= tol.iou:
            free.remove(same[best])
        elif abs(d.score - threshold) > tol.atol:
            return d, float(overlaps[best]) if best >= 0 else 0.0
    return None


def _detections(expected: Detections, actual: Detections, tol: Tolerance) -> str | None:
    missing = _unmatched(expected.items, actual.items, actual.threshold, tol)
    if missing:
        d, best = missing
        return (
            f"expected detection {_describe(d)} has no match of its class at IoU >= {tol.iou:g} "
            f"(best {best:.2f}) among {len(actual.items)} detections"
        )
    extra = _unmatched(actual.items, expected.items, expected.threshold, tol)
    if extra:
        d, best = extra
        return (
            f"unexpected detection {_describe(d)}: none expected of its class at "
            f"IoU >= {tol.iou:g} (best {best:.2f})"
        )
    return None


def _segmentation(expected: Segmentation, actual: Segmentation, tol: Tolerance) -> str | None:
    if expected.mask.shape != actual.mask.shape:
        want, have = list(expected.mask.shape), list(actual.mask.shape)
        return f"mask shape differs: expected {want}, got {have}"
    agree = float(np.mean(expected.mask == actual.mask)) if expected.mask.size else 1.0
    if agree < tol.mask_agreement:
        return f"masks agree on {agree:.2%} of pixels, less than {tol.mask_agreement:.2%}"
    return None
