"""Image sections of ``config.toml`` and the pictures an image input takes, without a server
or a model: the documented keys parse, each request shape counts its pictures, and each
conversion gives the model's layout, colour order and datatype."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from cloud.serving import config as config_module
from cloud.serving.config import ImageInputConfig, ModelConfig
from cloud.serving.image_inputs import INLINE_FRAME_BYTES, ImageInput
from shared.errors import ContractError, InvalidRequestError
from shared.oip.types import InferTensor, TensorMetadata

NHWC = TensorMetadata(name="images", datatype="FP32", shape=[-1, 32, 32, 3])


def image_input(meta: TensorMetadata = NHWC, **section: object) -> ImageInput:
    return ImageInput(meta, ImageInputConfig.model_validate(section))


def frames(*shape: int) -> InferTensor:
    return InferTensor.of("images", np.zeros(shape, np.uint8))


def encoded(n: int, *extra: int) -> InferTensor:
    return InferTensor("images", "BYTES", np.full((n, *extra), b"x", dtype=object))


def test_the_documented_config_toml_parses_as_documented(tmp_path: Path) -> None:
    doc = config_module.__doc__ or ""
    block = doc.split("\n\n")[1] + "\n\n" + doc.split("\n\n")[2]
    toml = textwrap.dedent(block).replace("# quantization", "quantization")
    (tmp_path / "config.toml").write_text(toml)
    config = ModelConfig.load(tmp_path)
    section = config.inputs["images"]
    assert (section.layout, section.colour, section.resize) == ("NHWC", "RGB", "squash")
    assert (section.mean, section.std, section.max_pixels) == ([0.0], [255.0], 40_000_000)
    assert section.quantization is not None and section.quantization.scale == 0.0078125
    assert section.image().model_dump() == {
        "layout": "NHWC",
        "colour": "RGB",
        "resize": "squash",
        "mean": [0.0],
        "std": [255.0],
    }


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        ('[inputs.images]\nkind = "tensor"\n', r"inputs.images.kind\n  Input should be 'image'"),
        (
            "[inputs.images]\nmax_pixels = 0\n",
            r"inputs.images.max_pixels\n  Input should be greater",
        ),
        ("[inputs.images]\nsize = [32, 32]\n", r"inputs.images.size\n  Extra inputs"),
        ('[inputs.images]\nresize = "stretch"\n', r"inputs.images.resize\n  Input should be"),
    ],
)
def test_a_malformed_image_section_is_a_contract_error(
    tmp_path: Path, toml: str, problem: str
) -> None:
    (tmp_path / "config.toml").write_text(toml)
    with pytest.raises(ContractError, match=problem):
        ModelConfig.load(tmp_path)


@pytest.mark.parametrize(
    ("tensor", "rows"),
    [
        (encoded(1), 1),
        (encoded(5), 5),
        (encoded(3, 1), 3),  # Triton's [batch, 1] of a BYTES input
        (frames(48, 64, 3), 1),
        (frames(48, 64), 1),  # gray
        (frames(1, 48, 64, 3), 1),
        (frames(4, 10, 20, 1), 4),
        (InferTensor.of("images", np.zeros((2, 32, 32, 3), np.float32)), 0),  # the model's own
    ],
)
def test_pictures_counts_the_rows_a_request_holds(tensor: InferTensor, rows: int) -> None:
    assert image_input().pictures(tensor) == rows


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (encoded(0), "holds no picture"),
        (frames(0, 8, 8, 3), "holds no picture"),
        (encoded(2, 2), r"got BYTES of shape \[2, 2\]"),
        (frames(8), r"got UINT8 of shape \[8\]"),
        (InferTensor.of("images", np.zeros((1, 32, 32, 3), np.int32)), "got INT32"),
    ],
)
def test_pictures_refuses_what_is_no_picture(tensor: InferTensor, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        image_input().pictures(tensor)


def test_a_model_of_fixed_batch_takes_that_many_pictures() -> None:
    image = image_input(TensorMetadata(name="images", datatype="FP32", shape=[1, 32, 32, 3]))
    assert image.pictures(encoded(1)) == 1
    with pytest.raises(InvalidRequestError, match=r"takes 1 picture\(s\) per request, got 2"):
        image.pictures(encoded(2))


def test_only_small_frames_are_converted_inline() -> None:
    image = image_input()
    side = int((INLINE_FRAME_BYTES / 3) ** 0.5)
    assert image.inline(frames(side, side, 3))
    assert not image.inline(frames(side + 1, side + 1, 3))
    assert not image.inline(encoded(1))  # however small: its header may claim 40 MP


def test_convert_gives_the_models_layout_colour_and_datatype() -> None:
    pixels = np.zeros((2, 8, 8, 3), np.uint8)
    pixels[0, ..., 0], pixels[1, ..., 2] = 255, 51  # a red frame, then a dark blue one
    nchw = TensorMetadata(name="images", datatype="FP32", shape=[-1, 3, 16, 16])
    out = image_input(nchw, layout="NCHW", colour="BGR", std=[255.0]).convert(
        InferTensor.of("images", pixels)
    )
    assert out.shape == (2, 3, 16, 16) and out.dtype == np.float32
    # BGR: red is the last channel, blue the first
    np.testing.assert_allclose(out[0].mean(axis=(1, 2)), [0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(out[1].mean(axis=(1, 2)), [0.2, 0, 0], atol=1e-6)


def test_a_frame_of_a_uint8_models_size_goes_in_as_it_is() -> None:
    meta = TensorMetadata(name="images", datatype="UINT8", shape=[-1, 8, 8, 3])
    image = image_input(meta)  # mean 0, std 1: the identity
    frame = np.random.default_rng(0).integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
    tensor = InferTensor.of("images", frame)
    assert image.pictures(tensor) == 1  # a uint8 tensor is a frame, as the agent reads it
    np.testing.assert_array_equal(image.convert(tensor), frame)


def test_an_integer_input_is_quantized_per_its_section() -> None:
    meta = TensorMetadata(name="images", datatype="INT8", shape=[-1, 4, 4, 1])
    image = image_input(
        meta,
        colour="GRAY",
        mean=[127.5],
        std=[127.5],
        quantization={"scale": 1 / 128, "zero_point": 0},
    )
    out = image.convert(InferTensor.of("images", np.full((4, 4), 255, np.uint8)))
    assert out.dtype == np.int8 and out.shape == (1, 4, 4, 1) and (out == 127).all()
