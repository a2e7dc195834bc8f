"""The cloud client on a scripted OIP server: binary or JSON by the server's extensions, and
4xx answers as refusals."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest

from agent.errors import CloudRefusedError, CloudUnavailableError
from shared.manifest import CloudTarget
from tests.fakes import ScriptedCloud

TARGET = CloudTarget(model="toy-cloud", version="7")
X = np.zeros((2, 4), np.float32)


def sent_binary(cloud: ScriptedCloud, client_options: dict[str, object]) -> list[bool]:
    """Whether each of two infer requests went as binary tensors."""
    seen: list[bool] = []
    handler = cloud.handler

    def spy(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/infer"):
            seen.append("inference-header-content-length" in request.headers)
        return handler(request)

    cloud.handler = spy  # type: ignore[method-assign]
    client = cloud.client(**client_options)
    try:
        if client_options.get("binary") == "auto":
            assert client.probed.wait(5)
        for _ in range(2):
            assert client.infer(X, TARGET, 1.0).output.shape == (2, 3)
    finally:
        client.close()
    return seen


@pytest.mark.parametrize(
    ("extensions", "binary", "expected"),
    [
        (["binary_tensor_data"], "auto", [True, True]),
        (["model_repository"], "auto", [False, False]),  # MLServer, some KServe runtimes
        ([], "auto", [False, False]),
        (None, "auto", [False, False]),  # no GET /v2 at all (404)
        ([], True, [True, True]),  # forced
        (["binary_tensor_data"], False, [False, False]),
    ],
)
def test_binary_follows_the_servers_extensions(
    extensions: list[str] | None, binary: object, expected: list[bool]
) -> None:
    cloud = ScriptedCloud()
    cloud.extensions = extensions
    assert sent_binary(cloud, {"binary": binary}) == expected


def test_json_until_an_unreachable_cloud_answers() -> None:
    """The client starts with no network: JSON while the probe retries, binary once the
    server says it can."""
    cloud = ScriptedCloud()
    cloud.extensions = ["binary_tensor_data"]
    down = threading.Event()
    down.set()
    attempts = []
    answer = cloud.handler

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2":
            attempts.append(1)
            if len(attempts) >= 3:
                down.clear()
        if down.is_set():
            raise httpx.ConnectError("no route to host", request=request)
        return answer(request)

    cloud.handler = handler  # type: ignore[method-assign]
    client = cloud.client(binary="auto", probe_backoff_s=(0.001, 0.01))
    try:
        assert client.binary is False
        assert client.probed.wait(5)
        assert client.binary is True and len(attempts) == 3
    finally:
        client.close()


def test_a_4xx_is_a_refusal_and_429_is_busy() -> None:
    cloud = ScriptedCloud()
    client = cloud.client()
    cloud.behaviour, cloud.error = "404", "unknown model 'toy-cloud'"
    with pytest.raises(CloudRefusedError) as refused:
        client.infer(X, TARGET, 1.0)
    assert refused.value.status == 404 and refused.value.detail == "unknown model 'toy-cloud'"
    assert refused.value.reason == "cloud_error"
    cloud.behaviour = "429"
    with pytest.raises(CloudUnavailableError):
        client.infer(X, TARGET, 1.0)
    client.close()
