"""The cloud OIP server on a real uvicorn with real ONNX Runtime: protocol and errors."""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from cloud.app import create_app
from cloud.pipeline.data import SplitData
from cloud.settings import CloudSettings
from shared.oip.codec import decode_response, encode_request, parse_header_length
from shared.oip.types import HEADER_LENGTH, InferRequest, InferTensor, RequestedOutput
from tests.helpers import CLOUD_MODEL, CLOUD_REPO, infer_body, serve_in_thread

INFER = f"/v2/models/{CLOUD_MODEL}/infer"


@pytest.fixture
def http(cloud_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cloud_url) as client:
        yield client


def test_health_and_metadata(http: httpx.Client) -> None:
    assert http.get("/v2/health/live").status_code == 200
    assert http.get("/v2/health/ready").status_code == 200
    meta = http.get("/v2").json()
    assert meta["name"] == "tandem-cloud" and "binary_tensor_data" in meta["extensions"]
    model = http.get(f"/v2/models/{CLOUD_MODEL}").json()
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert model["versions"] == ["1"]
    assert http.get(f"/v2/models/{CLOUD_MODEL}/versions/1").json() == model
    ready = http.get(f"/v2/models/{CLOUD_MODEL}/versions/1/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True


def test_json_infer_is_correct(http: httpx.Client, digits: SplitData) -> None:
    x = digits.test.x[:32]  # the model's max_batch_size
    r = http.post(f"/v2/models/{CLOUD_MODEL}/versions/1/infer", json=infer_body(x, id="req-9"))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["id"] == "req-9" and doc["model_version"] == "1"
    probs = np.array(doc["outputs"][0]["data"]).reshape(32, 10)
    assert (probs.argmax(1) == digits.test.y[:32]).mean() > 0.95


def test_binary_infer_both_ways(http: httpx.Client, digits: SplitData) -> None:
    x = digits.test.x[:8]
    req = InferRequest(
        inputs=[InferTensor.of("input", x)],
        outputs=[RequestedOutput("probabilities", binary_data=True)],
    )
    body, headers = encode_request(req)
    r = http.post(INFER, content=body, headers=headers)
    assert r.status_code == 200 and HEADER_LENGTH.lower() in r.headers
    resp = decode_response(r.content, parse_header_length(r.headers))
    assert resp.output("probabilities").data.shape == (8, 10)


def test_gzip_body(http: httpx.Client) -> None:
    body = gzip.compress(json.dumps(infer_body(np.zeros((1, 64), np.float32))).encode())
    r = http.post(INFER, content=body, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v2/models/nope/infer", infer_body(np.zeros((1, 64))), 404, "unknown model"),
        (
            f"/v2/models/{CLOUD_MODEL}/versions/9/infer",
            infer_body(np.zeros((1, 64))),
            404,
            "no version",
        ),
        (INFER, infer_body(np.zeros((1, 63))), 400, "shape"),
        (
            INFER,
            {
                "inputs": [
                    {"name": "input", "shape": [1, 64], "datatype": "FP64", "data": [0.0] * 64}
                ]
            },
            400,
            "must be FP32",
        ),
        (
            INFER,
            {
                "inputs": [
                    {"name": "other", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}
                ]
            },
            400,
            "no input",
        ),
        (
            INFER,
            infer_body(np.zeros((1, 64)), outputs=[{"name": "logits"}]),
            400,
            "unknown outputs",
        ),
        (INFER, {"inputs": "x"}, 400, "inputs"),
        (INFER, infer_body(np.zeros((33, 64))), 400, "batch-size must be <= 32"),
    ],
)
def test_client_mistakes_are_4xx_with_a_message(
    http: httpx.Client, path: str, body: object, status: int, needle: str
) -> None:
    r = http.post(path, json=body)
    assert r.status_code == status
    assert needle in r.json()["error"]


def test_raw_garbage_and_unknown_routes(http: httpx.Client) -> None:
    r = http.post(INFER, content=b"\x00\xff garbage")
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = http.post(INFER, content=b"{}", headers={"Content-Encoding": "br"})
    assert r.status_code == 415
    r = http.post(INFER, content=b"{}", headers={HEADER_LENGTH: "oops"})
    assert r.status_code == 400
    r = http.get("/v2/nothing/here")
    assert r.status_code == 404 and "error" in r.json()
    assert http.get("/v2/models/nope").status_code == 404
    assert http.get("/v2/models/nope/ready").status_code == 404
    assert http.get("/v2/models/nope/config").status_code == 404
    assert http.get(f"/v2/models/{CLOUD_MODEL}/versions/9/config").status_code == 404


def test_oversized_bodies_are_413() -> None:
    app = create_app(CloudSettings(repo=CLOUD_REPO, max_body_bytes=1000))
    with serve_in_thread(app) as url:
        big = infer_body(np.zeros((20, 64), np.float32))
        r = httpx.post(url + INFER, json=big)
        assert r.status_code == 413 and "limit" in r.json()["error"]
        bomb = gzip.compress(b" " * 100_000)
        r = httpx.post(url + INFER, content=bomb, headers={"Content-Encoding": "gzip"})
        assert r.status_code == 413


def test_broken_model_beside_a_good_one(tmp_path: Path) -> None:
    good = CLOUD_REPO / CLOUD_MODEL / "1" / "model.onnx"
    (tmp_path / "good" / "1").mkdir(parents=True)
    (tmp_path / "good" / "2").mkdir(parents=True)
    shutil.copy(good, tmp_path / "good" / "1" / "model.onnx")
    (tmp_path / "good" / "2" / "model.onnx").write_bytes(b"broken")
    (tmp_path / "bad" / "1").mkdir(parents=True)
    (tmp_path / "bad" / "1" / "model.onnx").write_bytes(b"also broken")
    with (
        serve_in_thread(create_app(CloudSettings(repo=tmp_path))) as url,
        httpx.Client(base_url=url) as http,
    ):
        assert http.get("/v2/health/ready").status_code == 503  # "bad" has no loaded version
        bad = http.get("/v2/models/bad/ready")
        assert bad.status_code == 503 and "cannot load" in bad.json()["reason"]
        assert (
            http.post("/v2/models/bad/infer", json=infer_body(np.zeros((1, 64)))).status_code == 503
        )
        assert http.get("/v2/models/good/versions/2/ready").status_code == 503
        # the unversioned route serves the newest version that loaded
        r = http.post("/v2/models/good/infer", json=infer_body(np.zeros((1, 64))))
        assert r.status_code == 200 and r.json()["model_version"] == "1"


def _chunks(body: bytes, size: int = 1024) -> Iterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


def test_json_is_limited_binary_is_not() -> None:
    """``max_json_bytes`` bounds what parsing can amplify: the whole of a JSON body, however
    it comes (declared, chunked, gzipped), and the header of a binary one; the binary data
    itself is only held to ``max_body_bytes``."""
    app = create_app(CloudSettings(repo=CLOUD_REPO, max_json_bytes=4000, repo_poll_s=0))
    x = np.zeros((16, 64), np.float32)
    text = json.dumps(infer_body(x)).encode()
    assert len(text) > 4000
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        for content, headers in [
            (text, {}),
            (_chunks(text), {}),
            (gzip.compress(text), {"Content-Encoding": "gzip"}),
            (_chunks(gzip.compress(text), 16), {"Content-Encoding": "gzip"}),
        ]:
            r = http.post(INFER, content=content, headers=headers)
            assert r.status_code == 413 and "binary tensor extension" in r.json()["error"]
        body, headers = encode_request(InferRequest(inputs=[InferTensor.of("input", x)]))
        assert http.post(INFER, content=body, headers=headers).status_code == 200
        r = http.post(INFER, content=body, headers={**headers, HEADER_LENGTH: "4001"})
        assert r.status_code == 413 and "JSON header" in r.json()["error"]


def test_broken_compressed_bodies() -> None:
    body = gzip.compress(json.dumps(infer_body(np.zeros((1, 64), np.float32))).encode())
    with serve_in_thread(create_app(CloudSettings(repo=CLOUD_REPO, repo_poll_s=0))) as url:
        r = httpx.post(url + INFER, content=body[:-12], headers={"Content-Encoding": "gzip"})
        assert r.status_code == 415 and "ends early" in r.json()["error"]
        r = httpx.post(url + INFER, content=b"\x1f\x8bnope", headers={"Content-Encoding": "gzip"})
        assert r.status_code == 415 and "not valid gzip" in r.json()["error"]
        # a binary body inflating past the body limit (it has no JSON limit to meet first)
        small = create_app(CloudSettings(repo=CLOUD_REPO, repo_poll_s=0, max_body_bytes=100_000))
        with serve_in_thread(small) as small_url:
            bomb = gzip.compress(b"{}" + b"\0" * 1_000_000)
            r = httpx.post(
                small_url + INFER,
                content=_chunks(bomb, 100),
                headers={"Content-Encoding": "gzip", HEADER_LENGTH: "2"},
            )
            assert r.status_code == 413 and "decompressed body" in r.json()["error"]


def test_large_bodies_stream_in_and_are_decoded_off_the_event_loop(
    tmp_path: Path, digits: SplitData
) -> None:
    """Bodies past ``LARGE_BODY_BYTES`` take another path (one buffer, decoding and encoding
    in a thread): same answers, in binary and in gzipped JSON sent in small chunks."""
    import onnxruntime as ort

    from shared.oip.http import LARGE_BODY_BYTES

    model = CLOUD_REPO / CLOUD_MODEL / "1" / "model.onnx"
    (tmp_path / "m" / "1").mkdir(parents=True)
    shutil.copy(model, tmp_path / "m" / "1" / "model.onnx")
    (tmp_path / "m" / "config.toml").write_text("max_batch_size = 0\n")  # no request limit
    x = np.tile(digits.test.x, (2000 // len(digits.test.x) + 1, 1))[:2000]
    expected = ort.InferenceSession(str(model)).run(None, {"input": x})[0]
    req = InferRequest(
        inputs=[InferTensor.of("input", x)],
        outputs=[RequestedOutput("probabilities", binary_data=True)],
    )
    body, headers = encode_request(req)
    text = json.dumps(infer_body(x)).encode()
    assert len(body) > LARGE_BODY_BYTES and len(text) > LARGE_BODY_BYTES  # inflated
    text = gzip.compress(text)
    with serve_in_thread(create_app(CloudSettings(repo=tmp_path, repo_poll_s=0))) as url:
        r = httpx.post(f"{url}/v2/models/m/infer", content=body, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        got = decode_response(r.content, parse_header_length(r.headers))
        np.testing.assert_allclose(got.output("probabilities").data, expected, rtol=1e-5)
        r = httpx.post(
            f"{url}/v2/models/m/infer",
            content=_chunks(text, 4096),
            headers={"Content-Encoding": "gzip"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        probs = np.array(r.json()["outputs"][0]["data"]).reshape(2000, 10)
        np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("body", "headers", "needle"),
    [
        (
            json.dumps(
                {"inputs": [{"name": "input", "shape": [1] * 33, "datatype": "FP32", "data": [0]}]}
            ).encode(),
            {},
            "33 dimensions",
        ),
        (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, "nested too deeply"),
        (
            b'{"id": "\\ud800", "inputs": [{"name": "input", "shape": [1, 1], "datatype": "FP32",'
            b' "data": [NaN]}]}',
            {},
            "surrogate",
        ),
        (
            json.dumps(infer_body(np.full((1, 64), 1e300))).replace("FP32", "FP16").encode(),
            {},
            "range",
        ),
        (b"{}", {HEADER_LENGTH: "-1"}, "outside the body"),
        (b"{}", {HEADER_LENGTH: "9" * 5000}, "must be an integer"),
    ],
)
def test_client_mistakes_that_were_500s(
    http: httpx.Client, body: bytes, headers: dict[str, str], needle: str
) -> None:
    r = http.post(INFER, content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]
