"""Pictures in: JPEG and PNG bytes decoded, and frames resized, with Pillow.

Pillow is imported here only, and only when a picture arrives: an agent serving feature
vectors never loads it. It was chosen for a Pi: wheels for aarch64 (and piwheels for 32-bit
Raspberry Pi OS) bundling libjpeg-turbo, whose scaled decoding (below) is the largest saving
there; OpenCV's wheels are ten times the size.

Encoded pictures come from whoever calls the agent, so hostile bytes are the normal case:

- the format is read from the magic bytes, and only the JPEG and PNG decoders ever run
  (Pillow knows some forty formats; EPS would start Ghostscript; WebP's decoder allocates
  its whole canvas when the file is opened, before any size check could refuse it);
- the size comes from the header (Pillow decodes lazily) and ``width x height`` over
  ``max_pixels`` is refused before a single pixel is decoded: a PNG of a few kilobytes can
  claim 20,000 x 20,000. Pillow's own guard (``Image.MAX_IMAGE_PIXELS``) is not used: it is
  process-wide, and between its limit and twice that it only *warns* (a warning that
  ``pytest -W error`` or a caller's filters turn into an exception anywhere). The format's
  ``ImageFile`` class is built directly, so ``Image.open`` and its check never run;
- whatever fails in the decoder (corrupt or truncated data: Pillow raises ``OSError``,
  ``SyntaxError``, ``ValueError``, ``struct.error`` and more) is an ``InvalidRequestError``.

A big JPEG is decoded at 1/2, 1/4 or 1/8 of its size by libjpeg's scaled IDCT (``draft``)
when the model needs far fewer pixels: a 10 MP photo for a 224 x 224 model takes 19 ms to
decode and resize instead of 65 ms (this project's x86 build machine) and 1/64 of the
memory. EXIF orientation is applied, so a phone's photo is upright, as its owner saw it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from shared.contract import Colour
from shared.errors import InvalidRequestError, TandemError

if TYPE_CHECKING:
    from PIL import Image, ImageFile

__all__ = ["FORMATS", "Decoded", "Picture", "decode_image", "open_image", "resize", "to_gray"]

ImageFormat = Literal["JPEG", "PNG"]
#: The formats decoded, by their magic bytes.
FORMATS: dict[ImageFormat, bytes] = {"JPEG": b"\xff\xd8\xff", "PNG": b"\x89PNG\r\n\x1a\n"}
#: EXIF orientations that swap width and height (the 90-degree ones).
_SWAPS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112
_SINGLE_CHANNEL = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
Box = tuple[float, float, float, float]


def _require_pillow() -> None:
    """Say which package is missing (a broken install: Pillow is a dependency of tandem)."""
    try:
        import PIL  # noqa: F401
    except ImportError as exc:
        raise TandemError(f"decoding images needs Pillow (pip install pillow): {exc}") from None


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded picture: ``image`` is upright, in mode ``L`` or ``RGB``; ``box`` is the
    region of ``image`` (``x0, y0, x1, y1`` in its pixels) that is the whole picture of
    ``width x height``: all of it, unless the JPEG was decoded at a reduced scale, where
    the last row and column hold a partial block."""

    image: Image.Image
    box: Box
    width: int
    height: int

    def array(self) -> np.ndarray:
        """The pixels, ``H x W x C`` uint8 (C is 1 for ``L``)."""
        a = np.asarray(self.image)
        return a[..., None] if a.ndim == 2 else a


class Picture:
    """An encoded picture whose header has been read and accepted (its size is within the
    cap); nothing is decoded yet. ``width``/``height`` are the upright size."""

    def __init__(self, image: ImageFile.ImageFile, fmt: ImageFormat, orientation: int) -> None:
        self._image = image
        self.format = fmt
        self.orientation = orientation
        w, h = image.size
        self.width, self.height = (h, w) if orientation in _SWAPS else (w, h)

    def decode(self, gray: bool = False, at_least: tuple[int, int] | None = None) -> Decoded:
        """Decode (once): mode ``L`` if ``gray`` or if the picture has one channel (a gray
        picture stays gray through the resize, a third of the work; the model's channels
        are made after), else ``RGB``; alpha is dropped. ``at_least`` (width, height, upright)
        lets a JPEG decode at 1/2, 1/4 or 1/8 scale while staying at least that big."""
        image = self._image
        box: Box = (0.0, 0.0, float(image.size[0]), float(image.size[1]))
        try:
            if self.format == "JPEG":
                size = None
                if at_least is not None:
                    w, h = max(1, at_least[0]), max(1, at_least[1])
                    size = (h, w) if self.orientation in _SWAPS else (w, h)
                drafted = image.draft("L" if gray else "RGB", size)
                if drafted is not None:
                    box = (0.0, 0.0, float(drafted[1][2]), float(drafted[1][3]))
            image.load()
            out = _to_mode(image, gray)
            if self.orientation > 1:
                out, box = _upright(out, box, self.orientation)
        except InvalidRequestError:
            raise
        except Exception as exc:  # any decoder failure is the data's: see the module doc
            raise InvalidRequestError(
                f"corrupt or truncated {self.format} image: {type(exc).__name__}: {exc}"
            ) from None
        return Decoded(out, box, self.width, self.height)


def open_image(data: bytes | bytearray | memoryview, max_pixels: int) -> Picture:
    """Read the header of a JPEG or PNG and refuse it, before decoding, if it is not one or
    if its ``width x height`` exceeds ``max_pixels``."""
    data = bytes(data)
    if not data:
        raise InvalidRequestError("empty image: 0 bytes")
    fmt = next((f for f, magic in FORMATS.items() if data.startswith(magic)), None)
    if fmt is None:
        raise InvalidRequestError(
            f"not a JPEG or PNG image ({len(data)} bytes starting {data[:8]!r})"
        )
    _require_pillow()
    from PIL import JpegImagePlugin, PngImagePlugin

    cls = JpegImagePlugin.JpegImageFile if fmt == "JPEG" else PngImagePlugin.PngImageFile
    try:
        image: ImageFile.ImageFile = cls(io.BytesIO(data))
    except Exception as exc:  # a header Pillow cannot read: the data's fault
        raise InvalidRequestError(
            f"corrupt {fmt} image header: {type(exc).__name__}: {exc}"
        ) from None
    w, h = image.size
    if w < 1 or h < 1:
        raise InvalidRequestError(f"{fmt} image claims a size of {w}x{h}")
    if w * h > max_pixels:
        raise InvalidRequestError(
            f"{fmt} image is {w}x{h} ({w * h:,} pixels); at most {max_pixels:,} are decoded "
            "(images.max_pixels)"
        )
    return Picture(image, fmt, _orientation(image))


def decode_image(
    data: bytes | bytearray | memoryview,
    max_pixels: int,
    colour: Colour = "RGB",
    target: tuple[int, int] | None = None,
) -> np.ndarray:
    """JPEG or PNG bytes to ``H x W x 3`` uint8 (RGB or BGR) or ``H x W x 1`` (GRAY),
    upright. With ``target`` (width, height) a big JPEG may come out smaller than its
    header says (by 2, 4 or 8), never smaller than ``target``."""
    decoded = open_image(data, max_pixels).decode(colour == "GRAY", target)
    pixels = decoded.array()
    if colour != "GRAY" and pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels[..., ::-1]) if colour == "BGR" else pixels


def resize(
    source: Image.Image | np.ndarray, size: tuple[int, int], box: Box | None = None
) -> np.ndarray:
    """``box`` of ``source`` (all of it by default) resized to ``size`` (width, height):
    ``H x W x C`` uint8. A frame (``H x W x C`` uint8, C 1 or 3) is wrapped without a copy
    when it is C-contiguous.

    Bilinear, as Pillow does it: when shrinking, its kernel widens with the scale, so every
    source pixel is averaged in (a 4000-pixel-wide photo into 224 pixels does not alias, as
    sampling four neighbours would), which is also what torchvision's default resize and
    TensorFlow's antialiased one compute, the preprocessing most models were trained with;
    a third of the cost of bicubic or Lanczos."""
    _require_pillow()
    from PIL import Image

    if isinstance(source, np.ndarray):
        frame = source[..., 0] if source.ndim == 3 and source.shape[2] == 1 else source
        source = Image.fromarray(frame)
    out = source.resize(size, Image.Resampling.BILINEAR, box=box)
    a = np.asarray(out)
    return a[..., None] if a.ndim == 2 else a


def to_gray(frame: np.ndarray) -> Image.Image:
    """An ``H x W x 3`` RGB frame as a Pillow ``L`` image (ITU-R 601 luma, as a JPEG's Y)."""
    _require_pillow()
    from PIL import Image

    return Image.fromarray(frame).convert("L")


def _orientation(image: ImageFile.ImageFile) -> int:
    """The EXIF orientation (1 to 8) if the header carries one. A malformed EXIF block
    counts as none: the picture itself may be fine. (A PNG whose eXIf chunk follows its
    pixel data is read upright as stored: looking for it would decode the image first.)"""
    if "exif" not in image.info:
        return 1
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block: ignore it, not the picture
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_mode(image: Image.Image, gray: bool) -> Image.Image:
    """``L`` or ``RGB``. 16-bit gray is scaled to 8 bits (``convert`` would clip it)."""
    mode = image.mode
    if mode.startswith("I"):  # I, I;16*: 16-bit gray in PNG
        from PIL import Image

        wide = np.asarray(image).astype(np.uint32)
        return Image.fromarray((wide >> 8).astype(np.uint8))
    if gray or mode in _SINGLE_CHANNEL:
        return image if mode == "L" else image.convert("L")
    return image if mode == "RGB" else image.convert("RGB")


def _upright(image: Image.Image, box: Box, orientation: int) -> tuple[Image.Image, Box]:
    """Apply an EXIF orientation, and move ``box`` with the pixels.

    ``ImageOps.exif_transpose`` does the same transpositions (this table is its), but it
    copies the image when there is nothing to do and cannot say where the box went."""
    from PIL import Image

    t = Image.Transpose
    method = {
        2: t.FLIP_LEFT_RIGHT,
        3: t.ROTATE_180,
        4: t.FLIP_TOP_BOTTOM,
        5: t.TRANSPOSE,
        6: t.ROTATE_270,
        7: t.TRANSVERSE,
        8: t.ROTATE_90,
    }[orientation]
    gw, gh = image.size
    x0, y0, x1, y1 = box

    def moved(x: float, y: float) -> tuple[float, float]:
        """Where the point (x, y) of the ``gw x gh`` image lands (pixel-edge coordinates)."""
        return {
            2: (gw - x, y),
            3: (gw - x, gh - y),
            4: (x, gh - y),
            5: (y, x),
            6: (gh - y, x),
            7: (gh - y, gw - x),
            8: (y, gw - x),
        }[orientation]

    (ax, ay), (bx, by) = moved(x0, y0), moved(x1, y1)
    upright: Image.Image = image.transpose(method)
    return upright, (min(ax, bx), min(ay, by), max(ax, bx), max(ay, by))
