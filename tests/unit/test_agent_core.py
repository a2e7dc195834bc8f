"""Agent.infer with a fake backend and a scripted cloud: routing outcomes, fallbacks, swaps."""

from __future__ import annotations

import numpy as np
import pytest

from agent import Agent, AgentSettings
from agent.errors import BackendError
from shared.errors import InvalidRequestError
from tests.fakes import ScriptedCloud, fake_model

CONFIDENT = [10.0, 0, 0, 0]
UNSURE = [0.0, 0, 0, 0]


def make(cloud: ScriptedCloud | None = None, **routing: object) -> Agent:
    settings = AgentSettings(routing=routing)
    return Agent(settings, model=fake_model(), cloud=cloud.client() if cloud else None)


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
    agent = make(cloud, breaker_failures=2, breaker_reset_s=0.05)
    reasons = [agent.infer(UNSURE).reason for _ in range(4)]
    assert reasons == ["cloud_unavailable", "cloud_unavailable", "breaker_open", "breaker_open"]
    assert cloud.calls == 2
    cloud.behaviour = "ok"
    import time

    time.sleep(0.06)
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
