"""``AgentService``: the agent as a device runs it. Boots the last-known-good model from the
store with no network, then connects to the broker (birth, Last Will, manifests) and keeps
the updater fed. ``Agent`` stays usable on its own (tests, embedding); this wires it up.

Boot order, all offline: the store's current slot; failing that, its previous slot; failing
that, the factory model (``model_dir``), which is imported into the store on first boot.

Every byte the agent's MQTT and HTTP clients move is counted by category (``WireCounter``:
births, telemetry, job states, manifests, the connection, downloads, escalations) and
reported in its telemetry, which keeps to the day's byte budget.

The learning loop (issue 15): every classifier answer goes through an ``ObservationQueue``
(its own thread: a request never waits) to capture (escalations), the audit (a share of
confident answers asked of the cloud on a client of its own) and the shadow; the audit's
labelled answers go to capture too. Captured samples wait in the spool for the uploader.
The fleet's capture switch comes on the retained command topics.
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

from agent.device.audit import Audit
from agent.device.capture import Capture
from agent.device.download import download_client
from agent.device.outbox import Outbox, OutboxSender
from agent.device.spool import Spool
from agent.device.store import ModelStore, atomic_write
from agent.device.switch import CaptureSwitch
from agent.device.telemetry import DailyBudget, TelemetryReporter
from agent.device.updater import Updater
from agent.device.uploader import UploadBudget, Uploader
from agent.device.wire import CountingMqttClient, WireCounter, count_http, http_hooks
from agent.errors import AgentError, ModelLoadError
from agent.inference.cloud_client import CloudClient
from agent.inference.core import Agent
from agent.inference.model import LoadedModel, load_model
from agent.inference.observe import Observation, ObservationQueue, Observer
from agent.inference.shadow import ShadowRunner
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
        self._learning_loop()

    # ----------------------------------------------------------------- learning loop

    def _learning_loop(self) -> None:
        """Capture, audit, upload and the capture switch (``agent.device.capture``,
        ``.audit``, ``.uploader``, ``.switch``), wired to the agent and the telemetry."""
        s, c = self.settings, self.settings.capture
        self.switch = CaptureSwitch(s.state_dir / "capture.json", c.enabled)
        self.spool = Spool(s.state_dir / "samples.db", c.max_spool_bytes)
        t = s.telemetry
        self.upload_budget = (
            UploadBudget(
                t.daily_budget_bytes,
                self.wire,
                t.interval_s,
                (lambda: self.telemetry.seq if self.telemetry else 0)
                if self.telemetry is not None
                else None,
            )
            if t.daily_budget_bytes is not None
            else None
        )
        self.capture = Capture(
            self.spool,
            self.switch,
            budget=self.upload_budget,
            cloud_model=self._cloud_model,
            batch=c.max_batch,
            include_probs=c.include_probs,
            max_samples_per_hour=c.max_samples_per_hour,
        )
        # audits go on a cloud client of their own: counted apart, and never holding one
        # of the request path's connections
        self.audit_cloud: CloudClient | None = None
        if s.cloud.url:
            self.audit_cloud = CloudClient(
                s.cloud.url,
                token=s.cloud.token.get_secret_value() if s.cloud.token else None,
                binary=s.cloud.binary,
                connect_timeout_s=s.cloud.connect_timeout_s,
                max_connections=1,
                event_hooks=http_hooks(self.wire, "audits"),
                tls=s.cloud.tls,
            )
        self.audit = Audit(
            self.agent,
            self._audit_rate(),
            cloud=self.audit_cloud,
            max_pending=c.max_pending,
            timeout_s=c.audit_timeout_s,
            seed=c.seed,
        )
        self.uploader: Uploader | None = None
        base = c.upload_url or s.cloud.url
        if base is not None:
            # the device's certificate, if any, goes to the upload origin (the token rides
            # in the upload's own headers)
            self.samples_http = download_client(None, [base], s.cloud.tls)
            count_http(self.samples_http, self.wire, "samples")
            self.uploader = Uploader(
                self.capture,
                self.samples_http,
                base,
                s.device,
                c.token.get_secret_value() if c.token else None,
                interval_s=c.upload_interval_s,
                max_batch=c.max_batch,
                budget=self.upload_budget,
                max_backoff_s=c.max_backoff_s,
            )
            self.capture.on_full = self.uploader.notify
            self.switch.listeners.append(self.uploader.notify)
        self.switch.listeners.append(self._switched)
        consumers: list[Observer] = [self.capture.observe, self.audit.observe]
        labelled: list[Observer] = [self.capture.audited]
        # --- learning loop: the shadow's consumers join here (H3)
        # the shadow candidate (agent.inference.shadow): installed and dropped by the
        # updater from the retained shadow topics, fed the answers and the audits
        self.shadow = ShadowRunner(s.shadow)
        self.updater.shadow = self.shadow
        self.shadow.listeners.append(self._shadow_changed)
        consumers.append(self.shadow.observe)
        # every audit, the shadow's extra ones too ([shadow] audit_rate, set while one is
        # installed: _shadow_changed)
        self.audit.on_shadow_labelled.append(self.shadow.labelled)
        if self.telemetry is not None:
            self.telemetry.extras.append(self.shadow.section)
        if self.mqtt is not None:
            for f in topics.agent_shadow_filters(s.fleet, s.device, s.group):
                self.mqtt.subscribe(f, self._on_shadow)
        # --- learning loop end
        self.audit.on_labelled += labelled
        self.observations = ObservationQueue(consumers, c.max_pending)
        self.capture.queue_dropped = lambda: self.observations.dropped
        # capture keeps only cloud-labelled answers: without a cloud nothing consumes
        if self.agent.cloud_configured:
            self.agent.observer = self.observations.offer
        if self.telemetry is not None:
            self.telemetry.extras += [self.capture.section, self.audit.section]
        if self.mqtt is not None:
            for name in topics.agent_command_topics(s.fleet, s.device, s.group):
                self.mqtt.subscribe(name, self.switch.on_message)

    def _audit_rate(self) -> float:
        rate = self.switch.audit_rate
        return rate if rate is not None else self.settings.capture.audit_rate

    def _switched(self) -> None:
        self.audit.rate = self._audit_rate()

    def _cloud_model(self, obs: Observation) -> str | None:
        target = self.agent.cloud_target
        if target is None:
            return None
        return f"{target.model}:{target.version}" if target.version else target.model

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

    # --- learning loop (H3): the shadow's topic and its observer switch
    def _on_shadow(self, topic: str, payload: bytes, retained: bool) -> None:
        parsed = topics.parse_manifest(topic, leaf="shadow")
        if parsed is None:
            log.warning("ignoring message on unexpected topic %s", topic)
            return
        self.updater.offer_shadow(parsed.scope, parsed.model, payload)

    def _shadow_changed(self) -> None:
        """A shadow was installed or cleared: with one, the agent's answers must reach the
        observation queue even where no cloud is configured (nothing else consumes then),
        and confident answers are audited at the shadow's rate (the gate's labels)."""
        installed = self.shadow.model is not None
        self.audit.shadow_rate = self.settings.shadow.audit_rate if installed else 0.0
        if installed:
            self.agent.observer = self.observations.offer
        elif not self.agent.cloud_configured:
            self.agent.observer = None

    # --- learning loop end

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
        self.observations.start()
        self.audit.start()
        if self.uploader is not None:
            self.uploader.start()
        if self.mqtt is not None:
            assert self.sender is not None and self.telemetry is not None
            self.sender.start()
            self.telemetry.start()
            self.mqtt.start(wait_s=wait_s)

    def _stop_learning_loop(self) -> None:
        """Producers first, the spool last: requests stop offering, the queue's thread
        stops, what is still queued is captured on this thread (the spool keeps it for the
        next start), then the audit's and the uploader's threads stop (audits under way are
        not waited for past a few seconds). The spool is closed only once none of them can
        write to it: a thread still busy after its join's timeout (a slow consumer, a cloud
        call) leaves it open, logged (every sample written is committed already)."""
        self.agent.observer = None
        stopped = self.observations.stop()
        self.observations.drain()  # safe beside a queue thread still busy
        stopped = self.audit.stop() and stopped
        if self.uploader is not None:
            stopped = self.uploader.stop() and stopped
            self.samples_http.close()
        if self.audit_cloud is not None:
            self.audit_cloud.close()
        if stopped:
            self.spool.close()
        else:
            log.warning("a learning-loop thread is still busy: the capture spool is left open")

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
        self._stop_learning_loop()
        self.http.close()
        self.agent.close()
        self.outbox.close()
        os.close(self._lock_fd)
