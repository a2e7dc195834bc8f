"""The shadow's audit rate: while a candidate is installed, confident answers are audited at
the higher of the capture's rate and ``[shadow] audit_rate``; the extra labels go to the
shadow alone (not to capture), and the live check counts them all."""

from __future__ import annotations

import random

from agent.device.audit import Audit
from agent.inference.observe import Observation
from tests.fakes import ScriptedCloud
from tests.unit.test_audit import agent_with, observation


def test_a_shadow_raises_the_rate_and_its_extra_labels_are_not_captured() -> None:
    audit = Audit(agent_with(ScriptedCloud()), 0.1, rng=random.Random(3), max_pending=1000)
    captured: list[Observation] = []
    shadow: list[Observation] = []
    audit.on_labelled.append(captured.append)
    audit.on_shadow_labelled.append(shadow.append)
    audit.shadow_rate = 0.5
    for _ in range(400):
        audit.observe(observation())
    audit.drain()
    draws = random.Random(3)
    picks = [draws.random() for _ in range(400)]
    assert len(shadow) == sum(u < 0.5 for u in picks) and 160 < len(shadow) < 240
    assert len(captured) == sum(u < 0.1 for u in picks) and 20 < len(captured) < 70
    assert all(o.reason == "audit" and o.cloud_index == 2 for o in shadow)
    accuracy = audit.accuracy("toy", 1)
    assert accuracy is not None and accuracy.session_audited == len(shadow)

    audit.shadow_rate = 0.0  # the shadow cleared: back to the capture's rate
    before = len(captured), len(shadow)
    for _ in range(400):
        audit.observe(observation())
    audit.drain()
    ordinary = sum(draws.random() < 0.1 for _ in range(400))
    assert (len(captured), len(shadow)) == (before[0] + ordinary, before[1] + ordinary)


def test_the_shadow_rate_alone_audits_with_the_capture_rate_at_zero() -> None:
    audit = Audit(agent_with(ScriptedCloud()), 0.0, max_pending=1000)
    captured: list[Observation] = []
    shadow: list[Observation] = []
    audit.on_labelled.append(captured.append)
    audit.on_shadow_labelled.append(shadow.append)
    audit.shadow_rate = 1.0
    for _ in range(5):
        audit.observe(observation())
    audit.observe(observation(confidence=0.5))  # it escalates: never audited
    audit.drain()
    assert (len(captured), len(shadow)) == (0, 5)
