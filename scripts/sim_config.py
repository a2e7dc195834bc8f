"""What the fleet simulator's devices share: their settings (``DeviceConfig``, the agent's
defaults unless set), the counters and times of one process's devices (``HostState``), and
what a device asks of the process hosting it (``Host``)."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from agent.settings import TelemetrySettings, UpdateSettings
from shared.mqtt import MqttSettings
from shared.signing import TrustStore
from shared.telemetry import LATENCY_BOUNDS_MS, Histogram

if TYPE_CHECKING:
    from sim_device import SimDevice

_MQTT = MqttSettings()
_TELEMETRY = TelemetrySettings()
_UPDATE = UpdateSettings()
#: Categories of the agent's byte counts (``agent.device.wire``), reported in telemetry.
WIRE_CATEGORIES = ("births", "telemetry", "job_states", "manifests", "session", "downloads")


@dataclass(frozen=True)
class DeviceConfig:
    """What every device of a simulated fleet shares: the agent's defaults unless set."""

    fleet: str
    broker_host: str
    broker_port: int
    registries: tuple[str, ...]  # base URLs; device i downloads from registries[i % n]
    keepalive_s: int = _MQTT.keepalive_s
    reconnect_min_s: float = _MQTT.reconnect_min_s
    reconnect_max_s: float = _MQTT.reconnect_max_s
    interval_s: float = _TELEMETRY.interval_s
    window: int = _TELEMETRY.window
    replay_per_s: float = _TELEMETRY.replay_per_s
    outbox_max_rows: int = _TELEMETRY.outbox_max_rows
    settle_s: float = _UPDATE.settle_s
    max_manifest_bytes: int = _UPDATE.max_manifest_bytes
    verify_s: float = 0.02
    health_watch_s: float = 0.0
    download_attempts: int = _UPDATE.download.attempts
    download_backoff_s: float = _UPDATE.download.backoff_s
    download_timeout_s: float = _UPDATE.download.timeout_s
    groups: int = 10


@dataclass
class VersionTimes:
    """When a release first reached a device of this host, and when devices went ACTIVE."""

    first_manifest: float | None = None
    active: int = 0
    first_active: float | None = None
    last_active: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "first_manifest": self.first_manifest,
            "active": self.active,
            "first_active": self.first_active,
            "last_active": self.last_active,
        }


@dataclass
class HostState:
    """Counters and times of all the devices of one ``SimHost`` (one process)."""

    counts: Counter[str] = field(default_factory=Counter)
    versions: dict[int, VersionTimes] = field(default_factory=dict)

    def version(self, v: int) -> VersionTimes:
        return self.versions.setdefault(v, VersionTimes())


class Host(Protocol):
    """What a device uses of the process hosting it (``sim_worker.SimHost``)."""

    loop: asyncio.AbstractEventLoop
    config: DeviceConfig
    trust: TrustStore
    http: httpx.AsyncClient
    http_slots: asyncio.Semaphore  # at most as many requests as the pool has connections
    state: HostState

    def request_connect(self, device: SimDevice) -> None: ...


def histogram(seed: int, total: int) -> Histogram:
    """A plausible latency histogram: ``total`` requests over three neighbouring buckets."""
    counts = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    b = 4 + seed % 5
    counts[b - 1], counts[b], counts[b + 1] = total // 4, total // 2, total - 3 * (total // 4)
    return Histogram(counts=counts)
