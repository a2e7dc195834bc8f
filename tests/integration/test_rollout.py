"""Rollouts against real agents: canary and waves, abort, promotion, rollback, a controller
restarted mid-rollout."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from shared import topics
from tests.fleet import FLEET, Fleet, last_state, retained_json, wait_for


@pytest.fixture
def fleet(fleet: Fleet) -> Fleet:
    """The integration tier's fleet with four agents started: dev-0..2 in group ``lab``,
    dev-3 in ``field``, all of them born in the fleet store."""
    for i in range(4):
        fleet.start_agent(f"dev-{i}", group="lab" if i < 3 else "field")
    wait_for(lambda: len(fleet.store.devices(FLEET)) == 4, what="births")
    return fleet


def test_failing_canary_stops_the_rollout(fleet: Fleet) -> None:
    good = fleet.release()
    bad = fleet.key.sign(
        good.model_copy(
            update={
                "golden": [g.model_copy(update={"label": (g.label + 1) % 10}) for g in good.golden]
            }
        )
    )
    # replace the registry's v2 manifest with the broken one (same artifact)
    (fleet.registry.release_dir("digits", 2) / "manifest.json").write_text(bad.to_json())
    controller = fleet.rollout_controller(poll_s=0.05)
    rid = controller.create("digits", 2, canary="1", waves=2, wave_timeout_s=30)
    result = controller.run(rid)
    assert result.state == "ABORTED" and "canary failure rate 100%" in result.detail
    canary = fleet.store.waves(rid)[0][0][0]
    assert last_state(fleet, canary, 2)[0] == "FAILED"  # type: ignore[index]
    others = [d for d in fleet.agents if d != canary]
    for d in others:  # the next wave never got the manifest
        assert last_state(fleet, d, 2) is None
        assert fleet.agents[d].agent.model.manifest.version == 1
    # the failed canary's device manifest was withdrawn
    assert retained_json(topics.manifest(FLEET, "digits", device=canary).name, fleet.broker) is None


def test_rollout_completes_promotes_and_rolls_back(fleet: Fleet) -> None:
    fleet.release()
    lines: list[str] = []
    controller = fleet.rollout_controller(poll_s=0.05, progress=lines.append)
    rid = controller.create("digits", 2, canary="25%", waves=2, wave_timeout_s=30)
    result = controller.run(rid)
    assert result.state == "COMPLETED", result.detail
    assert [len(w) for w in fleet.store.waves(rid)] == [1, 2, 1]
    assert lines[0].startswith("canary: 1/1 ACTIVE")
    for d, service in fleet.agents.items():
        assert service.agent.model.manifest.version == 2, d
    promoted = retained_json(topics.manifest(FLEET, "digits").name, fleet.broker)
    assert promoted["version"] == 2
    for d in fleet.agents:  # the per-device manifests are gone
        assert retained_json(topics.manifest(FLEET, "digits", device=d).name, fleet.broker) is None

    release = controller.rollback("digits", fleet.key)
    assert release.version == 3 and release.edge.url == "/registry/digits/1/model.tflite"
    for d in fleet.agents:
        wait_for(lambda d=d: last_state(fleet, d, 3) == ("ACTIVE", ""), what=f"{d} on v3")
        m = fleet.agents[d].agent.model.manifest
        assert m.version == 3 and m.edge.sha256 == fleet.registry.manifest("digits", 1).edge.sha256


def test_group_rollout_leaves_other_groups_alone(fleet: Fleet) -> None:
    fleet.release()
    controller = fleet.rollout_controller(poll_s=0.05)
    result = controller.run(controller.create("digits", 2, group="lab", canary="1", waves=1))
    assert result.state == "COMPLETED"
    assert (
        retained_json(topics.manifest(FLEET, "digits", group="lab").name, fleet.broker)["version"]
        == 2
    )
    assert fleet.agents["dev-3"].agent.model.manifest.version == 1


def test_controller_restarted_mid_rollout_carries_on(fleet: Fleet) -> None:
    fleet.release()

    class CrashError(Exception):
        pass

    def crash_after_canary(line: str) -> None:
        if line.startswith("canary"):
            raise CrashError(line)

    first = fleet.rollout_controller(poll_s=0.05, progress=crash_after_canary)
    rid = first.create("digits", 2, canary="1", waves=3, wave_timeout_s=30)
    with pytest.raises(CrashError):
        first.run(rid)
    mid = fleet.store.rollout(rid)
    assert mid.state == "RUNNING" and mid.current_wave == 0
    # a new controller (same store) picks the same rollout up by its release
    second = fleet.rollout_controller(poll_s=0.05)
    assert second.create("digits", 2) == rid
    result = second.run(rid)
    assert result.state == "COMPLETED"
    assert all(s.agent.model.manifest.version == 2 for s in fleet.agents.values())


def test_rollout_rides_out_a_broker_restart_mid_wave(fleet: Fleet) -> None:
    """The broker goes down right after the canary, before the next wave is published, and
    comes back a second later: the controller reconnects, publishes the wave and completes."""
    fleet.release()
    restarted = threading.Event()

    def restart() -> None:
        fleet.broker.start()
        restarted.set()

    def broker_down_after_canary(line: str) -> None:
        if line.startswith("canary"):
            fleet.broker.stop()
            wait_for(lambda: not fleet.controller.connected.is_set(), what="disconnect")
            threading.Timer(1.0, restart).start()

    controller = fleet.rollout_controller(poll_s=0.05, progress=broker_down_after_canary)
    rid = controller.create("digits", 2, canary="1", waves=1, wave_timeout_s=60)
    result = controller.run(rid)
    assert restarted.is_set()  # the wave was published to the restarted broker
    assert result.state == "COMPLETED", result.detail
    for d, service in fleet.agents.items():
        assert service.agent.model.manifest.version == 2, d
        assert last_state(fleet, d, 2) == ("ACTIVE", "")
    assert retained_json(topics.manifest(FLEET, "digits").name, fleet.broker)["version"] == 2


def test_fleet_commands(fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cloud.cli import main as cloud_main

    fleet.release()
    common = [
        "--fleet",
        FLEET,
        "--broker",
        fleet.broker.service_url,
        "--username",
        "controller",
        "--password",
        "ctl-pw",
        "--registry",
        str(fleet.registry.root),
        "--state-dir",
        str(tmp_path / "ctl"),
    ]
    code = cloud_main(
        [
            "fleet",
            "rollout",
            "digits@2",
            *common,
            "--canary",
            "1",
            "--waves",
            "1",
            "--wave-timeout",
            "30",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "COMPLETED" in out and "canary: 1/1 ACTIVE" in out
    assert cloud_main(["fleet", "status", *common]) == 0
    out = capsys.readouterr().out
    for d in fleet.agents:
        assert d in out
    assert "digits:2" in out and "digits@2 ACTIVE" in out
    key = tmp_path / "op.key"
    fleet.key.save(key)
    assert cloud_main(["fleet", "rollback", "digits", *common, "--key", str(key)]) == 0
    assert "published digits@3" in capsys.readouterr().out
    assert cloud_main(["fleet", "rollout", "digits@x", *common]) == 1
