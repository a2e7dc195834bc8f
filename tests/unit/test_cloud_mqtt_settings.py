"""The cloud's MQTT settings: MQTT 5 unless told otherwise, a shared group for the
collectors, and an instance id of its own for each instance's collector session."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from cloud.settings import CloudSettings
from shared.identifiers import IDENTIFIER_RE
from shared.mqtt import MqttSettings


def test_the_cloud_speaks_mqtt5_unless_its_section_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert CloudSettings(mqtt={"url": "mqtt://b:1883"}).mqtt.protocol == "5"  # type: ignore[arg-type,union-attr]
    assert CloudSettings(mqtt=MqttSettings(url="mqtt://b:1883")).mqtt.protocol == "5"  # type: ignore[union-attr]
    explicit = MqttSettings(url="mqtt://b:1883", protocol="3.1.1")
    assert CloudSettings(mqtt=explicit).mqtt.protocol == "3.1.1"  # type: ignore[union-attr]
    monkeypatch.setenv("TANDEM_CLOUD_MQTT__URL", "mqtt://env:1883")
    assert CloudSettings.load(None).mqtt.protocol == "5"  # type: ignore[union-attr]
    monkeypatch.setenv("TANDEM_CLOUD_MQTT__PROTOCOL", "3.1.1")
    assert CloudSettings.load(None).mqtt.protocol == "3.1.1"  # type: ignore[union-attr]
    assert MqttSettings().protocol == "3.1.1"  # devices keep 3.1.1


def test_the_clouds_clients_retry_a_lost_broker_quickly_unless_told_otherwise() -> None:
    """Back before the devices replay their outboxes: 2 s at most, a device's 30 s."""
    assert CloudSettings(mqtt={"url": "mqtt://b:1883"}).mqtt.reconnect_max_s == 2.0  # type: ignore[arg-type,union-attr]
    assert CloudSettings(mqtt=MqttSettings(url="mqtt://b:1883")).mqtt.reconnect_max_s == 2.0  # type: ignore[union-attr]
    slow = MqttSettings(url="mqtt://b:1883", reconnect_max_s=60)
    assert CloudSettings(mqtt=slow).mqtt.reconnect_max_s == 60  # type: ignore[union-attr]
    assert MqttSettings().reconnect_max_s == 30.0  # devices


def test_each_instance_has_a_stable_id_of_its_own() -> None:
    """Two instances on one host differ by port; a restart keeps the id (and the collector's
    persistent session); an explicit id wins."""
    host = socket.gethostname()
    a, b = CloudSettings(port=8000), CloudSettings(port=8001)
    assert a.instance != b.instance and a.instance == CloudSettings(port=8000).instance
    assert a.instance == re.sub(r"[^A-Za-z0-9_-]", "-", host)[:40] + "-8000"
    assert IDENTIFIER_RE.match(a.instance)  # fit for a client id and a lease holder
    assert CloudSettings(instance_id="cloud-0").instance == "cloud-0"
    assert CloudSettings().collector_share_group is None  # one instance: a plain subscription
    assert CloudSettings(collector_share_group="collectors").collector_share_group
    with pytest.raises(ValueError):
        CloudSettings(collector_share_group="a/b")


def test_an_empty_share_group_turns_sharing_off(tmp_path: Path) -> None:
    """TOML has no null: ``collector_share_group = ""`` is how a file says None."""
    config = tmp_path / "cloud.toml"
    config.write_text('collector_share_group = ""\n')
    assert CloudSettings.load(config).collector_share_group is None
