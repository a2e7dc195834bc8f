"""shared.images on real photos (scikit-learn's china.jpg) and real Pillow: decoding, colour,
EXIF orientation, reduced-scale JPEG decoding, and hostile bytes (corrupt, truncated, empty,
decompression bombs) refused with a 400 and bounded memory."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import warnings
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from shared.errors import InvalidRequestError
from shared.images import decode_image, open_image, resize
from tests.helpers import ROOT

CAP = 40_000_000


@cache
def china() -> np.ndarray:
    from sklearn.datasets import load_sample_images

    image: np.ndarray = load_sample_images().images[0]
    return image  # 427 x 640 x 3


def encode(pixels: np.ndarray, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **options)
    return buf.getvalue()


def with_orientation(pixels: np.ndarray, orientation: int, quality: int = 95) -> bytes:
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    return encode(pixels, "JPEG", quality=quality, exif=exif.tobytes())


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bilevel_png(width: int, height: int) -> bytes:
    """A real, valid 1-bit PNG of ``width x height`` black pixels: a few kilobytes that
    decode to ``width * height`` bytes in Pillow."""
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed pixels
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * 1000) for _ in range(height // 1000))
    idat += z.compress(row * (height % 1000)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def claiming(png: bytes, width: int, height: int) -> bytes:
    """``png`` with its IHDR patched to claim another size (CRC fixed): the pixel data no
    longer matches, so only a size check before decoding can refuse it for its size."""
    ihdr = struct.pack(">II", width, height) + png[24:29]
    return png[:8] + png_chunk(b"IHDR", ihdr) + png[33:]


# --- decoding


def test_png_decodes_exactly_and_jpeg_closely() -> None:
    pixels = china()
    assert np.array_equal(decode_image(encode(pixels, "PNG"), CAP), pixels)
    jpeg = decode_image(encode(pixels, "JPEG", quality=95), CAP)
    assert jpeg.shape == pixels.shape and jpeg.dtype == np.uint8
    assert np.abs(jpeg.astype(int) - pixels).mean() < 3


def test_colour_orders() -> None:
    png = encode(china(), "PNG")
    rgb = decode_image(png, CAP, "RGB")
    assert np.array_equal(decode_image(png, CAP, "BGR"), rgb[..., ::-1])
    gray = decode_image(png, CAP, "GRAY")
    assert gray.shape == (*rgb.shape[:2], 1)
    assert np.array_equal(gray[..., 0], np.asarray(Image.fromarray(rgb).convert("L")))


def test_gray_and_16_bit_pictures() -> None:
    luma = np.asarray(Image.fromarray(china()).convert("L"))
    rgb = decode_image(encode(luma, "PNG"), CAP, "RGB")
    assert rgb.shape == (*luma.shape, 3) and np.array_equal(rgb[..., 1], luma)
    # 16-bit gray: scaled to 8 bits (Pillow's convert would clip it to white)
    deep = Image.fromarray(luma.astype(np.uint16) * 257)
    buf = io.BytesIO()
    deep.save(buf, "PNG")
    assert np.array_equal(decode_image(buf.getvalue(), CAP, "GRAY")[..., 0], luma)


def test_alpha_is_dropped() -> None:
    rgba = np.dstack([china(), np.full(china().shape[:2], 7, np.uint8)])
    assert np.array_equal(decode_image(encode(rgba, "PNG"), CAP), china())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation: int) -> None:
    data = with_orientation(china(), orientation)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    picture = open_image(data, CAP)
    assert (picture.height, picture.width) == upright.shape[:2]
    assert np.array_equal(decode_image(data, CAP), upright)


def test_a_phone_photo_comes_out_upright() -> None:
    """Orientation 6: stored landscape, shown turned 90 degrees clockwise, so the stored
    top-left corner is the upright top-right."""
    stored = np.zeros((100, 200, 3), np.uint8)
    stored[:20, :20] = 255
    out = decode_image(with_orientation(stored, 6), CAP)
    assert out.shape == (200, 100, 3)
    assert out[:20, -20:].mean() > 200 and out[:20, :20].mean() < 50


# --- reduced-scale JPEG decoding


def big_photo() -> np.ndarray:
    """china.jpg blown up to 2561 x 3841 (not a multiple of 8: partial blocks at reduced
    scale)."""
    image = Image.fromarray(china()).resize((3841, 2561), Image.Resampling.BILINEAR)
    return np.asarray(image)


def test_a_big_jpeg_decodes_reduced_for_a_small_target() -> None:
    pixels = big_photo()
    data = encode(pixels, "JPEG", quality=90)
    decoded = open_image(data, CAP).decode(at_least=(224, 224))
    w, h = decoded.image.size
    assert (w, h) == (481, 321)  # 1/8, rounded up
    assert (decoded.width, decoded.height) == (3841, 2561)
    assert decoded.box == (0.0, 0.0, 3841 / 8, 2561 / 8)
    full = resize(pixels, (224, 224))
    assert np.abs(resize(decoded.image, (224, 224), decoded.box).astype(int) - full).mean() < 2
    assert decode_image(data, CAP, target=(224, 224)).shape == (h, w, 3)
    assert open_image(data, CAP).decode().image.size == (3841, 2561)  # no target: full


def test_the_reduced_box_moves_with_the_orientation() -> None:
    """Orientation 6 turns the stored 3841 x 2561 into an upright 2561 x 3841; at 1/8 the
    partial last stored row (2561 / 8 = 320.125 of 321) becomes the upright first column."""
    data = with_orientation(big_photo(), 6, quality=90)
    decoded = open_image(data, CAP).decode(at_least=(224, 224))
    assert decoded.image.size == (321, 481)
    assert decoded.box == pytest.approx((321 - 2561 / 8, 0.0, 321.0, 3841 / 8))
    upright = np.asarray(
        ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    )  # full-size reference
    small = resize(decoded.image, (64, 96), decoded.box).astype(int)
    assert np.abs(small - resize(upright, (64, 96))).mean() < 2


# --- hostile bytes


@pytest.mark.parametrize(
    ("name", "data", "says"),
    [
        ("empty", b"", "empty"),
        ("ten junk bytes", b"0123456789", "not a JPEG or PNG"),
        ("text", b"<html>hello</html>", "not a JPEG or PNG"),
    ],
)
def test_not_a_picture(name: str, data: bytes, says: str) -> None:
    with pytest.raises(InvalidRequestError, match=says):
        decode_image(data, CAP)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("keep", [10, 100, 600, 0.5, 0.99])
def test_truncated_pictures_are_400(fmt: str, keep: float) -> None:
    data = encode(china(), fmt)
    cut = data[: int(len(data) * keep) if keep < 1 else int(keep)]
    with pytest.raises(InvalidRequestError, match=f"(corrupt|truncated).*{fmt}|{fmt}.*claims"):
        decode_image(cut, CAP)


def test_corrupt_pictures_are_400() -> None:
    jpeg = bytearray(encode(china(), "JPEG"))
    mid = len(jpeg) // 2
    jpeg[mid : mid + 2000] = np.random.default_rng(0).integers(0, 256, 2000, np.uint8).tobytes()
    with pytest.raises(InvalidRequestError, match="corrupt or truncated JPEG"):
        decode_image(bytes(jpeg), CAP)
    png = bytearray(encode(china(), "PNG"))
    png[20] ^= 0xFF  # IHDR's checksum no longer matches
    with pytest.raises(InvalidRequestError, match="corrupt PNG image header"):
        decode_image(bytes(png), CAP)
    png = bytearray(encode(china(), "PNG"))
    png[len(png) // 2 : len(png) // 2 + 2000] = bytes(2000)
    with pytest.raises(InvalidRequestError, match="corrupt or truncated PNG"):
        decode_image(bytes(png), CAP)


def test_a_png_bomb_is_refused_from_its_header() -> None:
    bomb = bilevel_png(20_000, 20_000)
    assert len(bomb) < 100_000  # 400 million pixels in a few kilobytes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no DecompressionBombWarning on the way
        with pytest.raises(InvalidRequestError, match=r"20000x20000 \(400,000,000 pixels\)"):
            decode_image(bomb, CAP)
    # a header that lies about the size is judged by what it claims, before any decoding
    tiny = encode(np.zeros((2, 2), np.uint8), "PNG")
    with pytest.raises(InvalidRequestError, match="20000x20000"):
        open_image(claiming(tiny, 20_000, 20_000), CAP)


def test_a_jpeg_claiming_a_huge_size_is_refused() -> None:
    data = bytearray(encode(china(), "JPEG"))
    sof = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)
    with pytest.raises(InvalidRequestError, match="60000x60000"):
        open_image(bytes(data), CAP)


def test_the_cap_is_ours_alone() -> None:
    """Pillow's own guard (``Image.MAX_IMAGE_PIXELS``, about 89 MP) never speaks: a cap set
    above it decodes (here a 100 MP header whose data runs out: a truncation error), with
    no DecompressionBombWarning."""
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < 100_000_000
    lying = claiming(encode(np.zeros((2, 2), np.uint8), "PNG"), 10_000, 10_000)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(InvalidRequestError, match="truncated"):
            decode_image(lying, 200_000_000)
    assert [w.category for w in seen] == []


#: The child reads its peak RSS from /proc (VmHWM: this process's own since exec;
#: getrusage's ru_maxrss would start at the pytest process's peak, inherited over fork).
_PEAK_RSS = """
import sys
import numpy as np
from PIL import Image, PngImagePlugin
from shared.errors import InvalidRequestError
from shared.images import decode_image
def peak_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
data = open(sys.argv[1], "rb").read()
before = peak_kb()
try:
    decode_image(data, int(sys.argv[2]))
    outcome = "decoded"
except InvalidRequestError as exc:
    outcome = exc.message
print((peak_kb() - before) // 1024, outcome)
"""


def _peak_rss_mb(path: Path, cap: int) -> tuple[int, str]:
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(path), str(cap)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    grown, outcome = out.stdout.split(" ", 1)
    return int(grown), outcome.strip()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's VmHWM")
def test_refusing_a_bomb_costs_no_memory(tmp_path: Path) -> None:
    """In a fresh process: the peak RSS grows by under 8 MB while a 20,000 x 20,000 PNG is
    refused. The positive control, the same code on a picture within the cap, grows it by
    the picture's size (a 6,000 x 6,000 one: 36 MB as 1-bit, more as RGB)."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bilevel_png(20_000, 20_000))
    grown, outcome = _peak_rss_mb(bomb, CAP)
    assert "at most 40,000,000" in outcome
    assert grown < 8
    fine = tmp_path / "fine.png"
    fine.write_bytes(bilevel_png(6_000, 6_000))
    grown, outcome = _peak_rss_mb(fine, CAP)
    assert outcome == "decoded" and grown > 36


def test_importing_stays_free_of_pillow() -> None:
    code = "import shared.images, shared.preprocess, sys; print('PIL' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr
