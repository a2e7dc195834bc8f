"""Box overlap and greedy non-maximum suppression, in NumPy (no runtime's NMS op is needed
on the device: a detector with raw anchors gives a few hundred candidates at most above
the floor, where a per-class greedy loop over vectorised IoUs is quick)."""

from __future__ import annotations

import numpy as np


def areas(boxes: np.ndarray) -> np.ndarray:
    """Area of each ``x0, y0, x1, y1`` box of ``[n, 4]`` (0 for an inverted one)."""
    w = np.maximum(boxes[:, 2] - boxes[:, 0], 0.0)
    h = np.maximum(boxes[:, 3] - boxes[:, 1], 0.0)
    out: np.ndarray = w * h
    return out


def iou(
    box: np.ndarray, boxes: np.ndarray, area: float | None = None, others: np.ndarray | None = None
) -> np.ndarray:
    """IoU of one ``x0, y0, x1, y1`` box with each of ``boxes`` ``[n, 4]``; ``area`` and
    ``others`` (the boxes' areas) may be given when already known."""
    w = np.maximum(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0.0)
    h = np.maximum(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0.0)
    inter = w * h
    if area is None:
        area = max(float(box[2] - box[0]), 0.0) * max(float(box[3] - box[1]), 0.0)
    union = area + (areas(boxes) if others is None else others) - inter
    out: np.ndarray = inter / np.maximum(union, np.finfo(np.float32).tiny)
    return out


#: Up to this many boxes, NMS computes every pair's IoU at once (n x n floats) and runs its
#: greedy loop over rows of that matrix; above it, one box's IoUs at a time.
MATRIX_MAX = 256


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[len(a), len(b)]`` IoUs of two sets of ``x0, y0, x1, y1`` boxes."""
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.maximum(w, 0.0) * np.maximum(h, 0.0)
    union = areas(a)[:, None] + areas(b)[None, :] - inter
    out: np.ndarray = inter / np.maximum(union, np.finfo(np.float32).tiny)
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, threshold: float) -> np.ndarray:
    """Indices of the boxes kept by class-wise greedy NMS (a box is dropped when it
    overlaps a better box of its class by more than ``threshold`` IoU), best first."""
    order = np.argsort(-scores, kind="stable")
    if len(order) <= MATRIX_MAX:
        clash = (iou_matrix(boxes, boxes) > threshold) & (classes[:, None] == classes[None, :])
        dropped = np.zeros(len(order), dtype=bool)
        kept: list[int] = []
        for i in order.tolist():
            if not dropped[i]:
                kept.append(i)
                dropped |= clash[i]
        return np.asarray(kept, dtype=np.int64)
    size = areas(boxes)
    keep: list[int] = []
    for c in np.unique(classes):
        members = order[classes[order] == c]
        while members.size:
            best = int(members[0])
            keep.append(best)
            rest = members[1:]
            if not rest.size:
                break
            overlap = iou(boxes[best], boxes[rest], float(size[best]), size[rest])
            members = rest[overlap <= threshold]
    out = np.asarray(keep, dtype=np.int64)
    return out[np.argsort(-scores[out], kind="stable")]
