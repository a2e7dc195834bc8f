"""The cloud server takes pictures for an image input (``config.toml``'s ``[inputs.<name>]``):
encoded JPEG/PNG as BYTES and uint8 frames of any size, preprocessed before the batcher, on
real uvicorn and ONNX Runtime, with a two-output model whose answers can be worked out by
hand: each picture's mean colour."""

from __future__ import annotations

import asyncio
import io
import re
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from cloud.app import create_app
from cloud.serving import batcher as batcher_module
from cloud.serving.batcher import Batcher
from cloud.serving.config import ModelConfig
from cloud.serving.metrics import ServerMetrics
from cloud.serving.model import OnnxModel
from cloud.serving.settings import OrtSettings
from cloud.settings import CloudSettings
from shared.errors import ServerBusyError
from shared.oip.codec import decode_response, encode_request, parse_header_length
from shared.oip.types import InferRequest, InferResponse, InferTensor, RequestedOutput
from tests.helpers import serve_in_thread
from tests.prometheus import sample

IMAGE_SECTION = """
[inputs.images]
kind = "image"
layout = "NHWC"
colour = "RGB"
resize = "squash"
mean = [0.0]
std = [255.0]
max_pixels = 1000000
"""
RED, GREEN, BLUE, GREY = (200, 30, 10), (20, 180, 40), (10, 20, 230), (90, 90, 90)


def mean_colour_model(path: Path, height: int | str = 32, width: int | str = 32) -> None:
    """``images [b, H, W, 3]`` FP32 -> ``scores [b, 1, 3]``, the mean of each channel, and
    ``boxes [b, 1, 4]``, those means and their largest: a detector's two outputs, in shape."""
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["images"], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("ReduceMax", ["mean"], ["top"], axes=[1], keepdims=1),
            helper.make_node("Concat", ["mean", "top"], ["four"], axis=1),
            helper.make_node("Unsqueeze", ["mean", "axes"], ["scores"]),
            helper.make_node("Unsqueeze", ["four", "axes"], ["boxes"]),
        ],
        "mean_colour",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", height, width, 3])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["b", 1, 3]),
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["b", 1, 4]),
        ],
        initializer=[axes],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))


def repo_of(tmp: Path, **configs: str) -> Path:
    """A repository of mean-colour models, one per name, each with its ``config.toml``."""
    repo = tmp / "repo"
    for name, config in configs.items():
        mean_colour_model(repo / name / "1" / "model.onnx")
        if config:
            (repo / name / "config.toml").write_text(config)
    return repo


def picture(colour: tuple[int, int, int], width: int, height: int) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (height, width, 3)).copy()


def encoded(colour: tuple[int, int, int], width: int, height: int, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(picture(colour, width, height)).save(out, fmt)
    return out.getvalue()


def expected(colour: tuple[int, int, int]) -> dict[str, np.ndarray]:
    mean = np.array(colour, np.float32) / 255
    return {"scores": mean[None], "boxes": np.append(mean, mean.max())[None]}


def png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few bytes whose header claims ``width x height`` (a decompression bomb's
    header: its pixel data would be zeros, compressed to nothing)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def post(
    url: str, model: str, *inputs: InferTensor, outputs: list[str] | None = None
) -> httpx.Response:
    """A binary-extension request (how tritonclient and the agent send BYTES pictures)."""
    request = InferRequest(
        inputs=list(inputs),
        outputs=None
        if outputs is None
        else [RequestedOutput(n, binary_data=True) for n in outputs],
    )
    body, headers = encode_request(request)
    return httpx.post(f"{url}/v2/models/{model}/infer", content=body, headers=headers, timeout=30)


def answer(reply: httpx.Response) -> dict[str, np.ndarray]:
    assert reply.status_code == 200, reply.text
    response = decode_response(reply.content, parse_header_length(reply.headers))
    return {t.name: t.data for t in response.outputs}


def bytes_tensor(*pictures: bytes) -> InferTensor:
    return InferTensor("images", "BYTES", np.array(list(pictures), dtype=object))


def test_pictures_of_every_kind_become_the_models_tensor(tmp_path: Path) -> None:
    repo = repo_of(tmp_path, img="max_batch_size = 8\n" + IMAGE_SECTION)
    with serve_in_thread(create_app(CloudSettings(repo=repo, repo_poll_s=0))) as url:
        # a JPEG as BYTES, shape [1], of another size than the model's (JPEG: within 2/255)
        got = answer(post(url, "img", bytes_tensor(encoded(RED, 120, 80, "JPEG"))))
        for name, want in expected(RED).items():
            np.testing.assert_allclose(got[name], want[None], atol=2 / 255)
        # a PNG (lossless: exact), only the output asked for
        got = answer(
            post(url, "img", bytes_tensor(encoded(GREEN, 7, 300, "PNG")), outputs=["boxes"])
        )
        assert list(got) == ["boxes"]
        np.testing.assert_allclose(got["boxes"], expected(GREEN)["boxes"][None], atol=1e-5)
        # uint8 frames of any size: [1, H, W, C] and [H, W, C]
        frame = InferTensor.of("images", picture(BLUE, 64, 48)[None])
        got = answer(post(url, "img", frame))
        np.testing.assert_allclose(got["scores"], expected(BLUE)["scores"][None], atol=1e-5)
        frame = InferTensor.of("images", picture(GREY, 33, 31))
        got = answer(post(url, "img", frame))
        np.testing.assert_allclose(got["scores"], expected(GREY)["scores"][None], atol=1e-5)
        # several pictures in one request: one row each, in order, sizes and formats mixed
        many = bytes_tensor(
            encoded(RED, 40, 30, "PNG"),
            encoded(BLUE, 32, 32, "PNG"),
            encoded(GREEN, 500, 20, "JPEG"),
        )
        got = answer(post(url, "img", many, outputs=["scores", "boxes"]))
        assert got["scores"].shape == (3, 1, 3) and got["boxes"].shape == (3, 1, 4)
        for row, colour in enumerate((RED, BLUE, GREEN)):
            np.testing.assert_allclose(got["boxes"][row], expected(colour)["boxes"], atol=2 / 255)
        # the model's own tensor still goes in as it is
        tensor = InferTensor.of("images", np.full((2, 32, 32, 3), 0.25, np.float32))
        np.testing.assert_allclose(
            answer(post(url, "img", tensor))["scores"], np.full((2, 1, 3), 0.25)
        )
        # JSON: a uint8 frame as numbers
        small = picture(RED, 6, 4)
        doc = {
            "inputs": [
                {
                    "name": "images",
                    "shape": list(small.shape),
                    "datatype": "UINT8",
                    "data": small.ravel().tolist(),
                }
            ]
        }
        reply = httpx.post(f"{url}/v2/models/img/infer", json=doc)
        assert reply.status_code == 200, reply.text
        scores = next(o for o in reply.json()["outputs"] if o["name"] == "scores")
        np.testing.assert_allclose(scores["data"], np.array(RED) / 255, atol=1e-5)
        metrics = httpx.get(f"{url}/metrics").text
    ok = dict(model="img", version="1", status="200")
    assert sample(metrics, "tandem_inference_requests_total", **ok) == 7
    # 3 + 2 rows went as one run each: batch sizes count requests, and there were 7 runs
    assert sample(metrics, "tandem_batch_size_count", model="img", version="1") == 7


def test_tritonclient_sends_a_jpeg_and_reads_the_configuration(tmp_path: Path) -> None:
    import tritonclient.http as triton

    repo = repo_of(tmp_path, img="max_batch_size = 8\n" + IMAGE_SECTION)
    with serve_in_thread(create_app(CloudSettings(repo=repo, repo_poll_s=0))) as url:
        client = triton.InferenceServerClient(urlparse(url).netloc)
        config = client.get_model_config("img")
        assert config["max_batch_size"] == 8
        assert config["input"] == [
            {
                "name": "images",
                "data_type": "TYPE_FP32",
                "dims": [32, 32, 3],
                "format": "FORMAT_NHWC",
            }
        ]
        assert config["output"] == [
            {"name": "scores", "data_type": "TYPE_FP32", "dims": [1, 3]},
            {"name": "boxes", "data_type": "TYPE_FP32", "dims": [1, 4]},
        ]
        inp = triton.InferInput("images", [2], "BYTES")
        jpegs = [encoded(GREEN, 300, 200, "JPEG"), encoded(GREY, 16, 16, "JPEG")]
        inp.set_data_from_numpy(np.array(jpegs, dtype=object), binary_data=True)
        result = client.infer("img", [inp], outputs=[triton.InferRequestedOutput("boxes")])
        boxes = result.as_numpy("boxes")
        client.close()
    assert boxes is not None and boxes.shape == (2, 1, 4)
    np.testing.assert_allclose(boxes[0], expected(GREEN)["boxes"], atol=2 / 255)
    np.testing.assert_allclose(boxes[1], expected(GREY)["boxes"], atol=2 / 255)


def test_pictures_of_different_sizes_and_kinds_merge_into_one_batch(tmp_path: Path) -> None:
    # the batch waits (up to 10 s) until it holds 4 rows: it closes when the 4th arrives
    config = (
        "max_batch_size = 4\nmax_queue_delay_us = 10000000\nclose_when_quiet = false\n"
        "timeout_ms = 30000\n" + IMAGE_SECTION
    )
    repo = repo_of(tmp_path, img=config)
    inputs = [
        bytes_tensor(encoded(RED, 40, 30, "JPEG")),
        bytes_tensor(encoded(GREEN, 50, 70, "PNG")),
        InferTensor.of("images", picture(BLUE, 640, 480)[None]),
        InferTensor.of("images", np.full((1, 32, 32, 3), 90 / 255, np.float32)),
    ]
    with serve_in_thread(create_app(CloudSettings(repo=repo, repo_poll_s=0))) as url:
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda t: post(url, "img", t, outputs=["scores"]), inputs))
        metrics = httpx.get(f"{url}/metrics").text
    for reply, colour in zip(replies, (RED, GREEN, BLUE, GREY), strict=True):
        np.testing.assert_allclose(
            answer(reply)["scores"], expected(colour)["scores"][None], atol=2 / 255
        )
    assert sample(metrics, "tandem_batch_size_count", model="img", version="1") == 1
    assert sample(metrics, "tandem_batch_size_sum", model="img", version="1") == 4


def test_hostile_pictures_get_a_400_with_a_message(tmp_path: Path) -> None:
    repo = repo_of(tmp_path, img="max_batch_size = 8\n" + IMAGE_SECTION)
    jpeg = encoded(RED, 64, 64, "JPEG")
    cases = {
        "truncated JPEG": (bytes_tensor(jpeg[: len(jpeg) // 2]), "truncated|broken|corrupt"),
        "bomb PNG": (bytes_tensor(png_claiming(20_000, 20_000)), "20000x20000"),
        "not a picture": (bytes_tensor(b"GIF89a not ours"), "JPEG|PNG"),
        "a good JPEG and a cut one": (bytes_tensor(jpeg, jpeg[:100]), "truncated|broken|corrupt"),
        "two channels": (
            InferTensor.of("images", np.zeros((1, 40, 40, 2), np.uint8)),
            "2 channels",
        ),
        "frame over max_pixels": (
            InferTensor.of("images", np.zeros((1001, 1000, 3), np.uint8)),
            "1000x1001",
        ),
        "5-D frames": (
            InferTensor.of("images", np.zeros((1, 1, 4, 4, 3), np.uint8)),
            "UINT8 of shape",
        ),
        "BYTES matrix": (
            InferTensor("images", "BYTES", np.array([[jpeg, jpeg]], dtype=object)),
            "BYTES of shape",
        ),
        "no picture": (InferTensor("images", "BYTES", np.empty(0, dtype=object)), "no picture"),
        "FP16": (InferTensor.of("images", np.zeros((1, 32, 32, 3), np.float16)), "got FP16"),
        "FP32 of the wrong shape": (
            InferTensor.of("images", np.zeros((1, 16, 16, 3), np.float32)),
            "shape",
        ),
        # refused before any is decoded: the 9 are junk, and the refusal is not about them
        "more pictures than a batch": (bytes_tensor(*[b"junk"] * 9), "batch-size must be <= 8"),
    }
    with serve_in_thread(create_app(CloudSettings(repo=repo, repo_poll_s=0))) as url:
        for what, (tensor, message) in cases.items():
            reply = post(url, "img", tensor)
            assert reply.status_code == 400, (what, reply.text)
            assert re.search(message, reply.json()["error"]), (what, reply.text)
        # JSON BYTES are strings: a picture's bytes cannot go there, a string is no picture
        doc = {
            "inputs": [
                {
                    "name": "images",
                    "shape": [1],
                    "datatype": "BYTES",
                    "data": ["\u00ff\u00d8\u00ff"],
                }
            ]
        }
        reply = httpx.post(f"{url}/v2/models/img/infer", json=doc)
        assert reply.status_code == 400 and "JPEG" in reply.json()["error"], reply.text
        # the server is still well, and counted each refusal
        np.testing.assert_allclose(
            answer(post(url, "img", bytes_tensor(jpeg)))["scores"][0],
            expected(RED)["scores"],
            atol=2 / 255,
        )
        metrics = httpx.get(f"{url}/metrics").text
    refused = dict(model="img", version="1", status="400")
    assert sample(metrics, "tandem_inference_requests_total", **refused) == len(cases) + 1


def test_a_model_without_an_image_section_takes_only_its_tensor(tmp_path: Path) -> None:
    repo = repo_of(tmp_path, img=IMAGE_SECTION, plain="")
    frame = InferTensor.of("images", picture(RED, 64, 48)[None])
    jpeg = bytes_tensor(encoded(RED, 64, 48, "JPEG"))
    with serve_in_thread(create_app(CloudSettings(repo=repo, repo_poll_s=0))) as url:
        # the same ONNX file, the same requests: with the section they are pictures...
        assert answer(post(url, "img", frame))["scores"].shape == (1, 1, 3)
        assert answer(post(url, "img", jpeg))["scores"].shape == (1, 1, 3)
        # ...without it, tensors of the wrong datatype, as before
        for tensor in (frame, jpeg):
            reply = post(url, "plain", tensor)
            assert reply.status_code == 400
            assert reply.json()["error"] == f"input 'images' must be FP32, got {tensor.datatype}"
        config = httpx.get(f"{url}/v2/models/plain/config").json()
        assert "format" not in config["input"][0]


@pytest.mark.parametrize(
    ("section", "reason"),
    [
        ('[inputs.pixels]\nkind = "image"\n', "image sections for ['pixels']"),
        ('[inputs.images]\ncolour = "GRAY"\n', "has 3 channels, GRAY has 1"),
        ('[inputs.images]\nlayout = "NCHW"\n', "channels"),
        ('[inputs.images]\nkind = "audio"\n', "Input should be 'image'"),
        ("[inputs.images]\nstd = [0.0]\n", "std may not be 0"),
        ("[inputs.images]\nmean = [1.0, 2.0]\n", "2 mean values for 3 channels"),
    ],
)
def test_an_image_section_that_does_not_fit_is_the_models_load_error(
    tmp_path: Path, section: str, reason: str
) -> None:
    repo = repo_of(tmp_path, bad=section)
    with serve_in_thread(create_app(CloudSettings(repo=repo, repo_poll_s=0))) as url:
        reply = httpx.get(f"{url}/v2/models/bad/ready")
    assert reply.status_code == 503 and reason in reply.json()["reason"], reply.text


def test_a_model_of_free_height_and_width_needs_a_size(tmp_path: Path) -> None:
    mean_colour_model(tmp_path / "repo" / "free" / "1" / "model.onnx", "h", "w")
    (tmp_path / "repo" / "free" / "config.toml").write_text(IMAGE_SECTION)
    with serve_in_thread(create_app(CloudSettings(repo=tmp_path / "repo", repo_poll_s=0))) as url:
        reply = httpx.get(f"{url}/v2/models/free/ready")
    assert reply.status_code == 503 and "fixed height and width" in reply.json()["reason"]


# ------------------------------------------------------------ the batcher, without HTTP


def image_batcher(tmp_path: Path, **config: object) -> Batcher:
    mean_colour_model(tmp_path / "m.onnx")
    model_config = ModelConfig.model_validate(
        {"max_batch_size": 8, "inputs": {"images": {"std": [255.0]}}, **config}
    )
    model = OnnxModel("m", "1", tmp_path / "m.onnx", OrtSettings(), 1, model_config.inputs)
    return Batcher(model, model_config, ServerMetrics())


def picture_request(tensor: InferTensor) -> InferRequest:
    return InferRequest(inputs=[tensor], outputs=[RequestedOutput("scores")])


def test_pictures_are_decoded_off_the_event_loop_but_small_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batcher = image_batcher(tmp_path)
    threads: list[int] = []
    convert = batcher.model.with_tensors

    def recording(request: InferRequest) -> InferRequest:
        threads.append(threading.get_ident())
        return convert(request)

    monkeypatch.setattr(batcher.model, "with_tensors", recording)
    requests = [
        bytes_tensor(encoded(RED, 8, 8, "PNG")),  # tiny, but encoded: its header could lie
        InferTensor.of("images", picture(RED, 640, 480)),  # a big frame
        InferTensor.of("images", picture(RED, 8, 8)),  # a small frame: on the loop
        InferTensor.of("images", np.zeros((1, 32, 32, 3), np.float32)),  # a tensor: as it is
    ]

    async def each() -> int:
        for tensor in requests:
            await batcher.infer(picture_request(tensor))
        return threading.get_ident()

    loop_thread = asyncio.run(each())
    assert [t == loop_thread for t in threads] == [False, False, True]


def test_decoding_requests_count_in_the_queue_and_at_most_decoders_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a queue of one: while a picture decodes, the next request finds it full
    batcher = image_batcher(tmp_path, max_queue_size=1)
    jpeg = bytes_tensor(encoded(RED, 64, 64, "JPEG"))

    async def two() -> tuple[InferResponse | BaseException, ...]:
        return await asyncio.gather(
            batcher.infer(picture_request(jpeg)),
            batcher.infer(picture_request(jpeg)),
            return_exceptions=True,
        )

    first, second = asyncio.run(two())
    assert isinstance(first, InferResponse) and isinstance(second, ServerBusyError)
    assert "1 requests waiting (limit 1)" in second.message

    def peak_decoders(decoders: int, wait_s: float) -> int:
        """Decodes running at once, of 3 requests, with ``DECODERS`` = ``decoders``: each
        waits up to ``wait_s`` for a second one to be decoding beside it."""
        monkeypatch.setattr(batcher_module, "DECODERS", decoders)
        b = image_batcher(tmp_path)
        together = threading.Barrier(2)
        active = peak = 0
        lock = threading.Lock()
        convert = b.model.with_tensors

        def overlapping(request: InferRequest) -> InferRequest:
            nonlocal active, peak
            with lock:
                active += 1
                peak = max(peak, active)
            try:
                together.wait(timeout=wait_s)
            except threading.BrokenBarrierError:
                together.reset()
            with lock:
                active -= 1
            return convert(request)

        monkeypatch.setattr(b.model, "with_tensors", overlapping)

        async def three() -> None:
            await asyncio.gather(*(b.infer(picture_request(jpeg)) for _ in range(3)))

        asyncio.run(three())
        return peak

    assert peak_decoders(2, wait_s=5.0) == 2  # positive control: two do meet
    assert peak_decoders(1, wait_s=0.5) == 1  # each waits the whole time for nobody


# ------------------------------------------------- an agent escalating pictures to it

EDGE_CONTRACT = """
task = "custom"
[inputs.images]
kind = "image"
shape = [1, 16, 16, 3]
std = [255.0]
[cloud]
model = "img"
input = "images"
send = "{send}"
"""


@pytest.mark.parametrize(
    ("send", "binary"),
    [("frame", True), ("encoded", True), ("tensor", True), ("encoded", False)],
)
def test_an_agent_escalates_pictures_as_its_manifest_says(
    tmp_path: Path, send: str, binary: bool
) -> None:
    """A packaged edge model of 16 x 16 pictures escalating to a cloud model of 32 x 32:
    the caller's frame or JPEG goes, and the cloud preprocesses it for its own size. The
    edge's 16 x 16 tensor (``send = "tensor"``) does not fit it: refused, answered locally.
    An agent told to send JSON still sends an encoded image binary: JSON carries text, and
    a JPEG went mangled (U+FFFD for every byte that is not UTF-8)."""
    from agent import Agent, AgentSettings
    from agent.inference.backends import OnnxSettings
    from agent.settings import CloudSettings as AgentCloudSettings
    from cloud.releases.package_model import ModelPackageRequest, package_model
    from cloud.releases.registry import Registry
    from shared.signing import SigningKey

    mean_colour_model(tmp_path / "edge.onnx", 16, 16)
    (tmp_path / "contract.toml").write_text(EDGE_CONTRACT.replace("{send}", send))
    registry = Registry(tmp_path / "reg")
    request = ModelPackageRequest(
        edge=tmp_path / "edge.onnx", name="colours", contract=tmp_path / "contract.toml"
    )
    manifest = package_model(request, SigningKey.generate(), registry)
    assert manifest.cloud is not None and manifest.cloud.send == send
    repo = repo_of(tmp_path, img="max_batch_size = 8\n" + IMAGE_SECTION)
    with serve_in_thread(create_app(CloudSettings(repo=repo, repo_poll_s=0))) as url:
        settings = AgentSettings(
            model_dir=registry.release_dir("colours", manifest.version),
            state_dir=tmp_path / "state",
            backend=OnnxSettings(),
            cloud=AgentCloudSettings(url=url, binary=binary),
        )
        with Agent(settings) as agent:
            jpeg = agent.infer(encoded(GREEN, 120, 90, "JPEG"), mode="cloud")
            frame = agent.infer(picture(BLUE, 64, 48), mode="cloud")
        metrics = httpx.get(f"{url}/metrics").text
    for result, colour in ((jpeg, GREEN), (frame, BLUE)):
        assert result.source == ("edge" if send == "tensor" else "cloud"), result
        outputs = result.prediction.to_tensors()
        np.testing.assert_allclose(outputs["boxes"], expected(colour)["boxes"][None], atol=2 / 255)
    status = "400" if send == "tensor" else "200"
    counted = dict(model="img", version="1", status=status)
    assert sample(metrics, "tandem_inference_requests_total", **counted) == 2
