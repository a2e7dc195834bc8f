"""Where a model's input image sits in the caller's frame, so boxes and masks computed in the
model's pixels are reported in the caller's.

Preprocessing makes one ``Placement`` per image (``shared.preprocess``); decoders
use it to map results back (``shared.decode``). A model pixel ``(x, y)`` is frame
pixel ``(x * scale_x + offset_x, y * scale_y + offset_y)``:

- squash: ``scale = frame / model`` per axis, no offset;
- crop (centre crop to the model's aspect, then resize): one scale, offset = crop origin;
- letterbox (fit inside, pad): one scale, offset = minus the padding, scaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Placement:
    frame_h: int
    frame_w: int
    model_h: int
    model_w: int
    scale_x: float
    scale_y: float
    offset_x: float = 0.0
    offset_y: float = 0.0

    @classmethod
    def identity(cls, h: int, w: int) -> Placement:
        return cls(h, w, h, w, 1.0, 1.0)

    def boxes_to_frame(self, boxes: np.ndarray) -> np.ndarray:
        """``[n, 4]`` boxes ``x0, y0, x1, y1`` in model pixels to frame pixels, clipped to
        the frame."""
        out = np.empty_like(boxes, dtype=np.float32)
        out[:, 0] = boxes[:, 0] * self.scale_x + self.offset_x
        out[:, 2] = boxes[:, 2] * self.scale_x + self.offset_x
        out[:, 1] = boxes[:, 1] * self.scale_y + self.offset_y
        out[:, 3] = boxes[:, 3] * self.scale_y + self.offset_y
        np.clip(out[:, 0::2], 0, self.frame_w, out=out[:, 0::2])
        np.clip(out[:, 1::2], 0, self.frame_h, out=out[:, 1::2])
        return out
