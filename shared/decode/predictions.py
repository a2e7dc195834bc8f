"""The typed results of decoding one sample, one type per task.

Each result is a frozen value with two views: ``to_dict()`` for JSON (the Python API, the
CLI's one line per input, OIP response parameters), floats rounded, and ``to_tensors()``,
the named arrays the local OIP endpoint returns as its outputs. Every tensor has a leading
batch dimension of 1 (one sample), strings are ``BYTES`` (``np.object_`` arrays of
``bytes``), so a client reads an edge answer the way it reads any OIP model's.

Boxes are ``x0, y0, x1, y1`` in the caller's frame pixels when the decoder was given a
``Placement``; without one, in the model input's pixels (normalised boxes stay in [0, 1]
only when the model has no image input to size them by).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from shared.contract import Task
from shared.placement import Placement

#: Decimal places of probabilities/values and of pixel coordinates in ``to_dict``.
PLACES = 6
PIXEL_PLACES = 2


def _round(value: float, places: int = PLACES) -> float:
    return round(float(value), places)


def _round_nested(value: Any) -> Any:
    if isinstance(value, list):
        return [_round_nested(v) for v in value]
    return _round(value) if isinstance(value, float) else value


def _strings(values: list[str]) -> np.ndarray:
    """A ``[1, n]`` BYTES tensor."""
    arr = np.empty((1, len(values)), dtype=np.object_)
    for i, v in enumerate(values):
        arr[0, i] = v.encode()
    return arr


def _floats(values: list[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).reshape(1, -1)


def _scored(pairs: list[tuple[str, float]]) -> list[dict[str, Any]]:
    return [{"label": label, "score": _round(score)} for label, score in pairs]


@dataclass(frozen=True, slots=True)
class Classification:
    """The top-1 class, every class's probability (temperature applied) and the best k.

    Tensors: ``label`` [1] BYTES, ``index`` [1] INT64, ``probabilities`` [1, C] FP32,
    ``top_k_labels`` [1, k] BYTES, ``top_k_scores`` [1, k] FP32."""

    label: str
    index: int
    probs: list[float]
    top_k: list[tuple[str, float]]
    task: ClassVar[Task] = "classification"
    #: What ``to_tensors`` gives: (name, OIP datatype, shape; -1 varies).
    TENSORS: ClassVar[tuple[tuple[str, str, list[int]], ...]] = (
        ("label", "BYTES", [1]),
        ("index", "INT64", [1]),
        ("probabilities", "FP32", [1, -1]),
        ("top_k_labels", "BYTES", [1, -1]),
        ("top_k_scores", "FP32", [1, -1]),
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "label": self.label,
            "index": self.index,
            "score": _round(self.probs[self.index]),
            "top_k": _scored(self.top_k),
            "probabilities": [_round(p) for p in self.probs],
        }

    def to_tensors(self) -> dict[str, np.ndarray]:
        return {
            "label": _strings([self.label])[0],
            "index": np.array([self.index], dtype=np.int64),
            "probabilities": _floats(self.probs),
            "top_k_labels": _strings([label for label, _ in self.top_k]),
            "top_k_scores": _floats([p for _, p in self.top_k]),
        }


@dataclass(frozen=True, slots=True)
class MultiLabel:
    """The labels at or above 0.5 (best first), and every label's probability.

    Tensors: ``labels`` [1, m] BYTES, ``scores`` [1, m] FP32, ``probabilities`` [1, C]."""

    labels: list[tuple[str, float]]
    probs: list[float]
    task: ClassVar[Task] = "multilabel"
    #: What ``to_tensors`` gives: (name, OIP datatype, shape; -1 varies).
    TENSORS: ClassVar[tuple[tuple[str, str, list[int]], ...]] = (
        ("labels", "BYTES", [1, -1]),
        ("scores", "FP32", [1, -1]),
        ("probabilities", "FP32", [1, -1]),
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "labels": _scored(self.labels),
            "probabilities": [_round(p) for p in self.probs],
        }

    def to_tensors(self) -> dict[str, np.ndarray]:
        return {
            "labels": _strings([label for label, _ in self.labels]),
            "scores": _floats([p for _, p in self.labels]),
            "probabilities": _floats(self.probs),
        }


@dataclass(frozen=True, slots=True)
class Detection:
    """One object: its class, score and box ``x0, y0, x1, y1`` (see the module)."""

    label: str
    class_id: int
    score: float
    box: tuple[float, float, float, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "class_id": self.class_id,
            "score": _round(self.score),
            "box": [_round(v, PIXEL_PLACES) for v in self.box],
        }


@dataclass(frozen=True, slots=True)
class Detections:
    """The detections at or above the score threshold, best first.

    ``candidate_scores`` are the scores (after NMS) of every candidate at or above the
    confidence floor, among the classes of interest: what the confidence rule reads, kept
    apart from ``items`` because most sit under the reporting threshold. ``threshold`` is
    the reporting threshold, so ``compare`` can forgive a detection that sits on it.

    Tensors: ``boxes`` [1, n, 4] FP32, ``scores`` [1, n] FP32, ``classes`` [1, n] INT64,
    ``labels`` [1, n] BYTES, ``count`` [1] INT64."""

    items: list[Detection]
    candidate_scores: tuple[float, ...] = ()
    threshold: float = 0.0
    task: ClassVar[Task] = "detection"
    #: What ``to_tensors`` gives: (name, OIP datatype, shape; -1 varies).
    TENSORS: ClassVar[tuple[tuple[str, str, list[int]], ...]] = (
        ("boxes", "FP32", [1, -1, 4]),
        ("scores", "FP32", [1, -1]),
        ("classes", "INT64", [1, -1]),
        ("labels", "BYTES", [1, -1]),
        ("count", "INT64", [1]),
    )

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "detections": [d.to_dict() for d in self.items]}

    def to_tensors(self) -> dict[str, np.ndarray]:
        boxes = np.asarray([d.box for d in self.items], dtype=np.float32).reshape(1, -1, 4)
        return {
            "boxes": boxes,
            "scores": _floats([d.score for d in self.items]),
            "classes": np.asarray([d.class_id for d in self.items], dtype=np.int64).reshape(1, -1),
            "labels": _strings([d.label for d in self.items]),
            "count": np.array([len(self.items)], dtype=np.int64),
        }


@dataclass(frozen=True, slots=True, eq=False)
class Segmentation:
    """A class id per pixel of the model's output, and the share of pixels of each label
    present.

    ``mask`` stays at the model's output resolution (the cheap form: no resize on the
    request path); ``placement`` says where the model's input sits in the caller's frame,
    and ``in_frame()`` resizes the mask to the frame when a caller wants it there.
    ``areas`` count only the mask pixels that fall inside the frame (letterbox padding is
    not part of the picture). ``max_prob_quantile`` is the confidence rule's quantile of
    per-pixel max probability (1.0 for a model that gives class ids).

    Tensors: ``mask`` [1, H, W] INT32, ``area_labels`` [1, m] BYTES, ``areas`` [1, m] FP32.
    """

    mask: np.ndarray
    areas: dict[str, float]
    max_prob_quantile: float = 1.0
    placement: Placement | None = None
    task: ClassVar[Task] = "segmentation"
    #: What ``to_tensors`` gives: (name, OIP datatype, shape; -1 varies).
    TENSORS: ClassVar[tuple[tuple[str, str, list[int]], ...]] = (
        ("mask", "INT32", [1, -1, -1]),
        ("area_labels", "BYTES", [1, -1]),
        ("areas", "FP32", [1, -1]),
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "shape": list(self.mask.shape),
            "areas": {label: _round(a) for label, a in self.areas.items()},
        }

    def to_tensors(self) -> dict[str, np.ndarray]:
        return {
            "mask": self.mask.astype(np.int32, copy=False)[None],
            "area_labels": _strings(list(self.areas)),
            "areas": _floats(list(self.areas.values())),
        }

    def in_frame(self) -> np.ndarray:
        """The mask resized (nearest pixel) to the caller's frame: ``[frame_h, frame_w]``,
        with -1 where the frame lies outside the model's input (a centre crop's margins).
        Without a placement, the mask itself."""
        p = self.placement
        if p is None:
            return self.mask
        mh, mw = self.mask.shape
        cols, col_ok = _frame_to_mask(p.frame_w, p.scale_x, p.offset_x, p.model_w, mw)
        rows, row_ok = _frame_to_mask(p.frame_h, p.scale_y, p.offset_y, p.model_h, mh)
        out: np.ndarray = self.mask.astype(np.int32, copy=False)[np.ix_(rows, cols)]
        out[~(row_ok[:, None] & col_ok[None, :])] = -1
        return out


def _frame_to_mask(
    frame: int, scale: float, offset: float, model: int, mask: int
) -> tuple[np.ndarray, np.ndarray]:
    """For each frame pixel along one axis: the mask pixel under its centre, and whether
    that centre falls on the model's input at all."""
    at = (np.arange(frame) + 0.5 - offset) / scale  # model pixels
    ok = (at >= 0) & (at < model)
    index = np.clip((at * mask / model).astype(np.int64), 0, mask - 1)
    return index, ok


@dataclass(frozen=True, slots=True)
class Regression:
    """The values of the model's ``value`` outputs, flattened, in manifest order.

    Tensors: ``values`` [1, n] FP32."""

    values: list[float]
    task: ClassVar[Task] = "regression"
    #: What ``to_tensors`` gives: (name, OIP datatype, shape; -1 varies).
    TENSORS: ClassVar[tuple[tuple[str, str, list[int]], ...]] = (("values", "FP32", [1, -1]),)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "values": [_round(v) for v in self.values]}

    def to_tensors(self) -> dict[str, np.ndarray]:
        return {"values": _floats(self.values)}


@dataclass(frozen=True, slots=True)
class Custom:
    """Every output as the model gave it (nested lists, batch dimension included).

    Tensors: each output by its name, FP32, in its own shape."""

    outputs: dict[str, list[Any]]
    task: ClassVar[Task] = "custom"

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "outputs": {name: _round_nested(v) for name, v in self.outputs.items()},
        }

    def to_tensors(self) -> dict[str, np.ndarray]:
        return {name: np.asarray(v, dtype=np.float32) for name, v in self.outputs.items()}


Prediction = Classification | MultiLabel | Detections | Segmentation | Regression | Custom
