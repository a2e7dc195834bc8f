"""The agent's local OIP endpoint on real uvicorn, with the real TFLite model and cloud."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from agent import Agent, AgentSettings
from agent.server import AgentDataPlane, create_app
from cloud.app import create_app as cloud_app
from cloud.pipeline.data import SplitData
from cloud.settings import CloudSettings
from shared.errors import ModelNotFoundError
from tests.helpers import CLOUD_REPO, EDGE_INT8, serve_in_thread


@pytest.fixture(scope="module")
def agent_url(cloud_url: str) -> Iterator[str]:
    settings = AgentSettings(model_dir=EDGE_INT8, cloud={"url": cloud_url})
    with Agent(settings) as agent, serve_in_thread(create_app(agent)) as url:
        yield url


@pytest.fixture
def http(agent_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=agent_url) as client:
        yield client


def tensor(x: np.ndarray, name: str = "input", datatype: str = "FP32") -> dict[str, object]:
    return {"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}


def body(x: np.ndarray, **params: object) -> dict[str, object]:
    doc: dict[str, object] = {"inputs": [tensor(x)]}
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


def test_single_row_carries_the_result_as_parameters(http: httpx.Client, digits: SplitData) -> None:
    r = http.post("/v2/models/digits/infer", json=body(digits.test.x[:1], mode="edge"))
    assert r.status_code == 200, r.text
    doc = r.json()
    p = doc["parameters"]
    assert p["source"] == "edge" and p["reason"] == "forced_edge"
    assert p["label"] == str(digits.test.y[0]) and p["edge_model"] == "digits:1"
    assert p["latency_total_ms"] >= p["latency_local_ms"] > 0
    outputs = {o["name"]: o["data"] for o in doc["outputs"]}
    assert outputs["source"] == ["edge"] and len(outputs["probabilities"]) == 10


def test_cloud_mode_and_batches(http: httpx.Client, digits: SplitData) -> None:
    r = http.post(
        "/v2/models/digits/infer", json=body(digits.test.x[:5], mode="cloud", deadline_ms=2000)
    )
    doc = r.json()
    assert r.status_code == 200 and doc["parameters"]["escalated"] == 5
    outputs = {o["name"]: o["data"] for o in doc["outputs"]}
    assert outputs["source"] == ["cloud"] * 5
    assert outputs["label"] == [str(y) for y in digits.test.y[:5]]


def test_requested_outputs_only(http: httpx.Client, digits: SplitData) -> None:
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
            "must be FP32",
        ),
        # the input is checked as tandem-cloud and Triton check theirs
        (
            "/v2/models/digits/infer",
            {"inputs": [tensor(np.zeros((1, 64)), name="pixels")]},
            400,
            "no input 'pixels'",
        ),
        (
            "/v2/models/digits/infer",
            {"inputs": [tensor(np.zeros((1, 64), np.int32), datatype="INT32")]},
            400,
            "must be FP32, got INT32",
        ),
        (
            "/v2/models/digits/infer",
            {"inputs": [tensor(np.zeros((1, 64)), datatype="FP64")]},
            400,
            "must be FP32, got FP64",
        ),
        (
            "/v2/models/digits/infer",
            {"inputs": [tensor(np.zeros((1, 64))), tensor(np.zeros((1, 64)), name="extra")]},
            400,
            "exactly one input",
        ),
        (
            "/v2/models/digits/infer",
            body(np.zeros((33, 64)), mode="edge"),
            400,
            "exceeds max_batch_size 32",
        ),
        # a deadline past httpx's range was an OverflowError (500) on the way to the cloud
        (
            "/v2/models/digits/infer",
            body(np.zeros((1, 64)), mode="cloud", deadline_ms=1e13),
            400,
            "deadline",
        ),
        (
            "/v2/models/digits/infer",
            body(np.zeros((2, 64)), mode="cloud", deadline_ms=1e13),
            400,
            "deadline",
        ),
        ("/v2/models/digits/infer", body(np.zeros((1, 64)), deadline_ms=10**400), 400, "deadline"),
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


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e400"])
def test_a_deadline_must_be_a_finite_number(http: httpx.Client, literal: str) -> None:
    doc = body(np.zeros((1, 64)), mode="cloud", deadline_ms=0)
    text = httpx.Request("POST", "/", json=doc).content.decode()
    text = text.replace('"deadline_ms":0', f'"deadline_ms":{literal}')
    assert literal in text
    r = http.post("/v2/models/digits/infer", content=text)
    assert r.status_code == 400, r.text
    assert "deadline_ms" in r.json()["error"]


def test_tritonclient_sees_the_input_checks(agent_url: str) -> None:
    client = triton.InferenceServerClient(urlparse(agent_url).netloc)
    for name, datatype, needle in [("pixels", "FP32", "no input"), ("input", "INT32", "FP32")]:
        inp = triton.InferInput(name, [1, 64], datatype)
        inp.set_data_from_numpy(
            np.zeros((1, 64), dtype="int32" if datatype == "INT32" else "float32")
        )
        with pytest.raises(InferenceServerException, match=needle):
            client.infer("digits", [inp])
    client.close()


def test_model_config_document() -> None:
    """What the config route answers, from the data plane itself (unknown names: 404)."""
    settings = AgentSettings(model_dir=EDGE_INT8, routing={"max_batch_rows": 8})
    with Agent(settings) as agent:
        plane = AgentDataPlane(agent)
        doc = plane.model_config("digits", "1")
        assert (doc["platform"], doc["max_batch_size"]) == ("tensorflowlite", 8)
        assert doc["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [64]}]
        types = [o["data_type"] for o in doc["output"]]
        assert types == ["TYPE_FP32", "TYPE_STRING", "TYPE_FP32", "TYPE_STRING", "TYPE_STRING"]
        with pytest.raises(ModelNotFoundError):
            plane.model_config("other", None)


def test_model_config(http: httpx.Client, agent_url: str) -> None:
    """Triton's model configuration extension, as tritonclient's get_model_config reads it."""
    for path in ("/v2/models/digits/config", "/v2/models/digits/versions/1/config"):
        r = http.get(path)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["name"] == "digits" and doc["platform"] == "tensorflowlite"
        assert doc["max_batch_size"] == 32  # routing.max_batch_rows
        assert doc["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [64]}]
        outputs = {o["name"]: o for o in doc["output"]}
        assert list(outputs) == ["probabilities", "label", "confidence", "source", "reason"]
        assert outputs["probabilities"]["dims"] == [10]
        assert outputs["label"]["data_type"] == "TYPE_STRING"
        assert outputs["confidence"] == {
            "name": "confidence",
            "data_type": "TYPE_FP32",
            "dims": [1],
            "reshape": {"shape": []},
        }
    assert http.get("/v2/models/other/config").status_code == 404
    assert http.get("/v2/models/digits/versions/9/config").status_code == 404
    client = triton.InferenceServerClient(urlparse(agent_url).netloc)
    assert client.get_model_config("digits")["max_batch_size"] == 32
    client.close()


class InferCounter:
    """ASGI wrapper counting the infer requests that reach the app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.infers = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/infer"):
            self.infers += 1
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def batching_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, InferCounter]]:
    """The real cloud, its model allowed batches of 64 rows, counting infer requests."""
    repo = tmp_path_factory.mktemp("batching") / "cloud"
    shutil.copytree(CLOUD_REPO, repo)
    for model in repo.iterdir():
        (model / "config.toml").write_text("max_batch_size = 64\n")
    counter = InferCounter(cloud_app(CloudSettings(repo=repo)))
    with serve_in_thread(counter) as url:
        yield url, counter


def test_a_many_row_request_is_one_cloud_call(
    batching_cloud: tuple[str, InferCounter], digits: SplitData
) -> None:
    cloud_url, counter = batching_cloud
    settings = AgentSettings(
        model_dir=EDGE_INT8, cloud={"url": cloud_url}, routing={"max_batch_rows": 64}
    )
    x = digits.test.x[:50]
    with (
        Agent(settings) as agent,
        serve_in_thread(create_app(agent)) as url,
        httpx.Client(base_url=url) as http,
    ):
        before = counter.infers
        r = http.post("/v2/models/digits/infer", json=body(x, mode="cloud", deadline_ms=5000))
        assert r.status_code == 200, r.text
        assert counter.infers == before + 1
        doc = r.json()
        outputs = {o["name"]: o["data"] for o in doc["outputs"]}
        assert doc["parameters"]["escalated"] == 50 and outputs["source"] == ["cloud"] * 50
        assert outputs["reason"] == ["forced_cloud"] * 50
        assert len(outputs["label"]) == 50 and len(outputs["probabilities"]) == 50 * 10
        accuracy = np.mean([int(label) == y for label, y in zip(outputs["label"], digits.test.y)])
        assert accuracy > 0.9
        # auto: the unsure rows, in one request too
        before = counter.infers
        r = http.post("/v2/models/digits/infer", json=body(x, mode="auto", deadline_ms=5000))
        reasons = {o["name"]: o["data"] for o in r.json()["outputs"]}["reason"]
        assert counter.infers == before + (1 if "low_confidence" in reasons else 0)
        assert set(reasons) <= {"confident", "low_confidence"}
