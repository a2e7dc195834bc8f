"""The demo's fleet part: a signed model update reaching running agents, under traffic.

Generates a demo signing key and trust store, publishes the factory model as release 1 in a
fresh registry (served by the running cloud server), starts agents (``AgentService``, the
device runtime) on a broker, drives requests through all of them, then packages the
float32 edge model as release 2 and rolls it out: canary first, then the rest. It prints the
job states as they arrive and checks that no request failed during the swap.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dataset

from agent.device.service import AgentService
from agent.settings import AgentSettings
from cloud.fleet.listener import FleetListener
from cloud.fleet.rollout import RolloutController
from cloud.fleet.store import FleetStore
from cloud.releases.packaging import PackageRequest, package
from cloud.releases.registry import Registry
from shared.manifest import Manifest
from shared.mqtt import MqttClient, MqttSettings
from shared.signing import SigningKey, TrustStore

FLEET = "demo"


def prepare_registry(out: Path, factory: Path) -> tuple[SigningKey, Path, Path]:
    """Keys, trust store and registry with the factory model as release 1 (``out`` fresh)."""
    key = SigningKey.generate()
    key.save(out / "keys" / "demo.key")
    trust = TrustStore()
    trust.add(key.public_b64)
    trust.save(out / "keys" / "trust.json")
    registry = Registry(out / "registry")
    m = Manifest.load(factory)
    release1 = m.model_copy(
        update={"edge": m.edge.model_copy(update={"url": f"/registry/{m.model}/1/{m.edge.file}"})}
    )
    registry.publish(key.sign(release1), (factory / m.edge.file).read_bytes())
    return key, out / "keys" / "trust.json", out / "registry"


@dataclass
class Traffic:
    """Requests through every agent until stopped; counts answers and failures."""

    agents: list[AgentService]
    rows: Any
    stop: threading.Event = field(default_factory=threading.Event)
    answered: int = 0
    failed: int = 0
    versions: set[str] = field(default_factory=set)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            service = self.agents[i % len(self.agents)]
            try:
                r = service.agent.infer(self.rows[i % len(self.rows)], deadline_ms=150)
                self.answered += 1
                self.versions.add(r.edge_model)
            except Exception:  # the demo reports failures; there should be none
                self.failed += 1
            i += 1
            time.sleep(0.001)


def fresh(out: Path) -> None:
    """Remove what an earlier run left (keys, registry, agent stores, fleet database)."""
    for sub in ("keys", "registry", "agents", "cloud"):
        shutil.rmtree(out / sub, ignore_errors=True)


def run_fleet_demo(
    out: Path,
    factory: Path,
    update_dir: Path,
    cloud_url: str,
    broker_url: str,
    agents: int,
    fleet_db: Path,
    hold_s: float = 0.0,
) -> dict[str, Any]:
    key, trust_path, registry_dir = prepare_registry(out, factory)
    registry = Registry(registry_dir)
    services = []
    for i in range(agents):
        settings = AgentSettings(
            model_dir=factory,
            device=f"dev-{i}",
            fleet=FLEET,
            group="demo",
            state_dir=out / "agents" / f"dev-{i}",
            cloud={"url": cloud_url},
            mqtt=MqttSettings(url=broker_url, reconnect_min_s=0.2, reconnect_max_s=2),
            update={"trust_store": trust_path, "health_watch_s": 1.0, "settle_s": 0.2},
            telemetry={"interval_s": 1.0},
        )
        service = AgentService(settings)
        service.start(wait_s=10)
        services.append(service)
    store = FleetStore(fleet_db)  # the cloud server's: the dashboard shows the rollout
    controller_mqtt = MqttClient(MqttSettings(url=broker_url), client_id="demo-controller")
    FleetListener(store, FLEET).attach(controller_mqtt)
    controller_mqtt.start(wait_s=10)
    traffic = Traffic(services, dataset.load().test.x)
    thread = threading.Thread(target=traffic.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while len(store.devices(FLEET)) < agents and time.monotonic() < deadline:
            time.sleep(0.05)
        release = package(
            PackageRequest(edge=update_dir / "model.tflite", template=Manifest.load(update_dir)),
            key,
            registry,
        )
        print(
            f"\nfleet: {agents} agents online; published {release.ref} "
            f"(signed by {release.key_id}), rolling out: canary 1, then the rest"
        )
        start = time.monotonic()
        controller = RolloutController(
            store,
            controller_mqtt,
            registry,
            FLEET,
            poll_s=0.05,
            progress=lambda line: print(f"  +{time.monotonic() - start:5.2f}s {line}"),
        )
        result = controller.run(
            controller.create(
                release.model, release.version, canary="1", waves=1, wave_timeout_s=60
            )
        )
        elapsed = time.monotonic() - start
        time.sleep(0.3)
        answered, failed = traffic.answered, traffic.failed
        if hold_s:
            print(
                f"  agents keep serving for {hold_s:.0f}s: watch the dashboard "
                "(Ctrl-C ends the wait)",
                flush=True,
            )
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(hold_s)
    finally:
        traffic.stop.set()
        thread.join()
        controller_mqtt.stop()
        for service in services:
            service.stop()
        store.close()
    serving = sorted({s.agent.model.manifest.ref for s in services})
    print(
        f"  rollout {result.state} in {elapsed:.2f}s; agents now serve {', '.join(serving)}; "
        f"{answered} requests answered during the update, {failed} failed"
    )
    return {
        "rollout": result.state,
        "seconds": elapsed,
        "serving": serving,
        "requests_during_update": answered,
        "failed_during_update": failed,
        "failed_total": traffic.failed,
        "versions_seen": sorted(traffic.versions),
    }
