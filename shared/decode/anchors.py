"""SSD anchors generated as MediaPipe's ``SsdAnchorsCalculator`` does for its BlazeFace-
family detectors (face, palm, pose): ``fixed_anchor_size`` (every anchor 1 x 1, so the
regressors are offsets in units of ``box_scale``) and ``anchor_offset`` 0.5.

For each stride, a feature map of ``ceil(input / stride)`` cells per axis; consecutive
layers with the same stride are merged into one map whose cells carry the anchors of all
of them (face_detection_short_range: strides 8, 16, 16, 16 with 2 anchors each over a
128 x 128 input give 16 x 16 x 2 + 8 x 8 x 6 = 896 anchors). Anchors run row by row, cell
by cell, the anchors of one cell together: the order of the model's regressor rows.
"""

from __future__ import annotations

import numpy as np

from shared.contract import Anchors

OFFSET = 0.5


def ssd_anchors(spec: Anchors, height: int, width: int) -> np.ndarray:
    """``[n, 2]`` anchor centres ``x, y`` in [0, 1] for a ``height`` x ``width`` input."""
    layers: list[np.ndarray] = []
    strides, per_cell = spec.strides, spec.anchors_per_cell
    first = 0
    while first < len(strides):
        last = first
        count = 0
        while last < len(strides) and strides[last] == strides[first]:
            count += per_cell[last]
            last += 1
        rows = -(-height // strides[first])
        cols = -(-width // strides[first])
        ys, xs = np.meshgrid(
            (np.arange(rows) + OFFSET) / rows, (np.arange(cols) + OFFSET) / cols, indexing="ij"
        )
        centres = np.stack([xs.ravel(), ys.ravel()], axis=1)
        layers.append(np.repeat(centres, count, axis=0))
        first = last
    out: np.ndarray = np.concatenate(layers).astype(np.float32)
    return out
