"""Shadow candidates end to end: real Mosquitto, the real cloud server and registry over
HTTP, real TFLite, an in-process ``AgentService``. A signed release published on the
device's shadow topic runs beside the serving model (telemetry, read from the broker,
carries its ``shadow`` section) and never answers; clearing the topic, a refused or broken
candidate, and the rollout activating the candidate's version each leave serving as it
must be."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from agent import Agent, AgentSettings
from agent.device.service import AgentService
from agent.inference.backends import TFLiteSettings
from agent.inference.model import load_model
from agent.inference.observe import Observation
from agent.inference.shadow import ShadowRunner
from agent.settings import ShadowSettings
from cloud.pipeline.data import SplitData
from cloud.releases.package_model import ModelPackageRequest, package_model
from cloud.releases.registry import Registry
from shared import topics
from shared.manifest import Manifest, utc_now
from shared.mqtt import MqttClient
from shared.signing import SigningKey
from shared.telemetry import Telemetry
from tests.fleet import FLEET, Fleet, last_state, wait_for
from tests.mosquitto import Mosquitto
from tests.real_models import photo, real_model

DEVICE = "dev-0"
EMOTIONS = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]


class TelemetryLog:
    """Every telemetry message of one device, as the collector would receive it."""

    def __init__(self, broker: Mosquitto, device: str) -> None:
        self.messages: list[Telemetry] = []
        self._lock = threading.Lock()
        self.client = MqttClient(broker.settings_for("collector"), client_id="shadow-telemetry")
        self.client.subscribe(topics.device_telemetry(FLEET, device).name, self._on)
        self.client.start(wait_s=10)

    def _on(self, topic: str, payload: bytes, retained: bool) -> None:
        with self._lock:
            self.messages.append(Telemetry.model_validate_json(payload))

    def since(self, seq: int) -> list[Telemetry]:
        with self._lock:
            return [t for t in self.messages if t.seq > seq]


@pytest.fixture
def telemetry(broker: Mosquitto) -> Iterator[TelemetryLog]:
    log = TelemetryLog(broker, DEVICE)
    yield log
    log.client.stop()


def start_agent(fleet: Fleet, cloud: bool = True) -> AgentService:
    """dev-0 with telemetry every 0.2 s and every confident answer audited (labels);
    ``cloud`` False: no cloud, the registry named on its own."""
    base = fleet.agent_settings(DEVICE, **({} if cloud else {"registry_url": fleet.url}))
    update: dict[str, Any] = {
        "telemetry": base.telemetry.model_copy(
            update={"interval_s": 0.2, "daily_budget_bytes": None}
        ),
        "capture": base.capture.model_copy(update={"audit_rate": 1.0}),
    }
    if not cloud:
        update["cloud"] = base.cloud.model_copy(update={"url": None})
    settings = base.model_copy(update=update)
    service = AgentService(settings)
    service.start(wait_s=10)
    fleet.agents[DEVICE] = service
    return service


def publish_shadow(fleet: Fleet, manifest: Manifest | None, raw: bytes | None = None) -> None:
    """The candidate on dev-0's shadow topic (retained); None: the topic cleared."""
    payload = raw if raw is not None else (manifest.to_json().encode() if manifest else b"")
    topic = topics.shadow(FLEET, "digits", device=DEVICE)
    assert fleet.controller.publish_wait(topic, payload)


def shadow_state(service: AgentService, version: int) -> tuple[str, str] | None:
    report = service.updater.last_shadow
    if report is None or report.version != version:
        return None
    return report.state.value, report.reason


class Traffic:
    """Requests to the agent, every result kept (to check who answered)."""

    def __init__(self, service: AgentService, x: np.ndarray) -> None:
        self.service, self.x = service, x
        self.results: list[Any] = []
        self.i = 0

    def some(self, n: int = 10) -> bool:
        for _ in range(n):
            self.results.append(self.service.agent.infer(self.x[self.i % len(self.x)]))
            self.i += 1
        return True


def test_a_shadow_runs_beside_serving_until_its_topic_is_cleared(
    fleet: Fleet, digits: SplitData, telemetry: TelemetryLog
) -> None:
    service = start_agent(fleet)
    candidate = fleet.release()  # v2, the float model
    publish_shadow(fleet, candidate)
    ended = ("ACTIVE", "FAILED", "REJECTED")
    wait_for(lambda: (shadow_state(service, 2) or ("",))[0] in ended, what="the shadow's job")
    assert shadow_state(service, 2) == ("ACTIVE", "running as the shadow")
    traffic = Traffic(service, digits.test.x)

    def shadowed() -> bool:
        traffic.some()
        runs = [t.shadow for t in telemetry.since(0) if t.shadow is not None]
        escalated = sum(r.source == "cloud" for r in traffic.results)
        return (
            all((s.model, s.version) == ("digits", 2) for s in runs)
            and sum(s.samples for s in runs) > 0
            # more labels than escalations: the audits' labels reach the shadow too
            and sum(s.labelled for s in runs) > escalated
        )

    wait_for(shadowed, what="telemetry with the shadow's runs")
    # it never answered, never became the serving model, never wrote the pointer
    assert {r.edge_model for r in traffic.results} == {"digits:1"}
    assert service.agent.model.manifest.version == 1
    pointer = service.store.pointer("digits")
    assert pointer is not None and pointer.current.startswith("v1-")
    assert pointer.previous is None
    assert service.store.highest_accepted("digits") == 1
    assert service.store.shadow_path(candidate).is_dir()
    assert last_state(fleet, DEVICE, 2) is None  # nothing on the update topic
    totals = [t.shadow for t in telemetry.since(0) if t.shadow is not None]
    assert sum(s.samples for s in totals) > 0
    assert all(s.agree_serving <= s.samples and s.labelled <= s.samples for s in totals)

    publish_shadow(fleet, None)  # cleared
    wait_for(lambda: service.shadow.model is None, what="the shadow dropped")
    assert not service.store.shadow_path(candidate).exists()
    built = service.telemetry.seq if service.telemetry else 0
    wait_for(
        lambda: traffic.some() and any(t.requests > 0 for t in telemetry.since(built)),
        what="telemetry after the clear",
    )
    assert all(t.shadow is None for t in telemetry.since(built))
    assert {r.edge_model for r in traffic.results} == {"digits:1"}


def test_a_forged_or_broken_shadow_is_refused_and_serving_is_untouched(
    fleet: Fleet, digits: SplitData
) -> None:
    service = start_agent(fleet)
    downloads = len(fleet.server.artifact_requests)
    base = fleet.registry.manifest("digits", 1)
    forged = SigningKey.generate().sign(
        base.model_copy(update={"version": 2, "created": utc_now()})
    )
    publish_shadow(fleet, forged)
    wait_for(lambda: shadow_state(service, 2) is not None, what="the forged one's state")
    assert shadow_state(service, 2) == (
        "REJECTED",
        f"signature: manifest signed by unknown key {forged.key_id}",
    )
    assert len(fleet.server.artifact_requests) == downloads  # nothing downloaded

    broken = fleet.release(version=3)
    artifact = fleet.registry.release_dir("digits", 3) / "model.tflite"
    blob = bytearray(artifact.read_bytes())
    blob[-10] ^= 0xFF  # same size, other bytes
    artifact.write_bytes(bytes(blob))
    publish_shadow(fleet, broken)
    wait_for(
        lambda: (shadow_state(service, 3) or ("",))[0] == "FAILED", what="the broken one FAILED"
    )
    assert shadow_state(service, 3)[1].startswith("digest:")  # type: ignore[index]
    assert service.shadow.model is None
    assert not service.store.shadow_path(broken).exists()
    for version in (2, 3):
        assert last_state(fleet, DEVICE, version) is None
    assert service.agent.model.manifest.version == 1
    assert service.agent.infer(digits.test.x[0]).edge_model == "digits:1"
    pointer = service.store.pointer("digits")
    assert pointer is not None and pointer.current.startswith("v1-")

    good = fleet.release(version=4)  # the positive control: the same path installs it
    publish_shadow(fleet, good)
    wait_for(lambda: shadow_state(service, 4) == ("ACTIVE", "running as the shadow"), what="v4")
    assert service.shadow.model is not None
    assert service.shadow.model.manifest.version == 4
    assert service.agent.model.manifest.version == 1


def test_a_shadow_is_dropped_once_serving_reaches_its_version(
    fleet: Fleet, digits: SplitData
) -> None:
    service = start_agent(fleet)
    candidate = fleet.release()  # v2
    publish_shadow(fleet, candidate)
    wait_for(lambda: shadow_state(service, 2) == ("ACTIVE", "running as the shadow"), what="v2")
    downloads = len(fleet.server.artifact_requests)
    assert downloads == 1
    fleet.publish(candidate)  # the rollout activates it
    wait_for(lambda: last_state(fleet, DEVICE, 2) == ("ACTIVE", ""), what="v2 serving")
    wait_for(lambda: service.shadow.model is None, what="the shadow dropped")
    assert service.agent.infer(digits.test.x[0]).edge_model == "digits:2"
    # the activation took the shadow's files: no second download
    assert len(fleet.server.artifact_requests) == downloads
    assert not service.store.shadow_path(candidate).exists()
    pointer = service.store.pointer("digits")
    assert pointer is not None and pointer.current == service.store.slot_name(candidate)
    # the shadow topic still holds v2: it is not taken up again (logged once as moot)
    publish_shadow(fleet, candidate)
    wait_for(lambda: (shadow_state(service, 2) or ("",))[0] == "REJECTED", what="moot")
    assert "not newer than the serving 2" in shadow_state(service, 2)[1]  # type: ignore[index]
    assert service.shadow.model is None


def test_without_a_cloud_the_shadow_still_sees_the_answers(
    fleet: Fleet, digits: SplitData, telemetry: TelemetryLog
) -> None:
    """No cloud (the registry named on its own): nothing else consumes the answers, so
    the agent hands them over only while a shadow is installed."""
    service = start_agent(fleet, cloud=False)
    assert not service.agent.cloud_configured and service.agent.observer is None
    publish_shadow(fleet, fleet.release())
    wait_for(lambda: shadow_state(service, 2) == ("ACTIVE", "running as the shadow"), what="v2")
    assert service.agent.observer is not None
    traffic = Traffic(service, digits.test.x)
    wait_for(
        lambda: (
            traffic.some()
            and any(t.shadow is not None and t.shadow.samples > 0 for t in telemetry.since(0))
        ),
        what="the shadow's runs",
    )
    assert {(r.edge_model, r.source) for r in traffic.results} == {("digits:1", "edge")}
    assert all(t.shadow.labelled == 0 for t in telemetry.since(0) if t.shadow is not None)
    publish_shadow(fleet, None)
    wait_for(lambda: service.agent.observer is None, what="the hand-over off again")


def test_a_newer_shadow_replaces_it_and_a_restart_keeps_its_files(
    fleet: Fleet, digits: SplitData
) -> None:
    service = start_agent(fleet)
    v2, v3 = fleet.release(), fleet.release()
    publish_shadow(fleet, v2)
    wait_for(lambda: shadow_state(service, 2) == ("ACTIVE", "running as the shadow"), what="v2")
    publish_shadow(fleet, v3)
    wait_for(lambda: shadow_state(service, 3) == ("ACTIVE", "running as the shadow"), what="v3")
    assert service.shadow.model is not None and service.shadow.model.manifest.version == 3
    assert not service.store.shadow_path(v2).exists()
    assert service.store.shadow_path(v3).is_dir()
    downloads = len(fleet.server.artifact_requests)
    assert downloads == 2

    service.stop()  # the retained shadow comes again at the next start
    del fleet.agents[DEVICE]
    again = start_agent(fleet)
    wait_for(lambda: shadow_state(again, 3) == ("ACTIVE", "running as the shadow"), what="again")
    assert len(fleet.server.artifact_requests) == downloads  # from its folder, no download
    assert again.agent.model.manifest.version == 1
    assert again.agent.infer(digits.test.x[0]).edge_model == "digits:1"


def test_an_image_candidate_runs_on_the_encoded_picture(tmp_path: Path) -> None:
    """A real image classifier (MediaPipe's fer, ``tests/real_models.py``): the shadow
    decodes and preprocesses the caller's PNG with its own preprocessor, and its counts
    are those of the candidate answering the same pictures itself."""
    (tmp_path / "emotions.txt").write_text("\n".join(EMOTIONS) + "\n")
    contract = tmp_path / "fer.toml"
    contract.write_text(
        'task = "classification"\nlabels = "emotions.txt"\n'
        '[inputs.x]\nkind = "image"\ncolour = "GRAY"\nmean = [127.5]\nstd = [127.5]\n'
    )
    registry, key = Registry(tmp_path / "reg"), SigningKey.generate()
    folders = []
    for _ in range(2):  # v1 serves, v2 is the candidate (the same network)
        request = ModelPackageRequest(
            edge=real_model("fer_emotion"), name="emotions", contract=contract
        )
        version = package_model(request, key, registry).version
        folders.append(registry.release_dir("emotions", version))
    pictures = []
    for name in ("astronaut", "coffee", "chelsea"):
        image = photo(name)
        for dx in (0, 40):
            buffer = io.BytesIO()
            Image.fromarray(image[dx : dx + 160, dx : dx + 150]).save(buffer, format="PNG")
            pictures.append(buffer.getvalue())
    serving = Agent(AgentSettings(model_dir=folders[0], routing={"mode": "edge"}))
    own = Agent(AgentSettings(model_dir=folders[1], routing={"mode": "edge"}))
    runner = ShadowRunner(ShadowSettings())
    runner.install(load_model(folders[1], TFLiteSettings()))
    seen: list[Observation] = []
    serving.observer = seen.append
    try:
        served = [serving.infer(p) for p in pictures]
        direct = [own.infer(p) for p in pictures]
    finally:
        serving.close()
        own.close()
    assert len(seen) == len(pictures) and all(o.encoded is not None for o in seen)
    for obs in seen:
        runner.observe(obs)
    runner.drain()
    got = runner.section()["shadow"]
    runner.clear()
    threshold = Manifest.load(folders[1]).routing.threshold
    assert (got.model, got.version, got.samples) == ("emotions", 2, len(pictures))
    assert got.agree_serving == sum(a.index == b.index for a, b in zip(served, direct))
    assert got.would_escalate == sum(d.confidence < threshold for d in direct)
