"""Routing against a real cloud server that is slow, dead, or flapping.

The guarantee under test: every request gets an answer (never an error) and, whatever the
cloud does, within its deadline. Deadlines are checked with slack for a loaded CI machine;
the benchmark scripts, not these tests, measure speed.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import pytest

from agent import Agent, AgentSettings
from cloud.app import create_app
from cloud.pipeline.data import SplitData
from cloud.settings import CloudSettings
from shared.oip.types import HEADER_LENGTH
from tests.fleet import wait_for
from tests.helpers import CLOUD_REPO, EDGE_INT8, closed_port_url, serve_in_thread

SLACK_MS = 60.0


def agent_for(url: str, cloud: dict[str, Any] | None = None, **routing: Any) -> Agent:
    return Agent(
        AgentSettings(model_dir=EDGE_INT8, cloud={"url": url, **(cloud or {})}, routing=routing)
    )


def test_healthy_cloud_answers_the_unsure(cloud_url: str, digits: SplitData) -> None:
    with agent_for(cloud_url) as agent:
        results = [agent.infer(x, deadline_ms=1000) for x in digits.test.x[:120]]
    escalated = [r for r in results if r.source == "cloud"]
    assert escalated and all(r.reason == "low_confidence" for r in escalated)
    for r in results:
        if r.source == "edge":
            assert r.reason == "confident" and r.confidence >= agent.threshold
    assert all(r.cloud_model == "digits-cloud:1" for r in escalated)


def test_slow_cloud_times_out_within_the_deadline(digits: SplitData) -> None:
    slow = create_app(CloudSettings(repo=CLOUD_REPO, testing={"simulated_delay_ms": 1000}))
    with serve_in_thread(slow) as url, agent_for(url, breaker_failures=100) as agent:
        for mode in ("cloud", "auto"):
            for x in digits.test.x[:4]:
                t0 = time.perf_counter()
                r = agent.infer(x, deadline_ms=200, mode=mode)
                wall = (time.perf_counter() - t0) * 1000
                assert r.source == "edge"
                assert wall < 200 + SLACK_MS
        # after a timeout, the estimate says the cloud takes ~200 ms: unsure requests with a
        # tighter budget no longer even try
        unsure = _unsure_sample(agent, digits)
        r = agent.infer(unsure, deadline_ms=100)
        assert (r.source, r.reason) == ("edge", "no_budget")


def test_dead_cloud_opens_the_breaker(digits: SplitData) -> None:
    with agent_for(closed_port_url(), breaker_failures=3) as agent:
        unsure = _unsure_sample(agent, digits)
        reasons = []
        for _ in range(6):
            t0 = time.perf_counter()
            r = agent.infer(unsure, deadline_ms=100)
            assert r.source == "edge" and (time.perf_counter() - t0) * 1000 < 100 + SLACK_MS
            reasons.append(r.reason)
        assert reasons == ["cloud_unavailable"] * 3 + ["breaker_open"] * 3
        # every held-out sample still gets an answer
        answers = [agent.infer(x, deadline_ms=50) for x in digits.test.x]
        assert len(answers) == len(digits.test) and all(a.source == "edge" for a in answers)


class Flaky:
    """ASGI wrapper: while ``down``, every infer call is a 503."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.down = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.down and scope["type"] == "http" and scope["path"].endswith("/infer"):
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": b'{"error": "flapping"}'})
            return
        await self.app(scope, receive, send)


def test_flapping_cloud_recovers_through_the_half_open_probe(digits: SplitData) -> None:
    flaky = Flaky(create_app(CloudSettings(repo=CLOUD_REPO)))
    with (
        serve_in_thread(flaky) as url,
        # the reset must outlast the five calls after the breaker opens, on a loaded machine
        agent_for(url, breaker_failures=2, breaker_reset_s=1.0) as agent,
    ):
        unsure = _unsure_sample(agent, digits)
        for _cycle in range(3):
            assert agent.infer(unsure, deadline_ms=500).source == "cloud"
            flaky.down = True
            down = [agent.infer(unsure, deadline_ms=500).reason for _ in range(4)]
            assert down == [
                "cloud_unavailable",
                "cloud_unavailable",
                "breaker_open",
                "breaker_open",
            ]
            flaky.down = False
            assert agent.infer(unsure, deadline_ms=500).reason == "breaker_open"
            # the reset timeout passes: the next request is the probe
            wait_for(lambda: agent.router.breaker.state == "half_open", what="half-open")
            r = agent.infer(unsure, deadline_ms=500)
            assert (r.source, r.reason) == ("cloud", "low_confidence")
            assert agent.router.breaker.state == "closed"
        assert agent.router.breaker.opened_count == 3


class NoBinary:
    """ASGI wrapper making the real cloud look like an OIP server without Triton's binary
    extension (MLServer, some KServe runtimes): ``GET /v2`` does not list it, and a request
    carrying ``Inference-Header-Content-Length`` gets a 500, as such servers answer it.
    ``binary_ok`` lifts the second (the server was upgraded)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.binary_ok = False
        self.refused = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if not self.binary_ok and HEADER_LENGTH.lower().encode() in headers:
            self.refused += 1
            await _answer(send, 500, b'{"error": "Internal Server Error"}')
            return
        if scope["path"] == "/v2":
            await self.app(scope, receive, _strip_binary_extension(send))
            return
        await self.app(scope, receive, send)


def _strip_binary_extension(send: Any) -> Any:
    async def strip(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [
                (k, v) for k, v in message["headers"] if k.lower() != b"content-length"
            ]
        elif message["type"] == "http.response.body":
            doc = json.loads(message["body"])
            doc["extensions"] = [e for e in doc["extensions"] if e != "binary_tensor_data"]
            message["body"] = json.dumps(doc).encode()
        await send(message)

    return strip


async def _answer(send: Any, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def test_escalations_reach_a_server_without_the_binary_extension(
    digits: SplitData,
) -> None:
    """With the default settings the agent reads the server's extensions and speaks JSON."""
    no_binary = NoBinary(create_app(CloudSettings(repo=CLOUD_REPO)))
    with serve_in_thread(no_binary) as url, agent_for(url) as agent:
        client = agent.cloud_client
        assert client is not None
        wait_for(client.probed.is_set, what="the cloud's extensions")
        assert client.binary is False
        unsure = _unsure_sample(agent, digits)
        results = [agent.infer(unsure, deadline_ms=1000) for _ in range(5)]
        assert [(r.source, r.reason) for r in results] == [("cloud", "low_confidence")] * 5
        batch = agent.infer_batch(np.stack([unsure] * 4), deadline_ms=1000, mode="cloud")
        assert {r.source for r in batch} == {"cloud"}
        assert no_binary.refused == 0


def test_a_cloud_that_keeps_failing_is_logged_once(
    digits: SplitData, caplog: pytest.LogCaptureFixture
) -> None:
    """Forced binary against that server: every escalation fails. One WARNING when the
    breaker opens (with the last error), none for the probes that fail again, one INFO when
    it closes."""
    no_binary = NoBinary(create_app(CloudSettings(repo=CLOUD_REPO)))
    caplog.set_level(logging.INFO, logger="agent.inference.core")
    with (
        serve_in_thread(no_binary) as url,
        # longer than a stall between a probe's failure and the next check of the state
        agent_for(url, {"binary": True}, breaker_failures=2, breaker_reset_s=0.5) as agent,
    ):
        unsure = _unsure_sample(agent, digits)
        breaker = agent.router.breaker
        for _ in range(3):  # opens, then two probes fail
            while breaker.state != "open":
                assert agent.infer(unsure, deadline_ms=500).source == "edge"
            wait_for(lambda: breaker.state == "half_open", what="the half-open probe")
        assert no_binary.refused == 4 and breaker.opened_count == 3
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "breaker open" in warnings[0].getMessage() and "500" in warnings[0].getMessage()
        no_binary.binary_ok = True
        assert agent.infer(unsure, deadline_ms=500).source == "cloud"
        closed = [r for r in caplog.records if "breaker closed" in r.getMessage()]
        assert len(closed) == 1 and closed[0].levelno == logging.INFO
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_a_wrong_cloud_model_is_a_loud_refusal(
    cloud_url: str, digits: SplitData, caplog: pytest.LogCaptureFixture
) -> None:
    """A 404 says the server is up and the configuration is wrong: no breaker, a WARNING
    (once) naming the status and the server's message, and a counted reason."""
    caplog.set_level(logging.WARNING, logger="agent.inference.core")
    with agent_for(cloud_url, {"model": "digits-typo"}, breaker_failures=2) as agent:
        unsure = _unsure_sample(agent, digits)
        agent.swap_stats()
        results = [agent.infer(unsure, deadline_ms=500) for _ in range(5)]
        assert [(r.source, r.reason) for r in results] == [("edge", "cloud_error")] * 5
        assert agent.router.breaker.state == "closed"
        assert agent.swap_stats().reasons == {"cloud_error": 5}
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "404" in warning and "digits-typo" in warning


def test_a_batch_against_a_slow_cloud_keeps_one_deadline(digits: SplitData) -> None:
    """One cloud call for the batch, timed out within the batch's deadline; every row keeps
    its local answer and reports the same latency."""
    counter = InferCounter(
        create_app(CloudSettings(repo=CLOUD_REPO, testing={"simulated_delay_ms": 1000}))
    )
    with serve_in_thread(counter) as url, agent_for(url, breaker_failures=100) as agent:
        rows = digits.test.x[:20]
        results = agent.infer_batch(rows, deadline_ms=200, mode="cloud")
        assert counter.infers == 1
        assert [(r.source, r.reason) for r in results] == [("edge", "cloud_timeout")] * 20
        assert len({r.latency.total_ms for r in results}) == 1
        assert len({r.latency.local_ms for r in results}) == 1
        assert results[0].latency.total_ms < 200 + SLACK_MS
        assert [r.label for r in results] == [r.label for r in agent.infer_batch(rows, mode="edge")]


class InferCounter:
    """ASGI wrapper counting the infer requests that reach the app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.infers = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/infer"):
            self.infers += 1
        await self.app(scope, receive, send)


def _unsure_sample(agent: Agent, digits: SplitData) -> np.ndarray:
    for x in digits.test.x:
        if agent.infer(x, mode="edge").confidence < agent.threshold - 0.1:
            return np.asarray(x)
    pytest.fail("no unsure sample in the held-out split")
