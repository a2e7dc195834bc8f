"""The README's main job, end to end: cloud server process, agent, three modes, the curve,
the fleet's signed update, and one learning-loop cycle (fewer escalations after it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.mosquitto import mosquitto_binary

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("broker", ["auto", "embedded"])
def test_demo_prints_the_table_and_writes_the_curve(tmp_path: Path, broker: str) -> None:
    """``auto`` takes the installed Mosquitto here (the test command installs it); a new
    machine without it runs the embedded broker, checked on its own."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "demo.py"),
            "--wan-ms",
            "15",
            "--hold-s",
            "0",
            "--out",
            str(tmp_path),
            "--broker",
            broker,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for mode in ("edge", "cloud", "auto", "auto, cloud down"):
        assert f"\n{mode} " in proc.stdout
    mosquitto = broker == "auto" and mosquitto_binary() is not None
    shown = "mosquitto" if mosquitto else "embedded (amqtt)"
    assert f"broker: {shown} at mqtt://127.0.0.1:" in proc.stdout
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert len(curve) == 101 and curve[0]["escalated"] == 0.0 and curve[-1]["escalated"] == 1.0
    results = json.loads((tmp_path / "results.json").read_text())
    modes = {m["mode"]: m for m in results["modes"]}
    cloud, auto, down = modes["cloud"], modes["auto"], modes["auto, cloud down"]
    assert auto["accuracy"] >= cloud["accuracy"] - 0.005
    assert auto["escalated"] <= 0.25 and modes["edge"]["escalated"] == 0.0
    assert down["escalated"] == 0.0
    assert set(down["reasons"]) <= {"confident", "cloud_unavailable", "breaker_open"}
    # every request answered with the cloud gone; the slack allows for a loaded CI machine
    assert down["max_ms"] < results["deadline_ms"] + 50
    fleet = results["fleet"]  # the signed update reached every agent under traffic
    assert fleet["rollout"] == "COMPLETED" and fleet["serving"] == ["digits:2"]
    assert fleet["failed_during_update"] == 0 and fleet["requests_during_update"] > 0
    # one learning-loop cycle: the retrained candidate passed its shadow gate, reached every
    # agent, and they escalate less than before on the same held-out shifted requests
    loop = results["learning_loop"]
    assert loop is not None and 0 < loop["stored"] <= 2000
    assert loop["rollout"] == "COMPLETED"
    assert loop["serving"] == [f"digits:{loop['release']['version']}"]
    assert loop["after"]["escalated"] < loop["before"]["escalated"]
