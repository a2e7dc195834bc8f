"""The fleet simulator's results: percentiles, the table it prints, the JSON it keeps.

``report`` turns a run's figures into the printed table and the JSON document; ``merge_json``
keeps one run per configuration (``n1000-i2-postgres``) in one file, so the runs the
benchmark page quotes live side by side.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from results import write_json


async def measure_api(
    base: str, paths: list[str], requests: int, timeout_s: float, log: Callable[[str], None]
) -> dict[str, Any]:
    """``requests`` GETs of each path in turn (p50/p95, bytes; the first failure ends a
    path's series and is reported), then every device page walked once."""
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        for path in paths:
            times: list[float] = []
            size = 0
            error = None
            for _ in range(requests):
                t = time.perf_counter()
                try:
                    r = await client.get(base + path)
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__} after {time.perf_counter() - t:.1f} s"
                    break
                times.append(time.perf_counter() - t)
                size = len(r.content)
                if r.status_code != 200:
                    error = f"HTTP {r.status_code}"
                    break
            out[path] = percentiles(times) | {"bytes": size, "error": error}
            log(f"api {path}: {out[path]}")
        out["all_pages_s"] = await walk_pages(client, base)
    return out


async def walk_pages(client: httpx.AsyncClient, base: str) -> float | None:
    """Time to list every device page by page (``next``), or the one answer if unpaged."""
    t = time.perf_counter()
    url: str | None = base + "/fleet/devices?limit=1000"
    try:
        while url:
            doc = (await client.get(url)).json()
            nxt = doc.get("next") if isinstance(doc, dict) else None
            url = f"{base}/fleet/devices?limit=1000&after={nxt}" if nxt else None
    except (httpx.HTTPError, ValueError):
        return None
    return time.perf_counter() - t


def percentiles(times: list[float]) -> dict[str, Any]:
    if not times:
        return {"requests": 0}
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return {
        "requests": len(times),
        "p50_ms": 1000 * statistics.median(ordered),
        "p95_ms": 1000 * p95,
        "max_ms": 1000 * ordered[-1],
    }


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def report(
    a: Any, n: int, r: dict[str, Any], memory: dict[str, dict[str, dict[str, int]]]
) -> dict[str, Any]:
    """Print the table of a run (``a``: its arguments) and return its JSON document."""
    rows: list[tuple[str, str]] = []
    if "connect" in r:
        c = r["connect"]
        rows.append(
            (
                "connect (paced)",
                f"{c['connected']} connected in {fmt(c['all_connected_s'])} s, births stored "
                f"{fmt(c['births_stored_s'])} s ({c['connect_rate']}/s)",
            )
        )
    if "rollout" in r:
        o = r["rollout"]
        rows.append(
            (
                f"rollout canary {o['canary']} + {o['waves']} waves",
                f"publish -> all ACTIVE {fmt(o['publish_to_all_active_s'])} s (first manifest "
                f"-> all {fmt(o['first_manifest_to_all_active_s'])} s), {o['active']} ACTIVE, "
                f"{o['failed']} failed; command {fmt(o['command_s'])} s",
            )
        )
    if "ingest" in r:
        i = r["ingest"]
        rows.append(
            (
                f"ingest, {i['instances']} instance(s), {i['store']}",
                f"{fmt(i['store_msg_per_s'], 0)} msg/s stored ({i['messages']:,} messages; "
                f"broker acked {fmt(i['broker_acked_msg_per_s'], 0)} msg/s)"
                + (f"; {i['lost']:,} LOST" if i.get("lost") else ""),
            )
        )
    if "outage" in r:
        g = r["outage"]
        rows.append(
            (
                f"broker outage {g['outage_s']:g} s",
                f"lag {fmt(g['lag_s'])} s after restart ({g['queued_during_outage']:,} queued; "
                f"devices back in {fmt(g['devices_reconnected_s'])} s)"
                + (f"; {g['lost']:,} LOST" if g.get("lost") else ""),
            )
        )
    for path, figures in r.get("api", {}).items():
        if isinstance(figures, dict):
            rows.append(
                (
                    f"GET {path}",
                    f"p50 {fmt(figures.get('p50_ms'))} ms, p95 {fmt(figures.get('p95_ms'))} ms"
                    f", {figures.get('bytes', 0):,} bytes"
                    + (f" ({figures['error']})" if figures.get("error") else ""),
                )
            )
        elif figures is not None:
            rows.append(("all device pages", f"{1000 * figures:,.0f} ms"))
    rows += cpu_rows(memory)
    last: dict[str, int] = {}
    peak: dict[str, int] = {}  # over the samples: a restarted broker's peak is its own
    for sample in memory.values():
        for name, m in sample.items():
            if m:
                last[name] = m.get("VmRSS", 0)
                peak[name] = max(peak.get(name, 0), m.get("VmHWM", 0))
    for name, rss in last.items():
        rows.append(
            (f"memory {name}", f"RSS {rss / 2**20:,.0f} MB, peak {peak[name] / 2**20:,.0f} MB")
        )
    title = (
        f"fleet simulator: {n:,} devices, {a.instances} instance(s), {a.store}, "
        f"{a.procs} sim process(es), {os.cpu_count()} cores {platform.machine()}"
    )
    width = max(len(k) for k, _ in rows) if rows else 10
    print(f"\n{title}")
    print("-" * len(title))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return {
        "devices": n,
        "instances": a.instances,
        "store": a.store,
        "procs": a.procs,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "interval_s": a.interval,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "scripts/fleet_sim.py", *sys.argv[1:]]),
        **r,
        "memory": memory,
    }


def cpu_rows(samples: dict[str, dict[str, dict[str, int]]]) -> list[tuple[str, str]]:
    """CPU seconds each process used in each phase (between its samples). A process that
    restarted in a phase (the broker in the outage) counts from its restart."""
    rows = []
    before: dict[str, int] = {}
    for phase, sample in samples.items():
        used = []
        for name, figures in sample.items():
            now = figures.get("cpu_ms")
            if now is None:
                continue
            start = before.get(name, 0)
            used.append(f"{name} {(now - start if now >= start else now) / 1000:.1f}")
            before[name] = now
        if phase != "setup":
            rows.append((f"cpu s in {phase}", ", ".join(used)))
    return rows


def merge_json(path: Path, key: str, doc: dict[str, Any]) -> None:
    """Add this configuration's run to the file (other configurations' runs are kept)."""
    runs: dict[str, Any] = {}
    if path.exists():
        try:
            runs = json.loads(path.read_text()).get("runs", {})
        except (ValueError, AttributeError):
            runs = {}
    runs[key] = doc
    write_json(path, {"runs": runs})
