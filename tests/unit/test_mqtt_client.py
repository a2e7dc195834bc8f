"""The MQTT client wrapper's settings reach paho as given (no broker needed)."""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as paho
import pytest

from shared.mqtt import MqttClient, MqttSettings


def test_reconnect_delays_keep_their_fractions(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def spy(self: paho.Client, min_delay: float = 1, max_delay: float = 120) -> None:
        seen.update(min=min_delay, max=max_delay)

    monkeypatch.setattr(paho.Client, "reconnect_delay_set", spy)
    MqttClient(MqttSettings(reconnect_min_s=0.2, reconnect_max_s=1.5), "c1")
    assert seen == {"min": 0.2, "max": 1.5}
    MqttClient(MqttSettings(reconnect_min_s=3.0, reconnect_max_s=1.0), "c2")
    assert seen == {"min": 3.0, "max": 3.0}  # the ceiling is never below the floor
