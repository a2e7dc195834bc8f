"""The demo's learning-loop part: one short cycle on a shifted digits stream.

Agents (``AgentService``) with capture on serve digits written with a bolder pen through a
noisier sensor (``shifted_digits.py``: held-out images only); their escalations and audits
are uploaded to a cloud server of its own (``tandem-cloud serve`` with the sample store and
the registry; a collector and the rollout controller run in this process, on the demo's
broker); ``tandem-cloud model retrain digits``
distils a candidate from those samples; a rollout with a shadow phase runs it beside the
serving model on a canary and goes ahead only when the gate passes; then the same held-out
shifted requests are sent again. It prints each step and the escalation rate and hybrid
accuracy before and after.

    python scripts/demo_loop.py [--broker auto] [--out out/demo]   # alone, or from demo.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset
import shifted_digits
from demo_fleet import prepare_registry
from local_broker import local_broker
from procs import CloudProcess

from agent.device.service import AgentService
from agent.settings import AgentSettings
from cloud.fleet.collector import Collector
from cloud.fleet.rollout import RolloutController
from cloud.fleet.store import FleetStore
from cloud.releases.registry import Registry
from shared.mqtt import MqttClient, MqttSettings
from shared.samples import device_token

FLEET = "demo-loop"
MODEL = "digits"
SECRET = "demo-loop-secret"
CLOUD_REPO = dataset.ROOT / "models" / "cloud"
TEACHER = CLOUD_REPO / "digits-cloud" / "1" / "model.onnx"
#: requests captured in the cycle (at most 2,000: the issue's cap), then the shadow's traffic
CAPTURE = 1200
#: labelled shadow runs before the gate decides: the canary sees every other row of the
#: shadow traffic, 400 distinct rows, so about all of them (at 120 the estimate's standard
#: error was near 3 points, and the gate failed a good candidate one cycle in ten)
GATE_MIN = 400


def hybrid(results: list[Any], y: np.ndarray) -> tuple[float, float]:
    escalated = float(np.mean([r.source == "cloud" for r in results]))
    return escalated, float(np.mean([int(r.label) == t for r, t in zip(results, y, strict=True)]))


def serve(services: list[AgentService], rows: np.ndarray, observed: bool = True) -> list[Any]:
    """Rows through the agents round robin; ``observed=False``: not captured (measuring)."""
    saved = [s.agent.observer for s in services]
    if not observed:
        for s in services:
            s.agent.observer = None
    try:
        return [services[i % len(services)].agent.infer(r) for i, r in enumerate(rows)]
    finally:
        for s, observer in zip(services, saved, strict=True):
            s.agent.observer = observer


def run_loop_demo(out: Path, broker_url: str, agents: int = 2, epochs: int = 120) -> dict[str, Any]:
    """One cycle; ``out/loop`` is made fresh. Returns the figures (for ``results.json``)."""
    work = out / "loop"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    stream = shifted_digits.make_stream()
    key, trust, registry_dir = prepare_registry(work, shifted_digits.EDGE_DIR)
    del key  # the retrain signs with the key file
    start = time.monotonic()

    def say(line: str) -> None:
        print(f"  +{time.monotonic() - start:5.1f}s {line}", flush=True)

    print(
        f"\nlearning loop: {agents} agents, a shifted stream (bolder pen, noisier sensor; "
        "images the edge model never trained on)"
    )
    with contextlib.ExitStack() as stack:
        cloud = stack.enter_context(
            CloudProcess(
                CLOUD_REPO,
                log=work / "cloud.log",
                extra=["--registry", str(registry_dir)],
                env={
                    # the fleet and sample routes need the server's MQTT (its collector)
                    "TANDEM_CLOUD_MQTT__URL": broker_url,
                    "TANDEM_CLOUD_FLEET": FLEET,
                    "TANDEM_CLOUD_STATE_DIR": str(work / "cloud"),
                    "TANDEM_CLOUD_SAMPLES__DEVICE_TOKEN_SECRET": SECRET,
                },
            )
        )
        # a collector and the controller in this process too, on one plain MQTT 3.1.1
        # connection: the server's own collector (a persistent session) does not get through
        # to the embedded broker; on Mosquitto both store each message, and the store keeps
        # one (telemetry and its shadow counts are keyed by device, session and sequence)
        store = FleetStore(work / "cloud" / "fleet.db")
        stack.callback(store.close)
        mqtt = MqttClient(MqttSettings(url=broker_url), client_id="demo-loop-controller")
        Collector(store, FLEET).attach(mqtt)
        mqtt.start(wait_s=10)
        stack.callback(mqtt.stop)
        services = []
        for i in range(agents):
            device = f"dev-{i}"
            s = AgentService(
                AgentSettings(
                    model_dir=shifted_digits.EDGE_DIR,
                    device=device,
                    fleet=FLEET,
                    state_dir=work / "agents" / device,
                    cloud={"url": cloud.url, "binary": True},
                    mqtt=MqttSettings(url=broker_url, reconnect_min_s=0.2, reconnect_max_s=2),
                    routing={"deadline_ms": 10_000},
                    update={"trust_store": trust, "health_watch_s": 0.5, "settle_s": 0.2},
                    telemetry={"interval_s": 0.5, "daily_budget_bytes": None},
                    capture={
                        "enabled": True,
                        "token": device_token(SECRET, FLEET, device),
                        "audit_rate": 0.05,
                        "upload_interval_s": 0.2,
                        "max_samples_per_hour": None,  # hours of capture in seconds
                        "seed": i,  # the same audits each run: the same candidate
                    },
                )
            )
            s.start(wait_s=10)
            stack.callback(s.stop)
            services.append(s)
        before = hybrid(serve(services, stream.heldout.x, observed=False), stream.heldout.y)
        say(
            f"before: {len(stream.heldout.y)} held-out shifted digits, "
            f"{100 * before[0]:.1f}% escalated, hybrid accuracy {100 * before[1]:.1f}%"
        )
        serve(services, stream.field.x[:CAPTURE])
        stored = wait_stored(cloud.url, services)
        say(f"capture: {CAPTURE} field requests, {stored} samples uploaded and stored")
        release = retrain(work, registry_dir, epochs)
        say(
            f"retrain: {MODEL}@{release['version']} published (signed), threshold "
            f"{release['threshold']:.2f}"
        )
        outcome, lines = gated_rollout(
            store, mqtt, registry_dir, services, stream.field.x[CAPTURE:], say
        )
        serving = sorted({s.agent.model.manifest.ref for s in services})
        after = hybrid(serve(services, stream.heldout.x, observed=False), stream.heldout.y)
        say(
            f"after: {', '.join(serving)}; {100 * after[0]:.1f}% escalated, hybrid accuracy "
            f"{100 * after[1]:.1f}%"
        )
    fewer = 1 - after[0] / before[0] if before[0] else 0.0
    print(
        f"  one cycle: {100 * fewer:.0f}% fewer escalations "
        f"({100 * before[0]:.1f}% -> {100 * after[0]:.1f}%), hybrid accuracy "
        f"{100 * before[1]:.1f}% -> {100 * after[1]:.1f}%, rollout {outcome}"
    )
    return {
        "captured_requests": CAPTURE,
        "stored": stored,
        "release": release,
        "rollout": outcome,
        "gate": [line for line in lines if "gate" in line],
        "before": {"escalated": before[0], "hybrid_accuracy": before[1]},
        "after": {"escalated": after[0], "hybrid_accuracy": after[1]},
        "serving": serving,
        "seconds": time.monotonic() - start,
    }


def wait_stored(url: str, services: list[AgentService], timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=10) as http:
        while time.monotonic() < deadline:
            summary = http.get("/fleet/samples/summary", params={"fleet": FLEET}).json()
            stored = sum(int(m["samples"]) for m in summary["models"])
            captured = sum(s.capture.captured for s in services)
            if stored and stored == captured and all(s.spool.pending == 0 for s in services):
                return stored
            time.sleep(0.1)
    raise TimeoutError("captured samples not all stored")


def retrain(work: Path, registry: Path, epochs: int) -> dict[str, Any]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cloud.cli",
            "model",
            "retrain",
            MODEL,
            "--registry",
            str(registry),
            "--key",
            str(work / "keys" / "demo.key"),
            "--state-dir",
            str(work / "cloud"),
            "--fleet",
            FLEET,
            "--data",
            str(dataset.DEFAULT_DATA),
            "--teacher",
            str(TEACHER),
            "--out",
            str(work / "retrain"),
            "--epochs",
            str(epochs),
        ],
        cwd=dataset.ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"retrain failed:\n{proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def gated_rollout(
    store: FleetStore,
    mqtt: MqttClient,
    registry_dir: Path,
    services: list[AgentService],
    rows: np.ndarray,
    say: Any,
) -> tuple[str, list[str]]:
    """The candidate's rollout with a shadow phase on a canary, under traffic."""
    stop = threading.Event()
    lines: list[str] = []

    def traffic() -> None:
        i = 0
        while not stop.is_set():
            services[i % len(services)].agent.infer(rows[i % len(rows)])
            i += 1

    def progress(line: str) -> None:
        lines.append(line)
        say(line)

    thread = threading.Thread(target=traffic, daemon=True)
    try:
        deadline = time.monotonic() + 10
        while len(store.devices(FLEET)) < len(services) and time.monotonic() < deadline:
            time.sleep(0.05)
        registry = Registry(registry_dir)
        controller = RolloutController(store, mqtt, registry, FLEET, poll_s=0.05, progress=progress)
        rid = controller.create(
            MODEL,
            registry.versions(MODEL)[-1],
            canary="1",
            waves=1,
            wave_timeout_s=60,
            shadow=True,
            gate_min_samples=GATE_MIN,
            shadow_timeout_s=90,
        )
        thread.start()
        result = controller.run(rid)
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=10)
    return result.state, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default="auto", help="mqtt://host:port, or a local one")
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=120, help="the retrain's epochs")
    parser.add_argument("--out", type=Path, default=dataset.ROOT / "out" / "demo")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.broker.startswith(("mqtt://", "mqtts://")):
            url = args.broker
        else:
            url = stack.enter_context(local_broker(args.broker)).url
        result = run_loop_demo(args.out, url, args.agents, args.epochs)
    (args.out / "loop" / "loop.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
