"""The agent's local OIP endpoint on real uvicorn, with the real TFLite model and cloud."""

from __future__ import annotations

from collections.abc import Iterator

import dataset
import httpx
import numpy as np
import pytest

from agent import Agent, AgentSettings
from agent.server import create_app
from tests.helpers import EDGE_INT8, serve_in_thread


@pytest.fixture(scope="module")
def agent_url(cloud_url: str) -> Iterator[str]:
    settings = AgentSettings(model_dir=EDGE_INT8, cloud={"url": cloud_url})
    with Agent(settings) as agent, serve_in_thread(create_app(agent)) as url:
        yield url


@pytest.fixture
def http(agent_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=agent_url) as client:
        yield client


def body(x: np.ndarray, **params: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    if params:
        doc["parameters"] = params
    return doc


def test_metadata(http: httpx.Client) -> None:
    assert http.get("/v2").json()["name"] == "tandem-agent"
    meta = http.get("/v2/models/digits").json()
    assert meta["inputs"][0]["shape"] == [-1, 64]
    assert [o["name"] for o in meta["outputs"]] == [
        "probabilities",
        "label",
        "confidence",
        "source",
        "reason",
    ]
    assert http.get("/v2/models/digits/versions/1/ready").status_code == 200


def test_single_row_carries_the_result_as_parameters(
    http: httpx.Client, digits: dataset.Digits
) -> None:
    r = http.post("/v2/models/digits/infer", json=body(digits.test.x[:1], mode="edge"))
    assert r.status_code == 200, r.text
    doc = r.json()
    p = doc["parameters"]
    assert p["source"] == "edge" and p["reason"] == "forced_edge"
    assert p["label"] == str(digits.test.y[0]) and p["edge_model"] == "digits:1"
    assert p["latency_total_ms"] >= p["latency_local_ms"] > 0
    outputs = {o["name"]: o["data"] for o in doc["outputs"]}
    assert outputs["source"] == ["edge"] and len(outputs["probabilities"]) == 10


def test_cloud_mode_and_batches(http: httpx.Client, digits: dataset.Digits) -> None:
    r = http.post(
        "/v2/models/digits/infer", json=body(digits.test.x[:5], mode="cloud", deadline_ms=2000)
    )
    doc = r.json()
    assert r.status_code == 200 and doc["parameters"]["escalated"] == 5
    outputs = {o["name"]: o["data"] for o in doc["outputs"]}
    assert outputs["source"] == ["cloud"] * 5
    assert outputs["label"] == [str(y) for y in digits.test.y[:5]]


def test_requested_outputs_only(http: httpx.Client, digits: dataset.Digits) -> None:
    doc = body(digits.test.x[:2])
    doc["outputs"] = [{"name": "label"}]
    r = http.post("/v2/models/digits/infer", json=doc)
    assert [o["name"] for o in r.json()["outputs"]] == ["label"]


@pytest.mark.parametrize(
    ("path", "doc", "status", "needle"),
    [
        ("/v2/models/other/infer", body(np.zeros((1, 64))), 404, "unknown model"),
        ("/v2/models/digits/versions/3/infer", body(np.zeros((1, 64))), 404, "no version"),
        ("/v2/models/digits/infer", body(np.zeros((1, 10))), 400, "shape"),
        ("/v2/models/digits/infer", body(np.zeros((1, 64)), mode="fast"), 400, "mode"),
        ("/v2/models/digits/infer", body(np.zeros((1, 64)), deadline_ms=-1), 400, "deadline"),
        ("/v2/models/digits/infer", body(np.zeros((1, 64)), deadline_ms="x"), 400, "deadline"),
        (
            "/v2/models/digits/infer",
            {"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": ["a"]}]},
            400,
            "numeric",
        ),
        (
            "/v2/models/digits/infer",
            {**body(np.zeros((1, 64))), "outputs": [{"name": "x"}]},
            400,
            "unknown outputs",
        ),
    ],
)
def test_bad_requests(http: httpx.Client, path: str, doc: object, status: int, needle: str) -> None:
    r = http.post(path, json=doc)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_nan_input_is_refused(http: httpx.Client) -> None:
    nan_body = (
        '{"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [NaN, 1]}]}'
    )
    nan_body = nan_body.replace("[1, 2]", "[1, 64]").replace("[NaN, 1]", str(["NaN"] * 64))
    r = http.post("/v2/models/digits/infer", content=nan_body.replace("'", ""))
    assert r.status_code == 400 and "NaN" in r.json()["error"]
