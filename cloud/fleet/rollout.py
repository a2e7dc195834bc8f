"""Rollouts: canary first, then waves, each waiting for the devices' job states; abort when a
wave fails too often; promote to the target scope and clear the device-specific manifests
the rollout used. Rollback is a new release pointing at older artifacts.

Everything the controller decides is written to the fleet store before it acts, and every
publish is idempotent (retained manifests), so a controller killed mid-rollout and started
again carries on: it re-reads the plan, re-publishes what a wave needs, and waits for the
states devices report (retained too, so none is missed while it was down). A dropped
connection or a restarted broker is ridden out the same way: the client reconnects by itself
(and re-subscribes, so the retained job states come again), and a publish the broker did not
acknowledge is simply made again, until the wave's own deadline.

Several instances may run a controller: given a ``Lease`` (``cloud/fleet/lease.py``), this one
checks it before every act (a store write, a publish, each poll of a wave) and stops with
``LeaseLostError`` the moment it no longer holds it, so that the instance that takes the lease
over finds the plan as this one last wrote it (``cloud/fleet/controller.py`` runs the loop).

A rollout may start with a **shadow phase** (``create(shadow=True)``): before the canary
gets the release, the controller publishes its signed manifest, unchanged, on each canary
device's retained *shadow* topic; the agents run it beside their serving model and report
how the two compare (telemetry's ``shadow`` section, stored by the collector). The
controller waits until the gate (``cloud/fleet/gate.py``) has enough labelled samples to
decide, or the shadow timeout, then clears those shadow topics and either aborts (no device
ever served the candidate) or goes on with the canary and the waves, the gate checked again
before each wave on everything gathered since the shadow phase began (the shadow runs and
the audits of the devices that now serve the candidate). The phase, its start and each
decision of the gate are written to the store before they are acted on, so that a
controller killed in the shadow phase resumes it: the same deadline, the same evidence,
the shadow topics published (or cleared) again.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from cloud.fleet import queries
from cloud.fleet.gate import DEFAULT_MARGIN, DEFAULT_MIN_SAMPLES, GateDecision, GateStats, decide
from cloud.fleet.lease import Lease, LeaseLostError
from cloud.fleet.store import FleetStore, Rollout
from cloud.releases.packaging import rollback_release
from cloud.releases.registry import Registry
from shared import topics
from shared.errors import TandemError
from shared.manifest import Manifest
from shared.mqtt import MqttClient
from shared.signing import SigningKey
from shared.topics import Topic
from shared.update import UpdateState

log = logging.getLogger(__name__)


#: Device manifests of a wave published together before their acknowledgements are awaited
#: (paho holds them until PUBACK) and marked published in the store in one statement.
PUBLISH_WINDOW = 500


def mark_published(store: FleetStore, rollout_id: int, devices: list[str]) -> None:
    """Record that these devices' manifests were acknowledged: one statement per window
    (``FleetStore.mark_published`` takes one device)."""
    if devices:
        store.execute(
            "UPDATE rollout_devices SET published = 1 WHERE rollout = ? AND device IN ("
            + ", ".join("?" for _ in devices)
            + ")",
            [rollout_id, *devices],
        )


class RolloutError(TandemError):
    """The rollout cannot be planned or run (no devices, unknown release, ...)."""


def plan(devices: list[str], canary: str, waves: int) -> list[list[str]]:
    """Canary (a count, or a percentage of the devices) first, then ``waves`` equal parts."""
    devices = sorted(devices)
    if canary.endswith("%"):
        n = math.ceil(len(devices) * float(canary[:-1]) / 100.0)
    else:
        n = int(canary)
    n = max(0, min(n, len(devices)))
    out = [devices[:n]] if n else []
    rest = devices[n:]
    if rest:
        size = math.ceil(len(rest) / max(1, waves))
        out += [rest[i : i + size] for i in range(0, len(rest), size)]
    return out


def gate_decision(store: FleetStore, r: Rollout) -> GateDecision:
    """The gate of rollout ``r`` on what the store holds now: in the shadow phase, the
    canary devices' shadow runs since the phase began; afterwards, every device's shadow
    runs and audits since then (``queries.gate_stats``)."""
    if r.phase == "shadow":
        planned = store.waves(r.id)
        if r.shadow_started is None or not planned:
            stats = GateStats()
        else:
            canary = [d for d, _ in planned[0]]
            stats = queries.gate_stats(
                store, r.fleet, r.model, r.version, devices=canary, since=r.shadow_started
            )
    else:
        stats = queries.gate_stats(store, r.fleet, r.model, r.version, since=r.shadow_started)
    return decide(stats, r.gate_min_samples, r.gate_margin)


def gate_view(store: FleetStore, r: Rollout) -> dict[str, Any]:
    """What ``GET /fleet/rollouts/{id}/gate`` says: the rollout's phase, the gate's
    decision the controller last acted on, and the gate on the evidence now (for a shadow
    rollout still running; else the decision acted on)."""
    acted = json.loads(r.gate) if r.gate else None
    current: dict[str, Any] | None = None
    if r.shadow:
        unfinished = r.state in ("PLANNED", "RUNNING")
        current = gate_decision(store, r).to_dict() if unfinished else acted
    return {
        "rollout": r.id,
        "release": f"{r.model}@{r.version}",
        "state": r.state,
        "shadow": r.shadow,
        "phase": r.phase,
        "shadow_started": r.shadow_started,
        "min_samples": r.gate_min_samples,
        "margin": r.gate_margin,
        "shadow_timeout_s": r.shadow_timeout_s,
        "gate": current,
        "acted_on": acted,
        "detail": r.detail,
    }


@dataclass(frozen=True)
class WaveOutcome:
    active: list[str]
    failed: dict[str, str]  # device -> state: reason
    timed_out: list[str]


class RolloutController:
    def __init__(
        self,
        store: FleetStore,
        mqtt: MqttClient,
        registry: Registry,
        fleet: str,
        *,
        poll_s: float = 0.2,
        progress: Callable[[str], None] = lambda line: None,
        ack_timeout_s: float = 5.0,
        publish_deadline_s: float = 300.0,
        lease: Lease | None = None,
    ) -> None:
        self.store = store
        self.mqtt = mqtt
        self.registry = registry
        self.fleet = fleet
        self.poll_s = poll_s
        self.progress = progress
        self.ack_timeout_s = ack_timeout_s
        self.publish_deadline_s = publish_deadline_s
        self.lease = lease

    def _may_act(self) -> None:
        """Raise ``LeaseLostError`` if another instance may be acting now (no lease: a single
        controller, always)."""
        if self.lease is not None:
            self.lease.check()

    def _publish(
        self, topic: Topic, payload: bytes, what: str, deadline: float | None = None
    ) -> None:
        """One message, as ``_publish_all``."""
        self._publish_all([(topic, payload)], what, deadline)

    def _publish_all(
        self,
        messages: list[tuple[Topic, bytes]],
        what: str,
        deadline: float | None = None,
        acked: list[int] | None = None,
    ) -> None:
        """Publish every message until the broker acknowledges it, or raise ``RolloutError``
        at ``deadline`` (monotonic; default ``publish_deadline_s`` from now). The messages go
        out together and their acknowledgements are then awaited together (a wave of
        thousands costs a round trip per window, not per device). While the connection is
        down the client reconnects by itself; each try waits for it, then publishes again
        what is unacknowledged: the same retained message twice is the same state.

        The lease is checked before each message: once it is lost nothing more goes out,
        the acknowledgements of what went out are still collected, then ``LeaseLostError``
        is raised. ``acked`` receives the index of each message acknowledged, as it is."""
        if deadline is None:
            deadline = time.monotonic() + self.publish_deadline_s
        done: set[int] = set()
        tries = 0
        while True:
            self._may_act()
            left = deadline - time.monotonic()
            if self.mqtt.connected.wait(max(0.0, min(self.ack_timeout_s, left))):
                lost: LeaseLostError | None = None
                sent = []
                for i, (topic, payload) in enumerate(messages):
                    if i in done:
                        continue
                    try:
                        self._may_act()
                    except LeaseLostError as exc:
                        lost = exc
                        break
                    sent.append((i, self.mqtt.publish(topic, payload)))
                round_end = time.monotonic() + max(
                    0.1, min(self.ack_timeout_s, deadline - time.monotonic())
                )
                for i, info in sent:
                    try:
                        info.wait_for_publish(timeout=max(0.0, round_end - time.monotonic()))
                    except (RuntimeError, ValueError):  # not connected / queue full
                        continue
                    if info.is_published():
                        done.add(i)
                        if acked is not None:
                            acked.append(i)
                if lost is not None:
                    raise lost
                if len(done) == len(messages):
                    if tries:
                        log.info("broker acknowledged %s after %d retries", what, tries)
                    return
            if time.monotonic() >= deadline:
                raise RolloutError(
                    f"broker did not acknowledge {what} (tried {tries + 1} times); the rollout "
                    "stays as it is: resume it when the broker is back"
                )
            if tries == 0:
                log.warning("broker did not acknowledge %s; retrying until it does", what)
            tries += 1

    def create(
        self,
        model: str,
        version: int,
        *,
        group: str | None = None,
        devices: list[str] | None = None,
        canary: str = "1",
        waves: int = 2,
        max_failure_rate: float = 0.0,
        wave_timeout_s: float = 300.0,
        shadow: bool = False,
        gate_min_samples: int = DEFAULT_MIN_SAMPLES,
        gate_margin: float = DEFAULT_MARGIN,
        shadow_timeout_s: float = 3600.0,
    ) -> int:
        """Record a rollout (or return the unfinished one for the same release). With
        ``shadow``, it starts with a shadow phase on the canary, gated by field accuracy:
        ``gate_min_samples`` labelled samples, ``gate_margin`` (see ``cloud.fleet.gate``),
        at most ``shadow_timeout_s`` for the samples to come."""
        if gate_min_samples < 1 or not 0.0 <= gate_margin < 1.0 or shadow_timeout_s <= 0:
            raise RolloutError(
                "the gate needs gate_min_samples >= 1, 0 <= gate_margin < 1 and a positive "
                "shadow timeout"
            )
        self.registry.manifest(model, version)  # must exist
        existing = self.store.unfinished_rollout(self.fleet, model, version)
        if existing is not None:
            return existing.id
        kind, target = (
            ("devices", ",".join(devices))
            if devices
            else (("group", group) if group else ("fleet", None))
        )
        return self.store.create_rollout(
            self.fleet,
            model,
            version,
            kind,
            target,
            canary,
            waves,
            max_failure_rate,
            wave_timeout_s,
            shadow=shadow,
            gate_min_samples=gate_min_samples,
            gate_margin=gate_margin,
            shadow_timeout_s=shadow_timeout_s,
        )

    def _targets(self, r: Rollout) -> list[str]:
        if r.target_kind == "devices":
            return [d for d in (r.target or "").split(",") if d]
        group = r.target if r.target_kind == "group" else None
        return [d["device"] for d in self.store.devices(self.fleet, group)]

    def run(self, rollout_id: int) -> Rollout:
        r = self.store.rollout(rollout_id)
        if r.state in ("COMPLETED", "ABORTED"):
            return r
        manifest = self.registry.manifest(r.model, r.version)
        planned = self.store.waves(r.id)
        if not planned:
            targets = self._targets(r)
            if not targets:
                raise RolloutError(f"no devices to roll {r.model}@{r.version} out to")
            self._may_act()
            self.store.plan_waves(r.id, plan(targets, r.canary, r.waves))
            planned = self.store.waves(r.id)
            self.store.update_rollout(r.id, state="RUNNING")
        r = self.store.rollout(r.id)
        if r.shadow and r.phase == "shadow":
            stopped = self._shadow_phase(r, [d for d, _ in planned[0]], manifest)
            if stopped is not None:
                return stopped
            r = self.store.rollout(r.id)
        for index in range(r.current_wave, len(planned)):
            label = "canary" if index == 0 and len(planned) > 1 else f"wave {index}"
            if r.shadow and index > 0:
                stopped = self._recheck(r.id, index, label)
                if stopped is not None:
                    return stopped
            outcome = self._run_wave(r, index, planned[index], manifest)
            devices = len(planned[index])
            bad = len(outcome.failed) + len(outcome.timed_out)
            rate = bad / devices
            self.progress(
                f"{label}: {len(outcome.active)}/{devices} ACTIVE, {len(outcome.failed)} failed, "
                f"{len(outcome.timed_out)} timed out"
            )
            if rate > r.max_failure_rate:
                detail = (
                    f"{label} failure rate {rate:.0%} > {r.max_failure_rate:.0%}: "
                    + "; ".join(f"{d} {why}" for d, why in sorted(outcome.failed.items()))
                    + ("; timed out: " + ", ".join(outcome.timed_out) if outcome.timed_out else "")
                )
                for device in list(outcome.failed) + outcome.timed_out:
                    self._clear(topics.manifest(self.fleet, r.model, device=device))
                self._may_act()
                self.store.update_rollout(r.id, state="ABORTED", detail=detail)
                self.progress(f"aborted: {detail}")
                return self.store.rollout(r.id)
            self._may_act()
            self.store.update_rollout(r.id, current_wave=index + 1, wave_started=None)
        self._promote(r, manifest, [d for wave in planned for d, _ in wave])
        self._may_act()
        self.store.update_rollout(r.id, state="COMPLETED", detail="")
        self.progress(f"completed: {r.model}@{r.version}")
        return self.store.rollout(r.id)

    def _shadow_phase(self, r: Rollout, canary: list[str], manifest: Manifest) -> Rollout | None:
        """The candidate on the canary's shadow topics until the gate decides or the
        shadow timeout; the shadow topics cleared; the rollout ABORTED (returned) unless
        the gate passed (None: go on with the canary)."""
        shadows = [topics.shadow(self.fleet, r.model, device=d) for d in canary]
        if r.gate is not None:  # decided before a restart: the clearing may not have been
            decision = GateDecision.from_dict(json.loads(r.gate))
        else:
            started = r.shadow_started
            if started is None:
                started = datetime.now(timezone.utc).isoformat(timespec="microseconds")
                self._may_act()
                self.store.update_rollout(r.id, shadow_started=started)
                r = self.store.rollout(r.id)
            deadline = datetime.fromisoformat(started).timestamp() + r.shadow_timeout_s
            if time.time() < deadline:
                payload = manifest.to_json().encode()
                self._publish_all(
                    [(t, payload) for t in shadows], f"the shadow manifests of {r.model}"
                )
                self.progress(
                    f"shadow: {r.model}@{r.version} beside the serving model on "
                    f"{len(canary)} device(s), until {r.gate_min_samples} labelled samples"
                )
            while True:
                self._may_act()
                decision = gate_decision(self.store, r)
                if decision.state != "wait" or time.time() >= deadline:
                    break
                time.sleep(self.poll_s)
            self._may_act()
            self.store.update_rollout(r.id, gate=json.dumps(decision.to_dict()))
        self._publish_all(
            [(Topic(t.name, t.qos, True), b"") for t in shadows],
            f"the clearing of the shadow topics of {r.model}",
        )
        if decision.state == "pass":
            self._may_act()
            self.store.update_rollout(r.id, phase="waves")
            self.progress(f"shadow: {decision.detail}")
            return None
        if decision.state == "wait":
            detail = (
                f"shadow phase timed out after {r.shadow_timeout_s:g} s with "
                f"{decision.labelled} of {r.gate_min_samples} labelled samples: no decision, "
                "the candidate never served"
            )
        else:
            detail = f"shadow phase: {decision.detail}; the candidate never served"
        self._may_act()
        self.store.update_rollout(r.id, state="ABORTED", detail=detail)
        self.progress(f"aborted: {detail}")
        return self.store.rollout(r.id)

    def _recheck(self, rollout_id: int, index: int, label: str) -> Rollout | None:
        """The gate before wave ``index`` on everything gathered so far; the rollout
        ABORTED (returned) if it fails. A wave already started was checked before it."""
        r = self.store.rollout(rollout_id)
        if r.current_wave == index and r.wave_started is not None:
            return None
        decision = gate_decision(self.store, r)
        self._may_act()
        self.store.update_rollout(r.id, gate=json.dumps(decision.to_dict()))
        if decision.state != "fail":
            self.progress(f"gate before {label}: {decision.detail}")
            return None
        detail = (
            f"before {label}: {decision.detail}; the devices of earlier waves keep the "
            "candidate (fleet rollback to go back)"
        )
        self._may_act()
        self.store.update_rollout(r.id, state="ABORTED", detail=detail)
        self.progress(f"aborted: {detail}")
        return self.store.rollout(r.id)

    def _run_wave(
        self, r: Rollout, index: int, wave: list[tuple[str, bool]], manifest: Manifest
    ) -> WaveOutcome:
        current = self.store.rollout(r.id)
        started = current.wave_started if current.current_wave == index else None
        if started is None:
            started = datetime.now(timezone.utc).isoformat()
            self._may_act()
            self.store.update_rollout(r.id, wave_started=started)
        payload = manifest.to_json().encode()
        deadline = datetime.fromisoformat(started).timestamp() + r.wave_timeout_s
        publish_by = time.monotonic() + max(0.0, deadline - time.time())
        todo = [device for device, published in wave if not published]
        for start in range(0, len(todo), PUBLISH_WINDOW):
            window = todo[start : start + PUBLISH_WINDOW]
            messages = [(topics.manifest(self.fleet, r.model, device=d), payload) for d in window]
            what = f"the manifest for {window[0]}" if len(window) == 1 else "the manifests"
            acked: list[int] = []
            try:
                self._publish_all(messages, f"{what} of wave {index}", publish_by, acked)
            finally:
                # a fact, recorded even if the lease was lost since: the next holder skips them
                mark_published(self.store, r.id, [window[i] for i in acked])
        names = [d for d, _ in wave]
        while True:
            self._may_act()
            states = self.store.job_states(self.fleet, r.model, r.version)
            done = {d: states[d] for d in names if d in states and states[d][0].terminal}
            if len(done) == len(names) or time.time() >= deadline:
                break
            time.sleep(self.poll_s)
        return WaveOutcome(
            active=[d for d, (s, _) in done.items() if s == UpdateState.ACTIVE],
            failed={d: f"{s.value}: {why}" for d, (s, why) in done.items() if s.failure},
            timed_out=[d for d in names if d not in done],
        )

    def _promote(self, r: Rollout, manifest: Manifest, devices: list[str]) -> None:
        """Publish at the target scope, then clear the per-device manifests used to get
        there (a device never sees a gap: the same version is present at both scopes)."""
        if r.target_kind == "devices":
            return
        group = r.target if r.target_kind == "group" else None
        topic = topics.manifest(self.fleet, r.model, group=group)
        self._publish(topic, manifest.to_json().encode(), "the promoted manifest")
        self._clear_all([topics.manifest(self.fleet, r.model, device=d) for d in devices])

    def rollback(self, model: str, key: SigningKey, to_version: int | None = None) -> Manifest:
        """Publish a new release pointing at an earlier artifact to the whole fleet, and
        clear group and device manifests of the model so that it reaches every device."""
        release = rollback_release(self.registry, model, key, to_version)
        self._publish(
            topics.manifest(self.fleet, model), release.to_json().encode(), "the rollback manifest"
        )
        self._clear_all(
            [topics.manifest(self.fleet, model, group=g) for g in self.store.groups(self.fleet)]
            + [
                topics.manifest(self.fleet, model, device=d["device"])
                for d in self.store.devices(self.fleet)
            ]
        )
        return release

    def _clear(self, topic: Topic) -> None:
        """Delete a retained manifest (an empty retained payload), acknowledged."""
        self._publish(Topic(topic.name, topic.qos, True), b"", f"the clearing of {topic.name}")

    def _clear_all(self, manifests: list[Topic]) -> None:
        """``_clear`` of many, a window at a time."""
        for start in range(0, len(manifests), PUBLISH_WINDOW):
            window = manifests[start : start + PUBLISH_WINDOW]
            self._publish_all(
                [(Topic(t.name, t.qos, True), b"") for t in window],
                f"the clearing of {window[0].name}"
                if len(window) == 1
                else f"the clearing of {len(window)} manifests",
            )
