"""The cloud server under a fleet's load, on real uvicorn and ONNX Runtime: dynamic batching,
backpressure, live versions, unbatched models, auth, fuzzed requests."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from pydantic import SecretStr

from cloud.app import create_app
from cloud.pipeline.data import SplitData
from cloud.settings import CloudSettings
from tests.fleet import wait_for
from tests.helpers import CLOUD_MODEL, CLOUD_REPO, infer_body, serve_in_thread
from tests.prometheus import sample

MODEL = CLOUD_REPO / CLOUD_MODEL / "1" / "model.onnx"


def repo_with(tmp: Path, config: str = "", versions: tuple[int, ...] = (1,)) -> Path:
    repo = tmp / "repo"
    for v in versions:
        (repo / "m" / str(v)).mkdir(parents=True)
        shutil.copy(MODEL, repo / "m" / str(v) / "model.onnx")
    if config:
        (repo / "m" / "config.toml").write_text(config)
    return repo


def test_concurrent_requests_are_merged_and_answered_in_order(
    tmp_path: Path, digits: SplitData
) -> None:
    import onnxruntime as ort

    # requests from 12 threads arrive over milliseconds: the batch waits its delay out
    repo = repo_with(
        tmp_path, "max_batch_size = 16\nmax_queue_delay_us = 50000\nclose_when_quiet = false\n"
    )
    reference = ort.InferenceSession(str(MODEL)).run(None, {"input": digits.test.x[:24]})[0]
    with serve_in_thread(create_app(CloudSettings(repo=repo, repo_poll_s=0))) as url:

        def one(i: int) -> np.ndarray:
            x = digits.test.x[i : i + 1 + i % 2]  # batches of 1 and 2 rows
            r = httpx.post(f"{url}/v2/models/m/infer", json=infer_body(x), timeout=10)
            assert r.status_code == 200, r.text
            return np.array(r.json()["outputs"][0]["data"]).reshape(len(x), 10)

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(12)))
        metrics = httpx.get(f"{url}/metrics").text
    for i, probs in enumerate(results):
        np.testing.assert_allclose(probs, reference[i : i + 1 + i % 2], rtol=1e-5, atol=1e-6)
    # fewer runs than requests: they were merged
    runs = sample(metrics, "tandem_batch_size_count", model="m", version="1")
    assert runs is not None and runs < 12
    served = sample(
        metrics, "tandem_inference_requests_total", model="m", version="1", status="200"
    )
    assert served == 12


def test_full_queue_answers_503_with_retry_after(tmp_path: Path, digits: SplitData) -> None:
    # a batch waits up to 1 s for company it can never get (the queue holds 3, a batch 8):
    # the queue stays full for that second however fast the model is
    repo = repo_with(
        tmp_path,
        "max_batch_size = 8\nmax_queue_delay_us = 1000000\nmax_queue_size = 3\n"
        "close_when_quiet = false\n",
    )
    app = create_app(CloudSettings(repo=repo, repo_poll_s=0))
    batcher = app.state.plane.repository.batcher("m", None)
    deepest = 0
    done = threading.Event()

    def watch() -> None:  # what the server holds, sampled while the flood lasts
        nonlocal deepest
        while not done.is_set():
            deepest = max(deepest, batcher.depth)
            time.sleep(0.001)

    with serve_in_thread(app) as url:

        def one(_: int) -> httpx.Response:
            return httpx.post(
                f"{url}/v2/models/m/infer", json=infer_body(digits.test.x[:1]), timeout=20
            )

        watcher = threading.Thread(target=watch)
        watcher.start()
        with ThreadPoolExecutor(48) as pool:
            replies = list(pool.map(one, range(96)))
        done.set()
        watcher.join()
    codes = sorted(r.status_code for r in replies)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}
    busy = next(r for r in replies if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "waiting" in busy.json()["error"]
    # 96 requests, 48 at a time, and never more than the queue's 3 held: memory is bounded
    assert 1 <= deepest <= 3


def test_request_queued_past_its_timeout_gets_503(tmp_path: Path, digits: SplitData) -> None:
    # the batch would wait 3 s for company; the request may wait 0.2 s
    repo = repo_with(
        tmp_path,
        "max_batch_size = 8\nmax_queue_delay_us = 3000000\ntimeout_ms = 200\n"
        "close_when_quiet = false\n",
    )
    with serve_in_thread(create_app(CloudSettings(repo=repo, repo_poll_s=0))) as url:
        start = time.monotonic()
        r = httpx.post(f"{url}/v2/models/m/infer", json=infer_body(digits.test.x[:1]), timeout=10)
        took = time.monotonic() - start
    assert r.status_code == 503 and "waited more than 200 ms" in r.json()["error"]
    assert r.headers["retry-after"] == "1" and took < 2.0


def test_lone_request_does_not_wait_out_the_delay(tmp_path: Path, digits: SplitData) -> None:
    # a 5 s delay is an upper bound: with nobody else coming the batch closes at once
    repo = repo_with(tmp_path, "max_batch_size = 8\nmax_queue_delay_us = 5000000\n")
    with serve_in_thread(create_app(CloudSettings(repo=repo, repo_poll_s=0))) as url:
        start = time.monotonic()
        r = httpx.post(f"{url}/v2/models/m/infer", json=infer_body(digits.test.x[:1]), timeout=10)
        took = time.monotonic() - start
    assert r.status_code == 200, r.text
    assert took < 2.5


def test_requests_arriving_together_share_one_run_when_closing_on_quiet(
    tmp_path: Path, digits: SplitData
) -> None:
    import asyncio

    import onnxruntime as ort

    from cloud.serving.batcher import Batcher
    from cloud.serving.config import ModelConfig
    from cloud.serving.metrics import ServerMetrics
    from cloud.serving.model import OnnxModel
    from cloud.settings import OrtSettings
    from shared.oip.types import InferRequest, InferTensor

    model = OnnxModel("m", "1", MODEL, OrtSettings())
    metrics = ServerMetrics()
    batcher = Batcher(model, ModelConfig(max_batch_size=16, max_queue_delay_us=5_000_000), metrics)
    x = digits.test.x[:10]

    async def burst() -> list[np.ndarray]:
        replies = await asyncio.gather(
            *(
                batcher.infer(InferRequest(inputs=[InferTensor.of("input", x[i : i + 1])]))
                for i in range(10)
            )
        )
        return [r.outputs[0].data for r in replies]

    start = time.monotonic()
    results = asyncio.run(burst())
    took = time.monotonic() - start
    reference = ort.InferenceSession(str(MODEL)).run(None, {"input": x})[0]
    np.testing.assert_allclose(np.concatenate(results), reference, rtol=1e-5, atol=1e-6)
    assert metrics.sample("tandem_batch_size_count", model="m", version="1") == 1  # one run
    assert took < 2.5  # closed on quiet, not after the 5 s delay


def test_versions_added_and_removed_while_requests_run(tmp_path: Path, digits: SplitData) -> None:
    repo = repo_with(tmp_path)
    failures: list[str] = []
    answers: list[str] = []  # the version of each answer, in order
    stop = threading.Event()
    with serve_in_thread(create_app(CloudSettings(repo=repo, repo_poll_s=0.1))) as url:

        def drive() -> None:
            with httpx.Client(base_url=url) as http:
                while not stop.is_set():
                    r = http.post("/v2/models/m/infer", json=infer_body(digits.test.x[:1]))
                    if r.status_code != 200:
                        failures.append(r.text)
                    else:
                        answers.append(r.json()["model_version"])

        def versions() -> list[str]:
            return list(httpx.get(f"{url}/v2/models/m").json()["versions"])

        threads = [threading.Thread(target=drive) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: "1" in answers, what="answers from version 1")
            (repo / "m" / "2").mkdir()
            shutil.copy(MODEL, repo / "m" / "2" / "model.onnx")
            wait_for(lambda: "2" in answers, what="answers from version 2, once rescanned")
            shutil.rmtree(repo / "m" / "1")
            wait_for(lambda: versions() == ["2"], what="version 1 unloaded by a rescan")
            served = len(answers)
            wait_for(lambda: len(answers) > served + 10, what="answers after the unload")
            meta = httpx.get(f"{url}/v2/models/m").json()
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert meta["versions"] == ["2"]
        assert httpx.get(f"{url}/v2/models/m/versions/1/ready").status_code == 404
        # the repository extension: unload and load again
        assert httpx.post(f"{url}/v2/repository/models/m/unload").status_code == 200
        assert httpx.get(f"{url}/v2/models/m/ready").status_code == 404
        index = httpx.post(f"{url}/v2/repository/index").json()
        assert index == [{"name": "m", "state": "UNAVAILABLE", "reason": "unloaded"}]
        assert httpx.post(f"{url}/v2/repository/models/m/load").status_code == 200
        assert httpx.get(f"{url}/v2/models/m/ready").status_code == 200
    assert failures == [] and set(answers) == {"1", "2"}


def test_version_policy_latest(tmp_path: Path) -> None:
    repo = repo_with(tmp_path, "versions = {latest = 1}\n", versions=(1, 2, 3))
    with serve_in_thread(create_app(CloudSettings(repo=repo, repo_poll_s=0))) as url:
        assert httpx.get(f"{url}/v2/models/m").json()["versions"] == ["3"]
    bad = repo_with(tmp_path / "b", "max_batch_size = -1\n")
    with serve_in_thread(create_app(CloudSettings(repo=bad, repo_poll_s=0))) as url:
        ready = httpx.get(f"{url}/v2/models/m/ready")
        assert ready.status_code == 503 and "config.toml" in ready.json()["reason"]


def test_requests_for_different_outputs_are_batched_apart(tmp_path: Path) -> None:
    import asyncio

    from cloud.serving.batcher import Batcher
    from cloud.serving.config import ModelConfig
    from cloud.serving.metrics import ServerMetrics
    from cloud.serving.model import OnnxModel
    from cloud.settings import OrtSettings
    from shared.oip.types import InferRequest, InferTensor, RequestedOutput

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["pos"]), helper.make_node("Neg", ["x"], ["neg"])],
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [
            helper.make_tensor_value_info("pos", TensorProto.FLOAT, ["b", 4]),
            helper.make_tensor_value_info("neg", TensorProto.FLOAT, ["b", 4]),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, str(tmp_path / "two.onnx"))
    metrics = ServerMetrics()
    config = ModelConfig(max_batch_size=64, max_queue_delay_us=5_000_000)
    batcher = Batcher(OnnxModel("two", "1", tmp_path / "two.onnx", OrtSettings()), config, metrics)
    kinds = [["pos"], ["neg"], ["neg", "pos"]]
    xs = [np.full((1 + i % 2, 4), i - 4.5, np.float32) for i in range(9)]

    async def burst() -> list[dict[str, np.ndarray]]:
        replies = await asyncio.gather(
            *(
                batcher.infer(
                    InferRequest(
                        inputs=[InferTensor.of("x", x)],
                        outputs=[RequestedOutput(n) for n in kinds[i % 3]],
                    )
                )
                for i, x in enumerate(xs)
            )
        )
        return [{t.name: t.data for t in r.outputs} for r in replies]

    results = asyncio.run(burst())
    for i, (x, got) in enumerate(zip(xs, results, strict=True)):
        assert sorted(got) == sorted(kinds[i % 3])  # only what was asked, each its own rows
        if "pos" in got:
            np.testing.assert_array_equal(got["pos"], np.maximum(x, 0))
        if "neg" in got:
            np.testing.assert_array_equal(got["neg"], -x)
    # one run per kind of request: merged within a kind, never across
    assert metrics.sample("tandem_batch_size_count", model="two", version="1") == 3


def test_model_without_a_batch_dimension_is_served_unbatched(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    (tmp_path / "repo" / "fixed" / "1").mkdir(parents=True)
    onnx.save(proto, str(tmp_path / "repo" / "fixed" / "1" / "model.onnx"))
    with serve_in_thread(create_app(CloudSettings(repo=tmp_path / "repo", repo_poll_s=0))) as url:
        doc = {
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [-1, 2, -3, 4]}]
        }
        with ThreadPoolExecutor(6) as pool:
            replies = list(
                pool.map(lambda _: httpx.post(f"{url}/v2/models/fixed/infer", json=doc), range(6))
            )
        assert all(r.json()["outputs"][0]["data"] == [0, 2, 0, 4] for r in replies)
        wrong = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [0] * 8}]}
        assert httpx.post(f"{url}/v2/models/fixed/infer", json=wrong).status_code == 400


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[str]:
    settings = CloudSettings(
        repo=repo_with(tmp_path), repo_poll_s=0, tokens=[SecretStr("alpha"), SecretStr("beta")]
    )
    with serve_in_thread(create_app(settings)) as url:
        yield url


def test_bearer_tokens(secured: str, digits: SplitData, caplog: pytest.LogCaptureFixture) -> None:
    infer = f"{secured}/v2/models/m/infer"
    assert httpx.get(f"{secured}/v2/health/ready").status_code == 200  # open
    assert httpx.get(f"{secured}/metrics").status_code == 200  # open
    r = httpx.post(infer, json=infer_body(digits.test.x[:1]))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert (
        httpx.post(
            infer, json=infer_body(digits.test.x[:1]), headers={"Authorization": "Bearer gamma"}
        ).status_code
        == 401
    )
    for token in ("alpha", "beta"):
        assert (
            httpx.post(
                infer,
                json=infer_body(digits.test.x[:1]),
                headers={"Authorization": f"Bearer {token}"},
            ).status_code
            == 200
        )
    assert httpx.get(f"{secured}/v2/models/m").status_code == 401
    assert "alpha" not in caplog.text and "beta" not in caplog.text


def test_agent_uses_its_token(secured: str, digits: SplitData) -> None:
    from agent import Agent, AgentSettings
    from tests.helpers import EDGE_INT8

    good = AgentSettings(
        model_dir=EDGE_INT8, cloud={"url": secured, "token": "beta", "model": "m", "version": "1"}
    )
    with Agent(good) as agent:
        assert agent.infer(digits.test.x[0], mode="cloud").source == "cloud"
    bad = good.model_copy(
        update={"cloud": good.cloud.model_copy(update={"token": SecretStr("wrong")})}
    )
    with Agent(bad) as agent:
        r = agent.infer(digits.test.x[0], mode="cloud")
        assert (r.source, r.reason) == ("edge", "cloud_error")


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["input", "x", ""]) | JSON,
        "shape": st.lists(st.integers(-2, 70), max_size=3) | JSON,
        "datatype": st.sampled_from(["FP32", "INT64", "BYTES", "BOOL", "FP16", "nope"]) | JSON,
        "data": st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), max_size=70)
        | JSON,
        "parameters": JSON,
    },
)


@pytest.fixture(scope="module")
def plain_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    repo = repo_with(tmp_path_factory.mktemp("fuzz"))
    with serve_in_thread(create_app(CloudSettings(repo=repo, repo_poll_s=0))) as url:
        yield url


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    doc=st.fixed_dictionaries(
        {},
        optional={
            "inputs": st.lists(FIELDS, max_size=2) | JSON,
            "outputs": JSON,
            "id": JSON,
            "parameters": JSON,
        },
    )
)
def test_fuzzed_requests_never_get_a_5xx(plain_url: str, doc: dict[str, object]) -> None:
    r = httpx.post(f"{plain_url}/v2/models/m/infer", json=doc, timeout=10)
    assert r.status_code < 500, r.text
    assert "error" in r.json() if r.status_code != 200 else True


def test_model_configuration_follows_config_toml(tmp_path: Path) -> None:
    """``config.toml`` as Triton's configuration says it, and ``max_batch_size`` enforced as
    Triton enforces it: 1 refuses two rows; 0 is a model without a batch dimension, its dims
    whole, no request refused for its size."""
    one = repo_with(
        tmp_path / "a", "max_batch_size = 1\nversions = {latest = 2}\ninstances = 2\n", (1, 2, 3)
    )
    none = repo_with(tmp_path / "b", "max_batch_size = 0\n")
    with serve_in_thread(create_app(CloudSettings(repo=one, repo_poll_s=0))) as url:
        config = httpx.get(f"{url}/v2/models/m/config").json()
        assert config["max_batch_size"] == 1 and "dynamic_batching" not in config
        assert config["version_policy"] == {"latest": {"num_versions": 2}}
        assert config["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
        assert httpx.get(f"{url}/v2/models/m/versions/2/config").json()["name"] == "m"
        assert httpx.get(f"{url}/v2/models/m/versions/1/config").status_code == 404
        r = httpx.post(f"{url}/v2/models/m/infer", json=infer_body(np.zeros((2, 64))))
        assert r.status_code == 400
        assert r.json()["error"] == "inference request batch-size must be <= 1 for 'm'"
        r = httpx.post(f"{url}/v2/models/m/infer", json=infer_body(np.zeros((1, 64))))
        assert r.status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        refused = dict(model="m", version="3", status="400")
        assert sample(metrics, "tandem_inference_requests_total", **refused) == 1
    with serve_in_thread(create_app(CloudSettings(repo=none, repo_poll_s=0))) as url:
        config = httpx.get(f"{url}/v2/models/m/config").json()
        assert config["max_batch_size"] == 0
        assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [-1, 64]}]
        r = httpx.post(f"{url}/v2/models/m/infer", json=infer_body(np.zeros((100, 64))))
        assert r.status_code == 200


def test_names_clients_make_up_are_not_kept_as_metric_labels(tmp_path: Path) -> None:
    """A 404 is counted without the model or version the client named (every label value is
    kept for the life of the process: a client could grow it without bound)."""
    repo = repo_with(tmp_path)
    with serve_in_thread(create_app(CloudSettings(repo=repo, repo_poll_s=0))) as url:
        for i in range(3):
            r = httpx.post(f"{url}/v2/models/made-up-{i}/infer", json=infer_body(np.zeros((1, 64))))
            assert r.status_code == 404
        r = httpx.post(f"{url}/v2/models/m/versions/77/infer", json=infer_body(np.zeros((1, 64))))
        assert r.status_code == 404
        metrics = httpx.get(f"{url}/metrics").text
    requests = "tandem_inference_requests_total"
    assert sample(metrics, requests, model="", version="", status="404") == 3
    assert sample(metrics, requests, model="m", version="", status="404") == 1
    assert "made-up" not in metrics and 'version="77"' not in metrics
