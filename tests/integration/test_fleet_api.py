"""The cloud server as collector: fleet API, /metrics and the dashboard's files, fed by a
real agent over a real Mosquitto."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from agent.device.service import AgentService
from agent.settings import AgentSettings
from cloud.app import create_app
from cloud.pipeline.data import SplitData
from cloud.settings import CloudSettings
from shared.mqtt import MqttSettings
from tests.fleet import wait_for
from tests.helpers import CLOUD_REPO, EDGE_INT8, closed_port_url, serve_in_thread
from tests.mosquitto import Mosquitto
from tests.prometheus import sample

FLEET = "apifleet"


@pytest.fixture
def cloud(tmp_path: Path, broker: Mosquitto) -> Iterator[httpx.Client]:
    settings = CloudSettings(
        repo=CLOUD_REPO,
        fleet=FLEET,
        state_dir=tmp_path / "cloud",
        mqtt=broker.settings_for("collector"),
    )
    with serve_in_thread(create_app(settings)) as url, httpx.Client(base_url=url) as http:
        yield http


def test_agent_telemetry_reaches_the_fleet_api(
    cloud: httpx.Client, broker: Mosquitto, tmp_path: Path, digits: SplitData
) -> None:
    service = AgentService(
        AgentSettings(
            model_dir=EDGE_INT8,
            device="dev-1",
            fleet=FLEET,
            group="lab",
            state_dir=tmp_path / "dev-1",
            cloud={"url": str(cloud.base_url)},
            mqtt=MqttSettings(url=broker.url, username="dev-1", password=SecretStr("pw-1")),
            # one report, sent below: an idle one after it would be the device's latest
            # (offload 0, no p95) and the figures asserted would race it
            telemetry={"interval_s": 3600},
        )
    )
    service.start(wait_s=10)
    try:
        for x in digits.test.x[:200]:
            service.agent.infer(x, deadline_ms=2000)
        assert service.telemetry is not None
        service.telemetry.report()
        wait_for(
            lambda: (
                sum(
                    r["requests"]
                    for r in cloud.get("/fleet/devices/dev-1").json().get("series", [])
                )
                == 200
                if cloud.get("/fleet/devices").json()["devices"]
                else False
            ),
            what="all requests counted in the API",
        )
        page = cloud.get("/fleet/devices").json()
        assert page["total"] == 1 and page["next"] is None
        d = page["devices"][0]
        assert (d["device"], d["group"], d["online"]) == ("dev-1", "lab", True)
        assert d["models"] == [{"model": "digits", "version": 1}]
        assert 0 < d["offload_rate"] < 1 and d["p95_ms"] is not None
        one = cloud.get("/fleet/devices/dev-1").json()
        assert sum(r["requests"] for r in one["series"]) == 200
        assert one["wire_bytes"]["births"]["sent"] > 0, one["wire_bytes"]
        assert one["budget_backoff"] is False
        summary = cloud.get("/fleet/summary").json()
        assert summary["online"] == 1 and summary["versions"] == {"digits:1": 1}
        assert sum(b["requests"] for b in summary["series"]) == 200
        metrics = cloud.get("/metrics").text
        assert sample(metrics, "tandem_fleet_devices", fleet=FLEET, state="online") == 1
        assert sample(metrics, "tandem_fleet_devices", fleet=FLEET, state="offline") == 0
        assert (
            sample(metrics, "tandem_fleet_model_devices", fleet=FLEET, model="digits", version="1")
            == 1
        )
        offload = sample(metrics, "tandem_device_offload_rate", fleet=FLEET, device="dev-1")
        assert offload is not None and 0 < offload < 1
        stored = sample(metrics, "tandem_collector_messages_total", fleet=FLEET, outcome="stored")
        assert stored is not None and stored >= 1
        assert cloud.get("/fleet/devices/nobody").status_code == 404
    finally:
        service.stop()
    wait_for(lambda: not cloud.get("/fleet/devices").json()["devices"][0]["online"], what="offline")
    offline = cloud.get("/fleet/devices", params={"state": "offline", "group": "lab"}).json()
    assert [d["device"] for d in offline["devices"]] == ["dev-1"]
    assert cloud.get("/fleet/devices", params={"state": "online"}).json()["total"] == 0


def test_dashboard_files_are_served(cloud: httpx.Client) -> None:
    r = cloud.get("/", follow_redirects=True)
    assert r.status_code == 200 and "<canvas" in r.text and 'src="app.js"' in r.text
    assert "https://" not in r.text  # no CDN
    js = cloud.get("/dashboard/app.js")
    assert js.status_code == 200 and '"/fleet/summary"' in js.text


@pytest.fixture(scope="module")
def brokerless(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """The fleet routes over an empty store, the broker unreachable (the app never waits for
    it: it keeps retrying in the background)."""
    settings = CloudSettings(
        repo=CLOUD_REPO,
        fleet=FLEET,
        state_dir=tmp_path_factory.mktemp("cloud"),
        mqtt=MqttSettings(url=closed_port_url().replace("http://", "mqtt://")),
    )
    with serve_in_thread(create_app(settings)) as url, httpx.Client(base_url=url) as http:
        yield http


@pytest.mark.parametrize("param", ["minutes", "bucket_s"])
@pytest.mark.parametrize("value", ["0", "-5", "nan", "NaN", "inf", "-inf", "1e308", "1e12", "x"])
def test_summary_refuses_windows_that_make_no_sense(
    brokerless: httpx.Client, param: str, value: str
) -> None:
    r = brokerless.get("/fleet/summary", params={param: value})
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"} and param in r.json()["error"]


def test_summary_takes_sane_windows(brokerless: httpx.Client) -> None:
    r = brokerless.get("/fleet/summary", params={"minutes": "0.5", "bucket_s": "3600"})
    assert r.status_code == 200 and r.json()["devices"] == 0


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "x"},
        {"state": "asleep"},
        {"after": "a/b"},
        {"group": ""},
    ],
)
def test_device_paging_refuses_what_makes_no_sense(
    brokerless: httpx.Client, params: dict[str, str]
) -> None:
    r = brokerless.get("/fleet/devices", params=params)
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"} and next(iter(params)) in r.json()["error"]


def test_device_paging_of_an_empty_fleet(brokerless: httpx.Client) -> None:
    r = brokerless.get("/fleet/devices", params={"limit": "1000", "state": "online"})
    assert r.status_code == 200 and r.json() == {"devices": [], "total": 0, "next": None}


def test_device_series_refuses_a_since_that_is_no_time(brokerless: httpx.Client) -> None:
    r = brokerless.get("/fleet/devices/dev-1", params={"since": "yesterday"})
    assert r.status_code == 400 and "since" in r.json()["error"]
