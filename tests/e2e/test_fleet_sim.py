"""``scripts/fleet_sim.py`` with 20 devices against a real Mosquitto, the real cloud server and
the real rollout controller: what it reports is checked against the fleet store it leaves
behind (every device serving release 2 with an ACTIVE job, the ingest burst's rows all
there, the telemetry made before the broker's restart stored but for what it reports lost).
The script runs as a user runs it (tests import nothing from ``scripts/``); no figure of
speed is asserted."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import ROOT

DEVICES = 20


PHASES = ("connect", "rollout", "ingest", "outage", "api")


def _run(tmp: Path, *extra: str, phases: tuple[str, ...] = PHASES) -> dict[str, Any]:
    out = tmp / "fleet_sim.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "fleet_sim.py"),
            *("--devices", str(DEVICES), "--procs", "2", "--interval", "1"),
            *("--phases", *phases),
            *("--outage-s", "2", "--reconnect-max-s", "1", "--api-requests", "2"),
            *("--burst", "8", "--out", str(out), "--work", str(tmp / "work"), *extra),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "publish -> all ACTIVE" in proc.stdout  # the table was printed
    runs: dict[str, Any] = json.loads(out.read_text())["runs"]
    return runs


def _store(tmp: Path) -> sqlite3.Connection:
    db = sqlite3.connect(tmp / "work" / "cloud" / "fleet.db")
    db.row_factory = sqlite3.Row
    return db


def test_fleet_sim_reports_what_the_store_holds(tmp_path: Path) -> None:
    run = _run(tmp_path)[f"n{DEVICES}-i1-sqlite"]
    assert run["connect"]["connected"] == DEVICES
    rollout = run["rollout"]
    assert rollout["command_rc"] == 0
    assert rollout["active"] == DEVICES
    assert (rollout["failed"], rollout["rejected"]) == (0, 0)
    assert rollout["downloads"] == DEVICES  # each device fetched the new artifact itself
    assert rollout["publish_to_all_active_s"] is not None
    waves = [line["line"] for line in rollout["controller"] if "ACTIVE" in line["line"]]
    assert len(waves) == 4, waves  # canary + 3 waves, as the controller printed them
    ingest = run["ingest"]
    assert ingest["messages"] == DEVICES * 8
    assert ingest["stored"] == ingest["messages"]
    outage = run["outage"]
    assert outage["queued_during_outage"] > 0
    assert (outage["lag_s"] is None) == (outage["lost"] > 0)  # caught up, or says what not
    assert run["api"]["/fleet/summary"]["error"] is None
    assert run["memory"]["api"]["broker"]["VmRSS"] > 0
    assert run["memory"]["api"]["cloud-0"]["VmRSS"] > 0

    with _store(tmp_path) as db:  # the cloud's own record agrees with the report
        devices = db.execute("SELECT device, models FROM devices WHERE fleet='sim'").fetchall()
        assert len(devices) == DEVICES
        assert all(json.loads(d["models"]) == [{"model": "digits", "version": 2}] for d in devices)
        states = db.execute(
            "SELECT state, COUNT(*) FROM jobs WHERE fleet='sim' AND version=2 GROUP BY state"
        ).fetchall()
        assert {s[0]: s[1] for s in states} == {"ACTIVE": DEVICES}
        before_restart = db.execute(
            "SELECT COUNT(*) FROM telemetry WHERE fleet='sim' AND ts <= ?",
            (outage["restarted_at"],),
        ).fetchone()[0]
        assert before_restart == outage["generated_before_restart"] - outage["lost"]
        per_device = db.execute(
            "SELECT COUNT(DISTINCT device) FROM telemetry WHERE fleet='sim'"
        ).fetchone()[0]
        assert per_device == DEVICES


def test_fleet_sim_on_postgres_with_two_instances(tmp_path: Path) -> None:
    """The same fleet split over two cloud instances (shared subscription) on PostgreSQL:
    the release reaches every device and the burst is counted in PostgreSQL's table."""
    runs = _run(
        tmp_path,
        *("--instances", "2", "--store", "postgres"),
        phases=("connect", "rollout", "ingest"),
    )
    run = runs[f"n{DEVICES}-i2-postgres"]
    assert run["rollout"]["command_rc"] == 0
    assert run["rollout"]["active"] == DEVICES
    assert run["rollout"]["downloads"] == DEVICES
    assert run["ingest"]["stored"] == run["ingest"]["messages"] == DEVICES * 8
    assert {"cloud-0", "cloud-1", "postgres"} <= run["memory"]["ingest"].keys()
