"""The Tandem demo: the held-out digits through the agent in edge, cloud and auto modes.

Starts ``tandem-cloud serve`` as its own process with a simulated wide-area delay
(``--wan-ms``), runs every held-out sample through an in-process ``Agent`` in each mode, and
prints accuracy, share escalated and latency per mode. Then a fleet of agents on a broker
(an embedded one unless ``--broker`` names one) receives a signed model update while they
serve traffic (``demo_fleet.py``), and (``--loop``, the default) one learning-loop cycle runs
on a shifted stream: capture, upload, retrain, a gated rollout, escalations before and after
(``demo_loop.py``). It sweeps the routing threshold (from the measured
per-sample edge and cloud answers) and writes the accuracy-versus-escalation curve as
``curve.png`` and ``curve.json``. Then the image hybrid: Tandem's own detector pair
(``models/image``) packaged, served and run on held-out synthetic scenes in each mode, with
mAP@0.5 against escalation (``curve_detection.png``). Last, it stops the cloud and shows
that every request is still answered within its deadline. It stops everything it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset
import hybrid_detection
from demo_fleet import FLEET, fresh, run_fleet_demo
from demo_loop import run_loop_demo
from hybrid import ModeRun, run_mode, sweep
from local_broker import local_broker
from procs import CloudProcess

from agent import Agent, AgentSettings


def plot(
    curve: list[dict[str, float]], runs: dict[str, ModeRun], threshold: float, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    esc = [100 * c["escalated"] for c in curve]
    acc = [100 * c["accuracy"] for c in curve]
    ax.plot(esc, acc, "-", color="#3465a4", label="hybrid (threshold swept 0 → 1)")
    ax.axhline(100 * runs["cloud"].accuracy, color="#cc0000", ls="--", lw=1, label="cloud only")
    ax.axhline(100 * runs["edge"].accuracy, color="#4e9a06", ls="--", lw=1, label="edge only")
    auto = runs["auto"]
    ax.plot(
        [100 * auto.escalated],
        [100 * auto.accuracy],
        "o",
        color="#f57900",
        ms=8,
        label=f"auto at threshold {threshold:.2f}",
    )
    ax.set_xlabel("share of requests escalated to the cloud (%)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Tandem on digits: accuracy vs escalation")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'mode':<18}{'accuracy':>10}{'escalated':>11}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['mode']:<18}{100 * r['accuracy']:>9.2f}%{100 * r['escalated']:>10.1f}%"
            f"{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}{r['max_ms']:>9.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wan-ms", type=float, default=40.0, help="simulated cloud round trip")
    parser.add_argument("--deadline-ms", type=float, default=150.0, help="per-request budget")
    parser.add_argument("--model-dir", type=Path, default=dataset.ROOT / "models/edge/digits-int8")
    parser.add_argument("--repo", type=Path, default=dataset.ROOT / "models/cloud")
    parser.add_argument("--out", type=Path, default=dataset.ROOT / "out" / "demo")
    parser.add_argument(
        "--broker",
        default="auto",
        help="mqtt://host:port, or a local one: 'mosquitto' (the installed one, started on a "
        "free port), 'embedded' (amqtt, in this process), 'auto' (Mosquitto when installed, "
        "else embedded; the default)",
    )
    parser.add_argument("--agents", type=int, default=3, help="agents in the fleet part")
    parser.add_argument(
        "--scenes", type=int, default=200, help="held-out scenes in the image hybrid (0: skip)"
    )
    parser.add_argument(
        "--update-dir",
        type=Path,
        default=dataset.ROOT / "models/edge/digits-f32",
        help="the edge model released as the update",
    )
    parser.add_argument(
        "--hold-s",
        type=float,
        default=15.0,
        help="keep the fleet serving this long after the update, to watch the dashboard",
    )
    parser.add_argument(
        "--loop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one learning-loop cycle on a shifted stream after the fleet part (demo_loop.py)",
    )
    args = parser.parse_args(argv)
    # a SIGTERM stops the demo like Ctrl-C: every `with` below stops what it started
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    args.out.mkdir(parents=True, exist_ok=True)
    fresh(args.out)
    test = dataset.load().test
    registry = args.out / "registry"
    registry.mkdir(parents=True, exist_ok=True)

    print(
        f"Tandem demo: {len(test)} held-out digits, simulated WAN {args.wan_ms:.0f} ms, "
        f"deadline {args.deadline_ms:.0f} ms"
    )
    with contextlib.ExitStack() as stack:
        if args.broker.startswith(("mqtt://", "mqtts://")):
            broker_url = args.broker
            print(f"broker: {broker_url}")
        else:
            broker = stack.enter_context(local_broker(args.broker))
            broker_url = broker.url
            print(f"broker: {broker.name} at {broker_url}")
        cloud = stack.enter_context(
            CloudProcess(
                args.repo,
                delay_ms=args.wan_ms,
                log=args.out / "cloud.log",
                extra=["--registry", str(registry)],
                env={
                    "TANDEM_CLOUD_MQTT__URL": broker_url,
                    "TANDEM_CLOUD_FLEET": FLEET,
                    "TANDEM_CLOUD_STATE_DIR": str(args.out / "cloud"),
                },
            )
        )
        print(f"cloud: tandem-cloud serving {args.repo} at {cloud.url}")
        print(f"dashboard: {cloud.url}/dashboard/", flush=True)
        settings = AgentSettings.load(
            model_dir=args.model_dir, cloud={"url": cloud.url, "binary": True}
        )
        agent = stack.enter_context(Agent(settings))
        threshold = agent.threshold
        print(
            f"agent: {agent.model.manifest.ref} on {agent.model.backend.name}, "
            f"threshold {threshold:.2f} (manifest default)\n"
        )
        runs = {
            name: run_mode(agent, name, name, test, args.deadline_ms)
            for name in ("edge", "cloud", "auto")
        }
        print(table([runs[n].summary() for n in ("edge", "cloud", "auto")]), flush=True)
        fleet = run_fleet_demo(
            args.out,
            args.model_dir,
            args.update_dir,
            cloud.url,
            broker_url,
            args.agents,
            args.out / "cloud" / "fleet.db",
            args.hold_s,
        )
        loop = run_loop_demo(args.out, broker_url) if args.loop else None
        image = None
        if args.scenes:
            image = image_hybrid(stack, args)
        cloud.stop()
        down = run_mode(agent, "auto, cloud down", "auto", test, args.deadline_ms)

    rows = [runs[n].summary() for n in ("edge", "cloud", "auto")] + [down.summary()]
    print("\nwith the cloud stopped:")
    print(table([down.summary()]))
    late = sum(ms > args.deadline_ms for ms in down.wall_ms)
    print(
        f"{len(down.results)} answered, {late} over the deadline; "
        f"reasons {down.summary()['reasons']}"
    )

    curve = sweep(runs["edge"], runs["cloud"])
    plot(curve, runs, threshold, args.out / "curve.png")
    (args.out / "curve.json").write_text(json.dumps(curve, indent=1) + "\n")
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "wan_ms": args.wan_ms,
                "deadline_ms": args.deadline_ms,
                "threshold": threshold,
                "modes": rows,
                "fleet": fleet,
                "learning_loop": loop,
                "image_hybrid": image,
            },
            indent=2,
        )
        + "\n"
    )
    print(
        f"\nwrote {args.out / 'curve.png'}, {args.out / 'curve.json'}, {args.out / 'results.json'}"
    )
    return 0


def image_hybrid(stack: contextlib.ExitStack, args: argparse.Namespace) -> dict[str, Any]:
    """The detector pair on held-out scenes: its own cloud process (the image repository),
    every mode, the swept curve; printed, plotted and returned for ``results.json``."""
    cloud = stack.enter_context(
        CloudProcess(
            hybrid_detection.IMAGE_REPO, delay_ms=args.wan_ms, log=args.out / "cloud-image.log"
        )
    )
    print(
        f"\nimage hybrid: {args.scenes} held-out scenes of 1-4 digits, the int8 edge detector "
        f"escalating its frame to the cloud detector at {cloud.url}"
    )
    runs, curve, threshold = hybrid_detection.run_image_hybrid(
        cloud.url, args.scenes, args.deadline_ms * 10, args.out
    )
    print(hybrid_detection.table(runs), flush=True)
    hybrid_detection.plot(curve, runs, threshold, args.out / "curve_detection.png")
    (args.out / "curve_detection.json").write_text(json.dumps(curve, indent=1) + "\n")
    print(f"wrote {args.out / 'curve_detection.png'} (mAP@0.5 vs escalation)")
    cloud.stop()
    return {
        "threshold": threshold,
        "modes": {name: run.summary() for name, run in runs.items()},
    }


if __name__ == "__main__":
    raise SystemExit(main())
