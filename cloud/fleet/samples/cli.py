"""``tandem-cloud fleet device-token | samples | capture``: the learning loop's operator
commands.

    tandem-cloud fleet device-token DEVICE          print DEVICE's upload token
    tandem-cloud fleet samples [--model M] [--device D]
    tandem-cloud fleet capture on|off|clear [--group G | --device D] [--audit-rate R]

``device-token`` reads ``[samples] device_token_secret`` (or
``TANDEM_CLOUD_SAMPLES__DEVICE_TOKEN_SECRET``); the token goes into the device's
``[capture] token``. ``samples`` prints what the store holds per model, version and device.
``capture`` publishes the retained capture switch (``shared.commands.CaptureCommand``) at
the fleet's, a group's or a device's scope (the most specific one present holds); ``clear``
deletes the switch at that scope. A device owner's own ``capture.enabled`` outranks it.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cloud.fleet.samples.store import SampleStore
from cloud.fleet.store import open_store
from cloud.settings import CloudSettings
from shared.commands import CaptureCommand
from shared.identifiers import check_identifier
from shared.mqtt import MqttClient, MqttError, MqttSettings
from shared.samples import device_token
from shared.settings_files import SettingsError
from shared.topics import capture_command

ACTIONS = ("device-token", "samples", "capture")


def add_sample_parsers(fleet: Any) -> None:
    """The three commands, under ``tandem-cloud fleet``."""
    token = fleet.add_parser("device-token", help="print a device's sample upload token")
    token.add_argument("device")
    token.add_argument("--fleet")
    listing = fleet.add_parser("samples", help="field samples stored, per model and device")
    listing.add_argument("--model")
    listing.add_argument("--device")
    listing.add_argument("--fleet")
    listing.add_argument("--state-dir", type=Path)
    capture = fleet.add_parser("capture", help="switch field-data capture on or off")
    capture.add_argument("switch", choices=("on", "off", "clear"))
    scope = capture.add_mutually_exclusive_group()
    scope.add_argument("--group")
    scope.add_argument("--device")
    capture.add_argument("--audit-rate", type=float, help="0..1 (default: each agent's own)")
    capture.add_argument("--fleet")
    capture.add_argument("--broker", help="mqtt://host:port (default: settings)")
    capture.add_argument("--username")
    capture.add_argument("--password")


def run_sample_action(args: argparse.Namespace, settings: CloudSettings) -> int:
    if args.action == "device-token":
        return _device_token(args.device, settings)
    if args.action == "samples":
        return _samples(settings, model=args.model, device=args.device)
    return _capture(args, settings)


def _device_token(device: str, settings: CloudSettings) -> int:
    secret = settings.samples.device_token_secret
    if secret is None:
        raise SettingsError(
            "no device token secret: set [samples] device_token_secret in the cloud's "
            "settings (or TANDEM_CLOUD_SAMPLES__DEVICE_TOKEN_SECRET)"
        )
    try:
        check_identifier(device, "device")
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    print(device_token(secret.get_secret_value(), settings.fleet, device))
    return 0


def _samples(settings: CloudSettings, *, model: str | None, device: str | None) -> int:
    store = open_store(settings.database_url, settings.state_dir)
    try:
        root = settings.samples.root or settings.state_dir / "samples"
        rows = SampleStore(store, root).counts(settings.fleet, model=model, device=device)
    finally:
        store.close()
    head = ("model", "version", "device", "samples", "bytes", "escal", "audit", "cloud", "oper")
    table = [
        (
            r["model"],
            r["version"],
            r["device"],
            r["samples"],
            r["bytes"],
            r["escalation"],
            r["audit"],
            r["cloud"],
            r["operator"],
        )
        for r in rows
    ]
    print(f"fleet {settings.fleet}: {sum(r['samples'] for r in rows)} samples")
    widths = [max(len(str(r[i])) for r in [head, *table]) for i in range(len(head))]
    for line in [head, *table]:
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip())
    return 0


def _capture(args: argparse.Namespace, settings: CloudSettings) -> int:
    try:
        topic = capture_command(settings.fleet, group=args.group, device=args.device)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    if args.switch == "clear":
        if args.audit_rate is not None:
            raise SettingsError("--audit-rate goes with on or off, not clear")
        payload = b""
    else:
        try:
            command = CaptureCommand(
                enabled=args.switch == "on",
                audit_rate=args.audit_rate,
                ts=datetime.now(timezone.utc),
            )
        except ValueError as exc:
            raise SettingsError(f"--audit-rate: {exc}") from None
        payload = command.model_dump_json(exclude_none=True).encode()
    mqtt = MqttClient(
        settings.mqtt or MqttSettings(protocol="5"), client_id=f"capture-{time.time_ns()}"
    )
    mqtt.start(wait_s=10.0)
    try:
        if not mqtt.publish_wait(topic, payload, timeout_s=10.0):
            raise MqttError(f"the broker did not acknowledge {topic.name}")
    finally:
        mqtt.stop()
    scope = (
        f"device {args.device}" if args.device else f"group {args.group}" if args.group else "fleet"
    )
    what = "cleared" if not payload else payload.decode()
    print(f"capture switch ({scope} {settings.fleet}): {what}")
    return 0
