"""Field data from a real agent to the real cloud: a real Mosquitto (the capture switch),
the cloud server with its sample store and ``POST /fleet/samples``, real agents
(``AgentService`` in this process, ``tandem-agent run`` as a child for ``kill -9``)
serving the digits model with TFLite and escalating to the cloud's ONNX model.

What is checked: escalations and audits reach the store with the edge's and the cloud's
answers, once each; capture is off until enabled; the retained switch turns it on and off
live and is remembered across a restart; a ``kill -9`` with samples in the spool loses
none and stores none twice; an outage of the upload route loses nothing; a request never
waits for capture; telemetry carries the ``capture`` and ``audit`` sections."""

from __future__ import annotations

import contextlib
import random
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from agent.device.service import AgentService
from agent.inference.observe import Observation
from agent.settings import AgentSettings
from cloud.app import create_app
from cloud.pipeline.data import SplitData
from cloud.settings import CloudSettings
from shared import topics
from shared.commands import CaptureCommand
from shared.mqtt import MqttClient
from shared.samples import device_token
from shared.telemetry import Telemetry
from tests.fleet import wait_for
from tests.helpers import CLOUD_REPO, EDGE_INT8, ROOT, free_port, infer_body, serve_in_thread
from tests.mosquitto import Mosquitto
from tests.sample_items import feature_sample

FLEET = "loop"
SECRET = "loop-secret-for-tests"
#: Above the digits model's 0.85: rows between the two escalate, enough of the test split.
THRESHOLD = 0.99


class SamplesGate:
    """The cloud app, with the upload route breakable: ``down`` answers 503 without
    storing; ``lose_answers`` stores the upload and then drops its answer (the device sees
    a 500), as a connection lost after the server committed would."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.down = False
        self.lose_answers = False
        self.attempts = 0
        self.lost = 0
        self.statuses: list[int] = []  # the app's answers that were lost

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != "/fleet/samples"
            or scope["method"] != "POST"
        ):
            await self.app(scope, receive, send)
            return
        self.attempts += 1
        if self.down:
            await receive()
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b'{"error": "down"}'})
            return
        if not self.lose_answers:
            await self.app(scope, receive, send)
            return

        async def swallow(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.statuses.append(message["status"])

        await self.app(scope, receive, swallow)
        self.lost += 1
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b'{"error": "answer lost"}'})


class Loop:
    def __init__(self, tmp: Path, broker: Mosquitto, url: str, gate: SamplesGate) -> None:
        self.tmp = tmp
        self.broker = broker
        self.url = url
        self.gate = gate
        self.http = httpx.Client(base_url=url, timeout=10)
        self.controller = MqttClient(broker.settings_for("controller"), client_id="loop-ctl")
        self.telemetry: list[Telemetry] = []
        self.controller.subscribe(topics.fleet_device_filter(FLEET, "telemetry"), self._on)
        self.controller.start(wait_s=10)
        self.services: list[AgentService] = []

    def _on(self, topic: str, payload: bytes, retained: bool) -> None:
        self.telemetry.append(Telemetry.model_validate_json(payload))

    def settings(self, device: str, **capture: Any) -> AgentSettings:
        return AgentSettings(
            model_dir=EDGE_INT8,
            device=device,
            fleet=FLEET,
            state_dir=self.tmp / device,
            mqtt=self.broker.settings_for(device, keepalive_s=5),
            cloud={"url": self.url},
            routing={"threshold": THRESHOLD, "deadline_ms": 10_000},
            telemetry={"interval_s": 0.2, "daily_budget_bytes": None},
            capture={
                "token": device_token(SECRET, FLEET, device),
                "upload_interval_s": 0.1,
                "max_backoff_s": 0.3,
                "max_batch": 8,
                "audit_rate": 0.0,
                "max_samples_per_hour": None,
                **capture,
            },
        )

    def start(self, device: str, **capture: Any) -> AgentService:
        service = AgentService(self.settings(device, **capture))
        service.start(wait_s=10)
        self.services.append(service)
        return service

    def samples(self, device: str, kind: str | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"device": device, "limit": 1000}
        if kind is not None:
            params["kind"] = kind
        reply = self.http.get("/fleet/samples", params=params)
        reply.raise_for_status()
        found: list[dict[str, Any]] = reply.json()["samples"]
        return found

    def switch(self, command: CaptureCommand | None, **scope: str) -> None:
        payload = command.model_dump_json().encode() if command is not None else b""
        assert self.controller.publish_wait(topics.capture_command(FLEET, **scope), payload)

    def close(self) -> None:
        for service in self.services:
            with contextlib.suppress(Exception):  # a test may have stopped it already
                service.stop()
        self.controller.stop()
        self.http.close()


@pytest.fixture
def loop(tmp_path: Path, broker: Mosquitto) -> Iterator[Loop]:
    settings = CloudSettings(
        repo=CLOUD_REPO,
        fleet=FLEET,
        state_dir=tmp_path / "cloud",
        mqtt=broker.settings_for("collector"),
        samples={"device_token_secret": SECRET},
    )
    gate = SamplesGate(create_app(settings))
    with serve_in_thread(gate) as url:
        harness = Loop(tmp_path, broker, url, gate)
        try:
            yield harness
        finally:
            harness.close()


def split(service: AgentService, x: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Test rows the edge is unsure of (they escalate) and rows it is sure of."""
    unsure, sure = [], []
    with unobserved(service):
        for row in x:
            r = service.agent.infer(row, mode="edge")
            (unsure if r.confidence < THRESHOLD else sure).append(row)
    return unsure, sure


@contextmanager
def unobserved(service: AgentService) -> Iterator[None]:
    """The test's own questions to the edge, with the observer unplugged: not captured,
    not audited."""
    observer, service.agent.observer = service.agent.observer, None
    try:
        yield
    finally:
        service.agent.observer = observer


def escalate(service: AgentService, rows: list[np.ndarray]) -> list[int]:
    """Each row through the agent; each must have been answered by the cloud."""
    answers = []
    for row in rows:
        r = service.agent.infer(row)
        assert r.source == "cloud", r.reason
        answers.append(r.index)
    return answers


def ids(rows: list[np.ndarray]) -> set[str]:
    """The sample ids the device gives these rows (the SHA-256 of their encoded bytes)."""
    return {feature_sample(np.asarray(row, np.float32))[0].id for row in rows}


def stored_ids(loop: Loop, device: str) -> set[str]:
    return {s["id"] for s in loop.samples(device)}


def spooled(state_dir: Path) -> int:
    """Samples in an agent's spool, read as another process would."""
    db = sqlite3.connect(f"file:{state_dir / 'samples.db'}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])
    finally:
        db.close()


# ------------------------------------------------------------------------------ tests


def test_escalations_and_audits_are_stored_once_with_both_answers(
    loop: Loop, digits: SplitData
) -> None:
    service = loop.start("dev-1", enabled=True, audit_rate=1.0)
    unsure, sure = split(service, digits.test.x[:300])
    assert len(unsure) >= 11 and len(sure) >= 10
    fresh, unsure, sure = unsure[10], unsure[:10], sure[:10]
    cloud_answers = escalate(service, unsure)
    with unobserved(service):
        edge_answers = [service.agent.infer(row, mode="edge").index for row in unsure]
    for row in sure:  # answered by the edge; every one audited (audit_rate 1)
        assert service.agent.infer(row).source == "edge"
    wait_for(lambda: len(loop.samples("dev-1")) == 20, what="20 samples stored")
    escalations = loop.samples("dev-1", "escalation")
    audits = loop.samples("dev-1", "audit")
    assert len(escalations) == 10 and len(audits) == 10
    by_edge = sorted((s["edge_index"], s["cloud_index"]) for s in escalations)
    assert by_edge == sorted(zip(edge_answers, cloud_answers))
    for s in escalations + audits:
        assert (s["model"], s["version"], s["encoding"], s["shape"]) == ("digits", 1, "uint8", [64])
        assert s["cloud_model"] is not None and s["cloud_model"].startswith("digits-cloud")
        assert s["label_source"] == "cloud" and s["label"] == s["cloud_index"]
    # the same inputs again: nothing more is stored (duplicates caught on the device)
    before = service.capture.duplicates
    escalate(service, unsure)
    for row in sure:
        service.agent.infer(row)
    wait_for(lambda: service.capture.duplicates >= before + 20, what="duplicates counted")
    escalate(service, [fresh])  # a new input after them: a positive control
    wait_for(lambda: service.capture.uploaded == 21, what="the fresh one uploaded")
    assert len(loop.samples("dev-1")) == 21
    # telemetry carries both sections
    wait_for(
        lambda: any(
            t.capture is not None and t.capture.uploaded == 21 and t.audit is not None
            for t in loop.telemetry
        ),
        what="telemetry with capture and audit",
    )
    audited = [t.audit for t in loop.telemetry if t.audit is not None]
    assert sum(a.audited for a in audited) == audited[-1].session_audited >= 10
    last = [t.capture for t in loop.telemetry if t.capture is not None][-1]
    assert last.enabled and last.captured == 21 and last.pending == 0
    assert last.duplicates >= 20 and last.rejected == 0
    wire = service.wire.snapshot()
    assert wire["samples"].sent > 0 and wire["audits"].sent > 0


def test_capture_is_off_by_default_and_the_retained_switch_turns_it_on_and_off(
    loop: Loop, digits: SplitData
) -> None:
    service = loop.start("dev-2")
    unsure, _ = split(service, digits.test.x[:400])
    assert len(unsure) >= 12
    a, b, c, d = unsure[0:3], unsure[3:6], unsure[6:9], unsure[9:12]
    escalate(service, a)  # off by default: not captured
    assert not service.capture.enabled
    # the switch comes on while a's answers may still wait in the observation queue:
    # they were answered while capture was off, so they must not be kept
    loop.switch(CaptureCommand(enabled=True))  # the fleet's switch, retained
    wait_for(lambda: service.capture.enabled, what="capture on")
    escalate(service, b)
    wait_for(lambda: stored_ids(loop, "dev-2") >= ids(b), what="b stored")
    loop.switch(CaptureCommand(enabled=False), device="dev-2")  # more specific: off
    wait_for(lambda: not service.capture.enabled, what="capture off")
    escalate(service, c)
    loop.switch(None, device="dev-2")  # deleted: the fleet's on holds again
    wait_for(lambda: service.capture.enabled, what="capture on again")
    escalate(service, d)
    # the queue is in order: once d is stored, a and c were seen and not captured
    wait_for(lambda: stored_ids(loop, "dev-2") >= ids(d), what="d stored")
    assert stored_ids(loop, "dev-2") == ids(b) | ids(d)
    assert service.capture.captured == 6
    service.stop()
    loop.services.remove(service)
    # the switch is remembered: the device boots with no broker and captures
    offline = AgentService(loop.settings("dev-2").model_copy(update={"mqtt": None}))
    offline.start()
    try:
        assert offline.capture.enabled
    finally:
        offline.stop()


def test_a_fixed_setting_outranks_the_switch(loop: Loop, digits: SplitData) -> None:
    loop.switch(CaptureCommand(enabled=True))
    service = loop.start("dev-3", enabled=False)
    on = loop.start("dev-4")  # a positive control: it follows the switch
    wait_for(lambda: on.capture.enabled, what="dev-4 on")
    unsure, _ = split(service, digits.test.x[:200])
    escalate(service, unsure[:3])
    escalate(on, unsure[:3])
    wait_for(lambda: len(loop.samples("dev-4")) == 3, what="dev-4's samples")
    assert not service.capture.enabled and loop.samples("dev-3") == []


def test_the_hourly_limit_and_the_seed_reach_the_agent(loop: Loop, digits: SplitData) -> None:
    """``[capture] max_samples_per_hour``: 40 an hour is a bucket of 4 with 1 kept for
    audits, so 3 of 6 escalations in a burst are captured and 3 counted ``skipped_rate``
    in telemetry; ``seed``: two devices with the same seed audit the same answers."""
    limited = loop.start("dev-1", enabled=True, max_samples_per_hour=40)
    assert not limited.capture.include_probs
    unsure, sure = split(limited, digits.test.x[:300])
    escalate(limited, unsure[:6])
    wait_for(lambda: limited.capture.uploaded == 3, what="3 uploaded")
    wait_for(
        lambda: any(t.capture is not None and t.capture.skipped_rate == 3 for t in loop.telemetry),
        what="skipped_rate in telemetry",
    )
    assert len(loop.samples("dev-1")) == 3
    # the draw of seed 11: one number per confident answer
    draws = random.Random(11)
    expected = sum(draws.random() < 0.5 for _ in range(20))
    audited = []
    for device in ("dev-2", "dev-3"):
        service = loop.start(device, enabled=True, audit_rate=0.5, seed=11)
        for row in sure[:20]:
            assert service.agent.infer(row).source == "edge"
        wait_for(
            lambda d=device: len(loop.samples(d, "audit")) == expected,  # type: ignore[misc]
            what=f"{expected} audits stored",
        )
        audited.append(sorted(x["id"] for x in loop.samples(device, "audit")))
    assert audited[0] == audited[1]


def test_upload_outage_loses_nothing(loop: Loop, digits: SplitData) -> None:
    service = loop.start("dev-5", enabled=True)
    unsure, _ = split(service, digits.test.x[:300])
    loop.gate.down = True
    escalate(service, unsure[:12])
    wait_for(lambda: service.capture.captured == 12, what="12 captured")
    wait_for(lambda: loop.gate.attempts >= 3, what="uploads tried and refused")
    assert loop.samples("dev-5") == [] and service.spool.pending == 12
    loop.gate.down = False
    wait_for(lambda: service.spool.pending == 0, what="the spool drained")
    assert len(loop.samples("dev-5")) == 12
    assert (service.capture.uploaded, service.capture.rejected) == (12, 0)


def test_a_request_never_waits_for_capture(loop: Loop, digits: SplitData) -> None:
    service = loop.start("dev-6", enabled=True)
    unsure, _ = split(service, digits.test.x[:300])
    release = threading.Event()
    entered = threading.Event()

    def blocked(obs: Observation) -> None:
        entered.set()
        release.wait(60)

    service.observations.consumers.insert(0, blocked)
    try:
        escalate(service, unsure[:1])
        assert entered.wait(10)  # the consumer thread is stuck in capture's place...
        escalate(service, unsure[1:8])  # ...and requests still complete
        assert service.capture.captured == 0
    finally:
        release.set()
    wait_for(lambda: len(loop.samples("dev-6")) == 8, what="all 8 stored once released")


def _process_config(loop: Loop, path: Path, port: int) -> Path:
    state = loop.tmp / "dev-7"
    token = device_token(SECRET, FLEET, "dev-7")
    path.write_text(
        f'model_dir = "{EDGE_INT8}"\ndevice = "dev-7"\nfleet = "{FLEET}"\n'
        f'state_dir = "{state}"\nlog_level = "WARNING"\n'
        f'[cloud]\nurl = "{loop.url}"\n'
        f"[routing]\nthreshold = {THRESHOLD}\ndeadline_ms = 10000\n"
        f"[server]\nport = {port}\n"
        f'[capture]\nenabled = true\ntoken = "{token}"\nupload_interval_s = 0.1\n'
        "max_backoff_s = 0.3\nmax_batch = 4\naudit_rate = 0.0\n"
    )
    return path


def _serving_process(config: Path) -> subprocess.Popen[bytes]:
    """``tandem-agent run`` with its local endpoint (requests come over HTTP)."""
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--config", str(config), "run"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@contextmanager
def _running(config: Path, port: int) -> Iterator[tuple[subprocess.Popen[bytes], httpx.Client]]:
    proc = _serving_process(config)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

    def ready() -> bool:
        try:
            return client.get("/v2/health/ready").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, timeout=60, what="the agent's endpoint")
        yield proc, client
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_kill_9_with_a_full_spool_then_restart_stores_each_sample_once(
    loop: Loop, digits: SplitData, tmp_path: Path
) -> None:
    probe = loop.start("dev-8", enabled=False)
    unsure, _ = split(probe, digits.test.x[:300])
    assert len(unsure) >= 10
    rows = unsure[:10]
    port = free_port()
    config = _process_config(loop, tmp_path / "agent.toml", port)
    state = loop.tmp / "dev-7"
    # the cloud stores the first batch, but its answer never reaches the device, which
    # sends it again and again (in order: the rest waits behind it)
    loop.gate.lose_answers = True
    with _running(config, port) as (proc, client):
        for row in rows:
            reply = client.post("/v2/models/digits/infer", json=infer_body(row[None]))
            assert reply.status_code == 200, reply.text
            assert reply.json()["parameters"]["source"] == "cloud"
        wait_for(lambda: spooled(state) == 10, what="10 in the spool")
        wait_for(lambda: loop.gate.lost >= 2, what="a batch stored, its answer lost, twice")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert spooled(state) == 10
    first = loop.samples("dev-7")
    assert len(first) == 4  # one batch (max_batch 4) is in the cloud, stored once
    assert set(loop.gate.statuses) == {200}  # the lost answers were the cloud's yes
    loop.gate.lose_answers = False
    with _running(config, port) as (proc, _):
        wait_for(lambda: spooled(state) == 0, timeout=30, what="the spool uploaded again")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    samples = loop.samples("dev-7")
    assert len(samples) == 10 and len({s["id"] for s in samples}) == 10
    assert {s["id"] for s in first} <= {s["id"] for s in samples}
