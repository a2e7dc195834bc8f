"""Agent.infer with a fake backend and a scripted cloud: routing outcomes, fallbacks, swaps."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import pytest

from agent import Agent, AgentSettings
from agent.errors import BackendError
from shared.errors import InvalidRequestError
from tests.fakes import ScriptedCloud, confident_logits, fake_model

CONFIDENT = [10.0, 0, 0, 0]
UNSURE = [0.0, 0, 0, 0]


class Clock:
    """A clock the test moves (seconds)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(
    cloud: ScriptedCloud | None = None,
    clock: Callable[[], float] = time.perf_counter,
    **routing: object,
) -> Agent:
    settings = AgentSettings(routing=routing)
    return Agent(settings, model=fake_model(), cloud=cloud.client() if cloud else None, clock=clock)


def test_confident_answers_stay_local() -> None:
    cloud = ScriptedCloud()
    r = make(cloud).infer(CONFIDENT)
    assert (r.source, r.reason, r.label) == ("edge", "confident", "a")
    assert cloud.calls == 0 and r.cloud_model is None
    assert r.latency.local_ms is not None and r.latency.cloud_ms is None
    assert r.edge_model == "toy:1" and r.confidence > 0.99


def test_unsure_answers_escalate() -> None:
    cloud = ScriptedCloud()
    r = make(cloud).infer(UNSURE)
    assert (r.source, r.reason, r.label) == ("cloud", "low_confidence", "c")
    assert r.cloud_model == "toy-cloud:7" and r.confidence == pytest.approx(0.9)
    assert r.latency.cloud_ms is not None and cloud.calls == 1


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        ("timeout", "cloud_timeout"),
        ("refuse", "cloud_unavailable"),
        ("503", "cloud_unavailable"),
        ("400", "cloud_error"),
        ("garbage", "cloud_error"),
    ],
)
def test_cloud_failures_give_the_local_answer(behaviour: str, reason: str) -> None:
    cloud = ScriptedCloud()
    cloud.behaviour = behaviour
    r = make(cloud).infer(UNSURE)
    assert (r.source, r.reason, r.label) == ("edge", reason, "a")


def test_breaker_opens_then_probes_again() -> None:
    cloud = ScriptedCloud()
    cloud.behaviour = "refuse"
    clock = Clock()
    agent = make(cloud, clock, breaker_failures=2, breaker_reset_s=5.0)
    reasons = [agent.infer(UNSURE).reason for _ in range(4)]
    assert reasons == ["cloud_unavailable", "cloud_unavailable", "breaker_open", "breaker_open"]
    assert cloud.calls == 2
    cloud.behaviour = "ok"
    clock.t = 4.9
    assert agent.infer(UNSURE).reason == "breaker_open"  # the breaker runs on the agent's clock
    clock.t = 5.0
    assert agent.infer(UNSURE).source == "cloud"  # the half-open probe succeeds
    assert agent.router.breaker.state == "closed"


def test_modes_and_budget() -> None:
    cloud = ScriptedCloud()
    agent = make(cloud)
    assert agent.infer(UNSURE, mode="edge").reason == "forced_edge"
    r = agent.infer(CONFIDENT, mode="cloud")
    assert (r.source, r.reason) == ("cloud", "forced_cloud")
    assert r.latency.local_ms is None  # cloud first: local runs only as a fallback
    cloud.behaviour = "503"
    r = agent.infer(CONFIDENT, mode="cloud")
    assert (r.source, r.reason, r.label) == ("edge", "cloud_unavailable", "a")
    # a fresh agent predicts 50 ms for the cloud (no calls yet): that does not fit in 10 ms
    assert make(cloud).infer(UNSURE, deadline_ms=10).reason == "no_budget"


def test_no_cloud_configured() -> None:
    r = make(None).infer(UNSURE)
    assert (r.source, r.reason) == ("edge", "no_cloud")


def test_bad_input_is_a_clear_error() -> None:
    agent = make(None)
    with pytest.raises(InvalidRequestError, match="expected 4 features"):
        agent.infer([1.0, 2.0])
    with pytest.raises(InvalidRequestError, match="deadline"):
        agent.infer(CONFIDENT, deadline_ms=0)
    with pytest.raises(InvalidRequestError, match="mode"):
        agent.infer(CONFIDENT, mode="sideways")  # type: ignore[arg-type]


def test_local_failure_falls_to_cloud_or_raises() -> None:
    cloud = ScriptedCloud()
    agent = make(cloud)
    agent.model.backend.fail = True  # type: ignore[attr-defined]
    r = agent.infer(CONFIDENT)
    assert (r.source, r.reason) == ("cloud", "edge_error")
    lonely = make(None)
    lonely.model.backend.fail = True  # type: ignore[attr-defined]
    with pytest.raises(BackendError):
        lonely.infer(CONFIDENT)


def test_settings_override_manifest_threshold_and_swap_takes_new_defaults() -> None:
    agent = make(None)
    assert agent.threshold == 0.8
    assert make(None, threshold=0.3).threshold == 0.3
    old = agent.activate(fake_model(threshold=0.5, version=2))
    assert old.manifest.version == 1 and agent.threshold == 0.5
    assert agent.infer(CONFIDENT).edge_model == "toy:2"


def test_token_is_sent_as_bearer() -> None:
    cloud = ScriptedCloud()
    agent = Agent(AgentSettings(), model=fake_model(), cloud=cloud.client(token="s3cret"))
    agent.infer(UNSURE)
    assert cloud.token_seen == "Bearer s3cret"


def test_result_to_dict_is_json_friendly() -> None:
    import json

    d = make(None).infer(np.array(CONFIDENT)).to_dict()
    assert json.loads(json.dumps(d))["label"] == "a"


def core_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "agent.inference.core" and r.levelno == logging.WARNING
    ]


def test_a_refusal_is_loud_counted_and_keeps_the_breaker_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cloud = ScriptedCloud()
    cloud.behaviour, cloud.error = "404", "unknown model 'toy-cloud'"
    agent = make(cloud, breaker_failures=2)
    caplog.set_level(logging.INFO)
    results = [agent.infer(UNSURE) for _ in range(5)]
    assert [(r.source, r.reason) for r in results] == [("edge", "cloud_error")] * 5
    assert cloud.calls == 5 and agent.router.breaker.state == "closed"  # the server is up
    assert agent.swap_stats().reasons == {"cloud_error": 5}
    (warning,) = core_warnings(caplog)  # once, not per request
    assert "404" in warning and "unknown model 'toy-cloud'" in warning
    cloud.error = "unknown version '7'"  # a new message is logged again
    agent.infer(UNSURE)
    agent.infer(UNSURE)
    assert len(core_warnings(caplog)) == 2 and "unknown version" in core_warnings(caplog)[1]


def test_429_is_busy_not_a_refusal() -> None:
    cloud = ScriptedCloud()
    cloud.behaviour = "429"
    agent = make(cloud, breaker_failures=2)
    reasons = [agent.infer(UNSURE).reason for _ in range(3)]
    assert reasons == ["cloud_unavailable", "cloud_unavailable", "breaker_open"]


def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cloud = ScriptedCloud()
    cloud.behaviour = "503"
    clock = Clock()
    agent = make(cloud, clock, breaker_failures=2, breaker_reset_s=5.0)
    caplog.set_level(logging.DEBUG)
    for _ in range(3):  # two failures open it, then requests stay local
        agent.infer(UNSURE)
        clock.t += 6.0  # each time, the half-open probe goes and fails again
    assert cloud.calls == 3 and agent.router.breaker.state == "half_open"
    (warning,) = core_warnings(caplog)
    assert "breaker open" in warning and "503" in warning and "nope" in warning
    cloud.behaviour = "ok"
    assert agent.infer(UNSURE).source == "cloud"
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("breaker closed" in m for m in infos)
    assert len(core_warnings(caplog)) == 1


@pytest.mark.parametrize("deadline", [1e13, float("inf"), float("nan"), -1.0, 0.0])
def test_a_deadline_must_be_finite_and_bounded(deadline: float) -> None:
    cloud = ScriptedCloud()
    agent = make(cloud)
    with pytest.raises(InvalidRequestError, match="deadline_ms"):
        agent.infer(UNSURE, deadline_ms=deadline, mode="cloud")
    with pytest.raises(InvalidRequestError, match="deadline_ms"):
        agent.infer_batch([UNSURE, CONFIDENT], deadline_ms=deadline, mode="cloud")
    assert cloud.calls == 0
    assert agent.infer(UNSURE, deadline_ms=3_600_000, mode="cloud").source == "cloud"


def test_the_deadline_limit_is_a_setting() -> None:
    agent = make(None, max_deadline_ms=1000)
    with pytest.raises(InvalidRequestError, match="at most 1000"):
        agent.infer(CONFIDENT, deadline_ms=1001)
    with pytest.raises(ValueError, match="max_deadline_ms"):
        AgentSettings(routing={"deadline_ms": 2000, "max_deadline_ms": 1000})


ROWS = [CONFIDENT, UNSURE, CONFIDENT, UNSURE, UNSURE]


def test_a_batch_is_one_local_invoke_and_one_cloud_call() -> None:
    cloud = ScriptedCloud()
    agent = make(cloud)
    results = agent.infer_batch(ROWS)
    assert agent.model.backend.calls == 1  # type: ignore[attr-defined]
    assert cloud.rows == [3]  # the three unsure rows, in one request
    assert [(r.source, r.reason, r.label) for r in results] == [
        ("edge", "confident", "a"),
        ("cloud", "low_confidence", "c"),
        ("edge", "confident", "a"),
        ("cloud", "low_confidence", "c"),
        ("cloud", "low_confidence", "c"),
    ]
    assert all(r.cloud_model == "toy-cloud:7" for r in results if r.source == "cloud")
    stats = agent.swap_stats()
    assert stats.requests == 5 and stats.reasons == {"confident": 2, "low_confidence": 3}
    assert agent.health.served == 5 and agent.health.unsure == 3
    assert agent.infer_batch(ROWS, mode="cloud")[0].reason == "forced_cloud"
    assert cloud.rows == [3, 5]
    assert agent.infer_batch(ROWS, mode="edge")[1].reason == "forced_edge"
    assert cloud.rows == [3, 5] and agent.model.backend.calls == 3  # type: ignore[attr-defined]


def test_a_batch_agrees_with_single_requests() -> None:
    agent = make(None)
    rows = np.random.default_rng(0).normal(0, 3, (7, 4)).astype(np.float32)
    batch = agent.infer_batch(rows)
    single = [agent.infer(r) for r in rows]
    for b, s in zip(batch, single):
        assert (b.label, b.reason) == (s.label, s.reason)
        assert b.confidence == pytest.approx(s.confidence, abs=1e-6)


@pytest.mark.parametrize(
    ("behaviour", "reason"), [("503", "cloud_unavailable"), ("400", "cloud_error")]
)
def test_a_failed_batch_escalation_keeps_the_local_answers(behaviour: str, reason: str) -> None:
    cloud = ScriptedCloud()
    cloud.behaviour = behaviour
    results = make(cloud).infer_batch(ROWS)
    assert cloud.calls == 1
    assert [(r.source, r.reason, r.label) for r in results] == [
        ("edge", "confident", "a"),
        ("edge", reason, "a"),
        ("edge", "confident", "a"),
        ("edge", reason, "a"),
        ("edge", reason, "a"),
    ]


def test_a_batch_shares_one_deadline() -> None:
    """The cloud call gets what the batch's deadline leaves after the one local invoke (minus
    the margin), and every row reports the batch's latency."""
    clock = Clock()

    def slow_logits(x: np.ndarray) -> np.ndarray:
        clock.t += 0.030  # the local batch takes 30 ms
        return confident_logits(x)

    def agent() -> Agent:
        return Agent(
            AgentSettings(routing={"safety_margin_ms": 2.0}),
            model=fake_model(slow_logits),
            cloud=cloud.client(),
            clock=clock,
        )

    cloud = ScriptedCloud()
    results = agent().infer_batch(ROWS, deadline_ms=100.0)
    assert cloud.timeouts == [pytest.approx((100.0 - 30.0 - 2.0) / 1000.0)]
    assert [r.latency.total_ms for r in results] == [pytest.approx(30.0)] * 5
    assert [r.latency.local_ms for r in results] == [pytest.approx(30.0)] * 5
    assert [r.latency.cloud_ms for r in results] == [None, 0.0, None, 0.0, 0.0]
    # a local batch that eats the budget leaves no room for the cloud (predicted: 50 ms)
    results = agent().infer_batch(ROWS, deadline_ms=60.0)
    assert len(cloud.timeouts) == 1
    assert [r.reason for r in results] == ["confident", "no_budget"] * 2 + ["no_budget"]


def test_batch_input_is_checked() -> None:
    agent = make(None, max_batch_rows=4)
    with pytest.raises(InvalidRequestError, match="at most 4"):
        agent.infer_batch(ROWS)
    with pytest.raises(InvalidRequestError, match="rows of 4 features"):
        agent.infer_batch([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(InvalidRequestError, match="rows of 4 features"):
        agent.infer_batch(CONFIDENT)  # one sample is not a batch
    with pytest.raises(InvalidRequestError, match="rows of 4 features"):
        agent.infer_batch(np.zeros((0, 4)))
    with pytest.raises(InvalidRequestError, match="mode"):
        agent.infer_batch(ROWS[:2], mode="sideways")  # type: ignore[arg-type]
    (r,) = agent.infer_batch([CONFIDENT])  # a lone row is a plain request
    assert (r.source, r.reason) == ("edge", "confident")


def test_a_failed_local_batch_falls_to_the_cloud_or_raises() -> None:
    cloud = ScriptedCloud()
    agent = make(cloud)
    agent.model.backend.fail = True  # type: ignore[attr-defined]
    results = agent.infer_batch(ROWS)
    assert [(r.source, r.reason) for r in results] == [("cloud", "edge_error")] * 5
    assert cloud.rows == [5] and agent.health.errors == 5
    lonely = make(None)
    lonely.model.backend.fail = True  # type: ignore[attr-defined]
    with pytest.raises(BackendError):
        lonely.infer_batch(ROWS)
