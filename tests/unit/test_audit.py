"""The audit with a fake model and a scripted cloud: which answers it samples, the labelled
copy it hands on, that it leaves the router alone, and the live check of the guarantee."""

from __future__ import annotations

import dataclasses
import logging
import random

import numpy as np
import pytest

from agent import Agent, AgentSettings
from agent.device.audit import Audit
from agent.inference.observe import Observation
from shared import bounds
from shared.manifest import Guarantee
from tests.fakes import ScriptedCloud, fake_model


def observation(
    confidence: float = 0.99, *, cloud: int | None = None, version: int = 1, x0: float = 10.0
) -> Observation:
    return Observation(
        features=np.array([x0, 0, 0, 0], np.float32),
        encoded=None,
        edge_index=0,
        edge_confidence=confidence,
        edge_probs=[confidence, (1 - confidence) / 2, (1 - confidence) / 2],
        source="cloud" if cloud is not None else "edge",
        reason="low_confidence" if cloud is not None else "confident",
        cloud_index=cloud,
        cloud_confidence=0.9 if cloud is not None else None,
        cloud_probs=[0.05, 0.05, 0.9] if cloud is not None else None,
        model="toy",
        version=version,
        threshold=0.8,
        ts=1_700_000_000.0,
    )


def agent_with(cloud: ScriptedCloud, guarantee: Guarantee | None = None) -> Agent:
    model = fake_model()
    if guarantee is not None:
        m = model.manifest
        routing = m.routing.model_copy(update={"guarantee": guarantee})
        model = dataclasses.replace(model, manifest=m.model_copy(update={"routing": routing}))
    return Agent(AgentSettings(), model=model, cloud=cloud.client())


def test_only_confident_edge_answers_are_sampled_at_the_rate() -> None:
    cloud = ScriptedCloud()
    audit = Audit(agent_with(cloud), 0.25, rng=random.Random(7), max_pending=1000)
    for _ in range(400):
        audit.observe(observation())
    draws = random.Random(7)
    expected = sum(draws.random() < 0.25 for _ in range(400))
    assert audit.pending == expected and 60 < expected < 140
    audit.rate = 1.0
    before = audit.pending
    audit.observe(observation(cloud=2))  # escalated: the cloud already answered it
    audit.observe(observation(confidence=0.5))  # below the threshold: it escalates
    assert audit.pending == before
    audit.observe(observation())
    assert audit.pending == before + 1


def test_a_full_queue_drops_and_counts() -> None:
    audit = Audit(agent_with(ScriptedCloud()), 1.0, max_pending=3)
    for _ in range(5):
        audit.observe(observation())
    assert (audit.pending, audit.dropped) == (3, 2)


def test_the_labelled_copy_carries_the_cloud_answer_and_the_router_is_untouched() -> None:
    cloud = ScriptedCloud()
    agent = agent_with(cloud)
    audit = Audit(agent, 1.0)
    got: list[Observation] = []
    audit.on_labelled.append(got.append)
    original = observation()
    audit.observe(original)
    audit.drain()
    assert cloud.calls == 1 and len(got) == 1
    labelled = got[0]
    assert (labelled.reason, labelled.cloud_index, labelled.edge_index) == ("audit", 2, 0)
    assert labelled.cloud_confidence == pytest.approx(0.9)
    assert original.cloud_index is None and original.reason == "confident"  # a copy
    # the cloud failing on audits does not move the breaker or the latency estimate
    estimate = agent.router.estimator.predicted_ms
    cloud.behaviour = "503"
    for _ in range(10):
        audit.observe(observation())
    audit.drain()
    assert audit.failed == 10 and len(got) == 1
    assert agent.router.breaker.state == "closed"
    assert agent.router.estimator.predicted_ms == estimate


def test_a_consumer_that_raises_does_not_stop_the_others() -> None:
    audit = Audit(agent_with(ScriptedCloud()), 1.0)
    got: list[Observation] = []

    def broken(obs: Observation) -> None:
        raise RuntimeError("boom")

    audit.on_labelled += [broken, got.append]
    for _ in range(2):
        audit.observe(observation())
    audit.drain()
    assert len(got) == 2


def test_the_live_check_flags_a_broken_guarantee_once(caplog: pytest.LogCaptureFixture) -> None:
    guarantee = Guarantee(
        epsilon=0.05, delta=0.1, calibration_samples=1000, calibration_error=0.01, coverage=0.9
    )
    cloud = ScriptedCloud()  # answers class 2: every confident class-0 answer is wrong
    audit = Audit(agent_with(cloud, guarantee), 1.0)
    audit.observe(observation())
    audit.drain()
    first = audit.section()["audit"]
    assert (first.audited, first.wrong, first.session_audited) == (1, 1, 1)
    assert (first.epsilon, first.delta) == (0.05, 0.1)
    low, high = bounds.interval(1, 1, 0.1)
    assert (first.error_low, first.error_high) == (low, high)
    assert first.violated is (low > 0.05)
    with caplog.at_level(logging.WARNING, logger="agent.device.audit"):
        for _ in range(9):
            audit.observe(observation())
        audit.drain()
        later = audit.section()["audit"]
        for _ in range(5):
            audit.observe(observation())
        audit.drain()
    assert (later.audited, later.wrong, later.session_audited, later.error) == (9, 9, 10, 1.0)
    assert later.violated is True and later.error_low is not None and later.error_low > 0.05
    warnings = [r for r in caplog.records if "breaks its guarantee" in r.getMessage()]
    assert len(warnings) == 1


def test_without_a_guarantee_the_interval_is_at_five_percent_and_nothing_is_judged() -> None:
    cloud = ScriptedCloud()
    agent = agent_with(cloud)
    audit = Audit(agent, 1.0)
    assert audit.section() == {}
    for x0 in (10.0, 11.0, 12.0):
        audit.observe(observation(x0=x0))
    audit.drain()
    section = audit.section()["audit"]
    assert (section.epsilon, section.delta, section.violated) == (None, None, None)
    assert (section.error_low, section.error_high) == bounds.interval(3, 3, 0.05)


def test_an_observation_of_another_version_or_an_image_is_not_audited() -> None:
    cloud = ScriptedCloud()
    audit = Audit(agent_with(cloud), 1.0)
    audit.observe(observation(version=2))
    image = observation()
    image.features, image.encoded = None, b"\xff\xd8\xff..."
    audit.observe(image)
    audit.drain()
    assert cloud.calls == 0 and audit.skipped == 2


def test_a_seed_repeats_the_draw() -> None:
    """``[capture] seed``: the same observations are audited in two runs."""

    def picks(seed: int | None) -> list[int]:
        audit = Audit(agent_with(ScriptedCloud()), 0.3, seed=seed, max_pending=1000)
        chosen = []
        for i in range(200):
            before = audit.pending
            audit.observe(observation(x0=float(i)))
            if audit.pending > before:
                chosen.append(i)
        return chosen

    assert picks(5) == picks(5) and 30 < len(picks(5)) < 90
    assert picks(5) != picks(6)


def test_lost_audits_reach_telemetry_even_before_the_first_answer() -> None:
    """Dropped, failed and skipped audits are counted in the ``audit`` section: a device
    whose cloud never answers an audit says so, instead of sending no section at all."""
    cloud = ScriptedCloud()
    cloud.behaviour = "503"
    audit = Audit(agent_with(cloud), 1.0, max_pending=2)
    assert audit.section() == {}
    for _ in range(3):
        audit.observe(observation())  # two queued, one dropped
    audit.drain()
    section = audit.section()["audit"]
    assert (section.dropped, section.failed, section.skipped) == (1, 2, 0)
    assert (section.audited, section.session_audited, section.error) == (0, 0, None)
    image = observation()
    image.features, image.encoded = None, b"\xff\xd8\xff..."
    audit.observe(image)  # an image model's: skipped
    audit.observe(observation(version=2))  # not the serving model's: skipped
    cloud.behaviour = "ok"
    audit.observe(observation())
    audit.drain()
    section = audit.section()["audit"]
    assert (section.dropped, section.failed, section.skipped) == (1, 2, 2)
    assert (section.audited, section.session_audited) == (1, 1)
