"""``kill -9`` of a real agent process at every update state, then a clean restart: the
agent boots a loadable model with no network, its store is consistent, and the interrupted
update completes (or never started twice)."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.backends import TFLiteSettings
from agent.model import load_model
from agent.store import ModelStore
from tests.fleet import FLEET, Fleet, last_state, running_fleet, wait_for
from tests.helpers import EDGE_INT8, agent_process
from tests.mosquitto import Mosquitto


@pytest.fixture
def fleet(tmp_path: Path, broker: Mosquitto) -> Iterator[Fleet]:
    with running_fleet(tmp_path, broker) as f:
        yield f


def _config(fleet: Fleet, path: Path, **update: object) -> Path:
    state = fleet.tmp / "agents" / "dev-5"
    lines = [
        f'model_dir = "{EDGE_INT8}"',
        'device = "dev-5"',
        f'fleet = "{FLEET}"',
        f'state_dir = "{state}"',
        'log_level = "WARNING"',
        "[cloud]",
        f'url = "{fleet.url}"',
        "[mqtt]",
        f'url = "{fleet.broker.url}"',
        'username = "dev-5"',
        'password = "pw-5"',
        "reconnect_min_s = 0.2",
        "reconnect_max_s = 1",
        "[update]",
        f'trust_store = "{fleet.trust_path}"',
        "settle_s = 0.2",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in update.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _pointer(fleet: Fleet) -> str | None:
    """Read the pointer file directly: opening a ModelStore cleans up crash debris, which
    must not happen under a running agent."""
    path = fleet.tmp / "agents" / "dev-5" / "models" / "digits" / "pointer.json"
    try:
        current: str = json.loads(path.read_text())["current"]
    except (OSError, ValueError, KeyError):
        return None
    return current


@pytest.mark.parametrize(
    "kill_at", ["QUEUED", "DOWNLOADING", "VERIFYING", "ACTIVATING", "HEALTH_WATCH"]
)
def test_kill_9_at_every_state_then_restart(fleet: Fleet, kill_at: str, tmp_path: Path) -> None:
    release = fleet.release()
    if kill_at == "HEALTH_WATCH":  # after the pointer moved, before ACTIVE
        hold = _config(fleet, tmp_path / "hold.toml", health_watch_s=60.0)
    else:
        hold = _config(
            fleet,
            tmp_path / "hold.toml",
            health_watch_s=0.3,
            test_hold_state=kill_at,
            test_hold_s=60.0,
        )
    proc = agent_process(hold)
    try:
        wait_for(lambda: len(fleet.store.devices(FLEET)) == 1, what="birth")
        fleet.publish(release)
        if kill_at == "HEALTH_WATCH":
            wait_for(lambda: (_pointer(fleet) or "").startswith("v2-"), what="pointer moved")
        else:
            wait_for(lambda: (last_state(fleet, "dev-5", 2) or ("",))[0] == kill_at, what=kill_at)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # the store is consistent and bootable with no network at all
    store = ModelStore(fleet.tmp / "agents" / "dev-5")
    slot = store.bootable_slots("digits")[0]
    load_model(slot, TFLiteSettings()).close()

    again = agent_process(_config(fleet, tmp_path / "again.toml", health_watch_s=0.3))
    try:
        wait_for(
            lambda: last_state(fleet, "dev-5", 2) == ("ACTIVE", ""),
            timeout=30,
            what="ACTIVE after restart",
        )
        assert (_pointer(fleet) or "").startswith("v2-")
        status = fleet.store.devices(FLEET)[0]
        wait_for(lambda: fleet.store.devices(FLEET)[0]["session"] == 2, what="second session")
        assert status["device"] == "dev-5"
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(timeout=10)
    assert again.returncode == 0
    store = ModelStore(fleet.tmp / "agents" / "dev-5")
    assert store.job("digits") is None and store.highest_accepted("digits") == 2
    slots = sorted(p.name[:3] for p in (store.model_dir("digits") / "slots").iterdir())
    assert slots == ["v1-", "v2-"]
