"""Telemetry's shadow and audit sections in the fleet store (SQLite, then PostgreSQL): stored
with their telemetry row and only when it is new, so that a redelivered message adds
nothing to the sums a rollout's gate reads (``queries.gate_stats``); through the real
collector over a real Mosquitto too."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from cloud.fleet import queries
from cloud.fleet.collector import Collector
from cloud.fleet.gate import GateStats
from cloud.fleet.store import FleetStore, open_store
from shared import topics
from shared.mqtt import MqttClient
from tests.fleet import wait_for
from tests.mosquitto import Mosquitto
from tests.shadow_sim import MODEL, audit, shadow_stats, telemetry

FLEET = "gate"


@pytest.fixture
def store(store_url: str, tmp_path: Path) -> Iterator[FleetStore]:
    s = open_store(store_url, tmp_path)
    yield s
    s.close()


def _rows(store: FleetStore, table: str) -> list[dict[str, object]]:
    return store.query(f"SELECT * FROM {table} ORDER BY device, session, seq")


def test_sections_are_stored_once_with_their_telemetry(store: FleetStore) -> None:
    s1 = shadow_stats(2, both=15, shadow_only=1, serving_only=4)
    s2 = shadow_stats(2, both=10, shadow_only=0, serving_only=2, wrong_both=3)
    batch = [
        telemetry("dev-1", 1, shadow=s1),
        telemetry("dev-1", 2, shadow=s2, audit=audit(1, 30, 3)),
        telemetry("dev-1", 3),  # neither section
        telemetry("dev-2", 1, serving=2, audit=audit(2, 20, 4)),
        telemetry("dev-1", 1, shadow=s1),  # the same message twice in one batch
    ]
    assert store.record_telemetry_many(FLEET, batch) == [True, True, True, True, False]
    # redelivered, alone and in a batch with a new one: nothing more
    assert store.record_telemetry(FLEET, batch[1]) is False
    new = telemetry("dev-3", 1, shadow=s1)
    assert store.record_telemetry_many(FLEET, [batch[0], new, batch[3]]) == [False, True, False]
    shadow = _rows(store, "shadow_stats")
    assert [(r["device"], r["seq"]) for r in shadow] == [("dev-1", 1), ("dev-1", 2), ("dev-3", 1)]
    first = shadow[0]
    assert (first["model"], first["version"], first["serving_version"]) == (MODEL, 2, 1)
    assert (first["labelled"], first["agree_cloud"], first["serving_agree_cloud"]) == (20, 16, 19)
    assert (first["shadow_only_right"], first["serving_only_right"]) == (1, 4)
    audits = _rows(store, "audit_stats")
    assert [(r["device"], r["version"], r["audited"], r["wrong"]) for r in audits] == [
        ("dev-1", 1, 30, 3),
        ("dev-2", 2, 20, 4),
    ]
    # the telemetry row and its stats share the store's receive time
    t = store.query(
        "SELECT received FROM telemetry WHERE fleet = ? AND device = 'dev-1' AND seq = 1",
        [FLEET],
    )
    assert t[0]["received"] == first["received"]
    # one message alone, through record_telemetry (the collector's fallback)
    assert store.record_telemetry(FLEET, telemetry("dev-4", 1, shadow=s2)) is True
    assert len(_rows(store, "shadow_stats")) == 4


def test_gate_stats_sums_filters_and_compares_audits(store: FleetStore) -> None:
    assert queries.gate_stats(store, FLEET, MODEL, 2) == GateStats()
    s = shadow_stats(2, both=15, shadow_only=1, serving_only=4)
    store.record_telemetry_many(
        FLEET,
        [
            telemetry("dev-1", 1, shadow=s),
            telemetry("dev-2", 1, shadow=s),
            telemetry("dev-1", 2, shadow=shadow_stats(3, both=1, shadow_only=0, serving_only=0)),
            telemetry("dev-3", 1, audit=audit(1, 100, 10)),  # the serving version
            telemetry("dev-4", 1, serving=2, audit=audit(2, 50, 9)),  # the candidate's
            telemetry("dev-5", 1, serving=7, audit=audit(7, 999, 999)),  # unrelated
        ],
    )
    got = queries.gate_stats(store, FLEET, MODEL, 2)
    assert got == GateStats(
        samples=40,
        agree_serving=30,
        labelled=40,
        agree_cloud=32,
        serving_agree_cloud=38,
        shadow_only_right=2,
        serving_only_right=8,
        devices=2,
        candidate_audited=50,
        candidate_wrong=9,
        serving_audited=100,
        serving_wrong=10,
    )
    only = queries.gate_stats(store, FLEET, MODEL, 2, devices=["dev-2"])
    assert (only.labelled, only.devices, only.candidate_audited) == (20, 1, 0)
    assert queries.gate_stats(store, FLEET, MODEL, 2, devices=[]) == GateStats()
    later = store.query("SELECT MAX(received) AS t FROM telemetry")[0]["t"]
    store.record_telemetry(FLEET, telemetry("dev-2", 2, shadow=s))
    # what came after ``later`` only: the last message (the "z" sorts after its own time)
    since = queries.gate_stats(store, FLEET, MODEL, 2, since=later + "z")
    assert (since.labelled, since.devices, since.serving_audited) == (20, 1, 0)
    assert queries.gate_stats(store, FLEET, MODEL, 2).labelled == 60
    assert queries.gate_stats(store, "other", MODEL, 2) == GateStats()

    view = queries.loop(store, FLEET, MODEL)
    by = {v["version"]: v for v in view["versions"]}
    assert sorted(by) == [1, 2, 3, 7]
    assert by[2]["shadow"]["labelled"] == 60 and by[2]["shadow"]["devices"] == 2
    assert by[2]["shadow"]["diff"] == pytest.approx(-9 / 60)
    assert by[2]["audit"]["error"] == pytest.approx(9 / 50)
    low, high = by[2]["audit"]["error_low"], by[2]["audit"]["error_high"]
    assert low < 9 / 50 < high
    assert by[1]["shadow"] is None and by[1]["audit"]["audited"] == 100


def test_the_collector_stores_a_redelivered_message_once(
    broker: Mosquitto, store: FleetStore
) -> None:
    collector = Collector(store, FLEET)
    mqtt = MqttClient(broker.settings_for("collector", protocol="5"), "gate-collector")
    collector.attach(mqtt)
    device = MqttClient(broker.settings_for("dev-1"), "dev-1")
    mqtt.start(wait_s=10)
    device.start(wait_s=10)
    try:
        s = shadow_stats(2, both=18, shadow_only=1, serving_only=1)
        first = telemetry("dev-1", 1, shadow=s, audit=audit(1, 5, 1)).model_dump_json().encode()
        topic = topics.device_telemetry(FLEET, "dev-1")
        for payload in (first, first, first):  # an outbox sending again
            assert device.publish_wait(topic, payload)
        second = telemetry("dev-1", 2, shadow=s).model_dump_json().encode()
        assert device.publish_wait(topic, second)
        wait_for(
            lambda: collector.counts["stored"] + collector.counts["duplicate"] == 4,
            what="all four at the collector",
        )
        assert collector.counts["stored"] == 2 and collector.counts["duplicate"] == 2
        stats = queries.gate_stats(store, FLEET, MODEL, 2)
        assert (stats.labelled, stats.agree_cloud, stats.serving_audited) == (40, 38, 5)
    finally:
        device.stop()
        mqtt.stop()


def test_retention_takes_the_stats_with_their_telemetry(store: FleetStore) -> None:
    old = datetime.now(timezone.utc) - timedelta(days=40)
    s = shadow_stats(2, both=18, shadow_only=1, serving_only=1)
    store.record_telemetry_many(
        FLEET,
        [
            telemetry("dev-1", 1, shadow=s, audit=audit(1, 5, 1)).model_copy(update={"ts": old}),
            telemetry("dev-1", 2, shadow=s, audit=audit(1, 5, 1)),
        ],
    )
    cutoff = datetime.now(timezone.utc) - timedelta(days=30)
    assert store.expire_telemetry(cutoff) == 1
    assert store.expire_stats(cutoff.isoformat(), batch=1) == 2  # one shadow, one audit
    assert [r["seq"] for r in _rows(store, "shadow_stats")] == [2]
    assert [r["seq"] for r in _rows(store, "audit_stats")] == [2]
