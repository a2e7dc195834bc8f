"""Two real ``tandem-cloud serve`` instances with ``controller.run_in_server`` on one fleet
store, SQLite and PostgreSQL, and no ``fleet controller`` process: ``fleet rollout`` hands
the rollout to the instance holding the lease; that instance, killed with SIGKILL mid-wave,
is taken over by the other once the lease expires, which finishes the rollout from the
store's plan (no device published twice); a clean stop (SIGTERM, through uvicorn's shutdown)
releases the lease."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cloud.fleet.controller import lease_name
from cloud.fleet.store import FleetStore, open_store
from shared import topics
from tests.fleet import FLEET, Fleet, retained_json, wait_for
from tests.helpers import ROOT, free_port
from tests.integration.test_controller_failover import (
    DEVICES,
    TTL_S,
    FleetCommand,
    ManifestSpy,
    fleet_command,
    print_rollout,
    take_offline,
)


@dataclass
class ServeProcess:
    """``tandem-cloud serve`` with the collector and the controller on; its log is a file."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def holder(self) -> str:
        return f"{socket.gethostname()}:{self.proc.pid}"

    def said(self, text: str) -> bool:
        return text in self.log.read_text()

    def answers(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        try:
            return httpx.get(f"{self.url}/fleet/summary", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False


def _start_serve(fleet: Fleet, url: str, tmp: Path, name: str) -> ServeProcess:
    port = free_port()
    repo = tmp / "repo"  # no models: the fleet side alone
    repo.mkdir(exist_ok=True)
    config = tmp / f"cloud-{name}.toml"
    config.write_text(
        f'repo = "{repo}"\n'
        f"port = {port}\n"
        f'fleet = "{FLEET}"\n'
        f'registry = "{fleet.registry.root}"\n'
        f'state_dir = "{tmp / name}"\n'
        f'instance_id = "{name}"\n'
        "repo_poll_s = 0\n"
        "[mqtt]\n"
        f'url = "{fleet.broker.service_url}"\n'
        'username = "controller"\n'
        'password = "ctl-pw"\n'
        "reconnect_min_s = 0.2\n"
        "reconnect_max_s = 1.0\n"
        "[controller]\n"
        "run_in_server = true\n"
    )
    # the lease's times from the environment, the database from the environment too
    env = {
        **os.environ,
        "TANDEM_CLOUD_DATABASE_URL": url,
        "TANDEM_CLOUD_CONTROLLER__LEASE_TTL_S": str(TTL_S),
        "TANDEM_CLOUD_CONTROLLER__POLL_S": "0.1",
    }
    log = tmp / f"cloud-{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cloud.cli", "--config", str(config), "serve"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return ServeProcess(proc, f"http://127.0.0.1:{port}", log)


def _rollout_command(fleet: Fleet, url: str, tmp: Path) -> FleetCommand:
    rollout = ["rollout", "digits@2", "--canary", "1", "--waves", "2", "--wave-timeout", "60"]
    return fleet_command(fleet, url, tmp, "rollout", rollout)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes] | subprocess.Popen[str]]]:
    started: list[subprocess.Popen[bytes] | subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()


def _print_logs(servers: list[ServeProcess], url: str, tmp: Path) -> None:
    """The instances' logs and the rollout's plan, shown by pytest when the test failed."""
    for server in servers:
        print(f"--- {server.log.name} (pid {server.proc.pid})\n{server.log.read_text()}")
    print_rollout(url, tmp)


def test_serve_instances_share_the_rollouts_and_take_over(
    fleet: Fleet,
    store_url: str,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes] | subprocess.Popen[str]],
    request: pytest.FixtureRequest,
) -> None:
    fleet.release()  # digits@2
    for device in DEVICES:
        fleet.start_agent(device, group="lab")
    store: FleetStore = open_store(store_url, tmp_path)
    try:
        with ManifestSpy(fleet) as spy:
            servers = [_start_serve(fleet, store_url, tmp_path, name) for name in ("a", "b")]
            processes += [s.proc for s in servers]
            request.addfinalizer(lambda: _print_logs(servers, store_url, tmp_path))
            for server in servers:
                wait_for(server.answers, timeout=60, what="the instance serving")
            wait_for(lambda: len(store.devices(FLEET)) == 5, what="births in the store")
            # dev-2 goes away: the wave it is in cannot end until it is back
            take_offline(fleet, store, "dev-2")
            wait_for(lambda: store.lease_holder(lease_name(FLEET)) is not None, what="a holder")
            holder = store.lease_holder(lease_name(FLEET))
            first, second = servers if holder == servers[0].holder else servers[::-1]
            assert holder == first.holder

            command = _rollout_command(fleet, store_url, tmp_path)
            processes.append(command.proc)
            wait_for(
                lambda: command.said(f"rollout 1: run by {first.holder}; following it"),
                timeout=60,
                what="the command handing over to the instance",
            )
            # the operator leaves: the rollout lives on in the store, run by the instances
            command.proc.send_signal(signal.SIGKILL)
            command.proc.wait(timeout=10)
            # canary [dev-0], then [dev-1, dev-2], then [dev-3, dev-4]
            wait_for(
                lambda: (
                    store.rollout(1).current_wave == 1
                    and all(published for _, published in store.waves(1)[1])
                ),
                timeout=60,
                what="the canary done and wave 1 published",
            )
            planned = store.waves(1)
            assert [[d for d, _ in w] for w in planned] == [
                ["dev-0"],
                ["dev-1", "dev-2"],
                ["dev-3", "dev-4"],
            ]
            assert first.said("rollout 1 (digits@2): starting")
            assert not second.said("holds the lease")

            first.proc.send_signal(signal.SIGKILL)
            assert first.proc.wait(timeout=10) == -signal.SIGKILL
            fleet.start_agent("dev-2", group="lab")  # back: it finds its manifest retained

            wait_for(
                lambda: store.rollout(1).state in ("COMPLETED", "ABORTED"),
                timeout=90,  # past the wave's 60 s: a stuck wave shows as ABORTED
                what="the rollout finished by the other instance",
            )
            result = store.rollout(1)
            assert result.state == "COMPLETED", result.detail
            assert store.lease_holder(lease_name(FLEET)) == second.holder
            assert second.said("rollout 1 (digits@2): resuming at wave 1")
            assert not second.said("(digits@2): starting")
            assert [[d for d, _ in w] for w in store.waves(1)] == [
                [d for d, _ in w] for w in planned
            ]
            wait_for(lambda: sum(spy.counts.values()) >= 5, what="the spy saw every publish")
            assert spy.counts == dict.fromkeys(DEVICES, 1)
        for device, service in fleet.agents.items():
            assert service.agent.model.manifest.version == 2, device
            assert store.job_states(FLEET, "digits", 2)[device][0].value == "ACTIVE"
        assert retained_json(topics.manifest(FLEET, "digits").name, fleet.broker)["version"] == 2

        # SIGTERM: uvicorn's shutdown runs the lifespan's, which hands the lease over at once
        second.proc.send_signal(signal.SIGTERM)
        second.proc.wait(timeout=30)
        assert store.lease_holder(lease_name(FLEET)) is None, second.log.read_text()
    finally:
        store.close()
