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


def mean_average_precision(
    predictions: Sequence[Detections],
    truths: Sequence[tuple[np.ndarray, np.ndarray]],
    iou: float = 0.5,
) -> tuple[float, dict[int, float]]:
    """mAP@``iou`` and each class's AP. ``truths``: per picture, boxes ``[k, 4]`` and
    classes ``[k]``. A detection is a true positive when it overlaps a not yet matched
    truth box of its class by at least ``iou`` (detections taken best first over all
    pictures); classes with no truth box are left out of the mean."""
    per_class: dict[int, float] = {}
    classes = sorted({int(c) for _, cs in truths for c in cs})
    for c in classes:
        total = sum(int((cs == c).sum()) for _, cs in truths)
        found: list[tuple[float, int, np.ndarray]] = []
        for i, d in enumerate(predictions):
            for box, score in zip(d.boxes[d.classes == c], d.scores[d.classes == c]):
                found.append((float(score), i, box))
        found.sort(key=lambda f: -f[0])
        matched = [np.zeros(int((cs == c).sum()), dtype=bool) for _, cs in truths]
        hits = np.zeros(len(found), dtype=bool)
        for j, (_, i, box) in enumerate(found):
            gt = truths[i][0][truths[i][1] == c]
            if not len(gt):
                continue
            overlaps = box_iou(box, gt)
            k = int(overlaps.argmax())
            if overlaps[k] >= iou and not matched[i][k]:
                matched[i][k] = hits[j] = True
        tp = np.cumsum(hits)
        recall = tp / max(total, 1)
        precision = tp / np.arange(1, len(found) + 1)
        per_class[c] = average_precision(recall, precision) if len(found) else 0.0
    return (float(np.mean(list(per_class.values()))) if per_class else 0.0), per_class


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
    points = []
    for t in thresholds:
        escalate = conf < t
        mixed = [c if e else d for d, c, e in zip(edge, cloud, escalate)]
        points.append(
            HybridPoint(float(t), float(escalate.mean()), mean_average_precision(mixed, truths)[0])
        )
    return points
