"""Routing against a real cloud server that is slow, dead, or flapping.

The guarantee under test: every request gets an answer (never an error) and, whatever the
cloud does, within its deadline. Deadlines are checked with slack for a loaded CI machine;
the benchmark scripts, not these tests, measure speed.
"""

from __future__ import annotations

import time
from typing import Any

import dataset
import numpy as np
import pytest

from agent import Agent, AgentSettings
from cloud.app import create_app
from cloud.settings import CloudSettings
from tests.helpers import CLOUD_REPO, EDGE_INT8, closed_port_url, serve_in_thread

SLACK_MS = 60.0


def agent_for(url: str, **routing: Any) -> Agent:
    return Agent(AgentSettings(model_dir=EDGE_INT8, cloud={"url": url}, routing=routing))


def test_healthy_cloud_answers_the_unsure(cloud_url: str, digits: dataset.Digits) -> None:
    with agent_for(cloud_url) as agent:
        results = [agent.infer(x, deadline_ms=1000) for x in digits.test.x[:120]]
    escalated = [r for r in results if r.source == "cloud"]
    assert escalated and all(r.reason == "low_confidence" for r in escalated)
    for r in results:
        if r.source == "edge":
            assert r.reason == "confident" and r.confidence >= agent.threshold
    assert all(r.cloud_model == "digits-cloud:1" for r in escalated)


def test_slow_cloud_times_out_within_the_deadline(digits: dataset.Digits) -> None:
    slow = create_app(CloudSettings(repo=CLOUD_REPO, simulated_delay_ms=1000))
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


def test_dead_cloud_opens_the_breaker(digits: dataset.Digits) -> None:
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


def test_flapping_cloud_recovers_through_the_half_open_probe(digits: dataset.Digits) -> None:
    flaky = Flaky(create_app(CloudSettings(repo=CLOUD_REPO)))
    with (
        serve_in_thread(flaky) as url,
        agent_for(url, breaker_failures=2, breaker_reset_s=0.2) as agent,
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
            time.sleep(0.25)  # reset timeout passes: the next request is the probe
            r = agent.infer(unsure, deadline_ms=500)
            assert (r.source, r.reason) == ("cloud", "low_confidence")
            assert agent.router.breaker.state == "closed"
        assert agent.router.breaker.opened_count == 3


def _unsure_sample(agent: Agent, digits: dataset.Digits) -> np.ndarray:
    for x in digits.test.x:
        if agent.infer(x, mode="edge").confidence < agent.threshold - 0.1:
            return np.asarray(x)
    pytest.fail("no unsure sample in the held-out split")
