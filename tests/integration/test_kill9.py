"""``kill -9`` of a real agent process at every update state, then a clean restart: the
agent boots a loadable model with no network, its store is consistent, and the interrupted
update completes (or never started twice)."""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import pytest

from agent.device.store import ModelStore
from agent.inference.backends import TFLiteSettings
from agent.inference.model import load_model
from tests.artifact_server import serve_artifact
from tests.fleet import FLEET, Fleet, last_state, wait_for
from tests.helpers import EDGE_INT8, agent_process


def _config(
    fleet: Fleet, path: Path, testing: dict[str, object] | None = None, **update: object
) -> Path:
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
    if testing:
        lines += ["[testing]", *(f"{k} = {json.dumps(v)}" for k, v in testing.items())]
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
            {"hold_update_state": kill_at, "hold_s": 60.0},
            health_watch_s=0.3,
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


def test_kill_9_mid_download_resumes_from_the_partial_file(fleet: Fleet, tmp_path: Path) -> None:
    """Bytes received before a kill -9 are kept: the next start asks for the rest
    (``Range: bytes=N-``, with the ETag the first process saw as ``If-Range``)."""
    release = fleet.release()
    blob = (fleet.registry.release_dir("digits", 2) / "model.tflite").read_bytes()
    cut = len(blob) // 2
    with serve_artifact(blob) as (server, url):
        edge = release.edge.model_copy(update={"url": f"{url}/model.tflite"})
        manifest = fleet.key.sign(release.model_copy(update={"version": 3, "edge": edge}))
        part = fleet.tmp / "agents" / "dev-5" / "models" / "digits" / "staging"
        part = part / f"v3-{manifest.edge.sha256[:12]}.part"
        server.stall_next_at = cut  # half the artifact, then the connection hangs
        proc = agent_process(_config(fleet, tmp_path / "first.toml", health_watch_s=0.3))
        try:
            wait_for(lambda: len(fleet.store.devices(FLEET)) == 1, what="birth")
            fleet.publish(manifest)
            wait_for(lambda: part.is_file() and part.stat().st_size == cut, what="half on disk")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert last_state(fleet, "dev-5", 3) == ("DOWNLOADING", "")

        again = agent_process(_config(fleet, tmp_path / "again.toml", health_watch_s=0.3))
        try:
            wait_for(
                lambda: last_state(fleet, "dev-5", 3) == ("ACTIVE", ""),
                timeout=30,
                what="ACTIVE after restart",
            )
        finally:
            again.send_signal(signal.SIGTERM)
            again.wait(timeout=10)
        assert [r.get("range") for r in server.requests] == [None, f"bytes={cut}-"]
        assert server.requests[1]["if-range"] == server.etag
        assert server.sent == len(blob)  # every byte sent once
    current = _pointer(fleet)
    assert current is not None and current.startswith("v3-")
    slot = fleet.tmp / "agents" / "dev-5" / "models" / "digits" / "slots" / current
    assert hashlib.sha256((slot / "model.tflite").read_bytes()).hexdigest() == manifest.edge.sha256
