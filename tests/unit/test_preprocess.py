"""shared.preprocess on real photos and real Pillow: each resize mode's Placement maps model
pixels back onto the frame, the identity path adds no copy, normalisation and quantization
match a reference computation, colour orders and layouts, tensor and audio inputs, and
hostile values refused with a 400 that says what was expected."""

from __future__ import annotations

import io
import subprocess
import sys
from functools import cache
from typing import Any

import numpy as np
import pytest
from PIL import Image

from shared.contract import InputSpec
from shared.errors import ContractError, InvalidRequestError
from shared.images import decode_image, resize
from shared.preprocess import Prepared, Preprocessor
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


def image_input(
    h: int = 64,
    w: int = 64,
    datatype: str = "FP32",
    quantization: dict[str, float] | None = None,
    **image: Any,
) -> InputSpec:
    c = 1 if image.get("colour") == "GRAY" else 3
    nchw = image.get("layout") == "NCHW"
    return InputSpec.model_validate(
        {
            "name": "image",
            "shape": [1, c, h, w] if nchw else [1, h, w, c],
            "datatype": datatype,
            "quantization": quantization,
            "kind": "image",
            "image": image,
        }
    )


def tensor_input(shape: list[int], datatype: str = "FP32", **extra: Any) -> InputSpec:
    return InputSpec.model_validate({"name": "x", "shape": shape, "datatype": datatype, **extra})


def audio_input(shape: list[int], datatype: str = "FP32", **extra: Any) -> InputSpec:
    audio = {"sample_rate": 16_000, **extra.pop("audio", {})}
    return InputSpec.model_validate(
        {
            "name": "wave",
            "shape": shape,
            "datatype": datatype,
            "kind": "audio",
            "audio": audio,
            **extra,
        }
    )


def prepare(spec: InputSpec, value: object) -> Prepared:
    return Preprocessor([spec], CAP).prepare(value)


def rectangle_frame(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A black ``h x w`` RGB frame with a white rectangle ``x0, y0, x1, y1``."""
    frame = np.zeros((h, w, 3), np.uint8)
    x0, y0, x1, y1 = box
    frame[y0:y1, x0:x1] = 255
    return frame


def found_in_model(tensor: np.ndarray) -> np.ndarray:
    """The white rectangle's box in model pixels (edges), from an NHWC float tensor."""
    ys, xs = np.nonzero(tensor[0, ..., 0] > 127)
    return np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)


# --- where the model's picture sits in the frame

RECT = (120, 60, 280, 180)  # inside the centre crop of a 300 x 500 frame (x 100..400)


@pytest.mark.parametrize("mode", ["squash", "crop", "letterbox"])
@pytest.mark.parametrize("source", ["frame", "png"])
def test_each_resize_maps_model_pixels_back_onto_the_frame(mode: str, source: str) -> None:
    frame = rectangle_frame(300, 500, RECT)
    value = frame if source == "frame" else encode(frame, "PNG")
    prepared = prepare(image_input(resize=mode), value)
    p = prepared.placement
    assert p is not None and (p.frame_h, p.frame_w, p.model_h, p.model_w) == (300, 500, 64, 64)
    back = p.boxes_to_frame(found_in_model(prepared.tensors["image"]))[0]
    # within a model pixel (in frame pixels) of where it was drawn
    assert np.abs(back - RECT).max() <= max(p.scale_x, p.scale_y)


def test_crop_and_letterbox_geometry() -> None:
    frame = rectangle_frame(300, 500, RECT)
    crop = prepare(image_input(resize="crop"), frame).placement
    assert crop is not None
    assert (crop.scale_x, crop.scale_y, crop.offset_x, crop.offset_y) == (
        300 / 64,
        300 / 64,
        100,
        0,
    )
    boxed = prepare(image_input(resize="letterbox", mean=[10.0]), frame)
    t = boxed.tensors["image"][0]
    # 500 x 300 fits as 64 x 38, padded 13 rows above and below with black: 0 - mean
    assert (t[:13] == -10).all() and (t[51:] == -10).all()
    assert t[13:51].max() == 245
    p = boxed.placement
    assert p is not None
    assert p.boxes_to_frame(np.array([[0, 13, 64, 51]], np.float32))[0] == pytest.approx(
        [0, 0, 500, 300], abs=1e-3
    )


def test_placement_survives_reduced_decoding_and_orientation() -> None:
    """A 2,400 x 3,600 JPEG decoded at 1/8 for a 64 x 64 model, stored turned (EXIF 6):
    the box still lands where it is in the upright picture."""
    upright_rect = (900, 1500, 1700, 2600)  # x0, y0, x1, y1 in the upright 2400 x 3600
    upright = rectangle_frame(3600, 2400, upright_rect)
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # shown turned 90 degrees clockwise
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    prepared = prepare(image_input(), data)
    p = prepared.placement
    assert p is not None and (p.frame_w, p.frame_h) == (2400, 3600)
    back = p.boxes_to_frame(found_in_model(prepared.tensors["image"]))[0]
    assert np.abs(back - upright_rect).max() <= max(p.scale_x, p.scale_y)


def test_a_reduced_jpeg_is_resized_from_its_true_extent() -> None:
    """521 x 521 decodes at 1/8 as 66 x 66 pixels of which 65.125 are the picture (the last
    block is partial): resizing that region, not all 66, matches the full-size result."""
    g = np.add.outer(np.arange(521), np.arange(521)) * (255 / 1042)
    data = encode(np.dstack([g, g[::-1], g[:, ::-1]]).astype(np.uint8), "JPEG", quality=95)
    reference = resize(decode_image(data, CAP), (64, 64)).astype(np.float32)
    tensor = prepare(image_input(), data).tensors["image"][0]
    assert np.abs(tensor - reference).mean() < 0.6  # 0.31; 1.05 resizing all 66 pixels


# --- no copies where none are needed


@pytest.mark.parametrize(
    ("image", "quantization"),
    [
        ({}, None),  # uint8 in, no normalisation
        ({"mean": [0.0], "std": [255.0]}, {"scale": 1 / 255, "zero_point": 0}),  # cancels out
    ],
)
def test_a_frame_of_the_model_size_goes_straight_in(image: Any, quantization: Any) -> None:
    frame = np.ascontiguousarray(china()[:224, :224])
    spec = image_input(224, 224, "UINT8", quantization, **image)
    prepared = prepare(spec, frame)
    tensor = prepared.tensors["image"]
    assert tensor.shape == (1, 224, 224, 3) and np.shares_memory(tensor, frame)
    assert prepared.frame is frame
    # a different size, or a colour swap, is preprocessed (and right)
    swapped = prepare(image_input(224, 224, "UINT8", quantization, colour="BGR", **image), frame)
    assert not np.shares_memory(swapped.tensors["image"], frame)
    assert np.array_equal(swapped.tensors["image"][0], frame[..., ::-1])


def test_gray_frames_go_straight_in_too() -> None:
    frame = np.ascontiguousarray(china()[:64, :64, 0])
    for layout in ("NHWC", "NCHW"):
        tensor = prepare(image_input(datatype="UINT8", colour="GRAY", layout=layout), frame)
        assert np.shares_memory(tensor.tensors["image"], frame)


def test_a_float_tensor_of_the_model_shape_is_not_copied() -> None:
    x = np.random.default_rng(0).random((1, 64, 64, 3), dtype=np.float32)
    assert np.shares_memory(prepare(image_input(), x).tensors["image"], x)
    assert np.shares_memory(prepare(image_input(), x[0]).tensors["image"], x)  # no batch dim
    features = np.ones((1, 8), np.float32)
    prepared = prepare(tensor_input([1, 8]), features)
    assert np.shares_memory(prepared.tensors["x"], features)
    assert prepared.real("x") is prepared.tensors["x"]


# --- normalisation and quantization


def test_quantization_matches_a_reference_computation() -> None:
    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    quant = {"scale": 0.0186584, "zero_point": -20}
    spec = image_input(96, 128, "INT8", quant, mean=mean, std=std)
    prepared = prepare(spec, china())
    resized = np.asarray(Image.fromarray(china()).resize((128, 96), Image.Resampling.BILINEAR))
    real = (resized.astype(np.float64) - mean) / std
    reference = np.clip(np.rint(real / quant["scale"] + quant["zero_point"]), -128, 127)
    tensor = prepared.tensors["image"]
    assert tensor.dtype == np.int8 and tensor.shape == (1, 96, 128, 3)
    assert tensor.flags.c_contiguous
    assert np.array_equal(tensor[0], reference.astype(np.int8))
    assert reference.min() == -128 and reference.max() < 127  # the clip is exercised
    assert prepared.real("image")[0] == pytest.approx(real.astype(np.float32), abs=1e-5)


def test_fp16_and_uint8_quantized_inputs() -> None:
    half = prepare(image_input(datatype="FP16", mean=[127.5], std=[127.5]), china())
    t = half.tensors["image"]
    assert t.dtype == np.float16 and -1 <= t.min() < t.max() <= 1
    quant = {"scale": 0.0078125, "zero_point": 128}
    u8 = prepare(image_input(datatype="UINT8", quantization=quant, mean=[127.5], std=[127.5]), t)
    # a float array is the preprocessed tensor: quantized, not normalised again
    expected = np.clip(np.rint(t.astype(np.float32) / 0.0078125 + 128), 0, 255)
    assert np.array_equal(u8.tensors["image"], expected.astype(np.uint8))


def test_colour_orders_and_layouts() -> None:
    frame = china()
    rgb = prepare(image_input(), frame).tensors["image"]
    assert rgb[0] == pytest.approx(resize(frame, (64, 64)).astype(np.float32))
    bgr = prepare(image_input(colour="BGR"), frame).tensors["image"]
    assert np.array_equal(bgr, rgb[..., ::-1])
    nchw = prepare(image_input(layout="NCHW"), frame).tensors["image"]
    assert nchw.shape == (1, 3, 64, 64) and nchw.flags.c_contiguous
    assert np.array_equal(nchw, rgb.transpose(0, 3, 1, 2))
    gray = prepare(image_input(colour="GRAY"), frame).tensors["image"]
    luma = Image.fromarray(frame).convert("L").resize((64, 64), Image.Resampling.BILINEAR)
    assert np.array_equal(gray[0, ..., 0], np.asarray(luma))
    # a gray frame into an RGB model: every channel is its value
    from_gray = prepare(image_input(), np.asarray(luma)).tensors["image"]
    assert (from_gray == from_gray[..., :1]).all()


def test_per_channel_normalisation_in_nchw_bgr() -> None:
    mean, std = [10.0, 20.0, 30.0], [2.0, 4.0, 8.0]
    spec = image_input(layout="NCHW", colour="BGR", mean=mean, std=std)
    t = prepare(spec, china()).tensors["image"][0]
    pixels = resize(china(), (64, 64)).astype(np.float32)
    for c in range(3):  # model channel c is B, G, R: source channel 2 - c
        assert t[c] == pytest.approx((pixels[..., 2 - c] - mean[c]) / std[c], abs=1e-5)


def test_encoded_jpeg_and_the_frame_it_gives() -> None:
    data = encode(china(), "JPEG", quality=95)
    prepared = prepare(image_input(datatype="UINT8"), data)
    assert prepared.encoded == data
    frame = prepared.frame  # the full-size picture, decoded on demand
    assert frame is not None and np.array_equal(frame, decode_image(data, CAP))
    from_frame = prepare(image_input(datatype="UINT8"), china()).tensors["image"]
    assert np.abs(prepared.tensors["image"].astype(int) - from_frame).mean() < 3
    oip = np.array([data], dtype=object)  # an OIP BYTES tensor of one element
    assert np.array_equal(
        prepare(image_input(datatype="UINT8"), oip).tensors["image"], prepared.tensors["image"]
    )


def test_rgba_frames_lose_their_alpha() -> None:
    rgba = np.dstack([china(), np.zeros(china().shape[:2], np.uint8)])
    a = prepare(image_input(), rgba)
    assert np.array_equal(a.tensors["image"], prepare(image_input(), china()).tensors["image"])
    assert a.frame is not None and a.frame.shape == china().shape


# --- tensor inputs


def test_tensor_scale_offset_then_quantization() -> None:
    spec = tensor_input(
        [-1, 4], "INT8", quantization={"scale": 0.5, "zero_point": 3}, scale=2.0, offset=1.0
    )
    x = np.array([[0.0, 1.0, -40.0, 100.0]])
    prepared = prepare(spec, x)
    assert np.array_equal(prepared.tensors["x"], np.array([[5, 9, -128, 127]], np.int8))
    assert prepared.real("x") == pytest.approx(np.array([[1.0, 3.0, -79.0, 201.0]]))
    # the batch dimension is optional, lists are arrays, int8 is taken as quantized already
    assert prepare(spec, [0.0, 1.0, -40.0, 100.0]).tensors["x"].shape == (1, 4)
    ready = np.array([[1, 2, 3, 4]], np.int8)
    assert np.shares_memory(prepare(spec, ready).tensors["x"], ready)


def test_dynamic_dims_and_integer_inputs() -> None:
    ids = tensor_input([1, -1], "INT64")
    assert prepare(ids, [[3, 1, 4, 1, 5]]).tensors["x"].dtype == np.int64
    assert prepare(ids, np.array([[2.0, 7.0]])).tensors["x"].tolist() == [[2, 7]]
    with pytest.raises(InvalidRequestError, match="takes integers"):
        prepare(ids, [[2.5]])
    with pytest.raises(InvalidRequestError, match=r"in \[-128, 127\]"):
        prepare(tensor_input([1, 2], "INT8"), [[1, 300]])
    # a scalar input (silero-vad's sample rate) stays a scalar
    rate = tensor_input([], "INT64")
    for value in (16_000, np.array(16_000), np.array(16_000.0)):
        tensor = prepare(rate, value).tensors["x"]
        assert tensor.shape == () and tensor.dtype == np.int64 and tensor == 16_000


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (
            np.ones((1, 5), np.float32),
            r"expected FP32 of shape \[1, 4\], got float32 of shape \[1, 5\]",
        ),
        (np.ones((2, 2, 4), np.float32), r"of shape \[2, 2, 4\]"),
        (np.array(["a", "b", "c", "d"]), "got dtype <U1"),
        (np.ones(4, np.complex64), "got dtype complex64"),
        (np.array([object()] * 4), "got dtype object"),
        ([[1.0, 2.0], [3.0]], "inhomogeneous"),
        ("1,2,3,4", "got str"),
        (None, "got NoneType"),
        (np.array([1.0, np.nan, 0.0, 0.0], np.float32), "NaN or infinite"),
        (np.array([1.0, np.inf, 0.0, 0.0]), "NaN or infinite"),
    ],
)
def test_bad_tensors_are_400(value: object, says: str) -> None:
    with pytest.raises(InvalidRequestError, match=says):
        prepare(tensor_input([1, 4]), value)


# --- audio inputs


def test_audio_float_and_int16_waveforms() -> None:
    spec = audio_input([1, 16_000])
    wave = np.sin(np.linspace(0, 100, 16_000)).astype(np.float32) * 0.5
    assert np.shares_memory(prepare(spec, wave).tensors["wave"], wave)
    pcm = (wave * 32768).astype(np.int16)
    got = prepare(spec, pcm[None]).tensors["wave"]
    assert got.shape == (1, 16_000) and got == pytest.approx(pcm[None] / 32768)
    int8 = audio_input([1, 16_000, 1], "INT8", quantization={"scale": 1 / 128, "zero_point": 0})
    q = prepare(int8, wave).tensors["wave"]
    assert q.shape == (1, 16_000, 1)
    assert np.array_equal(q[0, :, 0], np.clip(np.rint(wave * 128), -128, 127).astype(np.int8))
    raw = audio_input([1, 16_000], "INT16")  # int16 without quantization: PCM as it is
    assert np.shares_memory(prepare(raw, pcm).tensors["wave"], pcm)


def test_audio_window_and_range() -> None:
    spec = audio_input([1, -1], audio={"window": 8_000})
    with pytest.raises(InvalidRequestError, match=r"window of 8000 samples .*got 4000"):
        prepare(spec, np.zeros(4_000, np.float32))
    with pytest.raises(InvalidRequestError, match=r"within \[-1, 1\] \(got 3\)"):
        prepare(spec, np.full(8_000, 3.0, np.float32))
    with pytest.raises(InvalidRequestError, match="int16 PCM; got dtype int32"):
        prepare(spec, np.zeros(8_000, np.int32))
    with pytest.raises(InvalidRequestError, match=r"got shape \[2, 8000\]"):
        prepare(spec, np.zeros((2, 8_000), np.float32))
    assert prepare(audio_input([1, -1]), np.zeros(123, np.float32)).tensors["wave"].shape == (
        1,
        123,
    )


# --- hostile image values


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (np.zeros((64, 64, 2), np.uint8), "frame has 2 channels, the model takes 3"),
        (np.zeros((64, 64, 5), np.uint8), "frame has 5 channels, the model takes 3"),
        (np.zeros((0, 64, 3), np.uint8), "at least one pixel"),
        (np.zeros((2, 64, 64, 3), np.uint8), r"got a uint8 array of shape \[2, 64, 64, 3\]"),
        (np.zeros((64, 64, 4), np.float32), r"preprocessed tensor of shape \[1, 64, 64, 3\]"),
        (np.zeros((1, 3, 64, 64), np.float32), r"got float32 of shape \[1, 3, 64, 64\]"),
        ("a picture", "got str"),
        ({"not": "a picture"}, r"missing \['image'\], unknown \['not'\]"),
        (None, "got NoneType"),
        (b"", "empty image"),
        (b"0123456789", "not a JPEG or PNG"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "corrupt JPEG image header"),
        (np.array([b"\x89PNG\r\n\x1a\n"], dtype=object), "corrupt PNG image header"),
    ],
)
def test_bad_image_values_are_400(value: object, says: str) -> None:
    with pytest.raises(InvalidRequestError, match=says):
        prepare(image_input(), value)


def test_the_pixel_cap_holds_for_frames_and_pictures() -> None:
    small = Preprocessor([image_input()], max_pixels=10_000)
    with pytest.raises(InvalidRequestError, match="at most 10,000"):
        small.prepare(np.zeros((101, 100, 3), np.uint8))
    with pytest.raises(InvalidRequestError, match=r"100x101 \(10,100 pixels\); at most 10,000"):
        small.prepare(encode(np.zeros((101, 100, 3), np.uint8), "PNG"))
    assert small.prepare(np.zeros((100, 100, 3), np.uint8)).placement is not None


# --- several inputs, and contracts that cannot be served


def test_inputs_by_name() -> None:
    pre = Preprocessor([image_input(), tensor_input([1, 2])], CAP)
    prepared = pre.prepare({"image": china(), "x": [1.0, 2.0]})
    assert set(prepared.tensors) == {"image", "x"} and prepared.placement is not None
    with pytest.raises(InvalidRequestError, match=r"takes 2 inputs \['image', 'x'\]"):
        pre.prepare(china())
    with pytest.raises(InvalidRequestError, match=r"missing \['x'\], unknown \['y'\]"):
        pre.prepare({"image": china(), "y": [1.0, 2.0]})
    with pytest.raises(InvalidRequestError, match="no input 'z'"):
        prepared.real("z")
    # one input: its name may be given too
    assert "x" in Preprocessor([tensor_input([1, 2])], CAP).prepare({"x": [1.0, 2.0]}).tensors


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        (lambda: image_input(mean=[1.0, 2.0]), "2 mean values for 3 channels"),
        (lambda: image_input(datatype="UINT8", mean=[127.5], std=[127.5]), "needs a quantization"),
        (lambda: image_input(datatype="BOOL"), "cannot be BOOL"),
        (lambda: tensor_input([1, 2], "BYTES"), "BYTES inputs are not supported"),
        (lambda: audio_input([1, 16_000], "INT8"), "needs a scale"),
        (lambda: audio_input([-1, -1, -1]), "ambiguous"),
    ],
)
def test_contracts_that_cannot_be_served_are_refused_at_load(spec: Any, says: str) -> None:
    with pytest.raises(ContractError, match=says):
        Preprocessor([spec()], CAP)


_WARM = """
import sys
from shared.contract import InputSpec
from shared.preprocess import Preprocessor
kind = sys.argv[1]
spec = {"name": "x", "shape": [1, 8, 8, 3], "datatype": "UINT8"}
if kind == "image":
    spec.update(kind="image", image={})
pre = Preprocessor([InputSpec.model_validate(spec)], 10_000)
before = "PIL" in sys.modules
pre.warm()
print(before, "PIL" in sys.modules)
"""


@pytest.mark.parametrize(("kind", "loads"), [("image", "True"), ("tensor", "False")])
def test_warm_imports_pillow_for_image_models_only(kind: str, loads: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _WARM, kind], capture_output=True, text=True, cwd=ROOT
    )
    assert out.stdout.split() == ["False", loads], out.stderr
