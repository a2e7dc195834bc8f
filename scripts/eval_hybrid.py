"""Evaluate an edge bundle with a cloud endpoint, paper-style: every held-out sample through
the agent on the edge and through the cloud, each measured, then the threshold swept from 0
to 1 (accuracy, share escalated, mean and p95 latency), against edge-only and cloud-only, and
the bundle's own threshold run for real in auto mode as a check on the sweep.

    python scripts/eval_hybrid.py --bundle out/pipeline/digits/bundle [--wan-ms 40]
        [--cloud-url URL] [--out out/eval_hybrid]

Without ``--cloud-url`` it starts ``tandem-cloud serve`` on ``--repo`` with a simulated
wide-area delay of ``--wan-ms``. Prints a table; writes ``eval_hybrid.json`` and
``eval_hybrid.png``.

``--detection`` evaluates the image detector pair instead (``models/image``, see
``hybrid_detection.py``): mAP@0.5 of edge, cloud and auto on ``--scenes`` held-out synthetic
scenes, the share escalated, the swept curve (``eval_hybrid_detection.json``/``.png``).

    python scripts/eval_hybrid.py --detection [--scenes 400] [--wan-ms 40]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset
import hybrid_detection
from demo import plot
from hybrid import run_mode, sweep
from procs import CloudProcess

from agent import Agent, AgentSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="model.tflite + manifest (classifiers)")
    parser.add_argument("--cloud-url", help="a running OIP endpoint; default: start one")
    parser.add_argument("--repo", type=Path, default=dataset.ROOT / "models/cloud")
    parser.add_argument("--wan-ms", type=float, default=40.0, help="simulated round trip")
    parser.add_argument("--data", type=Path, default=dataset.DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=dataset.ROOT / "out" / "eval_hybrid")
    parser.add_argument("--detection", action="store_true", help="the image detector pair")
    parser.add_argument("--scenes", type=int, default=400, help="held-out scenes (--detection)")
    args = parser.parse_args(argv)
    if args.detection:
        return detection(args)
    if args.bundle is None:
        parser.error("--bundle is required (or --detection)")
    test = dataset.load(args.data).test
    args.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        url = args.cloud_url
        if url is None:
            url = stack.enter_context(CloudProcess(args.repo, delay_ms=args.wan_ms)).url
        settings = AgentSettings.load(model_dir=args.bundle, cloud={"url": url, "binary": True})
        agent = stack.enter_context(Agent(settings))
        threshold = agent.threshold
        deadline = 10_000.0  # the cloud path is measured, never cut short
        runs = {m: run_mode(agent, m, m, test, deadline) for m in ("edge", "cloud", "auto")}
    curve = sweep(runs["edge"], runs["cloud"])
    cloud_mean = float(np.mean(runs["cloud"].wall_ms))
    at = min(curve, key=lambda c: abs(c["threshold"] - threshold))
    result: dict[str, Any] = {
        "bundle": str(args.bundle),
        "wan_ms": args.wan_ms if args.cloud_url is None else None,
        "threshold": threshold,
        "modes": {name: run.summary() for name, run in runs.items()},
        "curve": curve,
        "at_threshold": at,
        "relative_accuracy": runs["auto"].accuracy / runs["cloud"].accuracy,
        "auto_mean_over_cloud_mean": float(np.mean(runs["auto"].wall_ms)) / cloud_mean,
    }
    print(f"{'threshold':>9} {'accuracy':>9} {'escalated':>9} {'mean ms':>8} {'p95 ms':>8}")
    for c in curve:
        if round(c["threshold"] * 100) % 10 == 0 or c is at:
            mark = "  <- bundle" if c is at else ""
            print(
                f"{c['threshold']:9.2f} {100 * c['accuracy']:8.2f}% {100 * c['escalated']:8.1f}% "
                f"{c['mean_ms']:8.2f} {c['p95_ms']:8.2f}{mark}"
            )
    for name, run in runs.items():
        s = run.summary()
        print(
            f"{name + ' (measured)':>18}: accuracy {100 * s['accuracy']:.2f}%, escalated "
            f"{100 * s['escalated']:.1f}%, mean {s['mean_ms']:.2f} ms, p95 {s['p95_ms']:.2f} ms"
        )
    print(
        f"auto at {threshold:.3f}: {result['relative_accuracy']:.2%} of cloud-only accuracy, "
        f"mean latency {result['auto_mean_over_cloud_mean']:.2f}x cloud-only's"
    )
    (args.out / "eval_hybrid.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(curve, runs, threshold, args.out / "eval_hybrid.png")
    print(f"wrote {args.out / 'eval_hybrid.json'} and eval_hybrid.png")
    return 0


def detection(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        url = args.cloud_url
        if url is None:
            url = stack.enter_context(
                CloudProcess(hybrid_detection.IMAGE_REPO, delay_ms=args.wan_ms)
            ).url
        runs, curve, threshold = hybrid_detection.run_image_hybrid(
            url, args.scenes, 10_000.0, args.out
        )
    at = min(curve, key=lambda c: abs(c["threshold"] - threshold))
    print(f"{'threshold':>9} {'mAP@0.5':>8} {'escalated':>9} {'mean ms':>8}")
    for c in curve:
        if round(c["threshold"] * 100) % 10 == 0 or c is at:
            mark = "  <- release" if c is at else ""
            print(
                f"{c['threshold']:9.2f} {c['map50']:8.3f} {100 * c['escalated']:8.1f}% "
                f"{c['mean_ms']:8.2f}{mark}"
            )
    print(hybrid_detection.table(runs))
    result = {
        "scenes": args.scenes,
        "wan_ms": args.wan_ms if args.cloud_url is None else None,
        "threshold": threshold,
        "modes": {name: run.summary() for name, run in runs.items()},
        "curve": curve,
        "at_threshold": at,
    }
    (args.out / "eval_hybrid_detection.json").write_text(json.dumps(result, indent=2) + "\n")
    hybrid_detection.plot(curve, runs, threshold, args.out / "eval_hybrid_detection.png")
    print(f"wrote {args.out / 'eval_hybrid_detection.json'} and eval_hybrid_detection.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
