"""Benchmark: what telemetry costs a device, and how fast the collector ingests it.

1. Agent: CPU time to close one telemetry interval (swap stats, build the message, write it
   to the SQLite outbox), after an interval of real requests; the hot-path cost of
   recording one request; bytes per message.
2. Outbox while offline: messages and SQLite file size after one simulated hour without a
   broker, at a 10 s and a 1 s interval.
3. Collector: messages per second stored from many simulated devices (publisher processes
   on a local broker, Mosquitto when installed, else amqtt), with validation and dedup.

    python scripts/bench_telemetry.py [--devices 200 --messages 50]
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset
from local_broker import local_broker
from results import write_json

from agent import Agent, AgentSettings
from agent.device.outbox import Outbox
from agent.device.telemetry import TelemetryReporter
from agent.inference.stats import RequestStats
from cloud.fleet.collector import Collector
from cloud.fleet.store import FleetStore
from shared import topics
from shared.mqtt import MqttClient, MqttSettings
from shared.telemetry import Histogram, Telemetry

FLEET = "benchtele"


def agent_cost(work: Path, intervals: int, requests_per_interval: int) -> dict[str, Any]:
    x = dataset.load().test.x
    agent = Agent(AgentSettings(model_dir=dataset.ROOT / "models/edge/digits-int8"))
    outbox = Outbox(work / "cost" / "outbox.db")
    reporter = TelemetryReporter(agent, outbox, "t", "d0", 1, 10.0)
    cpu = []
    for _ in range(intervals):
        for i in range(requests_per_interval):
            agent.infer(x[i % len(x)])
        start = time.process_time()
        message = reporter.report()
        cpu.append(time.process_time() - start)
    size = len(message.model_dump_json())
    stats = RequestStats()
    n = 200_000
    t0 = time.perf_counter()
    for i in range(n):
        stats.add("edge", "confident", 0.05 + (i % 7), 0.04, None, 0.93)
    add_us = (time.perf_counter() - t0) / n * 1e6
    agent.close()
    outbox.close()
    cpu.sort()
    return {
        "report_cpu_ms_median": 1000 * cpu[len(cpu) // 2],
        "report_cpu_ms_p95": 1000 * cpu[int(len(cpu) * 0.95)],
        "message_bytes": size,
        "stats_add_us": add_us,
    }


def offline_hour(work: Path, interval_s: float, template: bytes) -> dict[str, Any]:
    path = work / f"offline-{interval_s}" / "outbox.db"
    outbox = Outbox(path, max_rows=10**6, max_bytes=10**10)
    count = int(3600 / interval_s)
    for _ in range(count):
        outbox.put("tandem/v1/f/devices/d/telemetry", template)
    outbox.close()
    files = [p for p in path.parent.iterdir() if p.name.startswith("outbox.db")]
    return {
        "interval_s": interval_s,
        "messages": count,
        "disk_bytes": sum(p.stat().st_size for p in files),
    }


def _message(device: str, seq: int) -> bytes:
    return (
        Telemetry(
            device=device,
            session=1,
            seq=seq,
            ts=datetime.now(timezone.utc),
            interval_s=10.0,
            requests=1000,
            routes={"edge": 790, "cloud": 210},
            reasons={"confident": 790, "low_confidence": 210},
            errors=0,
            latency_local=Histogram(),
            latency_cloud=Histogram(),
            latency_total=Histogram(),
            confidence=[0] * 10,
            offload_rate=0.21,
        )
        .model_dump_json()
        .encode()
    )


def _publisher(url: str, first: int, count: int, messages: int) -> None:
    mqtt = MqttClient(MqttSettings(url=url), client_id=f"pub-{first}")
    mqtt.start(wait_s=10)
    infos = []
    for seq in range(1, messages + 1):
        for d in range(first, first + count):
            infos.append(
                mqtt.publish(topics.device_telemetry(FLEET, f"d{d}"), _message(f"d{d}", seq))
            )
    for info in infos:
        info.wait_for_publish(timeout=60)
    mqtt.stop()


def collector_rate(work: Path, url: str, devices: int, messages: int) -> dict[str, Any]:
    store = FleetStore(work / "collector" / "fleet.db")
    collector = Collector(store, FLEET)
    mqtt = MqttClient(MqttSettings(url=url, persistent_session=True), client_id="bench-collector")
    collector.attach(mqtt)
    mqtt.start(wait_s=10)
    total = devices * messages
    per = max(1, devices // 4)
    procs = [
        multiprocessing.Process(
            target=_publisher, args=(url, first, min(per, devices - first), messages)
        )
        for first in range(0, devices, per)
    ]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    deadline = time.monotonic() + 300
    while collector.counts["stored"] < total and time.monotonic() < deadline:
        time.sleep(0.01)
    elapsed = time.monotonic() - t0
    for p in procs:
        p.join(timeout=30)
    mqtt.stop()
    store.close()
    return {
        "devices": devices,
        "messages": total,
        "stored": collector.counts["stored"],
        "seconds": elapsed,
        "per_second": collector.counts["stored"] / elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--messages", type=int, default=50, help="per device")
    parser.add_argument("--out", type=Path, default=dataset.ROOT / "out/bench/bench_telemetry.json")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tandem-bench-telemetry-"))
    try:
        cost = agent_cost(work, intervals=100, requests_per_interval=500)
        template = _message("d0", 1)
        offline = [offline_hour(work, s, template) for s in (10.0, 1.0)]
        broker = local_broker("auto", work / "broker")
        broker.start()
        try:
            ingest = collector_rate(work, broker.url, args.devices, args.messages)
        finally:
            broker.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"telemetry cost on {platform.machine()}")
    print(
        f"  closing an interval (500 requests): {cost['report_cpu_ms_median']:.2f} ms CPU "
        f"median, {cost['report_cpu_ms_p95']:.2f} ms p95; message {cost['message_bytes']} B"
    )
    print(f"  recording one request: {cost['stats_add_us']:.2f} µs")
    for o in offline:
        print(
            f"  one hour offline at {o['interval_s']:g} s: {o['messages']} messages, "
            f"{o['disk_bytes'] / 1e6:.2f} MB outbox"
        )
    print(
        f"collector: {ingest['stored']}/{ingest['messages']} messages from {ingest['devices']} "
        f"devices in {ingest['seconds']:.1f} s = {ingest['per_second']:.0f} msg/s"
    )
    write_json(args.out, {"agent": cost, "offline": offline, "collector": ingest})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
