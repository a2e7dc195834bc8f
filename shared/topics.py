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
| [groups/{group}/ or devices/{device}/]models/{model}/shadow | controller -> agents | 1 | yes |
| [groups/{group}/ or devices/{device}/]cmd/capture | operator -> agents | 1 | yes |

The most specific manifest wins: device > group > fleet. A ``shadow`` topic carries a signed
candidate manifest, byte for byte as released, that the agent runs beside its serving model
and never lets answer (the learning loop's shadow phase); an empty retained payload ends the
shadow. ``cmd/capture`` is the fleet's privacy switch for field-data capture
(``shared.commands.CaptureCommand``): retained, because it is a state the device must find
when it connects, not an event; the most specific scope wins there too.
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


def shadow(fleet: str, model: str, *, group: str | None = None, device: str | None = None) -> Topic:
    """The retained shadow-candidate topic for the whole fleet, one group, or one device."""
    m = manifest(fleet, model, group=group, device=device)
    return Topic(m.name[: -len("manifest")] + "shadow", 1, True)


def capture_command(fleet: str, *, group: str | None = None, device: str | None = None) -> Topic:
    """The retained capture switch for the whole fleet, one group, or one device."""
    if group is not None and device is not None:
        raise ValueError("a command targets a group or a device, not both")
    base = f"{PREFIX}/{_id(fleet, 'fleet')}"
    if device is not None:
        return Topic(f"{_device(fleet, device)}/cmd/capture", 1, True)
    if group is not None:
        return Topic(f"{base}/groups/{_id(group, 'group')}/cmd/capture", 1, True)
    return Topic(f"{base}/cmd/capture", 1, True)


def agent_shadow_filters(fleet: str, device: str, group: str | None) -> list[str]:
    """What an agent subscribes to for shadow candidates: fleet, group and device scope."""
    return [f[: -len("manifest")] + "shadow" for f in agent_manifest_filters(fleet, device, group)]


def agent_command_topics(fleet: str, device: str, group: str | None) -> list[str]:
    """The capture switch's topics an agent subscribes to (no wildcard: one per scope)."""
    names = [capture_command(fleet).name, capture_command(fleet, device=device).name]
    if group is not None:
        names.append(capture_command(fleet, group=group).name)
    return names


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


def parse_manifest(
    topic: str, leaf: Literal["manifest", "shadow"] = "manifest"
) -> ManifestTopic | None:
    """The parts of a manifest topic (or with ``leaf="shadow"``, of a shadow topic), or None
    if ``topic`` is not one."""
    parts = topic.split("/")
    if len(parts) < 6 or "/".join(parts[:2]) != PREFIX or parts[-1] != leaf:
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


def parse_command_scope(topic: str) -> Scope | None:
    """The scope of a capture-switch topic (fleet, group or device), or None."""
    parts = topic.split("/")
    if "/".join(parts[:2]) != PREFIX or parts[-2:] != ["cmd", "capture"]:
        return None
    if len(parts) == 5:
        return "fleet"
    if len(parts) == 7 and parts[3] in ("groups", "devices"):
        return "group" if parts[3] == "groups" else "device"
    return None
