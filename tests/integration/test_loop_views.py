"""What the dashboard's learning-loop panel reads, on both engines: ``queries.loop``'s audit
figures with the manifest's (epsilon, delta) the devices reported and the error's interval
at that delta, and the samples summary for one model with its top devices per version
(bounded, with the count of all of them), through the store and the real API."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import pytest

from cloud.app import create_app
from cloud.fleet import queries
from cloud.fleet.samples.store import SampleStore
from cloud.fleet.store import FleetStore, open_store
from cloud.settings import CloudSettings
from shared import bounds
from shared.mqtt import MqttSettings
from shared.samples import Answer, SampleMeta
from shared.telemetry import FieldAccuracy
from tests.helpers import CLOUD_REPO, closed_port_url, serve_in_thread
from tests.sample_items import feature_sample
from tests.shadow_sim import MODEL, audit, telemetry

FLEET = "loopviews"
NOW = datetime.now(timezone.utc).isoformat()
T0 = datetime(2026, 12, 1, 12, tzinfo=timezone.utc)


@pytest.fixture
def store(store_url: str, tmp_path: Path) -> Iterator[FleetStore]:
    s = open_store(store_url, tmp_path)
    yield s
    s.close()


def _guaranteed(
    version: int, audited: int, wrong: int, epsilon: float, delta: float
) -> FieldAccuracy:
    return audit(version, audited, wrong).model_copy(update={"epsilon": epsilon, "delta": delta})


def test_loop_reports_each_versions_guarantee_and_its_interval_at_delta(
    store: FleetStore,
) -> None:
    messages = [
        telemetry("dev-1", 1, audit=_guaranteed(1, 100, 3, 0.05, 0.2)),
        telemetry("dev-1", 2, audit=_guaranteed(1, 100, 2, 0.05, 0.2)),
        telemetry("dev-2", 1, audit=_guaranteed(1, 50, 1, 0.05, 0.2)),
        telemetry("dev-3", 1, serving=2, audit=audit(2, 40, 4)),  # no guarantee
    ]
    assert all(store.record_telemetry_many(FLEET, messages))
    # rows no telemetry message can carry (its schema refuses them), written as an older
    # collector might have: a delta no interval can have (95 %, not an error), and more
    # wrong than audited (all wrong)
    for device, version, audited, wrong, epsilon, delta in (
        ("dev-4", 3, 10, 1, 0.05, 1.5),
        ("dev-5", 5, 2, 9, None, None),
    ):
        store.execute(
            "INSERT INTO audit_stats (fleet, device, session, seq, ts, received, model,"
            " version, audited, wrong, epsilon, delta) VALUES (?, ?, 1, 1, ?, ?, ?, ?, ?, ?, ?, ?)",
            (FLEET, device, NOW, NOW, MODEL, version, audited, wrong, epsilon, delta),
        )
    rows = store.query("SELECT device, seq, epsilon, delta FROM audit_stats ORDER BY device, seq")
    assert [(r["device"], r["epsilon"], r["delta"]) for r in rows] == [
        ("dev-1", 0.05, 0.2),
        ("dev-1", 0.05, 0.2),
        ("dev-2", 0.05, 0.2),
        ("dev-3", None, None),
        ("dev-4", 0.05, 1.5),
        ("dev-5", None, None),
    ]
    by = {v["version"]: v["audit"] for v in queries.loop(store, FLEET, MODEL)["versions"]}
    one = by[1]
    assert (one["audited"], one["wrong"], one["devices"]) == (250, 6, 2)
    assert (one["epsilon"], one["delta"]) == (0.05, 0.2)
    # at the manifest's delta (an 80 % interval), not at 95 %
    assert (one["error_low"], one["error_high"]) == pytest.approx(bounds.interval(6, 250, 0.2))
    assert one["error_high"] < bounds.interval(6, 250, 0.05)[1]
    two = by[2]
    assert two["epsilon"] is None and two["delta"] == 0.05  # no guarantee: a 95 % interval
    assert (two["error_low"], two["error_high"]) == pytest.approx(bounds.interval(4, 40, 0.05))
    three = by[3]
    assert (three["epsilon"], three["delta"]) == (0.05, 0.05)
    assert (three["error_low"], three["error_high"]) == pytest.approx(bounds.interval(1, 10, 0.05))
    assert (by[5]["wrong"], by[5]["error"], by[5]["error_high"]) == (2, 1.0, 1.0)


def _item(seed: int, model: str = "digits", version: int = 1) -> tuple[SampleMeta, bytes]:
    return feature_sample(
        (np.arange(64) * (seed + 1) + seed // 17) % 17,
        ts=T0,
        cloud=Answer(index=7, confidence=0.9),
        model=model,
        version=version,
        cloud_model="digits-cloud",
        threshold=0.7,
    )


def _fill(samples: SampleStore) -> None:
    """digits@1: device dev-NN holds NN + 1 samples (dev-11 twelve), dev-00 two more;
    digits@2: dev-00 and dev-01 one each; cats@1: dev-05 one."""
    seed = 0
    for d in range(12):
        items = []
        for _ in range(d + 1):
            items.append(_item(seed))
            seed += 1
        samples.add(FLEET, f"dev-{d:02d}", items)
    samples.add(FLEET, "dev-00", [_item(1000), _item(1001)])
    samples.add(FLEET, "dev-00", [_item(2000, version=2)])
    samples.add(FLEET, "dev-01", [_item(2001, version=2)])
    samples.add(FLEET, "dev-05", [_item(3000, model="cats")])


def test_summary_of_one_model_names_its_top_devices_and_counts_all(
    store: FleetStore, tmp_path: Path
) -> None:
    samples = SampleStore(store, tmp_path / "samples")
    _fill(samples)
    entries = samples.summary(FLEET, model="digits", top=3)
    assert [(e["model"], e["version"]) for e in entries] == [("digits", 1), ("digits", 2)]
    v1, v2 = entries
    assert (v1["samples"], v1["devices"]) == (sum(range(1, 13)) + 2, 12)
    # the most samples first
    assert list(v1["by_device"].items()) == [("dev-11", 12), ("dev-10", 11), ("dev-09", 10)]
    # a tie in device order
    assert v2["devices"] == 2 and list(v2["by_device"]) == ["dev-00", "dev-01"]
    assert list(samples.summary(FLEET, model="digits", top=1)[1]["by_device"]) == ["dev-00"]
    default = samples.summary(FLEET, model="digits")[0]
    assert len(default["by_device"]) == 10 and default["devices"] == 12
    none = samples.summary(FLEET, model="digits", top=0)[0]
    assert none["by_device"] == {} and none["devices"] == 12
    every = samples.summary(FLEET)
    assert [(e["model"], e["version"], e["devices"]) for e in every] == [
        ("cats", 1, 1),
        ("digits", 1, 12),
        ("digits", 2, 2),
    ]
    assert samples.summary(FLEET, model="nothing") == []
    assert samples.model_names(FLEET) == ["cats", "digits"]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    store = FleetStore(tmp_path / "fleet.db")
    _fill(SampleStore(store, tmp_path / "samples"))
    store.close()
    settings = CloudSettings(
        repo=CLOUD_REPO,
        fleet=FLEET,
        state_dir=tmp_path,
        mqtt=MqttSettings(url=closed_port_url().replace("http://", "mqtt://")),
        repo_poll_s=0,
    )
    with serve_in_thread(create_app(settings)) as url:
        yield url


def test_summary_api_filters_on_model_and_bounds_the_devices(served: str) -> None:
    with httpx.Client(base_url=served) as http:
        answer = http.get("/fleet/samples/summary", params={"model": "digits", "top": 2}).json()
        assert answer["model_names"] == ["cats", "digits"]
        assert [(e["model"], e["version"]) for e in answer["models"]] == [
            ("digits", 1),
            ("digits", 2),
        ]
        v1 = answer["models"][0]
        assert v1["by_device"] == {"dev-11": 12, "dev-10": 11} and v1["devices"] == 12
        default = http.get("/fleet/samples/summary").json()
        assert len(default["models"]) == 3
        assert len(default["models"][1]["by_device"]) == 10
        for bad in ({"top": -1}, {"top": 10_000}, {"model": "../x"}):
            assert http.get("/fleet/samples/summary", params=bad).status_code == 400
