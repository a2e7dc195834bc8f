"""Rollouts with a shadow phase, gated by field accuracy: the real controller and collector
over a real Mosquitto, devices simulated as MQTT clients speaking the fleet protocol
(``tests/shadow_sim.py``) that run the candidate as a shadow when its manifest comes on
their shadow topic and report how it did in telemetry's ``shadow`` section.

A candidate as good as the serving model passes the shadow phase and the rollout
completes; one 10 points worse is aborted before the canary activates (no device manifest
published, the shadow topics cleared); too few labelled samples until the shadow timeout
abort too; a controller killed (SIGKILL) in the shadow phase is resumed by the next one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from cloud.fleet import queries
from cloud.fleet.api import fleet_router
from cloud.fleet.collector import Collector
from cloud.fleet.controller import lease_name
from cloud.fleet.store import FleetStore, open_store
from shared import topics
from shared.mqtt import MqttClient
from shared.oip.http import install_error_handlers
from tests.fleet import FLEET, Fleet, retained_json, wait_for
from tests.helpers import ROOT, serve_in_thread
from tests.mosquitto import Mosquitto
from tests.shadow_sim import MODEL, Quality, SimDevice

DEVICES = [f"dev-{i}" for i in range(4)]
#: 10 points worse than the serving model: 80 % against 90 % on the same requests
WORSE = Quality(both=16, shadow_only=0, serving_only=2, wrong_both=2)


def start_collector(broker: Mosquitto, store: FleetStore, name: str) -> MqttClient:
    """The collector (telemetry, births, job states) into ``store``, connected."""
    mqtt = MqttClient(broker.settings_for("collector", protocol="5"), f"collector-{name}")
    Collector(store, FLEET).attach(mqtt)
    mqtt.start(wait_s=10)
    return mqtt


@pytest.fixture
def sims(fleet: Fleet) -> Iterator[dict[str, SimDevice]]:
    """Four simulated devices serving digits@1, born in the store, the collector on."""
    collector = start_collector(fleet.broker, fleet.store, "sims")
    devices = {d: SimDevice(fleet.broker, FLEET, d) for d in DEVICES}
    try:
        for d in devices.values():
            d.start()
        wait_for(lambda: len(fleet.store.devices(FLEET)) == 4, what="births")
        yield devices
    finally:
        for d in devices.values():
            d.stop()
        collector.stop()


def shadow_retained(fleet: Fleet, device: str) -> object:
    return retained_json(topics.shadow(FLEET, MODEL, device=device).name, fleet.broker)


def test_a_candidate_as_good_as_serving_passes_and_the_rollout_completes(
    fleet: Fleet, sims: dict[str, SimDevice]
) -> None:
    fleet.release()  # digits@2
    lines: list[str] = []
    controller = fleet.rollout_controller(poll_s=0.05, progress=lines.append)
    rid = controller.create(
        MODEL,
        2,
        canary="1",
        waves=1,
        wave_timeout_s=30,
        shadow=True,
        gate_min_samples=100,
        gate_margin=0.02,
        shadow_timeout_s=60,
    )
    result = controller.run(rid)
    assert result.state == "COMPLETED", result.detail
    canary = fleet.store.waves(rid)[0][0][0]
    # the candidate ran as a shadow on the canary only, cleared before it was activated
    events = [what for what, _ in sims[canary].events]
    assert events[:3] == ["shadow", "shadow-cleared", "manifest"], sims[canary].events
    assert sims[canary].saw("shadow") == [2] and sims[canary].saw("manifest") == [2]
    for d in DEVICES:
        assert sims[d].serving == 2, d
        if d != canary:
            assert sims[d].saw("shadow") == [], d
        assert shadow_retained(fleet, d) is None, d
    gate = json.loads(result.gate or "{}")
    assert gate["state"] == "pass" and gate["labelled"] >= 100
    assert gate["candidate_agreement"] == pytest.approx(0.9)
    assert any(line.startswith("shadow: gate pass") for line in lines), lines
    assert any(line.startswith("gate before wave 1: gate pass") for line in lines), lines

    app = FastAPI()
    install_error_handlers(app)
    app.include_router(fleet_router(fleet.store, FLEET, None))
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        view = http.get(f"/fleet/rollouts/{rid}/gate").json()
        assert (view["state"], view["phase"], view["shadow"]) == ("COMPLETED", "waves", True)
        assert view["gate"]["state"] == "pass" and view["acted_on"] == view["gate"]
        assert http.get("/fleet/rollouts/999/gate").status_code == 404
        loop = http.get("/fleet/loop", params={"model": MODEL}).json()
        by = {v["version"]: v for v in loop["versions"]}
        assert by[2]["shadow"]["labelled"] >= 100
        assert by[2]["shadow"]["candidate_agreement"] == pytest.approx(0.9)
        assert [r["rollout"] for r in loop["rollouts"]] == [rid]
        assert loop["rollouts"][0]["gate"]["state"] == "pass"
        assert http.get("/fleet/loop", params={"model": "no such"}).status_code == 400


def test_a_candidate_ten_points_worse_is_aborted_before_the_canary(
    fleet: Fleet, sims: dict[str, SimDevice]
) -> None:
    fleet.release()
    for sim in sims.values():
        sim.quality = WORSE
    controller = fleet.rollout_controller(poll_s=0.05)
    rid = controller.create(
        MODEL, 2, canary="2", waves=1, shadow=True, gate_min_samples=100, shadow_timeout_s=60
    )
    result = controller.run(rid)
    assert result.state == "ABORTED"
    assert result.detail.startswith("shadow phase: gate fail: candidate 80.0% vs serving 90.0%")
    assert "the candidate never served" in result.detail
    canary = [d for d, _ in fleet.store.waves(rid)[0]]
    assert len(canary) == 2
    for d in DEVICES:
        # a positive control: the canary did get the shadow, and saw it cleared
        assert sims[d].saw("shadow") == ([2] if d in canary else []), d
        assert sims[d].saw("shadow-cleared") == ([None] if d in canary else []), d
        assert sims[d].saw("manifest") == [] and sims[d].serving == 1, d
        assert shadow_retained(fleet, d) is None, d
        assert retained_json(topics.manifest(FLEET, MODEL, device=d).name, fleet.broker) is None
    assert fleet.store.job_states(FLEET, MODEL, 2) == {}
    assert fleet.store.rollout(rid).current_wave == 0


def test_too_few_samples_until_the_shadow_timeout_abort(
    fleet: Fleet, sims: dict[str, SimDevice]
) -> None:
    fleet.release()
    for sim in sims.values():
        sim.budget = 2  # 40 labelled samples, then nothing more
    controller = fleet.rollout_controller(poll_s=0.05)
    rid = controller.create(
        MODEL, 2, canary="1", waves=1, shadow=True, gate_min_samples=100, shadow_timeout_s=3
    )
    result = controller.run(rid)
    assert result.state == "ABORTED"
    assert result.detail.startswith("shadow phase timed out after 3 s with 40 of 100 labelled")
    canary = fleet.store.waves(rid)[0][0][0]
    assert sims[canary].saw("shadow") == [2] and sims[canary].budget == 0
    assert sims[canary].saw("manifest") == [] and shadow_retained(fleet, canary) is None
    assert json.loads(result.gate or "{}")["state"] == "wait"


def test_the_gate_rechecked_before_a_wave_stops_a_worse_audit_error(
    fleet: Fleet, sims: dict[str, SimDevice]
) -> None:
    """The shadow phase passes; once serving, the canary's audited answers are wrong far
    more often than the serving version's on the other devices: aborted before wave 1."""
    fleet.release()

    def audits_first(sim: SimDevice) -> None:  # the canary's audits in before its ACTIVE
        sim.report(None)
        sim.report(None)
        wait_for(
            lambda: queries.gate_stats(fleet.store, FLEET, MODEL, 2).candidate_audited >= 100,
            what="the candidate's audits stored",
        )

    for sim in sims.values():
        sim.quality = Quality(audited={1: (50, 1), 2: (50, 20)})  # 2 % against 40 %
        sim.on_activate = audits_first
    lines: list[str] = []
    controller = fleet.rollout_controller(poll_s=0.05, progress=lines.append)
    rid = controller.create(
        MODEL, 2, canary="1", waves=1, shadow=True, gate_min_samples=100, shadow_timeout_s=60
    )
    result = controller.run(rid)
    assert result.state == "ABORTED", result.detail
    assert result.detail.startswith("before wave 1: gate fail: audit error 40.0% on "), result
    assert any(line.startswith("shadow: gate pass") for line in lines), lines
    canary = fleet.store.waves(rid)[0][0][0]
    assert sims[canary].serving == 2  # the canary went ahead, the next wave did not
    for d in DEVICES:
        if d != canary:
            assert sims[d].saw("manifest") == [] and sims[d].serving == 1, d
    assert fleet.store.rollout(rid).current_wave == 1


def test_fleet_rollout_shadow_command(
    fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``tandem-cloud fleet rollout --shadow ...`` with the gate's flags, on the store of
    its ``--state-dir`` (the collector writes there too)."""
    from cloud.cli import main as cloud_main

    fleet.release()
    store = open_store(None, tmp_path / "ctl")
    collector = start_collector(fleet.broker, store, "cli")
    devices = {d: SimDevice(fleet.broker, FLEET, d) for d in DEVICES[:2]}
    try:
        for sim in devices.values():
            sim.start()
        wait_for(lambda: len(store.devices(FLEET)) == 2, what="births")
        devices["dev-0"].quality = WORSE
        common = ["--fleet", FLEET, "--broker", fleet.broker.service_url]
        common += ["--username", "controller", "--password", "ctl-pw"]
        common += ["--registry", str(fleet.registry.root), "--state-dir", str(tmp_path / "ctl")]
        gate = ["--shadow", "--gate-min-samples", "60", "--gate-margin", "0.05"]
        gate += ["--shadow-timeout-s", "30"]
        code = cloud_main(
            ["fleet", "rollout", "digits@2", *common, "--canary", "1", "--waves", "1", *gate]
        )
        out = capsys.readouterr().out
        assert code == 3, out
        assert "shadow phase: gate fail: candidate 80.0% vs serving 90.0%" in out
        assert "margin 5.0%" in out
        r = store.rollouts(FLEET)[-1]
        assert (r.shadow, r.gate_min_samples, r.gate_margin, r.shadow_timeout_s) == (
            True,
            60,
            0.05,
            30.0,
        )
        assert devices["dev-0"].saw("shadow") == [2] and devices["dev-0"].saw("manifest") == []
        assert cloud_main(["fleet", "status", *common]) == 0
        assert f"rollout {r.id}: digits@2 -> fleet  ABORTED (shadow) shadow phase: gate fail" in (
            capsys.readouterr().out
        )
    finally:
        for sim in devices.values():
            sim.stop()
        collector.stop()
        store.close()


@dataclass
class Process:
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)


def controller_process(fleet: Fleet, url: str, tmp: Path, name: str) -> Process:
    """``tandem-cloud fleet controller`` (as in test_controller_failover), output read."""
    argv = [sys.executable, "-u", "-m", "cloud.cli", "fleet", "controller"]
    argv += ["--lease-ttl", "1.5", "--poll", "0.1", "--fleet", FLEET]
    argv += ["--broker", fleet.broker.service_url, "--username", "controller"]
    argv += ["--password", "ctl-pw", "--registry", str(fleet.registry.root)]
    argv += ["--state-dir", str(tmp / name)]
    env = {**os.environ, "TANDEM_CLOUD_DATABASE_URL": url}
    with (tmp / f"{name}.log").open("w") as log:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True
        )
    started = Process(proc)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            started.lines.append(line.rstrip())

    threading.Thread(target=read, daemon=True).start()
    return started


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
        p.proc.wait(timeout=30)
        if p.proc.stdout:
            p.proc.stdout.close()


def test_a_controller_killed_in_the_shadow_phase_is_resumed(
    fleet: Fleet, store_url: str, tmp_path: Path, processes: list[Process]
) -> None:
    fleet.release()
    store = open_store(store_url, tmp_path)
    collector = start_collector(fleet.broker, store, "kill9")
    devices = {d: SimDevice(fleet.broker, FLEET, d, budget=2) for d in DEVICES}
    try:
        for sim in devices.values():
            sim.start()
        wait_for(lambda: len(store.devices(FLEET)) == 4, what="births")
        processes.append(controller_process(fleet, store_url, tmp_path, "a"))
        wait_for(lambda: processes[0].said("holds the lease"), what="the first controller")
        rid = store.create_rollout(
            FLEET,
            MODEL,
            2,
            "fleet",
            None,
            "1",
            1,
            0.0,
            60.0,
            shadow=True,
            gate_min_samples=100,
            shadow_timeout_s=120,
        )
        # the shadow phase under way: the canary's first 40 labelled samples are in
        wait_for(
            lambda: queries.gate_stats(store, FLEET, MODEL, 2).labelled == 40,
            timeout=60,
            what="shadow samples from the canary",
        )
        mid = store.rollout(rid)
        assert (mid.state, mid.phase, mid.gate) == ("RUNNING", "shadow", None)
        assert mid.shadow_started is not None
        canary = store.waves(rid)[0][0][0]
        processes[0].proc.send_signal(signal.SIGKILL)
        assert processes[0].proc.wait(timeout=10) == -signal.SIGKILL
        devices[canary].budget = None  # the samples go on coming

        processes.append(controller_process(fleet, store_url, tmp_path, "b"))
        wait_for(
            lambda: store.rollout(rid).state in ("COMPLETED", "ABORTED"),
            timeout=90,
            what="the rollout finished by the second controller",
        )
        result = store.rollout(rid)
        assert result.state == "COMPLETED", result.detail
        second = processes[1]
        assert second.said(f"rollout {rid} ({MODEL}@2): resuming at wave 0"), second.lines
        holder = store.lease_holder(lease_name(FLEET))
        assert holder is not None and holder.endswith(f":{second.proc.pid}")
        # the same phase: its start kept, the evidence from before the kill counted
        assert result.shadow_started == mid.shadow_started
        gate = json.loads(result.gate or "{}")
        assert gate["state"] == "pass" and gate["labelled"] >= 100
        events = [what for what, _ in devices[canary].events]
        assert events[-2:] == ["shadow-cleared", "manifest"], devices[canary].events
        assert "manifest" not in events[:-1]
        for d in DEVICES:
            assert devices[d].serving == 2, d
            assert shadow_retained(fleet, d) is None, d
    finally:
        for sim in devices.values():
            sim.stop()
        collector.stop()
        store.close()
