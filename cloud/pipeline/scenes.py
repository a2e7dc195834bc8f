"""Synthetic camera pictures with known answers, made here with no download: scikit-learn's
bundled ``load_digits`` (8x8, intensities 0..16) drawn, enlarged, in colour, onto cluttered
RGB canvases.

- ``make_scenes``: several digits per picture (detection), each with its box and class id;
- ``make_crops``: one digit per small picture (classification).

Clutter is what makes the task a camera's: a random light background colour, soft blobs,
thin lines in random colours (some crossing the digits, drawn over them), and per-pixel
noise. Digits are dark ink of any hue (ink on paper: never light on dark, which would
double what a small net has to learn).
Digits of a scene never overlap each other, so every box has exactly one digit in it.

A digit's box is the extent of the pixels it was drawn on (alpha > 0), in pixels, half-open
``y0, x0, y1, x1``: ``image[y0:y1, x0:x1]`` holds the whole digit. Deterministic by seed.

``train``/``held-out`` pictures draw from disjoint digit samples (``SOURCE_SPLITS``), so a
held-out figure is on handwriting the models never saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

SourceSplit = Literal["train", "calib", "test"]
#: Which of the 1,797 digit samples each split draws from: every fifth sample (index 0
#: mod 5) is held out for ``test``, every tenth (1 mod 10) is for ``calib``, the other
#: 70% for ``train``.
SOURCE_SPLITS: tuple[SourceSplit, ...] = ("train", "calib", "test")
CLASSES = 10
LABELS = [str(i) for i in range(CLASSES)]


@dataclass(frozen=True)
class Scenes:
    """``images`` ``[n, H, W, 3]`` uint8; ``boxes`` ``[n, K, 4]`` pixel ``y0, x0, y1, x1``
    (float32, half-open) and ``classes`` ``[n, K]`` (int64), padded with ``-1`` classes
    (and zero boxes) where a picture has fewer than ``K`` digits. ``owners`` ``[n, H, W]``
    (int8, if asked for): which digit (``0..K-1``) was drawn on each pixel, -1 for none:
    a segmentation mask, and the ground truth the boxes are checked against."""

    images: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    owners: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    def objects(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Picture ``i``'s boxes ``[k, 4]`` and classes ``[k]``, padding dropped."""
        real = self.classes[i] >= 0
        return self.boxes[i][real], self.classes[i][real]


@dataclass(frozen=True)
class Crops:
    """``images`` ``[n, S, S, 3]`` uint8 with one digit each, its class in ``labels``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


def digit_sources(split: SourceSplit) -> tuple[np.ndarray, np.ndarray]:
    """The ``load_digits`` samples of ``split``: images ``[n, 8, 8]`` in 0..1, labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    index = np.arange(len(digits.target))
    test = index % 5 == 0
    calib = index % 10 == 1
    chosen = {"test": test, "calib": calib, "train": ~test & ~calib}[split]
    images = digits.images[chosen].astype(np.float32) / 16.0
    return images, digits.target[chosen].astype(np.int64)


def _resize(glyph: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a small 2-D image (pixel centres aligned), in NumPy."""
    h, w = glyph.shape
    ys = np.clip((np.arange(height) + 0.5) * h / height - 0.5, 0, h - 1)
    xs = np.clip((np.arange(width) + 0.5) * w / width - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = glyph[y0][:, x0] * (1 - fx) + glyph[y0][:, x1] * fx
    bottom = glyph[y1][:, x0] * (1 - fx) + glyph[y1][:, x1] * fx
    out: np.ndarray = top * (1 - fy) + bottom * fy
    return out


def _ink(rng: np.random.Generator) -> np.ndarray:
    """A dark ink colour of any hue (the canvas is light: ink on paper, never reversed)."""
    return rng.uniform(0, 100, 3)


def _canvas(rng: np.random.Generator, size: int) -> np.ndarray:
    """A float canvas: a light background colour and soft blobs of any colour."""
    background = rng.uniform(150, 255, 3)
    canvas = np.broadcast_to(background, (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0, size, 2)
        radius = rng.uniform(size / 12, size / 4)
        alpha = 0.5 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        colour = rng.uniform(60, 255, 3)
        canvas = canvas * (1 - alpha[..., None]) + colour * alpha[..., None]
    return canvas


def _lines(rng: np.random.Generator, canvas: np.ndarray, count: int) -> None:
    """``count`` thin straight lines in random colours, drawn in place."""
    size = canvas.shape[0]
    for _ in range(count):
        (y0, x0), (y1, x1) = rng.uniform(0, size, (2, 2))
        steps = int(max(abs(y1 - y0), abs(x1 - x0)) * 2) + 2
        ys = np.clip(np.round(np.linspace(y0, y1, steps)).astype(int), 0, size - 1)
        xs = np.clip(np.round(np.linspace(x0, x1, steps)).astype(int), 0, size - 1)
        canvas[ys, xs] = rng.uniform(0, 255, 3)


def _draw(
    canvas: np.ndarray,
    glyph: np.ndarray,
    y: int,
    x: int,
    colour: np.ndarray,
    owner: np.ndarray | None = None,
    index: int = 0,
) -> tuple[float, float, float, float]:
    """Blend ``glyph`` (alpha 0..1) in ``colour`` at ``(y, x)``, marking ``owner`` with
    ``index`` where it drew; the drawn pixels' box."""
    h, w = glyph.shape
    alpha = glyph[..., None]
    region = canvas[y : y + h, x : x + w]
    canvas[y : y + h, x : x + w] = region * (1 - alpha) + colour * alpha
    if owner is not None:
        owner[y : y + h, x : x + w][glyph > 0] = index
    rows, cols = np.flatnonzero(glyph.any(axis=1)), np.flatnonzero(glyph.any(axis=0))
    return (y + rows[0], x + cols[0], y + rows[-1] + 1, x + cols[-1] + 1)


def _finish(rng: np.random.Generator, canvas: np.ndarray, noise: float) -> np.ndarray:
    canvas = canvas + rng.normal(0, noise, canvas.shape)
    out: np.ndarray = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return out


def _glyph(rng: np.random.Generator, source: np.ndarray, low: float, high: float) -> np.ndarray:
    """A digit sample enlarged ``low..high`` times (aspect jittered), as alpha in 0..1."""
    scale = rng.uniform(low, high)
    height = round(8 * scale * rng.uniform(0.9, 1.1))
    width = round(8 * scale * rng.uniform(0.85, 1.05))
    alpha = _resize(source, height, width)
    alpha[alpha < 0.05] = 0.0  # bilinear tails: keep the box the digit's visible extent
    return np.clip(alpha * rng.uniform(0.85, 1.0), 0.0, 1.0)


def make_scenes(
    count: int,
    seed: int,
    split: SourceSplit = "train",
    size: int = 96,
    max_objects: int = 4,
    scale: tuple[float, float] = (3.0, 5.0),
    owners: bool = False,
) -> Scenes:
    """``count`` pictures of ``size`` x ``size`` with 1..``max_objects`` digits each,
    enlarged ``scale`` times (24-40 px at the defaults), none overlapping another;
    ``owners``: also the map of which digit is on which pixel."""
    sources, targets = digit_sources(split)
    rng = np.random.default_rng(seed)
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    boxes = np.zeros((count, max_objects, 4), dtype=np.float32)
    classes = np.full((count, max_objects), -1, dtype=np.int64)
    owner = np.full((count, size, size), -1, dtype=np.int8) if owners else None
    for i in range(count):
        canvas = _canvas(rng, size)
        _lines(rng, canvas, int(rng.integers(1, 4)))
        placed: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            pick = int(rng.integers(len(targets)))
            glyph = _glyph(rng, sources[pick], *scale)
            spot = _free_spot(rng, placed, glyph.shape, size)
            if spot is None:
                continue
            y, x = spot
            placed.append((y, x, y + glyph.shape[0], x + glyph.shape[1]))
            k = len(placed) - 1
            colour = _ink(rng)
            mark = None if owner is None else owner[i]
            boxes[i, k] = _draw(canvas, glyph, y, x, colour, mark, k)
            classes[i, k] = targets[pick]
        _lines(rng, canvas, int(rng.integers(0, 3)))  # over the digits: partial occlusion
        images[i] = _finish(rng, canvas, rng.uniform(2, 12))
    return Scenes(images, boxes, classes, owner)


def _free_spot(
    rng: np.random.Generator,
    placed: list[tuple[int, int, int, int]],
    shape: tuple[int, ...],
    size: int,
) -> tuple[int, int] | None:
    """A top-left corner where a glyph of ``shape`` overlaps no placed one (2 px apart)."""
    h, w = shape
    for _ in range(50):
        y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        if all(
            y + h + 2 <= a or b + 2 <= y or x + w + 2 <= c or d + 2 <= x
            for a, c, b, d in placed  # placed boxes are (y0, x0, y1, x1)
        ):
            return y, x
    return None


def make_crops(
    count: int,
    seed: int,
    split: SourceSplit = "train",
    size: int = 32,
    scale: tuple[float, float] = (2.2, 3.4),
) -> Crops:
    """``count`` pictures of ``size`` x ``size`` with one digit each, at a random place."""
    sources, targets = digit_sources(split)
    rng = np.random.default_rng(seed)
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    for i in range(count):
        canvas = _canvas(rng, size)
        _lines(rng, canvas, int(rng.integers(0, 3)))
        pick = int(rng.integers(len(targets)))
        glyph = _glyph(rng, sources[pick], *scale)
        h, w = glyph.shape
        y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        _draw(canvas, glyph, y, x, _ink(rng))
        _lines(rng, canvas, int(rng.integers(0, 2)))
        images[i] = _finish(rng, canvas, rng.uniform(2, 12))
        labels[i] = targets[pick]
    return Crops(images, labels)
