"""Benchmark: an idle device's bytes per day at default settings, by category.

A real agent (``AgentService``, the factory digits model from models/edge, default
``[telemetry]`` and MQTT keepalive) connects to a real Mosquitto (with per-device accounts
and the ACL, as a fleet runs it) through a counting TCP proxy, and sits idle: no requests,
no updates. After its first telemetry message (the start-up costs: CONNECT with its Last
Will, the manifest subscriptions, the birth) it is watched for ``--intervals`` telemetry
intervals at the default interval, so keepalive pings fall as they would. Then:

- measured: the bytes that crossed the socket each way (the proxy), and the agent's own
  counts per category (``agent.device.wire``), which must add up to the same;
- estimated: what the link adds below MQTT. TCP/IP headers, 52 bytes a segment (IPv4 20,
  TCP 20, timestamps 12), counting each read of the proxy as one data segment and one pure
  ACK for each segment the device receives (the broker's ACKs ride on its replies); and
  TLS 1.3 records for an ``mqtts://`` link, 22 bytes each (header 5, tag 16, type 1), one
  per data segment.

The window's bytes are scaled to a day (86,400 s); the start-up costs are shown apart (once
per connection: a device that reconnects every hour pays them 24 times).

    python scripts/bench_idle_bytes.py [--intervals 3] [--interval S] [--keepalive S] [--out F]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset
from results import write_json

from agent.device.service import AgentService
from agent.device.wire import CATEGORIES
from agent.settings import AgentSettings
from shared.mqtt import MqttSettings
from tests.counting_proxy import CountingProxy
from tests.mosquitto import Mosquitto

DAY_S = 86_400
TCPIP_HEADER = 52
TLS_RECORD = 22
GOAL_BYTES = 2_000_000
OTHER_PLATFORM_BYTES = 118 * 2**20


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def _sample(service: AgentService, proxy: CountingProxy) -> dict[str, Any]:
    wire = service.wire.snapshot()
    return {
        "t": time.monotonic(),
        "wire": {c: [wire[c].sent, wire[c].received] if c in wire else [0, 0] for c in CATEGORIES},
        "up": [proxy.up.bytes, proxy.up.chunks],
        "down": [proxy.down.bytes, proxy.down.chunks],
    }


def _delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {
        "s": b["t"] - a["t"],
        "wire": {c: [b["wire"][c][i] - a["wire"][c][i] for i in (0, 1)] for c in CATEGORIES},
        "up": [b["up"][i] - a["up"][i] for i in (0, 1)],
        "down": [b["down"][i] - a["down"][i] for i in (0, 1)],
    }


def measure(
    work: Path, intervals: int, interval_s: float | None, keepalive_s: int | None
) -> dict[str, Any]:
    broker = Mosquitto(work / "mosquitto", {"dev-0": "pw-0"})
    broker.start()
    try:
        with CountingProxy("127.0.0.1", broker.port) as proxy:
            mqtt_extra: dict[str, Any] = {} if keepalive_s is None else {"keepalive_s": keepalive_s}
            telemetry: dict[str, Any] = {} if interval_s is None else {"interval_s": interval_s}
            settings = AgentSettings(
                model_dir=dataset.ROOT / "models/edge/digits-int8",
                device="dev-0",
                state_dir=work / "agent",
                mqtt=MqttSettings(
                    url=f"mqtt://127.0.0.1:{proxy.port}",
                    username="dev-0",
                    password=SecretStr("pw-0"),
                    **mqtt_extra,
                ),
                telemetry=telemetry,
                log_level="WARNING",
            )
            service = AgentService(settings)
            reporter = service.telemetry
            assert reporter is not None
            try:
                service.start(wait_s=10)
                interval = settings.telemetry.interval_s

                def after(seq: int) -> dict[str, Any]:
                    # the message is out and acknowledged, and nothing else is under way
                    _wait(
                        lambda: reporter.seq >= seq and service.outbox.pending == 0,
                        interval * (seq - reporter.seq + 1) + 10,
                        f"telemetry {seq}",
                    )
                    time.sleep(0.2)  # the proxy passes the PUBACK on
                    return _sample(service, proxy)

                start = after(1)
                print(f"start-up done; watching {intervals} intervals of {interval:g} s ...")
                end = after(1 + intervals)
            finally:
                service.stop()
            startup = {
                "wire": start["wire"],
                "up": start["up"],
                "down": start["down"],
            }
            window = _delta(start, end)
    finally:
        broker.stop()
    return {
        "interval_s": interval,
        "keepalive_s": settings.mqtt.keepalive_s if settings.mqtt else None,
        "intervals": intervals,
        "startup": startup,
        "window": window,
    }


def report(m: dict[str, Any]) -> dict[str, Any]:
    w = m["window"]
    scale = DAY_S / w["s"]
    per_day = {c: round(sum(v) * scale) for c, v in w["wire"].items() if sum(v)}
    counted = sum(sum(v) for v in w["wire"].values())
    socket_bytes = w["up"][0] + w["down"][0]
    segments = w["up"][1] + 2 * w["down"][1]
    tcpip = segments * TCPIP_HEADER
    tls = (w["up"][1] + w["down"][1]) * TLS_RECORD
    day = {
        "categories (agent's counts)": per_day,
        "mqtt (socket, measured)": round(socket_bytes * scale),
        "tcp/ip headers (estimated)": round(tcpip * scale),
        "tls records (estimated, mqtts://)": round(tls * scale),
    }
    total_plain = round((socket_bytes + tcpip) * scale)
    total_tls = round((socket_bytes + tcpip + tls) * scale)
    s = m["startup"]
    startup_bytes = s["up"][0] + s["down"][0]
    return {
        "per_day": day,
        "total_per_day_mqtt": total_plain,
        "total_per_day_mqtts": total_tls,
        "agent_counts_match_socket": counted == socket_bytes,
        "startup_bytes_socket": startup_bytes,
        "startup_by_category": {c: sum(v) for c, v in s["wire"].items() if sum(v)},
        "goal_bytes": GOAL_BYTES,
        "meets_goal": total_tls <= GOAL_BYTES,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", type=int, default=3, help="telemetry intervals watched")
    parser.add_argument(
        "--interval", type=float, help="telemetry.interval_s (default: the default)"
    )
    parser.add_argument("--keepalive", type=int, help="mqtt.keepalive_s (default: the default)")
    parser.add_argument(
        "--out", type=Path, default=dataset.ROOT / "out/bench/bench_idle_bytes.json"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        m = measure(Path(tmp), args.intervals, args.interval, args.keepalive)
    r = report(m)
    w = m["window"]
    print(
        f"\nidle device, telemetry every {m['interval_s']:g} s, keepalive {m['keepalive_s']} s; "
        f"window {w['s']:.1f} s ({m['intervals']} intervals), scaled to a day\n"
    )
    print(f"{'category':<36}{'sent/day':>12}{'received/day':>14}{'total/day':>12}")
    scale = DAY_S / w["s"]
    for c, (sent, received) in w["wire"].items():
        if sent or received:
            print(
                f"{c:<36}{sent * scale / 1e3:>10.1f}kB{received * scale / 1e3:>12.1f}kB"
                f"{(sent + received) * scale / 1e3:>10.1f}kB"
            )
    for label, value in list(r["per_day"].items())[1:]:
        print(f"{label:<62}{value / 1e3:>10.1f}kB")
    print(f"{'total over mqtt:// (measured + TCP/IP)':<62}{r['total_per_day_mqtt'] / 1e6:>10.3f}MB")
    print(f"{'total over mqtts:// (+ TLS records)':<62}{r['total_per_day_mqtts'] / 1e6:>10.3f}MB")
    print(
        f"\nagent's counts = socket bytes: {r['agent_counts_match_socket']}; start-up (once per "
        f"connection): {r['startup_bytes_socket']} B {r['startup_by_category']}"
    )
    print(
        f"goal <= {GOAL_BYTES / 1e6:g} MB/day: {'met' if r['meets_goal'] else 'NOT met'} "
        f"(the other platform: {OTHER_PLATFORM_BYTES / 2**20:g} MiB/day, "
        f"{OTHER_PLATFORM_BYTES / max(r['total_per_day_mqtts'], 1):.0f}x)"
    )
    write_json(
        args.out,
        {"platform": platform.platform(), "python": platform.python_version(), **m, **r},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
