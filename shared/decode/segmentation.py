"""Segmentation: a ``mask`` output, ``[1, H, W, C]`` class scores or ``[1, H, W]`` class
ids, into a class id per pixel and the share of the picture each class covers.

Scores go through ``activation`` with the temperature; a one-channel mask (a person /
background model) is read as two classes, background 0 and foreground 1 at ``p >= 0.5``.
Confidence is a low quantile (``confidence.quantile``) of the per-pixel max probability:
the worst few percent of pixels, so a small unsure region is seen, not averaged away. A
mask of ids carries no probabilities: its confidence is 1.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from shared.errors import ContractError
from shared.manifest import Manifest
from shared.placement import Placement

from .activations import class_probs, each_probs
from .base import Decoder, LabelNames, expect, fixed, label_names, need_rank, one_output, take
from .predictions import Prediction, Segmentation


def _frame_region(placement: Placement | None, h: int, w: int) -> tuple[slice, slice]:
    """The rows and columns of an ``h`` x ``w`` mask that fall inside the caller's frame
    (all of them but a letterbox's padding)."""
    if placement is None:
        return slice(0, h), slice(0, w)
    p = placement

    def axis(frame: int, scale: float, offset: float, model: int, size: int) -> slice:
        lo = (0.0 - offset) / scale * size / model
        hi = (frame - offset) / scale * size / model
        start = min(max(int(np.floor(lo + 1e-6)), 0), size)
        stop = min(max(int(np.ceil(hi - 1e-6)), start), size)
        return slice(start, stop)

    return (
        axis(p.frame_h, p.scale_y, p.offset_y, p.model_h, h),
        axis(p.frame_w, p.scale_x, p.offset_x, p.model_w, w),
    )


class SegmentationDecoder(Decoder):
    task = "segmentation"

    def __init__(
        self, manifest: Manifest, labels: Mapping[str, Mapping[int, str]], temperature: float
    ) -> None:
        self._spec = one_output(manifest, "mask")
        need_rank(self._spec, (3, 4), "[1, H, W, C] scores or [1, H, W] class ids")
        self._names: LabelNames = label_names(manifest, labels, self._spec)
        if len(self._spec.shape) == 4:
            channels = fixed(self._spec.shape[3])
            self._names.check(2 if channels == 1 else channels, self._spec.name)
        self._temperature = temperature
        self._quantile = manifest.confidence.quantile

    def decode(self, outputs: Mapping[str, np.ndarray], placement: Placement | None) -> Prediction:
        raw = take(outputs, self._spec)
        if raw.ndim == 2:
            mask = np.rint(raw).astype(np.int32)
            if mask.size and mask.min() < 0:
                raise ContractError(f"mask output {self._spec.name!r} holds negative class ids")
            quantile = 1.0
        else:
            if raw.shape[2] == 1:
                fg = each_probs(raw[:, :, 0], self._spec.activation, self._temperature)
                mask = (fg >= 0.5).astype(np.int32)
                best = np.maximum(fg, 1.0 - fg)
            else:
                probs = class_probs(raw, self._spec.activation, self._temperature)
                mask = probs.argmax(axis=2).astype(np.int32)
                best = probs.max(axis=2)
            quantile = float(np.quantile(best, self._quantile)) if best.size else 1.0
        rows, cols = _frame_region(placement, *mask.shape)
        inside = mask[rows, cols].ravel()
        counts = np.bincount(inside) if inside.size else np.zeros(0, dtype=np.int64)
        areas: dict[str, float] = {}
        for i in np.flatnonzero(counts):
            name = self._names(int(i))
            areas[name] = areas.get(name, 0.0) + float(counts[i]) / inside.size
        return Segmentation(mask, areas, quantile, placement)

    def confidence(self, prediction: Prediction) -> float:
        return min(1.0, max(0.0, expect(prediction, Segmentation).max_prob_quantile))
