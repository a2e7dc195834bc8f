"""Signed updates end to end against real Mosquitto, the real cloud server and registry, and
real TFLite: installs, every refusal, resumed downloads, failed validation, health-watch
rollback. Agents run in-process (``AgentService``)."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta

import numpy as np
import pytest

from cloud.pipeline.data import SplitData
from shared import topics
from shared.manifest import Manifest, RoutingDefaults, utc_now
from shared.signing import SigningKey
from tests.artifact_server import serve_artifact
from tests.fleet import FLEET, Fleet, last_state, retained_json, wait_for
from tests.helpers import EDGE_INT8


def serving(fleet: Fleet, device: str) -> int:
    return fleet.agents[device].agent.model.manifest.version


def test_signed_update_installs_on_several_agents(fleet: Fleet, digits: SplitData) -> None:
    for i in range(3):
        fleet.start_agent(f"dev-{i}")
    release = fleet.release()
    fleet.publish(release)
    for i in range(3):
        wait_for(lambda i=i: last_state(fleet, f"dev-{i}", 2) == ("ACTIVE", ""), what="ACTIVE")
        service = fleet.agents[f"dev-{i}"]
        assert serving(fleet, f"dev-{i}") == 2
        assert service.agent.infer(digits.test.x[0]).edge_model == "digits:2"
        pointer = service.store.pointer("digits")
        assert pointer is not None and pointer.current.startswith("v2-")
        assert pointer.previous is not None and pointer.previous.startswith("v1-")
        assert service.store.highest_accepted("digits") == 2
    # the births were refreshed with the new version
    wait_for(
        lambda: all(
            d["models"] == [{"model": "digits", "version": 2}] for d in fleet.store.devices(FLEET)
        ),
        what="births",
    )
    status = retained_json(topics.device_status(FLEET, "dev-0").name, fleet.broker)
    assert status["state"] == "online" and status["models"][0]["version"] == 2


def _forged(fleet: Fleet, key: SigningKey, **update: object) -> Manifest:
    base = fleet.registry.manifest("digits", 1)
    return key.sign(base.model_copy(update={"version": 2, "created": utc_now(), **update}))


def test_refusals_name_their_reason_and_keep_the_old_model(fleet: Fleet) -> None:
    service = fleet.start_agent("dev-0")
    before = len(fleet.server.artifact_requests)

    unknown = _forged(fleet, SigningKey.generate())
    fleet.publish(unknown)
    wait_for(lambda: last_state(fleet, "dev-0", 2) is not None, what="report")
    assert last_state(fleet, "dev-0", 2) == (
        "REJECTED",
        f"signature: manifest signed by unknown key {unknown.key_id}",
    )

    expired = _forged(fleet, fleet.key, version=3, expires=utc_now() - timedelta(minutes=1))
    fleet.publish(expired)
    wait_for(lambda: last_state(fleet, "dev-0", 3) is not None, what="report")
    state, reason = last_state(fleet, "dev-0", 3)  # type: ignore[misc]
    assert state == "REJECTED" and reason.startswith("expired at")

    tampered = _forged(fleet, fleet.key, version=4)
    body = tampered.to_json().replace('"version": 4', '"version": 40')
    fleet.publish(tampered, raw=body.encode())
    wait_for(lambda: last_state(fleet, "dev-0", 40) is not None, what="report")
    assert last_state(fleet, "dev-0", 40)[0] == "REJECTED"  # type: ignore[index]
    assert "does not verify" in last_state(fleet, "dev-0", 40)[1]  # type: ignore[index]

    assert len(fleet.server.artifact_requests) == before  # nothing was downloaded
    assert serving(fleet, "dev-0") == 1
    assert service.agent.infer(np.zeros(64)).edge_model == "digits:1"

    # a release, then a replay of the older one (still validly signed)
    fleet.publish(fleet.release(version=5))
    wait_for(lambda: last_state(fleet, "dev-0", 5) == ("ACTIVE", ""), what="v5")
    fleet.publish(fleet.registry.manifest("digits", 1), device="dev-0")
    wait_for(lambda: last_state(fleet, "dev-0", 1) is not None, what="replay")
    assert last_state(fleet, "dev-0", 1) == (
        "REJECTED",
        "version 1 is not newer than 5: replayed or old",
    )
    assert serving(fleet, "dev-0") == 5


def test_replay_is_refused_after_a_restart(fleet: Fleet) -> None:
    service = fleet.start_agent("dev-0")
    fleet.publish(fleet.release())
    wait_for(lambda: last_state(fleet, "dev-0", 2) == ("ACTIVE", ""), what="v2")
    service.stop()
    del fleet.agents["dev-0"]
    # the old release is published again while the device is away
    fleet.publish(fleet.registry.manifest("digits", 1))
    again = fleet.start_agent("dev-0")
    assert serving(fleet, "dev-0") == 2  # booted v2 from its store
    wait_for(lambda: last_state(fleet, "dev-0", 1) is not None, what="replay report")
    assert last_state(fleet, "dev-0", 1)[0] == "REJECTED"  # type: ignore[index]
    assert again.store.highest_accepted("digits") == 2


def test_tampered_artifact_fails_its_digest(fleet: Fleet) -> None:
    fleet.start_agent("dev-0")
    release = fleet.release()
    artifact = fleet.registry.release_dir("digits", 2) / "model.tflite"
    blob = bytearray(artifact.read_bytes())
    blob[-10] ^= 0xFF  # same size, different bytes
    artifact.write_bytes(bytes(blob))
    fleet.publish(release)
    wait_for(lambda: (last_state(fleet, "dev-0", 2) or ("",))[0] == "FAILED", what="FAILED")
    assert last_state(fleet, "dev-0", 2)[1].startswith("digest:")  # type: ignore[index]
    assert serving(fleet, "dev-0") == 1


def test_download_cut_in_the_middle_resumes(fleet: Fleet) -> None:
    service = fleet.start_agent("dev-0")
    release = fleet.release()
    fleet.server.cut_next_download_at = release.edge.size // 2
    fleet.publish(release)
    wait_for(lambda: last_state(fleet, "dev-0", 2) == ("ACTIVE", ""), what="ACTIVE")
    requests = fleet.server.artifact_requests
    assert len(requests) == 2
    assert "range" not in requests[0]
    assert requests[1]["range"].startswith("bytes=") and requests[1]["range"] != "bytes=0-"
    assert requests[1]["if-range"] == f'"{release.edge.sha256}"'
    assert service.updater.downloader.resumed == 1


def test_failed_validation_keeps_the_previous_model(fleet: Fleet) -> None:
    fleet.start_agent("dev-0")
    good = fleet.release()
    # a release whose golden samples the artifact does not reproduce (signed and trusted)
    bad_golden = [g.model_copy(update={"label": (g.label + 1) % 10}) for g in good.golden]
    bad = fleet.key.sign(good.model_copy(update={"golden": bad_golden}))
    fleet.publish(bad)
    wait_for(lambda: (last_state(fleet, "dev-0", 2) or ("",))[0] == "FAILED", what="FAILED")
    assert last_state(fleet, "dev-0", 2)[1].startswith("validation:")  # type: ignore[index]
    assert serving(fleet, "dev-0") == 1
    pointer = fleet.agents["dev-0"].store.pointer("digits")
    assert pointer is not None and pointer.current.startswith("v1-")


def test_failed_health_watch_rolls_back(fleet: Fleet, digits: SplitData) -> None:
    service = fleet.start_agent("dev-0", health_watch_s=3.0, health_min_requests=20)
    # a release whose routing temperature makes every answer unsure: it would escalate
    # everything. Validation (golden samples at T=1) passes; traffic shows the problem.
    release = fleet.release(routing=RoutingDefaults(threshold=0.85, temperature=100.0))
    stop = threading.Event()
    errors: list[BaseException] = []

    def traffic() -> None:
        while not stop.is_set():
            try:
                service.agent.infer(digits.test.x[0], mode="edge")
            except BaseException as exc:
                errors.append(exc)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        fleet.publish(release)
        wait_for(
            lambda: (last_state(fleet, "dev-0", 2) or ("",))[0] == "ROLLED_BACK", what="ROLLED_BACK"
        )
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert "below the threshold" in last_state(fleet, "dev-0", 2)[1]  # type: ignore[index]
    assert serving(fleet, "dev-0") == 1
    pointer = service.store.pointer("digits")
    assert pointer is not None and pointer.current.startswith("v1-")
    # and it is not installed again when redelivered after a restart
    assert service.store.highest_accepted("digits") == 2


def test_most_specific_manifest_wins(fleet: Fleet) -> None:
    # the two publishes below must land in one settle window: 0.2 s is a stall away
    fleet.start_agent("dev-0", group="lab", settle_s=2.0)
    fleet.start_agent("dev-1", group="field")
    v2 = fleet.release()
    v3 = fleet.release(edge_dir=EDGE_INT8)
    fleet.publish(v2)  # fleet scope
    fleet.publish(v3, group="lab")  # the lab group gets v3
    wait_for(lambda: last_state(fleet, "dev-0", 3) == ("ACTIVE", ""), what="lab on v3")
    wait_for(lambda: last_state(fleet, "dev-1", 2) == ("ACTIVE", ""), what="field on v2")
    assert last_state(fleet, "dev-0", 2) is None  # never took the fleet's v2


def test_two_agents_cannot_share_a_store(fleet: Fleet) -> None:
    from agent.device.service import AgentService
    from agent.errors import AgentError

    fleet.start_agent("dev-0")
    with pytest.raises(AgentError, match="another agent"):
        AgentService(fleet.agent_settings("dev-0"))


def test_garbage_on_manifest_topics_is_counted_not_fatal(fleet: Fleet) -> None:
    service = fleet.start_agent("dev-0")
    release = fleet.release()
    fleet.publish(release, raw=b"\x00\xffnot json")
    fleet.publish(release, raw=b'{"schema": "tandem.manifest/v1", "model": "digits"}')
    wait_for(lambda: service.updater.malformed == 2, what="malformed counted")
    newer = fleet.release(min_agent_version="99.0")
    fleet.publish(newer)
    wait_for(lambda: last_state(fleet, "dev-0", 3) is not None, what="report")
    assert last_state(fleet, "dev-0", 3) == ("REJECTED", "needs agent 99.0, this is 0.1.0")
    fleet.publish(fleet.release())  # and a good one still goes through
    wait_for(lambda: last_state(fleet, "dev-0", 4) == ("ACTIVE", ""), what="v4")


def _hostile(fleet: Fleet) -> list[bytes]:
    """Payloads that are no manifest, each one a crash of the updater thread before."""
    genuine = fleet.registry.manifest("digits", 1)
    doc = json.loads(genuine.to_json())
    text = genuine.to_json()
    padded = fleet.key.sign(genuine.model_copy(update={"version": 9}))  # valid, signed...
    huge = padded.to_json() + " " * (3 << 20)  # ...and 3 MB of whitespace: refused unread
    assert Manifest.from_json(huge) == padded
    return [
        huge.encode(),
        b'{"schema": "tandem.manifest/v1", "model": "\xff\xfe"}',  # not UTF-8
        b"[1, 2, 3]",
        b"42",
        b"null",
        json.dumps({**doc, "version": "two", "labels": 5}).encode(),
        json.dumps({**doc, "output": {**doc["output"], "shape": []}}).encode(),  # IndexError
        json.dumps({**doc, "labels": "X"}).replace('"X"', "[" * 50_000 + "]" * 50_000).encode(),
        text[: len(text) // 2].encode(),  # truncated
        json.dumps({**doc, "model": "other"}).encode(),  # another model's, on digits' topic
    ]


def test_hostile_payloads_are_counted_and_updates_still_install(fleet: Fleet) -> None:
    deep = b"[" * 100_000  # RecursionError in the JSON decoder
    # retained at fleet scope before the device boots: the case that disabled updates at
    # every boot of every device
    fleet.publish(fleet.registry.manifest("digits", 1), raw=deep)
    service = fleet.start_agent("dev-0")
    wait_for(lambda: service.updater.malformed == 1, what="the deep payload counted")
    hostile = _hostile(fleet)
    for i, payload in enumerate(hostile):
        fleet.publish(
            fleet.registry.manifest("digits", 1),
            raw=payload,
            device="dev-0" if i % 2 else None,
        )
    wait_for(lambda: service.updater.malformed == 1 + len(hostile), what="all counted")
    assert service.updater.alive
    assert fleet.store.job_states(FLEET, "digits", 9) == {}  # the huge one was never read
    fleet.publish(fleet.release())  # fleet scope: the device scope's last word was garbage
    wait_for(lambda: last_state(fleet, "dev-0", 2) == ("ACTIVE", ""), what="ACTIVE")
    assert serving(fleet, "dev-0") == 2


def test_tampered_copy_does_not_block_the_genuine_manifest(fleet: Fleet) -> None:
    fleet.start_agent("dev-0")
    genuine = fleet.release()
    # same version, same signature, one field changed: it must not verify
    tampered = genuine.model_copy(
        update={"routing": genuine.routing.model_copy(update={"threshold": 0.01})}
    )
    fleet.publish(tampered)
    wait_for(lambda: last_state(fleet, "dev-0", 2) is not None, what="report")
    state, reason = last_state(fleet, "dev-0", 2)  # type: ignore[misc]
    assert state == "REJECTED" and "does not verify" in reason
    fleet.publish(genuine)
    wait_for(lambda: last_state(fleet, "dev-0", 2) == ("ACTIVE", ""), what="genuine ACTIVE")
    assert serving(fleet, "dev-0") == 2
    assert fleet.agents["dev-0"].agent.model.manifest.routing.threshold == genuine.routing.threshold


@pytest.mark.parametrize("field", ["expires", "created"])
def test_a_time_without_time_zone_is_rejected_with_a_reason(fleet: Fleet, field: str) -> None:
    fleet.start_agent("dev-0")
    naive = (datetime.now() + timedelta(days=1)).replace(microsecond=0)
    release = _forged(fleet, fleet.key, **{field: naive})
    assert getattr(Manifest.from_json(release.to_json()), field).tzinfo is None
    fleet.publish(release)
    wait_for(lambda: last_state(fleet, "dev-0", 2) is not None, what="report")
    assert last_state(fleet, "dev-0", 2) == (
        "REJECTED",
        f"{field} {naive.isoformat(sep=' ')} has no time zone",
    )
    fleet.publish(fleet.release(version=3))  # and the updater carries on
    wait_for(lambda: last_state(fleet, "dev-0", 3) == ("ACTIVE", ""), what="v3")


def _hosted_at(fleet: Fleet, release: Manifest, url: str, version: int) -> Manifest:
    """``release`` again as a new version whose artifact lives at an absolute ``url``."""
    edge = release.edge.model_copy(update={"url": url})
    return fleet.key.sign(release.model_copy(update={"version": version, "edge": edge}))


@pytest.mark.parametrize("fleet", [{"token": "fleet-secret"}], indirect=True, ids=["token"])
def test_the_cloud_token_goes_only_to_the_cloud_origin(fleet: Fleet) -> None:
    fleet.start_agent("dev-0")
    release = fleet.release()
    fleet.publish(release)  # from the registry: the token is needed there (401 without)
    wait_for(lambda: last_state(fleet, "dev-0", 2) == ("ACTIVE", ""), what="v2")
    assert fleet.server.artifact_requests[-1]["authorization"] == "Bearer fleet-secret"
    blob = (fleet.registry.release_dir("digits", 2) / "model.tflite").read_bytes()
    with serve_artifact(blob) as (elsewhere, url):
        fleet.publish(_hosted_at(fleet, release, f"{url}/cdn/model.tflite", 3))
        wait_for(lambda: last_state(fleet, "dev-0", 3) == ("ACTIVE", ""), what="v3")
        assert len(elsewhere.requests) == 1
        assert "authorization" not in elsewhere.requests[0]


def test_a_trickling_download_fails_at_its_deadline(fleet: Fleet) -> None:
    fleet.start_agent("dev-0", download={"backoff_s": 0.05, "deadline_s": 2.0})
    release = fleet.release()
    blob = (fleet.registry.release_dir("digits", 2) / "model.tflite").read_bytes()
    with serve_artifact(blob) as (slow, url):
        slow.trickle = (8, 0.1)  # 80 bytes/s: 50 s for the artifact
        fleet.publish(_hosted_at(fleet, release, f"{url}/model.tflite", 3))
        wait_for(lambda: (last_state(fleet, "dev-0", 3) or ("",))[0] == "FAILED", what="FAILED")
        reason = last_state(fleet, "dev-0", 3)[1]  # type: ignore[index]
        assert reason.startswith("download: ") and "within the 2 s deadline" in reason
        assert 0 < slow.sent < len(blob)
    assert serving(fleet, "dev-0") == 1
