"""How good a detector is, in NumPy: its raw outputs to detections (best class per box,
score floor, class-wise NMS), mAP@IoU over a set of pictures (PASCAL VOC's all-point
average precision, per class, then the mean over classes that occur), and the hybrid
curve of a pair: mAP and escalated share as the confidence threshold rises.

The confidence is the agent's detection rule (``shared.decode.detection``): the least
decisive candidate at or above the floor, ``min |2s - 1|``, 1 when there is none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.decode.nms import nms


@dataclass(frozen=True)
class Detections:
    """One picture's detections: ``boxes`` ``[k, 4]`` ``y0, x0, y1, x1`` (any unit, the
    same as the truth's), ``scores`` ``[k]``, ``classes`` ``[k]``, best first."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


def postprocess(
    boxes: np.ndarray, scores: np.ndarray, floor: float = 0.05, iou: float = 0.5, top: int = 20
) -> Detections:
    """One picture's ``[N, 4]`` yxyx boxes and ``[N, C]`` class probabilities: each box
    takes its best class; those scoring at least ``floor`` go through class-wise NMS at
    ``iou``; the best ``top`` are kept."""
    classes = scores.argmax(axis=1)
    best = scores[np.arange(len(scores)), classes]
    keep = np.flatnonzero(best >= floor)
    xyxy = boxes[keep][:, [1, 0, 3, 2]]
    order = nms(xyxy, best[keep], classes[keep], iou)[:top]
    chosen = keep[order]
    return Detections(boxes[chosen], best[chosen], classes[chosen].astype(np.int64))


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``y0, x0, y1, x1`` box with each of ``boxes`` ``[n, 4]``."""
    y0 = np.maximum(box[0], boxes[:, 0])
    x0 = np.maximum(box[1], boxes[:, 1])
    y1 = np.minimum(box[2], boxes[:, 2])
    x1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(y1 - y0, 0, None) * np.clip(x1 - x0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    out: np.ndarray = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
    return out


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision-recall curve made monotone (VOC 2010+ all-point)."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.flatnonzero(r[1:] != r[:-1])
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


@dataclass(frozen=True)
class Marked:
    """One picture's detections marked right or wrong against its truth, and the classes
    of its truth boxes: all mAP needs, whichever other pictures it is pooled with."""

    scores: np.ndarray
    classes: np.ndarray
    hits: np.ndarray
    truth_classes: np.ndarray


def mark(found: Detections, truth: tuple[np.ndarray, np.ndarray], iou: float = 0.5) -> Marked:
    """A detection is right when it overlaps a truth box of its class not yet matched by
    a better detection by at least ``iou`` (its best-overlapping such box; VOC's rule).
    Matching stays inside a picture, so it can be done once per picture."""
    boxes, classes = truth
    order = np.argsort(-found.scores, kind="stable")
    hits = np.zeros(len(order), dtype=bool)
    matched = np.zeros(len(classes), dtype=bool)
    for j in order:
        same = np.flatnonzero(classes == found.classes[j])
        if not len(same):
            continue
        overlaps = box_iou(found.boxes[j], boxes[same])
        k = int(overlaps.argmax())
        if overlaps[k] >= iou and not matched[same[k]]:
            matched[same[k]] = hits[j] = True
    return Marked(found.scores, found.classes, hits, np.asarray(classes))


def pooled_map(pictures: Sequence[Marked]) -> tuple[float, dict[int, float]]:
    """mAP and each class's AP over ``pictures``; classes with no truth box are left out."""
    scores = np.concatenate([m.scores for m in pictures]) if pictures else np.zeros(0)
    classes = np.concatenate([m.classes for m in pictures]) if pictures else np.zeros(0)
    hits = np.concatenate([m.hits for m in pictures]) if pictures else np.zeros(0, bool)
    truth = np.concatenate([m.truth_classes for m in pictures]) if pictures else np.zeros(0)
    per_class: dict[int, float] = {}
    for c in sorted({int(v) for v in truth}):
        mine = np.flatnonzero(classes == c)
        ranked = hits[mine[np.argsort(-scores[mine], kind="stable")]]
        if not len(ranked):
            per_class[c] = 0.0
            continue
        tp = np.cumsum(ranked)
        recall = tp / int((truth == c).sum())
        per_class[c] = average_precision(recall, tp / np.arange(1, len(ranked) + 1))
    return (float(np.mean(list(per_class.values()))) if per_class else 0.0), per_class


def mean_average_precision(
    predictions: Sequence[Detections],
    truths: Sequence[tuple[np.ndarray, np.ndarray]],
    iou: float = 0.5,
) -> tuple[float, dict[int, float]]:
    """mAP@``iou`` and each class's AP. ``truths``: per picture, boxes ``[k, 4]`` and
    classes ``[k]``. Detections are ranked by score over all pictures (PASCAL VOC)."""
    return pooled_map([mark(d, t, iou) for d, t in zip(predictions, truths, strict=True)])


def confidence(scores: np.ndarray, floor: float) -> float:
    """The agent's detection confidence of one picture's detection ``scores``."""
    counted = scores[scores >= floor]
    return float(np.min(np.abs(2.0 * counted - 1.0))) if len(counted) else 1.0


@dataclass(frozen=True)
class HybridPoint:
    threshold: float
    escalated: float  # share of pictures sent to the cloud model
    map50: float  # mAP@0.5 of the edge's answers where kept, the cloud's where escalated


def hybrid_curve(
    edge: Sequence[Detections],
    cloud: Sequence[Detections],
    truths: Sequence[tuple[np.ndarray, np.ndarray]],
    floor: float,
    thresholds: Sequence[float],
) -> list[HybridPoint]:
    """A picture escalates when the edge's confidence is below the threshold."""
    conf = np.array([confidence(d.scores, floor) for d in edge])
    marked = [[mark(d, t) for d, t in zip(side, truths, strict=True)] for side in (edge, cloud)]
    points = []
    for t in thresholds:
        escalate = conf < t
        mixed = [marked[int(e)][i] for i, e in enumerate(escalate)]
        points.append(HybridPoint(float(t), float(escalate.mean()), pooled_map(mixed)[0]))
    return points
