"""``AgentService``: the agent as a device runs it. Boots the last-known-good model from the
store with no network, then connects to the broker (birth, Last Will, manifests) and keeps
the updater fed. ``Agent`` stays usable on its own (tests, embedding); this wires it up.

Boot order, all offline: the store's current slot; failing that, its previous slot; failing
that, the factory model (``model_dir``), which is imported into the store on first boot.

Every byte the agent's MQTT and HTTP clients move is counted by category (``WireCounter``:
births, telemetry, job states, manifests, the connection, downloads, escalations) and
reported in its telemetry, which keeps to the day's byte budget.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from agent.device.download import download_client
from agent.device.outbox import Outbox, OutboxSender
from agent.device.store import ModelStore, atomic_write
from agent.device.telemetry import DailyBudget, TelemetryReporter
from agent.device.updater import Updater
from agent.device.wire import CountingMqttClient, WireCounter, count_http, http_hooks
from agent.errors import AgentError, ModelLoadError
from agent.inference.core import Agent
from agent.inference.model import LoadedModel, load_model
from agent.settings import AgentSettings
from agent.version import __version__
from shared import topics
from shared.errors import ContractError
from shared.manifest import Manifest
from shared.signing import TrustStore
from shared.status import DeviceStatus, ModelVersion
from shared.update import UpdateReport

log = logging.getLogger(__name__)


def lock_state_dir(state_dir: Path) -> int:
    """Hold an exclusive lock on the state folder for the life of the process: two agents
    sharing one store would clean up each other's downloads. Released by the kernel on exit,
    ``kill -9`` included."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AgentError(f"another agent is running on {state_dir}") from None
    return fd


def next_session(state_dir: Path) -> int:
    """A counter that increases at every start, persisted (births carry it)."""
    path = state_dir / "session.json"
    try:
        current = int(json.loads(path.read_text())["session"])
    except (OSError, ValueError, KeyError, TypeError):
        current = 0
    atomic_write(path, json.dumps({"session": current + 1}).encode())
    return current + 1


class AgentService:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self._lock_fd = lock_state_dir(settings.state_dir)
        self.store = ModelStore(settings.state_dir)
        self.session = next_session(settings.state_dir)
        #: Bytes on the wire by category, for this session (reported in telemetry).
        self.wire = WireCounter()
        self.agent = Agent(
            settings, model=self._boot(), cloud_hooks=http_hooks(self.wire, "escalations")
        )
        trust = (
            TrustStore.load(settings.update.trust_store) if settings.update.trust_store else None
        )
        # the cloud's token goes to the cloud and registry origins only, not to any host
        # an artifact URL names
        self.http = download_client(
            settings.cloud.token,
            [settings.cloud.url, settings.update.registry_url],
            settings.cloud.tls,
        )
        count_http(self.http, self.wire, "downloads")  # artifacts and bundle files
        self.mqtt: CountingMqttClient | None = None
        self.updater = Updater(
            self.agent,
            self.store,
            trust,
            settings.update,
            device=settings.device,
            backend=settings.backend,
            report=self._publish_report,
            http=self.http,
            registry_url=settings.cloud.url,
            hold=settings.testing,
        )
        t = settings.telemetry
        self.outbox = Outbox(
            settings.state_dir / "outbox.db", t.outbox_max_rows, t.outbox_max_bytes
        )
        self.sender: OutboxSender | None = None
        self.telemetry: TelemetryReporter | None = None
        if settings.mqtt is not None:
            offline = self._status("offline")
            self.mqtt = CountingMqttClient(
                settings.mqtt,
                client_id=settings.device,
                wire=self.wire,
                will=(topics.device_status(settings.fleet, settings.device), offline),
                on_connect=self._on_connect,
                on_ack=self._on_ack,
                on_disconnect=self._on_disconnect,
            )
            self.sender = OutboxSender(self.outbox, self.mqtt, t.window, t.replay_per_s)
            self.telemetry = TelemetryReporter(
                self.agent,
                self.outbox,
                topics.device_telemetry(settings.fleet, settings.device).name,
                settings.device,
                self.session,
                t.interval_s,
                on_put=self.sender.notify,
                wire=self.wire,
                budget=DailyBudget(t.daily_budget_bytes, self.wire)
                if t.daily_budget_bytes is not None
                else None,
                over_budget_interval_s=t.over_budget_interval_s,
            )
            for f in topics.agent_manifest_filters(settings.fleet, settings.device, settings.group):
                self.mqtt.subscribe(f, self._on_manifest)

    # ------------------------------------------------------------------------- boot

    def _served_model(self) -> str:
        s = self.settings
        if (s.model_dir / "manifest.json").is_file():
            return Manifest.load(s.model_dir).model
        models = self.store.models()
        if len(models) == 1:
            return models[0]
        raise ModelLoadError(
            f"no factory model at {s.model_dir} and the store holds {len(models)} models"
        )

    def _boot(self) -> LoadedModel:
        name = self._served_model()
        if self.store.pointer(name) is None:
            slot = self.store.import_dir(self.settings.model_dir)
            self.store.activate(name, slot)
            self.store.accept(name, Manifest.load(slot).version)
        for slot in self.store.bootable_slots(name):
            try:
                model = load_model(slot, self.settings.backend, self.settings.images.max_pixels)
            except (ModelLoadError, ContractError) as exc:
                log.error("slot %s does not boot: %s", slot.name, exc.message)
                continue
            log.info("booted %s from %s", model.manifest.ref, slot)
            return model
        log.error("no slot boots; falling back to the factory model %s", self.settings.model_dir)
        return load_model(
            self.settings.model_dir, self.settings.backend, self.settings.images.max_pixels
        )

    # ------------------------------------------------------------------------ MQTT

    def _status(self, state: Literal["online", "offline"]) -> bytes:
        """The retained status message: a birth (``online``) or a goodbye (``offline``)."""
        m = self.agent.model.manifest
        status = DeviceStatus(
            device=self.settings.device,
            state=state,
            group=self.settings.group,
            agent_version=__version__,
            session=self.session,
            models=[ModelVersion(model=m.model, version=m.version)],
            capabilities=["oip", "update", self.settings.backend.kind],
            ts=datetime.now(timezone.utc),
        )
        return status.model_dump_json().encode()

    def _on_connect(self) -> None:
        """Birth (retained), and the last job state again in case it was lost offline."""
        assert self.mqtt is not None
        s = self.settings
        self.mqtt.publish(topics.device_status(s.fleet, s.device), self._status("online"))
        if self.updater.last_report is not None:
            self._publish_report(self.updater.last_report)
        if self.sender is not None:
            self.sender.notify()  # replay the backlog

    def _on_ack(self, mid: int) -> None:
        if self.sender is not None:
            self.sender.on_ack(mid)

    def _on_disconnect(self) -> None:
        if self.sender is not None:
            self.sender.on_disconnect()

    def _on_manifest(self, topic: str, payload: bytes, retained: bool) -> None:
        parsed = topics.parse_manifest(topic)
        if parsed is None:
            log.warning("ignoring message on unexpected topic %s", topic)
            return
        self.updater.offer(parsed.scope, parsed.model, payload)

    def _publish_report(self, report: UpdateReport) -> None:
        if self.mqtt is None:
            return
        s = self.settings
        self.mqtt.publish(
            topics.device_update(s.fleet, s.device), report.model_dump_json().encode()
        )
        if report.state.terminal:  # the birth's model list changed, or may have
            self.mqtt.publish(topics.device_status(s.fleet, s.device), self._status("online"))

    # ------------------------------------------------------------------- lifecycle

    def start(self, wait_s: float | None = None) -> None:
        self.updater.start()
        if self.mqtt is not None:
            assert self.sender is not None and self.telemetry is not None
            self.sender.start()
            self.telemetry.start()
            self.mqtt.start(wait_s=wait_s)

    def stop(self) -> None:
        """Graceful: last telemetry out (briefly waiting for its ack), say offline ourselves
        (no Last Will), stop threads, release models."""
        if self.telemetry is not None and self.sender is not None:
            self.telemetry.stop(flush=True)
            deadline = time.monotonic() + 2.0
            while self.outbox.pending and self.mqtt and self.mqtt.connected.is_set():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            self.sender.stop()
        if self.mqtt is not None:
            s = self.settings
            if self.mqtt.connected.is_set():
                self.mqtt.publish_wait(
                    topics.device_status(s.fleet, s.device),
                    self._status("offline"),
                    timeout_s=2.0,
                )
            self.mqtt.stop()
        self.updater.stop()
        self.http.close()
        self.agent.close()
        self.outbox.close()
        os.close(self._lock_fd)
