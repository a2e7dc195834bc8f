"""Where a model's input image sits in the caller's frame, so boxes and masks computed in the
model's pixels are reported in the caller's.

Preprocessing makes one ``Placement`` per image (``shared.preprocess``); decoders
use it to map results back (``shared.decode``). A model pixel ``(x, y)`` is frame
pixel ``(x * scale_x + offset_x, y * scale_y + offset_y)``:

- squash: ``scale = frame / model`` per axis, no offset;
- crop (centre crop to the model's aspect, then resize): one scale, offset = crop origin;
- letterbox (fit inside, pad): one scale, offset = minus the padding, scaled.

Coordinates are pixel *edges*: model ``x = 0`` is the left edge of the first model pixel and
``x = model_w`` the right edge of the last, so a box covering the whole model input maps to
the whole (squash), the crop, or the un-padded part of the frame. ``fit`` computes both
directions at once: what preprocessing resizes, and the ``Placement`` that maps back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.contract import ResizeMode


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


@dataclass(frozen=True, slots=True)
class Fit:
    """How a frame becomes the model's picture: ``region`` of the frame (``x0, y0, x1, y1`` in
    frame pixels, fractional for a centre crop) is resized to ``size`` (width, height) and
    put at ``pad`` (x, y) of the model's picture, the rest of which is padding; and the
    ``placement`` that maps model pixels back to frame pixels."""

    region: tuple[float, float, float, float]
    size: tuple[int, int]
    pad: tuple[int, int]
    placement: Placement

    @property
    def padded(self) -> bool:
        p = self.placement
        return self.size != (p.model_w, p.model_h)

    @property
    def identity(self) -> bool:
        """The frame is already the model's picture: nothing to resize, crop or pad."""
        p = self.placement
        return (p.frame_w, p.frame_h) == self.size == (p.model_w, p.model_h)


def fit(mode: ResizeMode, frame_h: int, frame_w: int, model_h: int, model_w: int) -> Fit:
    """The resize of a ``frame_h x frame_w`` frame into a ``model_h x model_w`` input."""
    if mode == "squash":
        sx, sy = frame_w / model_w, frame_h / model_h
        placement = Placement(frame_h, frame_w, model_h, model_w, sx, sy)
        return Fit(
            (0.0, 0.0, float(frame_w), float(frame_h)), (model_w, model_h), (0, 0), placement
        )
    if mode == "crop":
        # the largest centred region of the model's aspect; a fractional one, which Pillow
        # resizes exactly, so both axes keep the same scale
        scale = min(frame_w / model_w, frame_h / model_h)
        cw, ch = model_w * scale, model_h * scale
        x0, y0 = (frame_w - cw) / 2, (frame_h - ch) / 2
        placement = Placement(frame_h, frame_w, model_h, model_w, scale, scale, x0, y0)
        return Fit((x0, y0, x0 + cw, y0 + ch), (model_w, model_h), (0, 0), placement)
    # letterbox: fit inside; whole pixels, so each axis has its own (near-equal) scale
    s = min(model_w / frame_w, model_h / frame_h)
    fw = min(model_w, max(1, round(frame_w * s)))
    fh = min(model_h, max(1, round(frame_h * s)))
    px, py = (model_w - fw) // 2, (model_h - fh) // 2
    sx, sy = frame_w / fw, frame_h / fh
    placement = Placement(frame_h, frame_w, model_h, model_w, sx, sy, -px * sx, -py * sy)
    return Fit((0.0, 0.0, float(frame_w), float(frame_h)), (fw, fh), (px, py), placement)
