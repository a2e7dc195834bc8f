"""``tandem-cloud fleet device-token | samples | capture`` in-process: the token an upload
is checked against, the store's table, and the retained capture switch on a real
Mosquitto, read back by a subscriber."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from cloud.cli import main as cloud_main
from cloud.fleet.samples.store import SampleStore
from cloud.fleet.store import FleetStore
from shared import topics
from shared.commands import CaptureCommand
from shared.samples import Answer, check_device_token
from tests.fleet import retained_json
from tests.mosquitto import Mosquitto
from tests.sample_items import feature_sample

FLEET = "clifleet"
SECRET = "cli-secret"


def test_device_token_prints_the_token_uploads_are_checked_against(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TANDEM_CLOUD_SAMPLES__DEVICE_TOKEN_SECRET", SECRET)
    assert cloud_main(["fleet", "device-token", "dev-7", "--fleet", FLEET]) == 0
    token = capsys.readouterr().out.strip()
    assert check_device_token(SECRET, FLEET, "dev-7", token)
    assert not check_device_token(SECRET, FLEET, "dev-8", token)


def test_device_token_without_a_secret_says_how_to_set_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TANDEM_CLOUD_SAMPLES__DEVICE_TOKEN_SECRET", raising=False)
    with pytest.raises(SystemExit) as info:
        cloud_main(["fleet", "device-token", "dev-7"])
    assert info.value.code == 2
    assert "device_token_secret" in capsys.readouterr().err
    monkeypatch.setenv("TANDEM_CLOUD_SAMPLES__DEVICE_TOKEN_SECRET", SECRET)
    with pytest.raises(SystemExit):
        cloud_main(["fleet", "device-token", "../x"])


def test_samples_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = FleetStore(tmp_path / "fleet.db")
    samples = SampleStore(store, tmp_path / "samples")
    for i, kind in enumerate(["escalation", "escalation", "audit"]):
        item = feature_sample(
            np.full(64, i),
            kind=kind,
            ts=datetime.now(timezone.utc),
            edge=Answer(index=1, confidence=0.5),
            cloud=Answer(index=3, confidence=0.9) if kind == "escalation" else None,
            version=2,
        )
        samples.add(FLEET, "dev-1", [item])
    store.close()
    args = ["fleet", "samples", "--fleet", FLEET, "--state-dir", str(tmp_path)]
    assert cloud_main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"fleet {FLEET}: 3 samples"
    assert lines[1].split() == [
        *("model", "version", "device", "samples", "bytes", "escal", "audit", "cloud", "oper")
    ]
    assert lines[2].split() == ["digits", "2", "dev-1", "3", "192", "2", "1", "2", "0"]
    assert cloud_main([*args, "--device", "dev-2"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"fleet {FLEET}: 0 samples"


def _capture(broker: Mosquitto, *argv: str) -> int:
    return cloud_main(
        [
            "fleet",
            "capture",
            *argv,
            "--fleet",
            FLEET,
            "--broker",
            broker.url_for("controller"),
            "--username",
            "controller",
            "--password",
            "ctl-pw",
        ]
    )


def test_capture_switch_is_retained_at_its_scope(broker: Mosquitto) -> None:
    group = topics.capture_command(FLEET, group="lab").name
    device = topics.capture_command(FLEET, device="dev-1").name
    fleet = topics.capture_command(FLEET).name
    assert _capture(broker, "on", "--group", "lab", "--audit-rate", "0.1") == 0
    on = CaptureCommand.model_validate(retained_json(group, broker))
    assert (on.enabled, on.audit_rate) == (True, 0.1) and on.ts is not None
    assert retained_json(fleet, broker) is None  # the positive control is the line above
    assert _capture(broker, "off", "--device", "dev-1") == 0
    off = CaptureCommand.model_validate(retained_json(device, broker))
    assert (off.enabled, off.audit_rate) == (False, None)
    assert _capture(broker, "on") == 0
    assert CaptureCommand.model_validate(retained_json(fleet, broker)).enabled
    # clear deletes the switch at that scope only
    assert _capture(broker, "clear", "--group", "lab") == 0
    assert retained_json(group, broker) is None
    assert retained_json(device, broker) is not None
    assert json.dumps(retained_json(fleet, broker))


def test_capture_refuses_a_bad_audit_rate(
    broker: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        _capture(broker, "on", "--audit-rate", "1.5")
    assert info.value.code == 2
    assert "--audit-rate: " in capsys.readouterr().err
    assert retained_json(topics.capture_command(FLEET).name, broker) is None
