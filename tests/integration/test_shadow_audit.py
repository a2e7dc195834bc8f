"""The shadow's audit rate end to end (real Mosquitto, cloud server, TFLite, an in-process
``AgentService``): with the capture's audit rate at 0, a delivered shadow makes the agent
audit confident answers at ``[shadow] audit_rate`` for the shadow's labels, none of them
captured, and clearing the shadow brings the rate back."""

from __future__ import annotations

from typing import Any

from agent.device.service import AgentService
from cloud.pipeline.data import SplitData
from tests.fleet import Fleet, wait_for
from tests.integration.test_shadow import DEVICE, Traffic, publish_shadow, shadow_state


def start_agent(fleet: Fleet) -> AgentService:
    base = fleet.agent_settings(DEVICE)
    update: dict[str, Any] = {
        "telemetry": base.telemetry.model_copy(update={"daily_budget_bytes": None}),
        "capture": base.capture.model_copy(update={"audit_rate": 0.0, "enabled": True}),
        "shadow": base.shadow.model_copy(update={"audit_rate": 1.0}),
    }
    service = AgentService(base.model_copy(update=update))
    service.start(wait_s=10)
    fleet.agents[DEVICE] = service
    return service


def test_a_shadow_audits_confident_answers_for_itself_and_captures_none(
    fleet: Fleet, digits: SplitData
) -> None:
    service = start_agent(fleet)
    assert service.audit.shadow_rate == 0.0
    publish_shadow(fleet, fleet.release())  # v2
    wait_for(lambda: (shadow_state(service, 2) or ("",))[0] == "ACTIVE", what="the shadow")
    assert service.audit.shadow_rate == 1.0
    traffic = Traffic(service, digits.test.x)
    labelled = 0

    def audited() -> bool:
        nonlocal labelled
        traffic.some()
        section = service.shadow.section()
        labelled += section["shadow"].labelled if section else 0
        escalated = int(sum(r.source == "cloud" for r in traffic.results))
        return labelled > escalated + 10

    wait_for(audited, what="the shadow's labels from audits")
    accuracy = service.audit.accuracy("digits", 1)
    assert accuracy is not None and accuracy.session_audited > 0
    # the capture took the escalations only: the shadow's audits are not uploaded
    service.observations.drain()
    state = service.capture.section()["capture"]
    escalated = sum(r.source == "cloud" for r in traffic.results)
    assert state.captured + state.duplicates + state.skipped_budget <= escalated

    publish_shadow(fleet, None)
    wait_for(lambda: service.shadow.model is None, what="the shadow dropped")
    assert service.audit.shadow_rate == 0.0  # back to the capture's rate (0)
