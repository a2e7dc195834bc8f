"""The fleet simulator's devices: thousands of real MQTT clients on one asyncio loop.

Each ``SimDevice`` is a paho-mqtt client speaking Tandem's device protocol through
``shared/``, as ``agent/device/service.py`` and ``agent/device/updater.py`` do: the Last Will
and the retained birth (``DeviceStatus``), telemetry (``Telemetry``, QoS 1) through an outbox
that deletes a message only on its PUBACK and replays after a reconnect (window and replay
rate as ``OutboxSender``), the three manifest subscriptions (fleet, group, device scope) with
the updater's settle time, the signature checked against the pinned trust store, expiry,
anti-rollback and compatibility checks, the artifact downloaded from the registry over HTTP
(size and SHA-256 checked; ``If-None-Match`` with the ETag of an artifact the device holds),
and the job states ``QUEUED .. ACTIVE`` (``UpdateReport``, retained) followed by a new birth.

What is simulated, and why: the interpreter (VERIFYING waits ``verify_s`` instead of loading
the model and running its golden samples; the health watch waits ``health_watch_s``), and the
device's disk (the outbox and the model store are in memory). Ten thousand interpreters and
SQLite outboxes would measure this machine's disk and cores, not the fleet side.

paho runs without its threads: its external-loop API (``loop_read``/``loop_write``/
``loop_misc``) driven by the loop's ``add_reader``/``add_writer`` on each socket, as paho's
``examples/loop_asyncio.py`` shows. Connects go through ``SimHost``'s pacer (a connect is a
blocking ``connect()`` on loopback: a storm of them would stall the loop); reconnects back off
like paho's own loop (doubling from ``reconnect_min_s`` to ``reconnect_max_s``, no jitter).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict, deque
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urljoin

import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from sim_config import WIRE_CATEGORIES, Host, histogram

from agent.device.updater import REFUSED_MEMORY, contract_change
from agent.version import __version__, older_than
from shared import topics
from shared.errors import TandemError
from shared.manifest import Manifest
from shared.signing import SignatureError, manifest_digest
from shared.status import DeviceStatus, ModelVersion
from shared.telemetry import CloudHealth, OutboxState, Telemetry, WireBytes
from shared.topics import SCOPE_RANK, Scope
from shared.update import UpdateReport, UpdateState

log = logging.getLogger(__name__)


class SimDevice:
    def __init__(self, host: Host, index: int, factory: Manifest, session: int) -> None:
        self.host = host
        self.config = host.config
        c = self.config
        self.index = index
        self.device = f"sim-{index:05d}"
        self.group = f"g{index % c.groups}" if c.groups else None
        self.session = session
        self.registry = c.registries[index % len(c.registries)]
        self.status_topic = topics.device_status(c.fleet, self.device)
        self.update_topic = topics.device_update(c.fleet, self.device)
        self.telemetry_topic = topics.device_telemetry(c.fleet, self.device)
        self.filters = topics.agent_manifest_filters(c.fleet, self.device, self.group)
        # the updater's state
        self.served = factory
        self.highest = factory.version
        #: artifacts held, by URL: (sha256, ETag) (the factory model came from release 1)
        self.artifacts: dict[str, tuple[str, str]] = {
            self._artifact_url(factory): (factory.edge.sha256, f'"{factory.edge.sha256}"')
        }
        self._scopes: dict[Scope, Manifest] = {}
        self._inbox: list[tuple[Scope, bytes, float]] = []
        self._settle: asyncio.TimerHandle | None = None
        self._job: asyncio.Task[None] | None = None
        self._done: set[str] = set()
        self._refused: OrderedDict[str, None] = OrderedDict()
        self.last_report: UpdateReport | None = None
        # the outbox (in memory) and its sender
        self.seq = 0
        self._pending: deque[bytes] = deque()
        self._inflight: dict[int, bytes] = {}
        self._budget = float(c.window)
        self._budget_at = time.monotonic()
        self._pump_timer: asyncio.TimerHandle | None = None
        self.dropped = 0
        # the connection
        self.connected = False
        self.stopping = False
        self._fd: int | None = None
        self._delay: float | None = None
        self._started = False
        self.client = self._make_client()

    # ------------------------------------------------------------------ the client

    def _make_client(self) -> paho.Client:
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.device,
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        client.connect_timeout = 2.0
        t = self.status_topic
        client.will_set(t.name, self._status("offline"), qos=t.qos, retain=t.retain)
        client.on_connect = self._safe(self._on_connect)
        client.on_disconnect = self._safe(self._on_disconnect)
        client.on_publish = self._safe(self._on_publish)
        client.on_message = self._safe(self._on_message)
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return client

    def _safe(self, fn: Any) -> Any:
        def wrapper(*args: Any) -> None:
            try:
                fn(*args)
            except Exception:  # a callback must never break paho's read or write
                self.host.state.counts["handler_errors"] += 1
                log.exception("%s: %s failed", self.device, fn.__name__)

        return wrapper

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        self._fd = sock.fileno()
        self.host.loop.add_reader(self._fd, self._read)

    def _read(self) -> None:
        self.client.loop_read()

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        if self._fd is not None:
            self.host.loop.remove_reader(self._fd)
            self.host.loop.remove_writer(self._fd)
            self._fd = None

    def _on_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        if self._fd is not None:
            self.host.loop.add_writer(self._fd, self.client.loop_write)

    def _on_unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        if self._fd is not None:
            self.host.loop.remove_writer(self._fd)

    def connect_now(self) -> None:
        """One connection attempt (called by the host's pacer)."""
        if self.stopping or self.connected:
            return
        try:
            if self._started:
                self.client.reconnect()
            else:
                self._started = True
                c = self.config
                self.client.connect(c.broker_host, c.broker_port, keepalive=c.keepalive_s)
        except OSError:
            self.host.state.counts["connect_errors"] += 1
            self._retry_later()

    def _retry_later(self) -> None:
        """paho's backoff: min, then doubling to max; reset by a successful connect."""
        c = self.config
        self._delay = (
            c.reconnect_min_s if self._delay is None else min(self._delay * 2, c.reconnect_max_s)
        )
        self.host.loop.call_later(self._delay, self.host.request_connect, self)

    def misc(self) -> None:
        if self._fd is not None:
            self.client.loop_misc()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.host.state.counts["refused"] += 1
            return
        self.connected = True
        self._delay = None
        self.host.state.counts["connects"] += 1
        for f in self.filters:  # one SUBSCRIBE each, as MqttClient makes them
            client.subscribe(f, qos=1)
        self._publish(self.status_topic, self._status("online"))
        self.host.state.counts["births"] += 1
        if self.last_report is not None:
            self._publish(self.update_topic, self.last_report.model_dump_json().encode())
        self._pump()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        was = self.connected
        self.connected = False
        # whatever was in flight is sent again after the reconnect (at-least-once)
        self._pending.extendleft(reversed(list(self._inflight.values())))
        self._inflight.clear()
        if was:
            self.host.state.counts["disconnects"] += 1
        if not self.stopping:
            self._retry_later()

    def _publish(self, topic: topics.Topic, payload: bytes) -> int:
        return self.client.publish(topic.name, payload, qos=topic.qos, retain=topic.retain).mid

    def _status(self, state: str) -> bytes:
        m = self.served
        return (
            DeviceStatus(
                device=self.device,
                state=state,  # type: ignore[arg-type]
                group=self.group,
                agent_version=__version__,
                session=self.session,
                models=[ModelVersion(model=m.model, version=m.version)],
                capabilities=["oip", "update", "tflite"],
                ts=datetime.now(timezone.utc),
            )
            .model_dump_json()
            .encode()
        )

    def stop(self) -> None:
        """Graceful, as ``AgentService.stop``: say offline ourselves (no Last Will)."""
        self.stopping = True
        if self.connected:
            self._publish(self.status_topic, self._status("offline"))
            self.client.disconnect()
        elif self._fd is not None:
            self.client.disconnect()

    # ---------------------------------------------------------------- telemetry

    def telemetry(self) -> bytes:
        """The next telemetry message, as ``TelemetryReporter.build`` makes it."""
        self.seq += 1
        requests = 80 + (self.index * 7 + self.seq * 13) % 60
        cloud = requests // 8
        m = self.served
        return (
            Telemetry(
                device=self.device,
                session=self.session,
                seq=self.seq,
                ts=datetime.now(timezone.utc),
                interval_s=self.config.interval_s,
                requests=requests,
                routes={"edge": requests - cloud, "cloud": cloud},
                reasons={"confident": requests - cloud, "low_confidence": cloud},
                errors=0,
                latency_local=histogram(self.seq, requests),
                latency_cloud=histogram(self.seq + 3, cloud),
                latency_total=histogram(self.seq + 1, requests),
                confidence=[0, 0, 0, 0, 1, 2, 4, 8, 16, requests - 31],
                offload_rate=cloud / requests,
                cloud=CloudHealth(breaker="closed", predicted_ms=42.0, last_ms=40.5),
                models=[ModelVersion(model=m.model, version=m.version)],
                rss_bytes=60_000_000 + self.index,
                cpu_temp_c=None,
                outbox=OutboxState(pending=len(self._pending), dropped=self.dropped),
                wire_bytes={
                    c: WireBytes(sent=900 * self.seq + i, received=120 * self.seq)
                    for i, c in enumerate(WIRE_CATEGORIES)
                },
            )
            .model_dump_json(exclude_none=True)  # as the agent sends it
            .encode()
        )

    def put(self, payload: bytes) -> None:
        """Into the outbox (oldest dropped and counted when full), then send what may go."""
        self._pending.append(payload)
        self.host.state.counts["generated"] += 1
        while len(self._pending) + len(self._inflight) > self.config.outbox_max_rows:
            self._pending.popleft()
            self.dropped += 1
            self.host.state.counts["dropped"] += 1
        self._pump()

    def _pump(self) -> None:
        """``OutboxSender``: at most ``window`` unacknowledged, a token bucket of
        ``replay_per_s`` refilled over time (full at ``window``)."""
        if not self.connected or not self._pending:
            return
        c = self.config
        now = time.monotonic()
        self._budget = min(float(c.window), self._budget + (now - self._budget_at) * c.replay_per_s)
        self._budget_at = now
        room = min(c.window - len(self._inflight), int(self._budget))
        topic = self.telemetry_topic
        sent = 0
        while sent < room and self._pending:
            payload = self._pending.popleft()
            self._inflight[self._publish(topic, payload)] = payload
            sent += 1
        self._budget -= sent
        self.host.state.counts["sent"] += sent
        if self._pending and len(self._inflight) < c.window and self._pump_timer is None:
            wait = max(0.001, (1.0 - self._budget) / c.replay_per_s)
            self._pump_timer = self.host.loop.call_later(wait, self._pump_later)

    def _pump_later(self) -> None:
        self._pump_timer = None
        self._pump()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        if self._inflight.pop(mid, None) is not None:
            self.host.state.counts["acked"] += 1
            self._pump()

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._inflight)

    # ------------------------------------------------------------------ updates

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        parsed = topics.parse_manifest(msg.topic)
        if parsed is None:
            self.host.state.counts["unexpected"] += 1
            return
        if parsed.model != self.served.model:
            return
        self._inbox.append((parsed.scope, bytes(msg.payload), time.monotonic()))
        if self._settle is None:  # let retained siblings arrive, as the updater does
            self._settle = self.host.loop.call_later(self.config.settle_s, self._consider)

    def _consider(self) -> None:
        self._settle = None
        if self._job is not None:  # one job at a time; its end looks again
            return
        for scope, payload, arrived in self._inbox:
            self._take(scope, payload, arrived)
        self._inbox.clear()
        if not self._scopes:
            return
        best = self._scopes[max(self._scopes, key=lambda s: SCOPE_RANK[s])]
        self._job = self.host.loop.create_task(self._process(best))
        self._job.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._job = None
        if not task.cancelled() and task.exception() is not None:
            self.host.state.counts["job_errors"] += 1
            log.error("%s: job failed", self.device, exc_info=task.exception())
        if self._inbox and self._settle is None:
            self._consider()

    def _take(self, scope: Scope, payload: bytes, arrived: float) -> None:
        if not payload:
            self._scopes.pop(scope, None)
            return
        if len(payload) > self.config.max_manifest_bytes:
            self._malformed(scope)
            return
        try:
            manifest = Manifest.from_json(payload)
        except TandemError:
            self._malformed(scope)
            return
        if manifest.model != self.served.model:
            self._malformed(scope)
            return
        times = self.host.state.version(manifest.version)
        if times.first_manifest is None or arrived < times.first_manifest:
            times.first_manifest = arrived
        self._scopes[scope] = manifest

    def _malformed(self, scope: Scope) -> None:
        self.host.state.counts["malformed"] += 1
        self._scopes.pop(scope, None)

    def _refusal(self, manifest: Manifest) -> tuple[str, bool] | None:
        """Why the updater refuses this manifest (and whether its signature verified)."""
        try:
            self.host.trust.verify(manifest)
        except SignatureError as exc:
            return f"signature: {exc.message}", False
        for name, value in (("created", manifest.created), ("expires", manifest.expires)):
            if value is not None and value.utcoffset() is None:
                return f"{name} {value} has no time zone", True
        if manifest.expires is not None and manifest.expires <= datetime.now(timezone.utc):
            return f"expired at {manifest.expires.isoformat()}", True
        if manifest.version <= self.highest:
            return f"version {manifest.version} is not newer than {self.highest}", True
        try:
            if older_than(manifest.min_agent_version):
                return f"needs agent {manifest.min_agent_version}", True
        except ValueError as exc:
            return str(exc), True
        problem = contract_change(self.served, manifest)
        if problem is not None:
            return f"input contract changed: {problem}", True
        if manifest.edge.format != "tflite":
            return f"{manifest.edge.format} artifact, this device runs tflite", True
        return None

    async def _process(self, manifest: Manifest) -> None:
        served = self.served
        if manifest.version == served.version and manifest.edge.sha256 == served.edge.sha256:
            return
        digest = manifest_digest(manifest)
        if digest in self._refused or digest in self._done:
            return
        refusal = self._refusal(manifest)
        if refusal is not None:
            reason, verified = refusal
            if verified:
                self._done.add(digest)
            else:
                self._refused[digest] = None
                while len(self._refused) > REFUSED_MEMORY:
                    self._refused.popitem(last=False)
            self.host.state.counts["rejected"] += 1
            self._emit(manifest, UpdateState.REJECTED, reason)
            return
        self._done.add(digest)
        self.highest = manifest.version
        self._emit(manifest, UpdateState.QUEUED)
        self._emit(manifest, UpdateState.DOWNLOADING)
        problem = await self._download(manifest)
        if problem is not None:
            self._emit(manifest, UpdateState.FAILED, problem)
            return
        self._emit(manifest, UpdateState.VERIFYING)
        await asyncio.sleep(self.config.verify_s)  # simulated: fresh interpreter, goldens
        self._emit(manifest, UpdateState.ACTIVATING)
        self.served = manifest
        if self.config.health_watch_s:
            await asyncio.sleep(self.config.health_watch_s)  # simulated: nothing fails it
        self._emit(manifest, UpdateState.ACTIVE)
        now = time.monotonic()
        times = self.host.state.version(manifest.version)
        times.active += 1
        times.first_active = now if times.first_active is None else times.first_active
        times.last_active = now

    def _artifact_url(self, manifest: Manifest) -> str:
        url = manifest.edge.url or (
            f"/registry/{manifest.model}/{manifest.version}/{manifest.edge.file}"
        )
        if url.startswith(("http://", "https://")):
            return url
        return urljoin(self.registry.rstrip("/") + "/", url.lstrip("/"))

    async def _download(self, manifest: Manifest) -> str | None:
        """The artifact, size- and digest-checked; a held one is revalidated by its ETag.
        None when it is there, else why not (the job's FAILED reason)."""
        url = self._artifact_url(manifest)
        counts = self.host.state.counts
        delay = self.config.download_backoff_s
        last = ""
        for attempt in range(self.config.download_attempts):
            held = self.artifacts.get(url)
            headers = {"If-None-Match": held[1]} if held else {}
            try:
                async with self.host.http_slots:
                    r = await self.host.http.get(url, headers=headers)
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if r.status_code == 304 and held is not None:
                    counts["download_304"] += 1
                    if held[0] != manifest.edge.sha256:
                        return "digest: the artifact held does not match the manifest"
                    return None
                if r.status_code == 200:
                    body = r.content
                    counts["download_200"] += 1
                    counts["download_bytes"] += len(body)
                    if len(body) > manifest.edge.size:
                        return f"download: larger than the manifest's {manifest.edge.size} bytes"
                    if hashlib.sha256(body).hexdigest() != manifest.edge.sha256:
                        return "digest: sha256 does not match the manifest"
                    etag = r.headers.get("etag")
                    if etag:
                        self.artifacts[url] = (manifest.edge.sha256, etag)
                    return None
                last = f"HTTP {r.status_code}"
                if r.status_code < 500:
                    break
            counts["download_retries"] += 1
            if attempt + 1 < self.config.download_attempts:
                await asyncio.sleep(delay)
                delay *= 2
        counts["download_failed"] += 1
        return f"download: {last}"

    def _emit(self, manifest: Manifest, state: UpdateState, reason: str = "") -> None:
        report = UpdateReport(
            device=self.device,
            model=manifest.model,
            version=manifest.version,
            state=state,
            reason=reason,
            active_version=self.served.version,
            ts=datetime.now(timezone.utc),
        )
        self.last_report = report
        self.host.state.counts[f"job_{state.value}"] += 1
        if self.connected:
            self._publish(self.update_topic, report.model_dump_json().encode())
            if state.terminal:  # the birth's model list changed, or may have
                self._publish(self.status_topic, self._status("online"))
