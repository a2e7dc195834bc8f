"""The demo, run again and again: how many runs in a row pass, per broker.

Each run is ``scripts/demo.py`` as a child process with a fresh output folder (the demo
also starts its cloud server, agents and broker afresh), exactly as ``scripts/demo`` runs it
but with no dashboard wait. A run passes when it exits 0 and its results show the rollout
``COMPLETED`` with no request failed. Prints a table and writes ``out/bench/demo_runs.json``.

    python scripts/demo_runs.py [--runs 20] [--brokers embedded mosquitto]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from local_broker import mosquitto_binary
from results import write_json

ROOT = Path(__file__).resolve().parent.parent


def one_run(broker: str, out: Path) -> dict[str, Any]:
    start = time.monotonic()
    cmd = [sys.executable, str(ROOT / "scripts/demo.py"), "--hold-s", "0", "--broker", broker]
    proc = subprocess.run(
        [*cmd, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    seconds = time.monotonic() - start
    problem = ""
    if proc.returncode != 0:
        problem = f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or [""])[-1]
    else:
        fleet = json.loads((out / "results.json").read_text())["fleet"]
        if fleet["rollout"] != "COMPLETED" or fleet["failed_total"]:
            problem = f"rollout {fleet['rollout']}, {fleet['failed_total']} requests failed"
    return {"broker": broker, "ok": not problem, "seconds": seconds, "problem": problem}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument(
        "--brokers",
        nargs="+",
        default=["embedded", "mosquitto"] if mosquitto_binary() else ["embedded"],
        help="embedded (amqtt), mosquitto, auto, or mqtt:// URLs",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "out/bench/demo_runs.json")
    args = parser.parse_args(argv)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tandem-demo-runs-") as work:
        for broker in args.brokers:
            for i in range(args.runs):
                run = one_run(broker, Path(work) / f"{broker.replace('/', '_')}-{i}")
                runs.append(run)
                mark = "ok" if run["ok"] else f"FAILED {run['problem']}"
                print(
                    f"{broker} run {i + 1}/{args.runs}: {run['seconds']:.1f} s {mark}", flush=True
                )
    rows = []
    for broker in args.brokers:
        mine = [r for r in runs if r["broker"] == broker]
        streak = best = 0
        for r in mine:
            streak = streak + 1 if r["ok"] else 0
            best = max(best, streak)
        rows.append(
            {
                "broker": broker,
                "runs": len(mine),
                "passed": sum(r["ok"] for r in mine),
                "longest_streak": best,
                "median_s": sorted(r["seconds"] for r in mine)[len(mine) // 2],
            }
        )
    head = f"{'broker':<12}{'runs':>6}{'passed':>8}{'in a row':>10}{'median s':>10}"
    print(f"\n{head}\n{'-' * len(head)}")
    for r in rows:
        print(
            f"{r['broker']:<12}{r['runs']:>6}{r['passed']:>8}{r['longest_streak']:>10}"
            f"{r['median_s']:>10.1f}"
        )
    write_json(args.out, {"rows": rows, "runs": runs})
    return 0 if all(r["passed"] == r["runs"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
