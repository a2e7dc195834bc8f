"""Devices without an agent for the rollout gate's tests: each speaks the fleet protocol over
MQTT (its retained birth, its retained job reports, its telemetry with ``shadow`` and
``audit`` sections) and reacts to its manifest and shadow topics the way an agent does:
a shadow manifest starts shadow reports on that candidate, an empty one stops them, a
manifest makes the release serve (job state ACTIVE) with audit reports on it.

How good the candidate is, is set per device (``Quality``): each telemetry message carries
``per_message`` labelled shadow runs with those agreements, so the sums a gate reads are
known exactly. Each logs in on its own device account of the test broker, whose ACL lets
it publish only its own topics and read its manifests and shadows, as a real device.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from shared import topics
from shared.manifest import Manifest
from shared.mqtt import MqttClient
from shared.status import DeviceStatus, ModelVersion
from shared.telemetry import FieldAccuracy, ShadowStats, Telemetry
from shared.update import UpdateReport, UpdateState
from tests.mosquitto import Mosquitto
from tests.telemetry_samples import sample_telemetry

MODEL = "digits"


def shadow_stats(
    version: int, *, both: int, shadow_only: int, serving_only: int, wrong_both: int = 0
) -> ShadowStats:
    """One interval's shadow section: labelled runs right for both, for one of the two, or
    for neither (every run labelled; the two disagree only on the one-sided ones and
    ``wrong_both``)."""
    n = both + shadow_only + serving_only + wrong_both
    return ShadowStats(
        model=MODEL,
        version=version,
        samples=n,
        agree_serving=n - shadow_only - serving_only - wrong_both,
        labelled=n,
        agree_cloud=both + shadow_only,
        serving_agree_cloud=both + serving_only,
        shadow_only_right=shadow_only,
        serving_only_right=serving_only,
        would_escalate=0,
    )


def telemetry(
    device: str,
    seq: int,
    *,
    serving: int = 1,
    session: int = 1,
    shadow: ShadowStats | None = None,
    audit: FieldAccuracy | None = None,
) -> Telemetry:
    """A well-formed message of ``device`` serving ``digits@serving``, with the sections."""
    base = Telemetry.model_validate_json(sample_telemetry(device, seq))
    return Telemetry.model_validate(
        {
            **base.model_dump(),
            "session": session,
            "models": [{"model": MODEL, "version": serving}],
            "shadow": shadow.model_dump() if shadow else None,
            "audit": audit.model_dump() if audit else None,
        }
    )


def audit(version: int, audited: int, wrong: int) -> FieldAccuracy:
    return FieldAccuracy(
        model=MODEL,
        version=version,
        audited=audited,
        wrong=wrong,
        session_audited=audited,
        session_wrong=wrong,
    )


@dataclass
class Quality:
    """Per telemetry message: labelled shadow runs (right for both, the shadow only, the
    serving model only, neither) and, for the version served, audited answers and wrong
    ones. The default: a candidate as good as the serving model (90 % each)."""

    both: int = 17
    shadow_only: int = 1
    serving_only: int = 1
    wrong_both: int = 1
    audited: dict[int, tuple[int, int]] = field(default_factory=dict)


@dataclass
class SimDevice:
    broker: Mosquitto
    fleet: str
    device: str
    quality: Quality = field(default_factory=Quality)
    serving: int = 1
    period_s: float = 0.05
    #: telemetry messages with shadow runs it may still send (None: no limit)
    budget: int | None = None
    #: (what, version) in the order they came: shadow, shadow-cleared, manifest
    events: list[tuple[str, int | None]] = field(default_factory=list)
    shadow_version: int | None = None
    seq: int = 0
    #: called on its own thread once a new release serves, before ACTIVE is reported
    on_activate: Callable[[SimDevice], None] | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Manifest] = []
        self._stop = threading.Event()
        self._client = MqttClient(
            self.broker.settings_for(self.device), client_id=f"sim-{self.device}"
        )
        self._client.subscribe(
            topics.manifest(self.fleet, MODEL, device=self.device).name, self._on_manifest
        )
        self._client.subscribe(
            topics.shadow(self.fleet, MODEL, device=self.device).name, self._on_shadow
        )
        self._thread = threading.Thread(target=self._run, name=f"sim-{self.device}", daemon=True)

    # paho's thread: record only (a publish waiting for its PUBACK here would never end)
    def _on_manifest(self, topic: str, payload: bytes, retained: bool) -> None:
        if payload:
            m = Manifest.model_validate_json(payload)
            with self._lock:
                self.events.append(("manifest", m.version))
                self._pending.append(m)

    def _on_shadow(self, topic: str, payload: bytes, retained: bool) -> None:
        with self._lock:
            if payload:
                version = Manifest.model_validate_json(payload).version
                self.events.append(("shadow", version))
                self.shadow_version = version
            else:
                self.events.append(("shadow-cleared", None))
                self.shadow_version = None

    def saw(self, what: str) -> list[int | None]:
        with self._lock:
            return [v for w, v in self.events if w == what]

    def start(self) -> SimDevice:
        self._client.start(wait_s=10)
        self._birth()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self._client.stop()

    def _birth(self) -> None:
        status = DeviceStatus(
            device=self.device,
            state="online",
            session=1,
            models=[ModelVersion(model=MODEL, version=self.serving)],
        )
        topic = topics.device_status(self.fleet, self.device)
        assert self._client.publish_wait(topic, status.model_dump_json().encode())

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            with self._lock:
                pending, self._pending = self._pending, []
                shadow = self.shadow_version
            for m in pending:
                if m.version > self.serving:
                    self.serving = m.version
                    self._birth()
                    if self.on_activate is not None:
                        self.on_activate(self)
                report = UpdateReport(
                    device=self.device,
                    model=MODEL,
                    version=m.version,
                    state=UpdateState.ACTIVE,
                    active_version=self.serving,
                    ts=datetime.now(timezone.utc),
                )
                topic = topics.device_update(self.fleet, self.device)
                self._client.publish_wait(topic, report.model_dump_json().encode())
            self.report(shadow)

    def report(self, shadow: int | None) -> None:
        """One telemetry message: shadow runs on ``shadow`` (if within the budget) and
        the audits of the version served (if its quality has them); none if neither."""
        q = self.quality
        stats = None
        if shadow is not None and (self.budget is None or self.budget > 0):
            stats = shadow_stats(
                shadow,
                both=q.both,
                shadow_only=q.shadow_only,
                serving_only=q.serving_only,
                wrong_both=q.wrong_both,
            )
            if self.budget is not None:
                self.budget -= 1
        checked = None
        if self.serving in q.audited:
            checked = audit(self.serving, *q.audited[self.serving])
        if stats is None and checked is None:
            return
        self.seq += 1
        message = telemetry(
            self.device, self.seq, serving=self.serving, shadow=stats, audit=checked
        )
        topic = topics.device_telemetry(self.fleet, self.device)
        self._client.publish_wait(topic, message.model_dump_json().encode())
