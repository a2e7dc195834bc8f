"""Benchmark: one many-row request to the agent's local endpoint, against a cloud over a WAN.

The cloud is the real ``tandem-cloud`` app with a simulated network delay per infer request
(``simulated_delay_ms``, default 40 ms), its model allowed batches of 64 rows; the agent is
the real endpoint on the int8 TFLite model. Each request carries ``--rows`` held-out samples
(default 50) with ``deadline_ms`` (default 100) in ``cloud`` and in ``auto`` mode. Reported
per mode: wall time of the request (median, p90, max), infer requests the cloud saw per
agent request, and rows the cloud answered.

    python scripts/bench_batch.py [--requests 10] [--rows 50] [--deadline-ms 100]
        [--delay-ms 40] [--out out/bench/bench_batch.json]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset
import httpx
from results import write_json

from agent import Agent, AgentSettings
from agent.server import create_app as agent_app
from cloud.app import create_app as cloud_app
from cloud.settings import CloudSettings
from tests.helpers import CLOUD_REPO, EDGE_INT8, infer_body, serve_in_thread

MODES = ("cloud", "auto")


class InferCounter:
    """ASGI wrapper counting the infer requests that reach the app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.infers = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/infer"):
            self.infers += 1
        await self.app(scope, receive, send)


def batching_repo(root: Path, max_batch_size: int) -> Path:
    """The demo cloud repository with its model allowed ``max_batch_size`` rows."""
    repo = root / "cloud"
    shutil.copytree(CLOUD_REPO, repo)
    for model in repo.iterdir():
        (model / "config.toml").write_text(f"max_batch_size = {max_batch_size}\n")
    return repo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10, help="per mode")
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument("--deadline-ms", type=float, default=100.0)
    parser.add_argument("--delay-ms", type=float, default=40.0)
    parser.add_argument("--out", type=Path, default=dataset.ROOT / "out/bench/bench_batch.json")
    args = parser.parse_args(argv)
    x = dataset.load().test.x[: args.rows]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = batching_repo(Path(tmp), max(64, args.rows))
        counter = InferCounter(
            cloud_app(CloudSettings(repo=repo, testing={"simulated_delay_ms": args.delay_ms}))
        )
        with serve_in_thread(counter) as cloud_url:
            settings = AgentSettings(
                model_dir=EDGE_INT8,
                cloud={"url": cloud_url},
                routing={"max_batch_rows": max(64, args.rows)},
            )
            with (
                Agent(settings) as agent,
                serve_in_thread(agent_app(agent)) as url,
                httpx.Client(base_url=url, timeout=60) as http,
            ):
                for mode in MODES:
                    body = infer_body(x, parameters={"mode": mode, "deadline_ms": args.deadline_ms})
                    http.post("/v2/models/digits/infer", json=body).raise_for_status()  # warm-up
                    walls, escalated = [], []
                    before = counter.infers
                    for _ in range(args.requests):
                        t0 = time.perf_counter()
                        reply = http.post("/v2/models/digits/infer", json=body)
                        walls.append((time.perf_counter() - t0) * 1000.0)
                        reply.raise_for_status()
                        escalated.append(reply.json()["parameters"]["escalated"])
                    rows.append(
                        {
                            "mode": mode,
                            "rows": args.rows,
                            "deadline_ms": args.deadline_ms,
                            "median_ms": float(np.median(walls)),
                            "p90_ms": float(np.percentile(walls, 90)),
                            "max_ms": float(max(walls)),
                            "cloud_requests_per_request": (counter.infers - before) / args.requests,
                            "cloud_rows_median": float(np.median(escalated)),
                        }
                    )

    print(
        f"{args.rows}-row requests to the agent endpoint, deadline {args.deadline_ms:g} ms, "
        f"cloud delay {args.delay_ms:g} ms, {args.requests} requests per mode"
    )
    head = (
        f"{'mode':<7}{'median ms':>11}{'p90 ms':>9}{'max ms':>9}"
        f"{'cloud calls':>13}{'cloud rows':>12}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['mode']:<7}{r['median_ms']:>11.1f}{r['p90_ms']:>9.1f}{r['max_ms']:>9.1f}"
            f"{r['cloud_requests_per_request']:>13.1f}{r['cloud_rows_median']:>12.0f}"
        )
    write_json(
        args.out,
        {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "requests": args.requests,
            "delay_ms": args.delay_ms,
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
