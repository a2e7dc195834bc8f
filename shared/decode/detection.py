"""Detection: three output layouts, told apart by their roles, into one ``Detections``.

- ``boxes`` + ``classes`` + ``scores`` (+ ``count``): TFLite's
  ``TFLite_Detection_PostProcess`` (SSD MobileNet and friends): NMS is done in the model;
  the first ``count`` rows are taken, thresholded and mapped;
- ``boxes`` ``[1, N, 4]`` + ``scores`` ``[1, N, C]`` (or ``[1, N]``): a box per row and a
  score per class; each box takes its best class, then class-wise NMS;
- ``anchors`` ``[1, N, K >= 4]`` + ``scores`` ``[1, N, C]`` with decoder ``ssd_anchors``:
  MediaPipe-style regressors over generated anchors (``shared.decode.anchors``), then NMS.

Scores: ``logits`` with several classes go through a softmax across them; ``sigmoid``
(and a single class's logits) through a sigmoid each; ``probabilities`` are taken as
they are (through their logit when a temperature re-scales them).

Every candidate at or above ``min(floor, score_threshold)`` goes through NMS; those at or
above the threshold are reported (at most ``max_detections``), and those at or above the
confidence floor, among the classes of interest, are what confidence reads: the least
decisive one's ``|2s - 1|``, 1 when there is none.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from shared.contract import OutputSpec
from shared.errors import ContractError
from shared.manifest import Manifest
from shared.placement import Placement

from .activations import class_probs, each_probs
from .anchors import ssd_anchors
from .base import (
    Decoder,
    LabelNames,
    expect,
    fixed,
    label_names,
    model_size,
    need_rank,
    one_output,
    optional_output,
    take,
)
from .nms import nms
from .predictions import Detection, Detections, Prediction

#: Candidates kept (best first) before NMS: bounds its cost on a model whose scores sit
#: above the floor everywhere (an untrained or broken detector).
MAX_CANDIDATES = 2000


def to_xyxy(boxes: np.ndarray, box_format: str) -> np.ndarray:
    """``[n, 4]`` boxes in ``box_format`` to ``x0, y0, x1, y1``."""
    a, b, c, d = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    if box_format == "yxyx":
        out = (b, a, d, c)
    elif box_format == "xyxy":
        out = (a, b, c, d)
    elif box_format == "xywh":
        out = (a, b, a + c, b + d)
    else:  # cxcywh
        out = (a - c / 2, b - d / 2, a + c / 2, b + d / 2)
    xyxy: np.ndarray = np.stack(out, axis=1).astype(np.float32)
    return xyxy


def _rows(spec: OutputSpec) -> int | None:
    return fixed(spec.shape[1]) if len(spec.shape) > 1 else None


def _same_rows(*specs: OutputSpec | None) -> None:
    rows = {s.name: _rows(s) for s in specs if s is not None}
    known = {n for n in rows.values() if n is not None}
    if len(known) > 1:
        raise ContractError(f"detection outputs disagree on the number of rows: {rows}")


class _DetectionDecoder(Decoder):
    task = "detection"

    def __init__(self, manifest: Manifest, names: LabelNames, temperature: float) -> None:
        self._names = names
        self._temperature = temperature
        self._decoding = manifest.decoding
        self._floor = manifest.confidence.floor
        interest = manifest.confidence.classes_of_interest
        self._interest = None if interest is None else np.asarray(interest, dtype=np.int64)
        self._size = model_size(manifest)

    def _finish(
        self,
        boxes: np.ndarray,
        scores: np.ndarray,
        classes: np.ndarray,
        placement: Placement | None,
        *,
        normalized: bool,
        suppress: bool,
    ) -> Detections:
        """Threshold, NMS, map to pixels. ``boxes`` ``x0, y0, x1, y1``, normalised or in
        the model input's pixels."""
        d = self._decoding
        keep = np.flatnonzero(scores >= min(self._floor, d.score_threshold))
        keep = keep[np.argsort(-scores[keep], kind="stable")][:MAX_CANDIDATES]
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        order = nms(boxes, scores, classes, d.iou) if suppress else np.arange(len(scores))
        boxes, scores, classes = boxes[order], scores[order], classes[order]
        counted = scores >= self._floor
        if self._interest is not None:
            counted &= np.isin(classes, self._interest)
        shown = np.flatnonzero(scores >= d.score_threshold)[: d.max_detections]
        boxes = self._to_pixels(boxes[shown], placement, normalized)
        items = [
            Detection(self._names(int(c)), int(c), float(s), (b[0], b[1], b[2], b[3]))
            for b, s, c in zip(boxes.tolist(), scores[shown].tolist(), classes[shown].tolist())
        ]
        return Detections(items, tuple(scores[counted].tolist()), d.score_threshold)

    def _to_pixels(
        self, boxes: np.ndarray, placement: Placement | None, normalized: bool
    ) -> np.ndarray:
        size = (placement.model_h, placement.model_w) if placement is not None else self._size
        if normalized and size is not None:
            boxes = boxes * np.array([size[1], size[0], size[1], size[0]], dtype=np.float32)
        if placement is not None:
            return placement.boxes_to_frame(boxes)
        if size is not None:
            boxes = boxes.copy()
            np.clip(boxes[:, 0::2], 0, size[1], out=boxes[:, 0::2])
            np.clip(boxes[:, 1::2], 0, size[0], out=boxes[:, 1::2])
        return boxes

    def _best_class(self, spec: OutputSpec, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row: (best score, its class id)."""
        if raw.ndim == 1:
            raw = raw[:, None]
        if spec.activation == "logits" and raw.shape[1] > 1:
            probs = class_probs(raw, "logits", self._temperature)
        else:
            probs = each_probs(raw, spec.activation, self._temperature)
        classes = probs.argmax(axis=1)
        return probs[np.arange(len(probs)), classes], classes.astype(np.int64)

    def confidence(self, prediction: Prediction) -> float:
        scores = expect(prediction, Detections).candidate_scores
        return min((abs(2.0 * s - 1.0) for s in scores), default=1.0)


def _check_boxes(spec: OutputSpec) -> None:
    need_rank(spec, (3,), "[1, N, 4]")
    if spec.shape[2] != 4:
        raise ContractError(f"boxes output {spec.name!r} must be [1, N, 4], has {spec.shape}")


def _check_classes(spec: OutputSpec, names: LabelNames) -> None:
    need_rank(spec, (2, 3), "[1, N] or [1, N, C]")
    if len(spec.shape) == 3:
        names.check(fixed(spec.shape[2]), spec.name)


class PostProcessDecoder(_DetectionDecoder):
    """``TFLite_Detection_PostProcess``: boxes, class ids (as floats), scores, count."""

    def __init__(
        self, manifest: Manifest, labels: Mapping[str, Mapping[int, str]], temperature: float
    ) -> None:
        self._boxes = one_output(manifest, "boxes")
        self._classes = one_output(manifest, "classes")
        self._scores = one_output(manifest, "scores")
        self._count = optional_output(manifest, "count")
        super().__init__(
            manifest, label_names(manifest, labels, self._classes, self._scores), temperature
        )
        _check_boxes(self._boxes)
        need_rank(self._classes, (2,), "[1, N] class ids")
        need_rank(self._scores, (2,), "[1, N] (one score per detection, beside its class id)")
        if self._count is not None and self._count.shape not in ([1], [-1]):
            raise ContractError(f"count output {self._count.name!r} must be [1]")
        _same_rows(self._boxes, self._classes, self._scores)

    def decode(self, outputs: Mapping[str, np.ndarray], placement: Placement | None) -> Prediction:
        boxes = take(outputs, self._boxes)
        classes = take(outputs, self._classes)
        scores = take(outputs, self._scores)
        n = min(len(boxes), len(classes), len(scores))
        if self._count is not None:
            count = float(take(outputs, self._count).reshape(-1)[0])
            n = max(0, min(n, int(count))) if np.isfinite(count) else 0
        probs = each_probs(scores[:n], self._scores.activation, self._temperature)
        return self._finish(
            to_xyxy(boxes[:n], self._boxes.box_format),
            probs,
            np.rint(classes[:n]).astype(np.int64),
            placement,
            normalized=self._boxes.normalized,
            suppress=False,
        )


class BoxesScoresDecoder(_DetectionDecoder):
    """A box and a score per class for each row, then NMS."""

    def __init__(
        self, manifest: Manifest, labels: Mapping[str, Mapping[int, str]], temperature: float
    ) -> None:
        self._boxes = one_output(manifest, "boxes")
        self._scores = one_output(manifest, "scores")
        super().__init__(manifest, label_names(manifest, labels, self._scores), temperature)
        _check_boxes(self._boxes)
        _check_classes(self._scores, self._names)
        _same_rows(self._boxes, self._scores)

    def decode(self, outputs: Mapping[str, np.ndarray], placement: Placement | None) -> Prediction:
        boxes = take(outputs, self._boxes)
        raw = take(outputs, self._scores)
        if len(boxes) != len(raw):
            raise ContractError(f"{len(boxes)} boxes but {len(raw)} rows of scores")
        scores, classes = self._best_class(self._scores, raw)
        return self._finish(
            to_xyxy(boxes, self._boxes.box_format),
            scores,
            classes,
            placement,
            normalized=self._boxes.normalized,
            suppress=True,
        )


class AnchorsDecoder(_DetectionDecoder):
    """MediaPipe-style raw regressors over SSD anchors (``decoding.decoder`` ssd_anchors).

    Row ``i`` of the anchors output starts ``cx, cy, w, h`` (box format ``cxcywh``:
    MediaPipe's ``reverse_output_order``) in units of ``decoding.box_scale`` (the input
    size the model was trained at, 128 for BlazeFace); further values (keypoints) are
    ignored. With anchors of size 1: ``cx = raw[0] / box_scale + anchor_x``, and so on."""

    def __init__(
        self, manifest: Manifest, labels: Mapping[str, Mapping[int, str]], temperature: float
    ) -> None:
        self._raw = one_output(manifest, "anchors")
        self._scores = one_output(manifest, "scores")
        super().__init__(manifest, label_names(manifest, labels, self._scores), temperature)
        d = manifest.decoding
        if d.decoder != "ssd_anchors" or d.anchors is None:
            raise ContractError("an anchors output needs decoding.decoder 'ssd_anchors'")
        if self._size is None:
            raise ContractError("ssd_anchors are laid over the model's image input; it has none")
        need_rank(self._raw, (3,), "[1, N, K] regressors")
        if fixed(self._raw.shape[2]) is not None and self._raw.shape[2] < 4:
            raise ContractError(f"anchors output {self._raw.name!r} needs at least 4 values a row")
        if self._raw.box_format != "cxcywh":
            raise ContractError(
                f"anchors output {self._raw.name!r}: the ssd_anchors decoder reads box_format "
                f"'cxcywh' (MediaPipe's reverse_output_order), not {self._raw.box_format!r}"
            )
        _check_classes(self._scores, self._names)
        self._anchors = ssd_anchors(d.anchors, *self._size)
        _same_rows(self._raw, self._scores)
        rows = _rows(self._raw) or _rows(self._scores)
        if rows is not None and rows != len(self._anchors):
            raise ContractError(
                f"decoding.anchors generate {len(self._anchors)} anchors over a "
                f"{self._size[0]}x{self._size[1]} input, but the model gives {rows} rows"
            )
        self._box_scale = d.box_scale

    def decode(self, outputs: Mapping[str, np.ndarray], placement: Placement | None) -> Prediction:
        raw = take(outputs, self._raw)
        scores_raw = take(outputs, self._scores)
        if len(raw) != len(self._anchors) or len(scores_raw) != len(self._anchors):
            raise ContractError(
                f"{len(self._anchors)} anchors, but {len(raw)} regressor rows and "
                f"{len(scores_raw)} score rows"
            )
        scores, classes = self._best_class(self._scores, scores_raw)
        # only the candidates are decoded: a few out of hundreds of anchors
        keep = np.flatnonzero(scores >= min(self._floor, self._decoding.score_threshold))
        reg = raw[keep, :4] / np.float32(self._box_scale)
        reg[:, :2] += self._anchors[keep]
        return self._finish(
            to_xyxy(reg, "cxcywh"),
            scores[keep],
            classes[keep],
            placement,
            normalized=True,
            suppress=True,
        )
