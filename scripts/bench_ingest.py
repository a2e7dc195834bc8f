"""Benchmark: the collector's ingest through a real Mosquitto into SQLite and PostgreSQL.

The real path: device clients (MQTT 3.1.1, one account each) publish telemetry at QoS 1 to
a real Mosquitto; one or two collector processes (``Collector`` on a real ``MqttClient``:
MQTT 5, persistent sessions, one shared subscription, as ``tandem-cloud serve`` runs it)
store it. The burst is published while the collectors are away, so that the broker holds it
in their sessions (as after a broker or cloud outage) and the publishers' speed is not what
is measured; then the collectors come back, and the clock runs from their connect to the
last row in the store. ``batched`` is the collector as it is (``subscribe_batched``: one
transaction per batch, acknowledged once stored); ``one by one`` stores each message with
``record_telemetry`` in paho's thread, as the collector did before. PostgreSQL runs with
fsync and synchronous commits on (``--fast``: off).

    python scripts/bench_ingest.py [--messages 10000 --devices 20 --fast]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset
from results import write_json

from cloud.fleet.collector import Collector
from cloud.fleet.listener import store_unavailable
from cloud.fleet.store import FleetStore
from shared import topics
from shared.mqtt import MqttClient, MqttSettings
from tests.mosquitto import Mosquitto
from tests.postgres import Postgres
from tests.telemetry_samples import sample_telemetry

FLEET = "bench"


class OneByOne(Collector):
    """The collector before batching: each message stored in paho's thread, acknowledged by
    paho when the handler returns."""

    def attach(self, mqtt: MqttClient) -> None:
        self.listener.attach(mqtt)
        mqtt.subscribe(
            topics.fleet_device_filter(self.fleet, "telemetry"),
            self._one,
            share_group=self.share_group,
            redeliver_on_error=True,
        )

    def _one(self, topic: str, payload: bytes, retained: bool) -> None:
        message = self._valid(topic, payload)
        if message is None:
            return
        try:
            stored = self.store.record_telemetry(self.fleet, message)
        except Exception as exc:
            if store_unavailable(exc):
                self._count("store_unavailable")
                raise
            self._complain(message.device, "unstorable", str(exc))
            return
        self._count("stored" if stored else "duplicate")


def _collector(
    url: str,
    settings: MqttSettings,
    group: str,
    name: str,
    batched: bool,
    go: Any,
    out: Any,
    stop: Any,
) -> None:
    """One instance: subscribes, leaves (its session keeps the subscription), waits for
    ``go``, comes back and stores until ``stop``; its connect time and counts into ``out``."""
    store = FleetStore(url)
    kind = Collector if batched else OneByOne
    for attempt in ("subscribe", "drain"):
        collector = kind(store, FLEET, share_group=group)
        mqtt = MqttClient(settings, f"collector-{FLEET}-{name}")
        collector.attach(mqtt)
        if attempt == "drain":
            go.wait()
            out.put(("connect", time.time()))
        mqtt.start(wait_s=30)
        if attempt == "subscribe":
            out.put(("ready", name))
            mqtt.stop()
    stop.wait()
    mqtt.stop()
    out.put(("counts", {**collector.counts, "batches": collector.batches}))
    store.close()


def _publish(broker: Mosquitto, devices: int, messages: int) -> None:
    """The burst: ``messages`` in all, round robin over the devices, each acknowledged."""
    clients = []
    for d in range(devices):
        c = MqttClient(broker.settings_for(f"dev-{d}"), f"dev-{d}")
        c.start(wait_s=10)
        clients.append(c)
    infos = []
    for i in range(messages):
        d = i % devices
        topic = topics.device_telemetry(FLEET, f"dev-{d}")
        infos.append(clients[d].publish(topic, sample_telemetry(f"dev-{d}", i // devices + 1)))
    for info in infos:
        info.wait_for_publish(timeout=120)
    for c in clients:
        c.stop()


def run(
    broker: Mosquitto, url: str, instances: int, batched: bool, messages: int, devices: int
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    go, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    settings = broker.settings_for("collector", protocol="5", persistent_session=True)
    # a group of its own: the sessions of an earlier run's members stay in theirs
    group = f"run{time.monotonic_ns()}"
    procs = [
        ctx.Process(
            target=_collector, args=(url, settings, group, f"{group}-{i}", batched, go, out, stop)
        )
        for i in range(instances)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        assert out.get(timeout=120)[0] == "ready"
    _publish(broker, devices, messages)
    store = FleetStore(url)
    go.set()
    connects = [out.get(timeout=120)[1] for _ in procs]
    while (rows := store.query("SELECT COUNT(*) AS n FROM telemetry")[0]["n"]) < messages:
        time.sleep(0.05)
    done = time.time()
    stop.set()
    counts = [out.get(timeout=120)[1] for _ in procs]
    for p in procs:
        p.join()
    store.close()
    seconds = done - min(connects)
    return {
        "instances": instances,
        "path": "batched" if batched else "one by one",
        "messages": messages,
        "rows": rows,
        "seconds": round(seconds, 2),
        "messages_per_s": round(messages / seconds),
        "batches": sum(c.get("batches", 0) for c in counts),
        "stored": sum(c.get("stored", 0) for c in counts),
        "duplicate": sum(c.get("duplicate", 0) for c in counts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--fast", action="store_true", help="PostgreSQL without fsync")
    parser.add_argument("--engines", default="sqlite,postgres")
    parser.add_argument("--paths", default="one-by-one,batched")
    parser.add_argument("--out", type=Path, default=dataset.ROOT / "out/bench/ingest.json")
    args = parser.parse_args()
    pg = Postgres(durable=not args.fast)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        users = {"collector": "col-pw"} | {f"dev-{d}": f"pw-{d}" for d in range(args.devices)}
        broker = Mosquitto(Path(tmp) / "mosquitto", users)
        broker.start()
        engines = args.engines.split(",")
        if "postgres" in engines:
            pg.start()
        files = iter(range(1000))
        new_url = {
            "sqlite": lambda: f"sqlite://{tmp}/fleet-{next(files)}.db",
            "postgres": pg.database,
        }
        try:
            print(f"{'engine':9s} {'path':11s} {'instances':>9s} {'msg/s':>8s} {'batches':>8s}")
            for engine in engines:
                for path in args.paths.split(","):
                    for instances in (1, 2):
                        r = run(
                            broker,
                            new_url[engine](),
                            instances,
                            path == "batched",
                            args.messages,
                            args.devices,
                        )
                        r["engine"] = engine
                        results.append(r)
                        print(
                            f"{engine:9s} {r['path']:11s} {instances:9d} "
                            f"{r['messages_per_s']:8d} {r['batches']:8d}"
                        )
        finally:
            broker.stop()
            if "postgres" in engines:
                pg.stop()
    write_json(
        args.out,
        {
            "messages": args.messages,
            "devices": args.devices,
            "postgres_durable": not args.fast,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
