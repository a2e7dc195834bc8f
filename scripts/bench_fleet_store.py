"""Benchmark: the fleet store's telemetry ingest and retention on SQLite and PostgreSQL.

For each engine: messages per second stored by ``record_telemetry`` (one statement per
message, as the collector stores them today) and by ``record_telemetry_many`` (batches),
from one and from two processes at once (two cloud instances sharing the database; SQLite
instances share one file), and rows per second deleted by ``expire_telemetry``. Messages
are built before the clock starts: what is timed is the store. PostgreSQL is Debian's,
started here (``tests/postgres.py``) with fsync and synchronous commits on, as a production
server runs (``--fast``: off, as in the tests).

    python scripts/bench_fleet_store.py [--messages 5000 --batch 200 --fast]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset
from results import write_json

from cloud.fleet.store import FleetStore
from shared.status import DeviceStatus
from shared.telemetry import CONFIDENCE_BUCKETS, Histogram, Telemetry
from tests.postgres import Postgres

DEVICES = 100
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _messages(worker: int, n: int) -> list[Telemetry]:
    latency = Histogram(counts=[0, 3] + [0] * (len(Histogram().counts) - 2))
    return [
        Telemetry(
            device=f"w{worker}-dev-{i % DEVICES}",
            session=1,
            seq=i // DEVICES + 1,
            ts=T0 + timedelta(seconds=i),
            interval_s=10,
            requests=3,
            routes={"edge": 2, "cloud": 1},
            reasons={"confident": 3},
            errors=0,
            latency_local=latency,
            latency_cloud=latency,
            latency_total=latency,
            confidence=[0] * CONFIDENCE_BUCKETS,
            offload_rate=0.33,
            rss_bytes=50_000_000,
        )
        for i in range(n)
    ]


def _ingest(url: str, worker: int, n: int, batch: int, start: Any, out: Any) -> None:
    """One instance: its devices born, then ``n`` messages stored; seconds into ``out``."""
    store = FleetStore(url)
    for d in range(DEVICES):
        store.record_status("f", DeviceStatus(device=f"w{worker}-dev-{d}", state="online"))
    messages = _messages(worker, n)
    start.wait()
    t = time.perf_counter()
    if batch <= 1:
        for m in messages:
            store.record_telemetry("f", m)
    else:
        for at in range(0, n, batch):
            store.record_telemetry_many("f", messages[at : at + batch])
    out.put(time.perf_counter() - t)
    store.close()


def ingest_rate(url: str, processes: int, n: int, batch: int) -> float:
    """Messages per second stored by ``processes`` instances at once (the slowest's time)."""
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_ingest, args=(url, w, n, batch, start, out)) for w in range(processes)
    ]
    for p in procs:
        p.start()
    time.sleep(3.0)  # each has opened its store and built its messages
    start.set()
    seconds = max(out.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    return processes * n / seconds


def expire_rate(url: str, n: int) -> float:
    store = FleetStore(url)
    _ingest_rows = _messages(9, n)
    store.record_telemetry_many("f", _ingest_rows)
    t = time.perf_counter()
    removed = store.expire_telemetry(T0 + timedelta(days=365))
    seconds = time.perf_counter() - t
    store.close()
    assert removed == n, removed
    return n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000, help="per process")
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--fast", action="store_true", help="PostgreSQL without fsync")
    parser.add_argument("--out", type=Path, default=dataset.ROOT / "out/bench/fleet_store.json")
    args = parser.parse_args()
    pg = Postgres(durable=not args.fast)
    pg.start()
    results: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            files = iter(range(1000))
            engines = {
                "sqlite": lambda: f"sqlite://{tmp}/fleet-{next(files)}.db",
                "postgres": pg.database,
            }
            print(f"{'engine':9s} {'ingest':10s} {'instances':>9s} {'msg/s':>9s}")
            for engine, new_url in engines.items():
                for batch in (1, args.batch):
                    for processes in (1, 2):
                        rate = ingest_rate(new_url(), processes, args.messages, batch)
                        how = "one by one" if batch == 1 else f"batch {batch}"
                        print(f"{engine:9s} {how:10s} {processes:9d} {rate:9.0f}")
                        results.append(
                            {
                                "engine": engine,
                                "batch": batch,
                                "instances": processes,
                                "messages_per_s": round(rate),
                            }
                        )
                rate = expire_rate(new_url(), args.messages)
                print(f"{engine:9s} {'expire':10s} {1:9d} {rate:9.0f} rows/s")
                results.append({"engine": engine, "expire_rows_per_s": round(rate)})
    finally:
        pg.stop()
    write_json(
        args.out,
        {
            "messages_per_process": args.messages,
            "postgres_durable": not args.fast,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
