"""The fleet simulator's command line: which phases, how many devices, instances and which
store, and the knobs of the devices (the agent's defaults), the broker and the waits."""

from __future__ import annotations

import argparse
from pathlib import Path

from procs import ROOT

from agent.settings import TelemetrySettings, UpdateSettings
from shared.mqtt import MqttSettings

PHASES = ("connect", "rollout", "ingest", "outage", "api")


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--instances", type=int, choices=(1, 2), default=1)
    p.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    p.add_argument("--procs", type=int, default=2, help="simulator processes (one loop each)")
    p.add_argument("--connect-rate", type=float, default=1000.0, help="connects a second")
    p.add_argument(
        "--interval",
        type=float,
        default=TelemetrySettings().interval_s,
        help="telemetry interval, s (default: the agent's)",
    )
    p.add_argument("--burst", type=int, default=0, help="messages per device (0: auto)")
    p.add_argument("--outage-s", type=float, default=60.0)
    p.add_argument("--canary", default="1%")
    p.add_argument("--waves", type=int, default=3)
    p.add_argument("--settle-s", type=float, default=UpdateSettings().settle_s)
    p.add_argument("--verify-ms", type=float, default=20.0, help="simulated validation")
    p.add_argument("--health-watch-s", type=float, default=0.0, help="simulated health watch")
    p.add_argument(
        "--reconnect-max-s",
        type=float,
        default=MqttSettings().reconnect_max_s,
        help="devices' reconnect backoff cap (default: the agent's)",
    )
    p.add_argument(
        "--http-connections",
        type=int,
        default=10,
        help="per sim process: downloads at once (httpcore scans its pool per request)",
    )
    p.add_argument("--max-queued", type=int, default=2_000_000, help="broker, per session")
    p.add_argument("--max-inflight", type=int, default=20, help="broker, per session")
    p.add_argument(
        "--stall-s",
        type=float,
        default=15.0,
        help="a store count still this long with nothing in flight: the rest is lost",
    )
    p.add_argument("--api-requests", type=int, default=20)
    p.add_argument("--api-timeout", type=float, default=120.0)
    p.add_argument("--rollout-timeout", type=float, default=900.0)
    p.add_argument("--ingest-timeout", type=float, default=600.0)
    p.add_argument("--outage-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=ROOT / "out/bench/fleet_sim.json")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    p.add_argument(
        "--cloud-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for the cloud instances and the controller "
        "(TANDEM_CLOUD_COLLECTOR_SHARE_GROUP=, ...)",
    )
    p.add_argument("--profile", type=Path, help="cProfile each sim process to PROFILE-<n>.prof")
    p.add_argument("--cloud-log-level", default="WARNING", help="the cloud instances' logs")
    p.add_argument("--work", type=Path, help="a new folder to work in (kept: logs, store)")
    args = p.parse_args(argv)
    if "connect" not in args.phases:
        args.phases.insert(0, "connect")
    return args
