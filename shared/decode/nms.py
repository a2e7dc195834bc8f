"""Box overlap and greedy non-maximum suppression, in NumPy (no runtime's NMS op is needed
on the device: a detector with raw anchors gives a few hundred candidates at most above
the floor, where a per-class greedy loop over vectorised IoUs is quick)."""

from __future__ import annotations

import numpy as np


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``x0, y0, x1, y1`` box with each of ``boxes`` ``[n, 4]``."""
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = max(float(box[2] - box[0]), 0.0) * max(float(box[3] - box[1]), 0.0)
    widths = np.clip(boxes[:, 2] - boxes[:, 0], 0, None)
    areas = widths * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    union = area + areas - inter
    out: np.ndarray = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, threshold: float) -> np.ndarray:
    """Indices of the boxes kept by class-wise greedy NMS (a box is dropped when it
    overlaps a better box of its class by more than ``threshold`` IoU), best first."""
    keep: list[int] = []
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        order = members[np.argsort(-scores[members], kind="stable")]
        while order.size:
            best = int(order[0])
            keep.append(best)
            rest = order[1:]
            order = rest[iou(boxes[best], boxes[rest]) <= threshold]
    kept = np.asarray(keep, dtype=np.int64)
    return kept[np.argsort(-scores[kept], kind="stable")]
