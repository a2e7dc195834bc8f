"""Two rollout controllers (``tandem-cloud fleet controller``, real processes) on one fleet
store, SQLite and PostgreSQL: the one holding the lease runs the rollout; killed with
SIGKILL mid-wave, the other takes the lease once it expires and finishes the rollout from the
store's plan: no wave planned again, no device's manifest published twice, every device on
the release."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydantic import SecretStr

from cloud.fleet.controller import lease_name
from cloud.fleet.store import FleetStore, open_store
from shared import topics
from shared.mqtt import MqttClient, MqttSettings
from tests.fleet import FLEET, Fleet, retained_json, wait_for
from tests.helpers import ROOT

#: the lease's ttl: long enough that a renewal stalled on a loaded 2-core machine does not
#: hand the lease over before the kill (the tests assert it did not), short enough that the
#: take-over after SIGKILL comes within seconds
TTL_S = 4.0
DEVICES = [f"dev-{i}" for i in range(5)]


@dataclass
class FleetCommand:
    """A ``tandem-cloud fleet ...`` process, its output read as it comes."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @property
    def holder_suffix(self) -> str:
        return f":{self.proc.pid}"

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)


#: The controllers of these tests.
ControllerProcess = FleetCommand


def fleet_command(fleet: Fleet, url: str, tmp: Path, name: str, command: list[str]) -> FleetCommand:
    """``tandem-cloud fleet COMMAND...`` on the test broker's controller account, the
    registry and the store at ``url``; stderr to ``tmp/NAME.log``."""
    argv = [sys.executable, "-u", "-m", "cloud.cli", "fleet", *command]
    argv += ["--fleet", FLEET, "--broker", fleet.broker.service_url]
    argv += ["--username", "controller", "--password", "ctl-pw"]
    argv += ["--registry", str(fleet.registry.root), "--state-dir", str(tmp / name)]
    env = {**os.environ, "TANDEM_CLOUD_DATABASE_URL": url}
    with (tmp / f"{name}.log").open("w") as log:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True
        )
    started = FleetCommand(proc)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            started.lines.append(line.rstrip())

    threading.Thread(target=read, daemon=True).start()
    return started


def _start_controller(fleet: Fleet, url: str, tmp: Path, name: str) -> ControllerProcess:
    lease = ["--lease-ttl", str(TTL_S), "--poll", "0.1"]
    return fleet_command(fleet, url, tmp, name, ["controller", *lease])


def print_rollout(url: str, tmp: Path) -> None:
    """Rollout 1's row, its plan and every device's job states (for a failed test's log)."""
    store = open_store(url, tmp)
    try:
        if store.rollouts(FLEET):
            print("--- rollout 1:", store.rollout(1), store.waves(1))
        print("--- jobs:", store.job_states(FLEET, "digits", 2))
    finally:
        store.close()


def _print_controllers(controllers: list[ControllerProcess], url: str, tmp: Path) -> None:
    """The controllers' output and logs and the rollout, shown by pytest when the test
    failed."""
    for name, c in zip("ab", controllers, strict=False):
        log = tmp / f"{name}.log"
        print(f"--- controller {name} (pid {c.proc.pid}) stdout:", *c.lines, sep="\n")
        print(f"--- {log.name}\n{log.read_text() if log.exists() else ''}")
    print_rollout(url, tmp)


def take_offline(fleet: Fleet, store: FleetStore, device: str) -> None:
    """Stop ``device``'s agent and wait until the store has it offline."""
    fleet.agents[device].stop()
    wait_for(
        lambda: {d["device"]: d["state"] for d in store.devices(FLEET)}[device] == "offline",
        what=f"{device} offline",
    )


class ManifestSpy:
    """Every live (not retained) non-empty device manifest publish, per device."""

    def __init__(self, fleet: Fleet) -> None:
        self.counts: Counter[str] = Counter()
        self._client = MqttClient(
            MqttSettings(
                url=fleet.broker.service_url, username="controller", password=SecretStr("ctl-pw")
            ),
            client_id="manifest-spy",
        )
        for device in DEVICES:
            topic = topics.manifest(FLEET, "digits", device=device).name
            self._client.subscribe(topic, self._take(device))

    def _take(self, device: str) -> Callable[[str, bytes, bool], None]:
        def on(topic: str, payload: bytes, retained: bool) -> None:
            if payload and not retained:
                self.counts[device] += 1

        return on

    def __enter__(self) -> ManifestSpy:
        self._client.start(wait_s=10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.stop()


@pytest.fixture
def controllers(tmp_path: Path) -> Iterator[list[ControllerProcess]]:
    started: list[ControllerProcess] = []
    yield started
    for c in started:
        if c.proc.poll() is None:
            c.proc.kill()
        c.proc.wait(timeout=30)
        if c.proc.stdout:
            c.proc.stdout.close()


def test_killed_controller_is_taken_over_mid_wave(
    fleet: Fleet,
    store_url: str,
    tmp_path: Path,
    controllers: list[ControllerProcess],
    request: pytest.FixtureRequest,
) -> None:
    fleet.release()  # digits@2
    for device in DEVICES:
        fleet.start_agent(device, group="lab")
    store: FleetStore = open_store(store_url, tmp_path)
    try:
        with ManifestSpy(fleet) as spy:
            controllers += [
                _start_controller(fleet, store_url, tmp_path, name) for name in ("a", "b")
            ]
            request.addfinalizer(lambda: _print_controllers(controllers, store_url, tmp_path))
            wait_for(lambda: len(store.devices(FLEET)) == 5, what="births in the store")
            # dev-2 goes away: the wave it is in cannot end until it is back
            take_offline(fleet, store, "dev-2")
            wait_for(lambda: store.lease_holder(lease_name(FLEET)) is not None, what="a holder")
            holder = store.lease_holder(lease_name(FLEET))
            assert holder is not None
            first, second = (
                controllers if holder.endswith(controllers[0].holder_suffix) else controllers[::-1]
            )
            assert holder.endswith(first.holder_suffix)

            rid = store.create_rollout(FLEET, "digits", 2, "fleet", None, "1", 2, 0.0, 60.0)
            # canary [dev-0], then [dev-1, dev-2], then [dev-3, dev-4]
            wait_for(
                lambda: (
                    store.rollout(rid).current_wave == 1
                    and all(published for _, published in store.waves(rid)[1])
                ),
                timeout=60,
                what="the canary done and wave 1 published",
            )
            planned = store.waves(rid)
            assert [[d for d, _ in w] for w in planned] == [
                ["dev-0"],
                ["dev-1", "dev-2"],
                ["dev-3", "dev-4"],
            ]
            assert store.job_states(FLEET, "digits", 2)["dev-0"][0].value == "ACTIVE"
            assert not second.said("holds the lease")

            first.proc.send_signal(signal.SIGKILL)
            assert first.proc.wait(timeout=10) == -signal.SIGKILL
            fleet.start_agent("dev-2", group="lab")  # back: it finds its manifest retained

            wait_for(
                lambda: store.rollout(rid).state in ("COMPLETED", "ABORTED"),
                timeout=90,  # past the wave's 60 s: a stuck wave shows as ABORTED
                what="the rollout finished by the second controller",
            )
            result = store.rollout(rid)
            assert result.state == "COMPLETED", result.detail
            now = store.lease_holder(lease_name(FLEET))
            assert now is not None and now.endswith(second.holder_suffix)
            assert second.said(f"rollout {rid} (digits@2): resuming at wave 1"), second.lines
            assert not second.said("starting")
            # the same plan, every device published exactly once
            assert [[d for d, _ in w] for w in store.waves(rid)] == [
                [d for d, _ in w] for w in planned
            ]
            assert store.query(
                "SELECT COUNT(*) AS n FROM rollout_devices WHERE rollout = ?", (rid,)
            ) == [{"n": 5}]
            wait_for(lambda: sum(spy.counts.values()) >= 5, what="the spy saw every publish")
            assert spy.counts == dict.fromkeys(DEVICES, 1)
        for device, service in fleet.agents.items():
            assert service.agent.model.manifest.version == 2, device
            assert store.job_states(FLEET, "digits", 2)[device][0].value == "ACTIVE"
        assert retained_json(topics.manifest(FLEET, "digits").name, fleet.broker)["version"] == 2

        # a clean stop hands the lease over at once
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(timeout=30) == 0
        assert store.lease_holder(lease_name(FLEET)) is None
    finally:
        store.close()


def test_rollout_command_hands_over_to_the_running_controller(
    fleet: Fleet,
    tmp_path: Path,
    controllers: list[ControllerProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``fleet rollout`` while a controller holds the lease: the command records the rollout,
    the controller runs it, the command follows it to the end and says how it ended."""
    from cloud.cli import main as cloud_main

    fleet.release()
    for device in DEVICES[:2]:
        fleet.start_agent(device)
    url = f"sqlite://{tmp_path / 'ctl' / 'fleet.db'}"
    controllers.append(_start_controller(fleet, url, tmp_path, "a"))
    wait_for(lambda: controllers[0].said("holds the lease"), what="the controller's lease")
    code = cloud_main(
        [
            "fleet",
            "rollout",
            "digits@2",
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
            "--waves",
            "1",
            "--wave-timeout",
            "30",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert (
        f"rollout 1: run by {socket.gethostname()}:{controllers[0].proc.pid}; following it" in out
    )
    assert out.rstrip().endswith("rollout 1: COMPLETED"), out
    assert "canary:" not in out  # the controller ran it, not the command
    wait_for(lambda: controllers[0].said("rollout 1: COMPLETED"), what="the controller's word")
    for device, service in fleet.agents.items():
        assert service.agent.model.manifest.version == 2, device
