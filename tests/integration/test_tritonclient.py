"""The official tritonclient[http] against both servers, JSON and binary in every combination."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from agent import Agent, AgentSettings
from agent.server import create_app
from cloud.app import create_app as cloud_app
from cloud.pipeline.data import SplitData
from cloud.settings import CloudSettings
from tests.helpers import CLOUD_MODEL, EDGE_INT8, serve_in_thread

COMBOS = [(bi, bo) for bi in (False, True) for bo in (False, True)]


def _client(url: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(urlparse(url).netloc)


@pytest.fixture(scope="module")
def agent_url() -> Iterator[str]:
    with (
        Agent(AgentSettings(model_dir=EDGE_INT8)) as agent,
        serve_in_thread(create_app(agent)) as url,
    ):
        yield url


@pytest.mark.parametrize(("binary_in", "binary_out"), COMBOS)
def test_cloud_with_tritonclient(
    cloud_url: str, digits: SplitData, binary_in: bool, binary_out: bool
) -> None:
    client = _client(cloud_url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(CLOUD_MODEL)
    meta = client.get_model_metadata(CLOUD_MODEL)
    assert meta["inputs"][0]["name"] == "input"
    x = digits.test.x[:32]
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    out = triton.InferRequestedOutput("probabilities", binary_data=binary_out)
    result = client.infer(CLOUD_MODEL, [inp], outputs=[out], request_id="t-1", model_version="1")
    probs = result.as_numpy("probabilities")
    assert probs.shape == (32, 10) and result.get_response()["id"] == "t-1"
    assert (probs.argmax(1) == digits.test.y[:32]).mean() > 0.95
    client.close()


@pytest.mark.parametrize(("binary_in", "binary_out"), COMBOS)
def test_agent_with_tritonclient(
    agent_url: str, digits: SplitData, binary_in: bool, binary_out: bool
) -> None:
    client = _client(agent_url)
    assert client.is_model_ready("digits")
    x = digits.test.x[:4]
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    outs = [
        triton.InferRequestedOutput(n, binary_data=binary_out)
        for n in ("label", "source", "probabilities")
    ]
    result = client.infer("digits", [inp], outputs=outs)

    def text(values: np.ndarray) -> list[str]:  # JSON BYTES come back as str, binary as bytes
        return [v.decode() if isinstance(v, bytes) else v for v in values]

    labels = text(result.as_numpy("label"))
    assert len(labels) == 4 and set(text(result.as_numpy("source"))) == {"edge"}
    assert result.as_numpy("probabilities").shape == (4, 10)
    client.close()


def test_model_configuration_with_tritonclient(cloud_url: str, agent_url: str) -> None:
    """Triton's model configuration extension, as tritonclient reads it: the cloud's
    config.toml defaults as config.pbtxt would say them, dims without the batch dimension."""
    client = _client(cloud_url)
    config = client.get_model_config(CLOUD_MODEL)
    assert config == client.get_model_config(CLOUD_MODEL, model_version="1")
    assert (config["name"], config["platform"], config["backend"]) == (
        CLOUD_MODEL,
        "onnxruntime_onnx",
        "onnxruntime",
    )
    assert config["max_batch_size"] == 32
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [64]}]
    assert config["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [10]}]
    batching = config["dynamic_batching"]
    assert batching["max_queue_delay_microseconds"] == 500
    assert batching["default_queue_policy"]["max_queue_size"] == 256
    assert batching["default_queue_policy"]["default_timeout_microseconds"] == 5_000_000
    assert config["instance_group"] == [{"count": 1, "kind": "KIND_CPU"}]
    assert config["version_policy"] == {"all": {}}
    assert "model_configuration" in client.get_server_metadata()["extensions"]
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_config("nope")
    client.close()
    agent = _client(agent_url)
    edge = agent.get_model_config("digits")
    assert edge["input"][0]["dims"] == [64] and edge["max_batch_size"] > 0
    agent.close()


def test_max_batch_size_refuses_a_larger_request_as_triton_does(cloud_url: str) -> None:
    client = _client(cloud_url)
    for rows in (32, 33):
        inp = triton.InferInput("input", [rows, 64], "FP32")
        inp.set_data_from_numpy(np.zeros((rows, 64), np.float32), binary_data=True)
        if rows == 32:
            assert client.infer(CLOUD_MODEL, [inp]).as_numpy("probabilities").shape == (32, 10)
        else:
            with pytest.raises(InferenceServerException, match="batch-size must be <= 32"):
                client.infer(CLOUD_MODEL, [inp])
    client.close()


def test_tritonclient_sees_errors(cloud_url: str) -> None:
    client = _client(cloud_url)
    inp = triton.InferInput("input", [1, 5], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 5), np.float32))
    with pytest.raises(InferenceServerException, match="shape"):
        client.infer(CLOUD_MODEL, [inp])
    assert not client.is_model_ready("nope")
    client.close()


def _string_model(path: Path) -> None:
    """A model of strings: ``words`` (a batch of rows of two words), echoed as ``same`` and
    with the words swapped as ``swapped``; batchable, so BYTES rows are merged too."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["words"], ["same"]),
            helper.make_node("Gather", ["words", "order"], ["swapped"], axis=1),
        ],
        "strings",
        [helper.make_tensor_value_info("words", TensorProto.STRING, ["b", 2])],
        [
            helper.make_tensor_value_info("same", TensorProto.STRING, ["b", 2]),
            helper.make_tensor_value_info("swapped", TensorProto.STRING, ["b", 2]),
        ],
        [helper.make_tensor("order", TensorProto.INT64, [2], [1, 0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))


@pytest.mark.parametrize(("binary_in", "binary_out"), COMBOS)
def test_cloud_serves_bytes_tensors(tmp_path: Path, binary_in: bool, binary_out: bool) -> None:
    _string_model(tmp_path / "repo" / "words" / "1" / "model.onnx")
    (tmp_path / "repo" / "words" / "config.toml").write_text(
        # the window is a real wait: a quiet queue would close the batch at once
        "max_queue_delay_us = 20000\nclose_when_quiet = false\n"
    )
    app = cloud_app(CloudSettings(repo=tmp_path / "repo", repo_poll_s=0))
    with serve_in_thread(app) as url:
        meta = _client(url).get_model_metadata("words")
        assert meta["inputs"][0]["datatype"] == "BYTES"

        def one(i: int) -> list[list[str]]:
            client = _client(url)
            words = np.array([[f"tandem-{i}", "héllo"]], dtype=object)
            inp = triton.InferInput("words", [1, 2], "BYTES")
            inp.set_data_from_numpy(words, binary_data=binary_in)
            out = triton.InferRequestedOutput("swapped", binary_data=binary_out)
            result = client.infer("words", [inp], outputs=[out])
            swapped = result.as_numpy("swapped")
            assert result.get_output("same") is None  # requested outputs only
            client.close()
            return [[v.decode() if isinstance(v, bytes) else v for v in row] for row in swapped]

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(16)))
    assert answers == [[["héllo", f"tandem-{i}"]] for i in range(16)]
    metrics = app.state.plane.repository.metrics
    assert metrics.sample("tandem_batch_size_count", model="words", version="1") < 16  # merged
