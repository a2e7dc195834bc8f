"""Benchmark: what the dashboard's learning-loop panel costs on a big fleet.

A SQLite fleet store with ``--devices`` devices serving ``digits@1``, each with one
telemetry message carrying a shadow section (``digits@2``) and an audit section (with its
manifest's guarantee, epsilon 5 %, delta 0.1), and
``--samples`` field samples per device in the sample store (``SampleStore.add``, files and
index, as uploads store them); five shadow rollouts of ``digits@2``. The real cloud app
serves it; timed: each request the page makes (the 2 s poll's ``/fleet/summary`` and page
of ``/fleet/devices``, the loop's 10 s poll of ``/fleet/samples/summary?model=digits&top=5``
and ``/fleet/loop``; the summary's default, every model and 10 devices per version, beside
them), median of ``--repeat`` calls, with the answer's size; then a headless
Chromium (Debian's) opens the page and the time until the panel is drawn is read.

    python scripts/bench_dashboard_loop.py [--devices 10000 --samples 2 --repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import numpy as np

from cloud.app import create_app
from cloud.fleet.samples.store import SampleStore
from cloud.fleet.store import FleetStore
from cloud.settings import CloudSettings
from shared.mqtt import MqttSettings
from shared.samples import Answer
from shared.status import DeviceStatus, ModelVersion
from tests.helpers import CLOUD_REPO, closed_port_url, serve_in_thread
from tests.sample_items import feature_sample
from tests.shadow_sim import audit, shadow_stats, telemetry

FLEET = "bench"
T0 = datetime(2026, 12, 1, 12, tzinfo=timezone.utc)
CHROMIUM = "/usr/bin/chromium"


def _build(state: Path, devices: int, samples: int) -> None:
    store = FleetStore(state / "fleet.db")
    names = [f"dev-{i:05d}" for i in range(devices)]
    for name in names:
        store.record_status(
            FLEET,
            DeviceStatus(
                device=name, state="online", models=[ModelVersion(model="digits", version=1)]
            ),
        )
    messages = [
        telemetry(
            name,
            1,
            shadow=shadow_stats(2, both=17, shadow_only=1, serving_only=1, wrong_both=1),
            audit=audit(1, audited=20, wrong=1).model_copy(update={"epsilon": 0.05, "delta": 0.1}),
        )
        for name in names
    ]
    for at in range(0, len(messages), 500):
        store.record_telemetry_many(FLEET, messages[at : at + 500])
    for _ in range(5):
        store.create_rollout(
            FLEET, "digits", 2, "fleet", None, "1", 2, 0.1, 30.0, shadow=True, gate_min_samples=100
        )
    rng = np.random.default_rng(0)
    sample_store = SampleStore(store, state / "samples")
    for i, name in enumerate(names):
        items = []
        for k in range(samples):
            items.append(
                feature_sample(
                    rng.integers(0, 17, 64),
                    kind="escalation" if k % 4 else "audit",
                    ts=T0,
                    edge=Answer(index=2, confidence=0.41),
                    cloud=Answer(index=5, confidence=0.97),
                    cloud_model="digits-cloud",
                    threshold=0.7,
                )
            )
        sample_store.add(FLEET, name, items)
        if i % 2000 == 0:
            print(f"  {i} devices stored", flush=True)
    store.close()


def _time(http: httpx.Client, path: str, repeat: int) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        answer = http.get(path)
        times.append(time.perf_counter() - t0)
        answer.raise_for_status()
        size = len(answer.content)
    return statistics.median(times), size


def _beside(http: httpx.Client) -> float:
    """The median time of the 2 s poll's summary while the loop's request is being answered
    (a CPU-bound answer holds the interpreter's lock: the others wait with it)."""
    loop = threading.Thread(target=http.get, args=("/fleet/loop?model=digits",))
    loop.start()
    times = []
    time.sleep(0.05)  # the loop's request under way
    while loop.is_alive():
        t0 = time.perf_counter()
        http.get("/fleet/summary").raise_for_status()
        times.append(time.perf_counter() - t0)
    loop.join()
    return 1000 * statistics.median(times) if times else float("nan")


def _panel_ms(url: str) -> float:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        t0 = time.perf_counter()
        page.goto(url + "/dashboard/")
        page.wait_for_selector('#loop-versions tr[data-version="2"]', timeout=120_000)
        elapsed = time.perf_counter() - t0
        browser.close()
    return 1000 * elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=2, help="per device")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        t0 = time.perf_counter()
        _build(state, args.devices, args.samples)
        print(f"store built in {time.perf_counter() - t0:.1f} s", flush=True)
        settings = CloudSettings(
            repo=CLOUD_REPO,
            fleet=FLEET,
            state_dir=state,
            mqtt=MqttSettings(url=closed_port_url().replace("http://", "mqtt://")),
            repo_poll_s=0,
        )
        with (
            serve_in_thread(create_app(settings)) as url,
            httpx.Client(base_url=url, timeout=120) as http,
        ):
            print(f"{args.devices} devices, {args.samples} samples each")
            for path in (
                "/fleet/summary",
                "/fleet/devices?limit=50",
                "/fleet/samples/summary",
                "/fleet/samples/summary?model=digits&top=5",
                "/fleet/loop?model=digits",
            ):
                seconds, size = _time(http, path, args.repeat)
                print(f"  GET {path:<42} {1000 * seconds:8.1f} ms  {size / 1024:8.1f} KB")
            print(f"  GET /fleet/summary while a /fleet/loop runs: {_beside(http):.1f} ms")
            print(f"  page opened to loop panel drawn: {_panel_ms(url):.0f} ms")


if __name__ == "__main__":
    main()
