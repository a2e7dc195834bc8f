"""Benchmark: time from publishing a signed manifest to every device ``ACTIVE``.

For each fleet size N (default 10, 100, 500) it starts N agents in worker processes of at
most 100 agents each (paho's ``select()`` loop cannot take descriptors above 1024), each a
real ``AgentService``: its own MQTT connection, updater thread, model store and TFLite
interpreter; one broker (Mosquitto when installed, else the embedded amqtt) and the cloud
server with the registry (a child process), waits for every birth, publishes release 2 at
fleet scope and records when each device's ``ACTIVE`` report reaches the controller. The
health watch is set to 0 s so the figure is the delivery pipeline itself: MQTT fan-out,
signature and policy checks, download, validation in a fresh interpreter, activation. Each
size is a fleet of its own on the broker (``bench-n<N>``): retained job reports and manifests
of an earlier size never count for a later one, and only reports made after the publish
(never retained ones) do.

    python scripts/bench_rollout.py [--sizes 10 100 500] [--out out/bench/bench_rollout.json]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset
from demo_fleet import prepare_registry
from local_broker import local_broker
from procs import CloudProcess
from results import write_json

from agent.device.service import AgentService
from agent.settings import AgentSettings
from cloud.releases.packaging import PackageRequest, package
from cloud.releases.registry import Registry
from shared import topics
from shared.manifest import Manifest
from shared.mqtt import MqttClient, MqttSettings
from shared.update import UpdateReport, UpdateState

FACTORY = dataset.ROOT / "models/edge/digits-int8"
UPDATE = dataset.ROOT / "models/edge/digits-f32"


def run_size(n: int, work: Path, broker_url: str) -> dict[str, Any]:
    fleet = f"bench-n{n}"
    out = work / f"n{n}"
    out.mkdir(parents=True)
    key, trust_path, registry_dir = prepare_registry(out, FACTORY)
    registry = Registry(registry_dir)
    release = package(
        PackageRequest(edge=UPDATE / "model.tflite", template=Manifest.load(UPDATE)), key, registry
    )
    active_at: dict[str, float] = {}
    online: set[str] = set()
    lock = threading.Lock()

    def on_update(topic: str, payload: bytes, retained: bool) -> None:
        if retained:  # stored before this controller subscribed: not this rollout's
            return
        report = UpdateReport.model_validate_json(payload)
        if report.version == release.version and report.state == UpdateState.ACTIVE:
            with lock:
                active_at.setdefault(report.device, time.monotonic())

    def on_status(topic: str, payload: bytes, retained: bool) -> None:
        parsed = topics.parse_device(topic)
        if parsed and b'"online"' in payload:
            with lock:
                online.add(parsed.device)

    controller = MqttClient(MqttSettings(url=broker_url), client_id=f"bench-ctl-{n}")
    controller.subscribe(topics.fleet_device_filter(fleet, "update"), on_update)
    controller.subscribe(topics.fleet_device_filter(fleet, "status"), on_status)
    controller.start(wait_s=10)
    with CloudProcess(
        dataset.ROOT / "models/cloud", extra=["--registry", str(registry_dir)]
    ) as cloud:
        t_boot = time.monotonic()
        workers = []
        for start in range(0, n, PER_WORKER):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                str(start),
                str(min(PER_WORKER, n - start)),
                fleet,
                broker_url,
                cloud.url,
                str(trust_path),
                str(out / "agents"),
            ]
            workers.append(
                subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
        for w in workers:
            assert w.stdout is not None and w.stdout.readline().strip() == "READY"
        deadline = time.monotonic() + 120
        while len(online) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        boot_s = time.monotonic() - t_boot
        t0 = time.monotonic()
        controller.publish_wait(topics.manifest(fleet, release.model), release.to_json().encode())
        deadline = time.monotonic() + 300
        while len(active_at) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        for w in workers:
            assert w.stdin is not None
            w.stdin.write("STOP\n")
            w.stdin.flush()
        for w in workers:
            w.wait(timeout=60)
    controller.stop()
    times = np.array(sorted(v - t0 for v in active_at.values()))
    return {
        "devices": n,
        "active": len(active_at),
        "all_active_s": float(times.max()) if len(times) == n else None,
        "p50_s": float(np.median(times)) if len(times) else None,
        "p95_s": float(np.percentile(times, 95)) if len(times) else None,
        "boot_and_connect_s": boot_s,
    }


PER_WORKER = 100


def worker(
    start: int, count: int, fleet: str, broker_url: str, cloud_url: str, trust: str, state: str
) -> int:
    """Host ``count`` agents until told to stop (one line on stdin)."""
    services = []
    for i in range(start, start + count):
        settings = AgentSettings(
            model_dir=FACTORY,
            device=f"d{i}",
            fleet=fleet,
            state_dir=Path(state) / f"d{i}",
            cloud={"url": cloud_url},
            backend={"kind": "tflite", "pool_size": 1},
            mqtt=MqttSettings(url=broker_url, reconnect_min_s=0.5, reconnect_max_s=5),
            update={"trust_store": Path(trust), "health_watch_s": 0.0, "settle_s": 0.1},
        )
        service = AgentService(settings)
        service.start()
        services.append(service)
    print("READY", flush=True)
    sys.stdin.readline()
    for service in services:
        service.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        start, count, fleet, broker_url, cloud_url, trust, state = argv[1:8]
        return worker(int(start), int(count), fleet, broker_url, cloud_url, trust, state)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--out", type=Path, default=dataset.ROOT / "out/bench/bench_rollout.json")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tandem-bench-rollout-"))
    broker = local_broker("auto", work / "broker")
    broker.start()
    rows = []
    try:
        for n in args.sizes:
            rows.append(run_size(n, work, broker.url))
            print(f"N={n}: {rows[-1]}", flush=True)
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    name = broker.name
    head = f"{'devices':>8}{'ACTIVE':>8}{'all ACTIVE s':>14}{'p50 s':>8}{'p95 s':>8}"
    print(f"\npublish -> every device ACTIVE ({name}, {platform.machine()}, health watch 0 s)")
    print(head)
    print("-" * len(head))
    for r in rows:

        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"

        print(
            f"{r['devices']:>8}{r['active']:>8}{f(r['all_active_s']):>14}{f(r['p50_s']):>8}"
            f"{f(r['p95_s']):>8}"
        )
    write_json(args.out, {"broker": name, "machine": platform.machine(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
