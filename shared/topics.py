"""Every MQTT topic Tandem uses, built and parsed here and nowhere else.

``tandem/v1/{fleet}/...``; every id is validated (``shared.identifiers``), so no topic can
carry a wildcard or a stray level. Each builder returns a ``Topic`` with the QoS and retain
flag the design fixes for it, so publishers cannot get them wrong.

| topic | direction | QoS | retained |
|---|---|---|---|
| devices/{device}/status | agent (LWT: offline) | 1 | yes |
| devices/{device}/telemetry | agent -> collector | 1 | no |
| devices/{device}/update | agent -> controller | 1 | yes |
| models/{model}/manifest | controller -> fleet | 1 | yes |
| groups/{group}/models/{model}/manifest | controller -> group | 1 | yes |
| devices/{device}/models/{model}/manifest | controller -> device | 1 | yes |

The most specific manifest wins: device > group > fleet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared.identifiers import check_identifier

PREFIX = "tandem/v1"

Scope = Literal["fleet", "group", "device"]
#: Precedence of manifest scopes: higher wins.
SCOPE_RANK: dict[Scope, int] = {"fleet": 0, "group": 1, "device": 2}


@dataclass(frozen=True, slots=True)
class Topic:
    name: str
    qos: int
    retain: bool


def _id(value: str, what: str) -> str:
    return check_identifier(value, what)


def _device(fleet: str, device: str) -> str:
    return f"{PREFIX}/{_id(fleet, 'fleet')}/devices/{_id(device, 'device')}"


def device_status(fleet: str, device: str) -> Topic:
    return Topic(f"{_device(fleet, device)}/status", 1, True)


def device_telemetry(fleet: str, device: str) -> Topic:
    return Topic(f"{_device(fleet, device)}/telemetry", 1, False)


def device_update(fleet: str, device: str) -> Topic:
    return Topic(f"{_device(fleet, device)}/update", 1, True)


def manifest(
    fleet: str, model: str, *, group: str | None = None, device: str | None = None
) -> Topic:
    """The retained manifest topic for the whole fleet, one group, or one device."""
    if group is not None and device is not None:
        raise ValueError("a manifest targets a group or a device, not both")
    base = f"{PREFIX}/{_id(fleet, 'fleet')}"
    m = _id(model, "model")
    if device is not None:
        return Topic(f"{_device(fleet, device)}/models/{m}/manifest", 1, True)
    if group is not None:
        return Topic(f"{base}/groups/{_id(group, 'group')}/models/{m}/manifest", 1, True)
    return Topic(f"{base}/models/{m}/manifest", 1, True)


# ------------------------------------------------------------------------ subscriptions


def agent_manifest_filters(fleet: str, device: str, group: str | None) -> list[str]:
    """What an agent subscribes to: every model's manifest at fleet, group and device scope."""
    base = f"{PREFIX}/{_id(fleet, 'fleet')}"
    filters = [f"{base}/models/+/manifest", f"{_device(fleet, device)}/models/+/manifest"]
    if group is not None:
        filters.append(f"{base}/groups/{_id(group, 'group')}/models/+/manifest")
    return filters


def fleet_device_filter(fleet: str, leaf: Literal["status", "telemetry", "update"]) -> str:
    """All devices' ``leaf`` topics of a fleet (collector, controller)."""
    return f"{PREFIX}/{_id(fleet, 'fleet')}/devices/+/{leaf}"


# ------------------------------------------------------------------------------ parsing


@dataclass(frozen=True, slots=True)
class ManifestTopic:
    fleet: str
    model: str
    scope: Scope
    target: str | None  # group or device id; None for the fleet


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    fleet: str
    device: str
    leaf: str


def parse_manifest(topic: str) -> ManifestTopic | None:
    """The parts of a manifest topic, or None if ``topic`` is not one."""
    parts = topic.split("/")
    if len(parts) < 6 or "/".join(parts[:2]) != PREFIX or parts[-1] != "manifest":
        return None
    fleet = parts[2]
    rest = parts[3:]
    try:
        check_identifier(fleet)
        if len(rest) == 3 and rest[0] == "models":
            return ManifestTopic(fleet, check_identifier(rest[1]), "fleet", None)
        if len(rest) == 5 and rest[0] in ("groups", "devices") and rest[2] == "models":
            scope: Scope = "group" if rest[0] == "groups" else "device"
            return ManifestTopic(fleet, check_identifier(rest[3]), scope, check_identifier(rest[1]))
    except ValueError:
        return None
    return None


def parse_device(topic: str) -> DeviceTopic | None:
    """``tandem/v1/{fleet}/devices/{device}/{leaf}`` parts, or None."""
    parts = topic.split("/")
    if len(parts) != 6 or "/".join(parts[:2]) != PREFIX or parts[3] != "devices":
        return None
    try:
        return DeviceTopic(check_identifier(parts[2]), check_identifier(parts[4]), parts[5])
    except ValueError:
        return None
