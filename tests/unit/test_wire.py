"""The daily byte budget and the telemetry interval it chooses, on a fake clock; the MQTT
packet sizes the agent counts (the integration test checks them against a socket)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from pydantic import SecretStr

from agent.device.telemetry import DailyBudget, TelemetryReporter
from agent.device.wire import WireCounter, connect_bytes, publish_bytes
from shared.mqtt import MqttSettings
from shared.topics import Topic


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 22, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now


def _reporter(budget: DailyBudget | None) -> TelemetryReporter:
    # next_wait_s needs neither the agent nor the outbox
    return TelemetryReporter(
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        "t",
        "dev-0",
        1,
        60.0,
        budget=budget,
        over_budget_interval_s=3600.0,
    )


def test_the_budget_counts_the_devices_own_bytes_per_utc_day() -> None:
    clock, wire = Clock(), WireCounter()
    wire.add("telemetry", sent=500)  # before the budget began: not today's
    budget = DailyBudget(1000, wire, now=clock)
    wire.add("downloads", received=10_000)  # asked for by an operator: not budgeted
    wire.add("escalations", sent=10_000)
    wire.add("telemetry", sent=600, received=4)
    assert budget.spent() == 604 and not budget.exhausted
    wire.add("births", sent=396)
    assert budget.exhausted
    clock.now += timedelta(hours=2)  # past midnight: a new day, a new budget
    assert budget.spent() == 0 and not budget.exhausted
    wire.add("session", sent=2, received=2)
    assert budget.spent() == 4


def test_a_spent_budget_stretches_the_interval_until_the_day_ends() -> None:
    clock, wire = Clock(), WireCounter()
    budget = DailyBudget(1000, wire, now=clock)
    reporter = _reporter(budget)
    assert reporter.next_wait_s() == 60.0 and not reporter.backing_off
    wire.add("telemetry", sent=1000)
    assert reporter.next_wait_s() == 3600.0 and reporter.backing_off
    clock.now = datetime(2026, 12, 1, 23, 50, tzinfo=timezone.utc)
    assert reporter.next_wait_s() == pytest.approx(601.0)  # a new budget at midnight
    clock.now = datetime(2026, 12, 1, 23, 59, 59, 900_000, tzinfo=timezone.utc)
    assert reporter.next_wait_s() == 60.0  # never shorter than the interval
    clock.now = datetime(2026, 12, 2, 0, 0, 1, tzinfo=timezone.utc)
    assert reporter.next_wait_s() == 60.0 and not reporter.backing_off


def test_no_budget_means_the_interval() -> None:
    reporter = _reporter(None)
    assert reporter.next_wait_s() == 60.0 and not reporter.backing_off


def test_unknown_categories_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown wire category"):
        WireCounter().add("telemetyr", sent=1)


def test_mqtt_packet_sizes() -> None:
    # PUBLISH: type byte, remaining length (1 byte below 128, 2 below 16,384), topic, id
    assert publish_bytes("a/b", b"x" * 10, 1) == 1 + 1 + 2 + 3 + 2 + 10
    assert publish_bytes("a/b", b"x" * 10, 0) == 1 + 1 + 2 + 3 + 10
    assert publish_bytes("a/b", b"x" * 200, 1) == 1 + 2 + 2 + 3 + 2 + 200
    settings = MqttSettings(username="dev-0", password=SecretStr("pw"))
    will = (Topic("s", 1, True), b"off")
    # header 10 (name, level, flags, keepalive), client id, Will topic and payload, user, pw
    body = 10 + (2 + 5) + (2 + 1) + (2 + 3) + (2 + 5) + (2 + 2)
    assert connect_bytes(settings, "dev-0", will) == 1 + 1 + body
