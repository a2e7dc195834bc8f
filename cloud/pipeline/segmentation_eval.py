"""The segmenter's ground truth and scores, in NumPy only (tests read them with no
TensorFlow loaded).

- ``class_maps``: a scene's ownership map (``Scenes.owners``: which digit is on each pixel)
  as class ids, background 0 and digit ``d`` as ``d + 1`` (``LABELS``), at the picture's
  size or pooled to a model's coarser output grid (the most frequent class of each block);
- ``confusion`` / ``scores``: pixel accuracy, per-class IoU and their mean over the classes
  that occur, the usual figures of a semantic segmenter;
- ``max_prob_quantile``: the agent's segmentation confidence on one probability map, so
  the build can measure what a device will report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cloud.pipeline.scenes import LABELS as DIGITS
from cloud.pipeline.scenes import Scenes

#: Class 0 is background; class ``d + 1`` is digit ``d``.
LABELS = ["background", *DIGITS]
CLASSES = len(LABELS)


def class_maps(data: Scenes, stride: int = 1, chunk: int = 256) -> np.ndarray:
    """``[n, S / stride, S / stride]`` uint8 class ids of ``data``'s pictures: each block of
    ``stride`` x ``stride`` pixels takes its most frequent class (a tie goes to the lower
    id, background before any digit)."""
    if data.owners is None:
        raise ValueError("the scenes were made without owners (make_scenes(owners=True))")
    n, size = data.owners.shape[:2]
    if size % stride:
        raise ValueError(f"stride {stride} does not divide the picture size {size}")
    # per picture: owner index -1..K-1 -> class id (padding slot K for background)
    lookup = np.concatenate([data.classes + 1, np.zeros((n, 1), np.int64)], axis=1)
    owner = np.where(data.owners < 0, lookup.shape[1] - 1, data.owners).astype(np.int64)
    pixels = np.take_along_axis(lookup, owner.reshape(n, -1), axis=1).reshape(owner.shape)
    if stride == 1:
        return pixels.astype(np.uint8)
    grid = size // stride
    out = np.empty((n, grid, grid), dtype=np.uint8)
    eye = np.eye(CLASSES, dtype=np.uint8)
    for start in range(0, n, chunk):
        part = eye[pixels[start : start + chunk]]  # [c, S, S, C]
        counts = part.reshape(len(part), grid, stride, grid, stride, CLASSES).sum(axis=(2, 4))
        out[start : start + chunk] = counts.argmax(axis=-1)
    return out


def confusion(predicted: np.ndarray, truth: np.ndarray, classes: int = CLASSES) -> np.ndarray:
    """``[C, C]`` pixel counts, rows the true class and columns the predicted one."""
    flat = truth.astype(np.int64).ravel() * classes + predicted.astype(np.int64).ravel()
    counts: np.ndarray = np.bincount(flat, minlength=classes * classes).reshape(classes, classes)
    return counts


@dataclass(frozen=True)
class SegmentationScores:
    pixel_accuracy: float
    #: the share of digit pixels given their own digit's class
    digit_pixel_accuracy: float
    mean_iou: float  # over the classes that occur in the truth or the prediction
    iou: dict[str, float]

    def as_dict(self) -> dict[str, object]:
        return {
            "pixel_accuracy": self.pixel_accuracy,
            "digit_pixel_accuracy": self.digit_pixel_accuracy,
            "mean_iou": self.mean_iou,
            "iou": self.iou,
        }


def scores(predicted: np.ndarray, truth: np.ndarray) -> SegmentationScores:
    """Pixel accuracy and IoU of ``predicted`` class ids against ``truth`` (same shape)."""
    if predicted.shape != truth.shape:
        raise ValueError(f"shapes differ: {predicted.shape} and {truth.shape}")
    m = confusion(predicted, truth)
    hit = np.diag(m).astype(np.float64)
    union = m.sum(axis=0) + m.sum(axis=1) - hit
    occurs = union > 0
    iou = {LABELS[c]: float(hit[c] / union[c]) for c in np.flatnonzero(occurs)}
    digits = m[1:].sum()
    return SegmentationScores(
        pixel_accuracy=float(hit.sum() / max(m.sum(), 1)),
        digit_pixel_accuracy=float(hit[1:].sum() / digits) if digits else 1.0,
        mean_iou=float(np.mean(list(iou.values()))) if iou else 1.0,
        iou=iou,
    )


def max_prob_quantile(probs: np.ndarray, quantile: float) -> float:
    """The agent's segmentation confidence (``shared.decode.segmentation``): the
    ``quantile`` of the per-pixel max probability of one ``[H, W, C]`` map."""
    return float(np.quantile(probs.max(axis=-1), quantile))
