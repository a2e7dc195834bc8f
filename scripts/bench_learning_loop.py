"""One cycle of the learning loop on the shifted digits stream, with the real parts: what
it buys (escalations and hybrid accuracy on held-out shifted data, before and after) and
what it costs (bytes uploaded per device).

The run, all real: Mosquitto (``local_broker.py``), ``tandem-cloud serve`` as a child
process (the cloud ONNX model, the registry, the fleet store and the sample store, uploads
on), ``--devices`` agents (``AgentService``, the real TFLite backend) with capture on
(their own setting) and the default audit rate. The field pool (``shifted_digits.py``, at
most 2,000 requests) is sent through the agents round robin in auto mode: escalations go to
the cloud, and are captured with both answers and uploaded (with the audits) to
``POST /fleet/samples``. Once every captured sample is stored, ``tandem-cloud model retrain
digits`` distils the candidate from the split plus those samples (labelled by the cloud
model at retrain time), once per ``--seeds`` seed, each published as the next release.
Then the serving release and every candidate are measured on the held-out shifted set (and
the clean test split): escalation at each one's own threshold, hybrid accuracy (an
escalated answer is the cloud model's), edge accuracy, error of the edge's kept answers.

The upload cost is the agents' own wire counter of the ``samples`` category (request and
answer bytes, headers included), per request served, times the assumed request rate
(``--rate``, 1 request/s by default: the demo drives requests as fast as it can, so it has
no rate of its own to borrow) for an hour.

    python scripts/bench_learning_loop.py [--devices 2] [--field 2000] [--seeds 7,8,9]
        [--epochs 120] [--rate 1.0] [--max-samples-per-hour N] [--capture-only]
        [--out out/bench]

``--max-samples-per-hour`` (the agents' ``[capture]`` limit, 240 by default on a device):
the bench's own capture has none unless given, since the retrain needs every sample of the
2,000 requests it serves in seconds; given, the limit runs on the stream's time (a
device's requests served / ``--rate``) and the uploads keep their default interval (what is
left at the end is flushed), so the bytes per device-hour are the limited device's.
Each agent's audit draw is seeded (``--stream-seed`` + its index): a capture repeats.

The retrain is matched against release 1 (``--serving-version 1``: what the agents serve;
earlier seeds' candidates are published but never rolled out) with its defaults unless
``--hidden``, ``--max-escalation``, ``--threshold-rule match|budget``,
``--match-tolerance`` or ``--match-weighting`` say otherwise; each configuration has its
own work folder and json (``learning_loop-hidden32-budget.json``).

Prints tables; writes ``learning_loop.json``. Takes a few minutes (one training per seed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset
import shifted_digits
from demo_fleet import prepare_registry
from local_broker import local_broker
from procs import CloudProcess
from results import write_json

from agent.device.capture import RateLimit
from agent.device.service import AgentService
from agent.settings import AgentSettings, CaptureSettings
from cloud.releases.registry import Registry
from shared.mqtt import MqttSettings
from shared.samples import device_token

FLEET = "loop"
MODEL = "digits"
SECRET = "bench-learning-loop-secret"
CLOUD_REPO = dataset.ROOT / "models" / "cloud"
TEACHER = CLOUD_REPO / "digits-cloud" / "1" / "model.onnx"


def agent_settings(
    out: Path,
    device: str,
    cloud_url: str,
    broker_url: str,
    trust: Path,
    audit_rate: float,
    max_samples_per_hour: int | None = None,
    seed: int | None = None,
) -> AgentSettings:
    """``max_samples_per_hour`` None: every sample (the retrain's capture, 2,000 requests
    served in seconds); else the device's limit, with the default upload interval."""
    return AgentSettings(
        model_dir=shifted_digits.EDGE_DIR,
        device=device,
        fleet=FLEET,
        group="bench",
        state_dir=out / "agents" / device,
        cloud={"url": cloud_url, "binary": True},
        mqtt=MqttSettings(url=broker_url, reconnect_min_s=0.2, reconnect_max_s=2),
        update={"trust_store": trust},
        routing={"deadline_ms": 10_000},  # every escalation answered: nothing cut short
        # the defaults (60 s, 2 MB a day): uploads get what the budget leaves telemetry
        telemetry={},
        capture={
            "enabled": True,
            "token": device_token(SECRET, FLEET, device),
            "audit_rate": audit_rate,
            "max_samples_per_hour": max_samples_per_hour,
            "seed": seed,  # the audit's draw: the same capture in every run
            **({"upload_interval_s": 1.0} if max_samples_per_hour is None else {}),
        },
    )


def settled(services: list[AgentService], quiet_s: float = 1.5, timeout_s: float = 120) -> None:
    """Until every captured sample is uploaded and nothing new was captured for
    ``quiet_s`` (audits are asked off the request path, so they trail the requests)."""
    deadline = time.monotonic() + timeout_s
    last: tuple[int, ...] = ()
    since = time.monotonic()
    while time.monotonic() < deadline:
        now = tuple(s.capture.captured for s in services)
        pending = sum(s.spool.pending for s in services)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            if pending == 0:
                return
            for s in services:  # what the upload interval would send later
                if s.uploader is not None:
                    s.uploader.notify()
        time.sleep(0.1)
    raise TimeoutError(f"samples still pending after {timeout_s:.0f}s")


def capture_phase(
    out: Path,
    stream: shifted_digits.ShiftedStream,
    devices: int,
    audit_rate: float,
    rate: float,
    max_samples_per_hour: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, Any], Path, Path, Path]:
    """Broker, cloud, agents; the field pool through them; every sample stored. Returns the
    capture figures and the registry, key and cloud state folders. With
    ``max_samples_per_hour``, each agent's capture limit runs on the stream's own time (its
    requests served / ``rate``), so the limit sees the request rate the figures are for."""
    for sub in ("keys", "registry", "agents", "cloud"):
        shutil.rmtree(out / sub, ignore_errors=True)
    _, trust, registry = prepare_registry(out, shifted_digits.EDGE_DIR)
    figures: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(local_broker("auto"))
        cloud = stack.enter_context(
            CloudProcess(
                CLOUD_REPO,
                log=out / "cloud.log",
                extra=["--registry", str(registry)],
                env={
                    "TANDEM_CLOUD_MQTT__URL": broker.url,
                    "TANDEM_CLOUD_FLEET": FLEET,
                    "TANDEM_CLOUD_STATE_DIR": str(out / "cloud"),
                    "TANDEM_CLOUD_SAMPLES__DEVICE_TOKEN_SECRET": SECRET,
                },
            )
        )
        services = []
        served = [0] * devices
        for i in range(devices):
            s = AgentService(
                agent_settings(
                    out,
                    f"dev-{i}",
                    cloud.url,
                    broker.url,
                    trust,
                    audit_rate,
                    max_samples_per_hour,
                    seed + i,
                )
            )
            if max_samples_per_hour is not None:
                s.capture.rate_limit = RateLimit(
                    max_samples_per_hour, clock=lambda i=i: served[i] / rate
                )
            s.start(wait_s=10)
            stack.callback(s.stop)
            services.append(s)
        sources, t0 = [], time.monotonic()
        for i, row in enumerate(stream.field.x):
            served[i % devices] += 1
            sources.append(services[i % devices].agent.infer(row).source)
        serve_s = time.monotonic() - t0
        settled(services)
        samples_bytes = [s.wire.snapshot()["samples"] for s in services]
        states = [s.capture.state() for s in services]
        with httpx.Client(base_url=cloud.url, timeout=10) as http:
            summary = http.get("/fleet/samples/summary", params={"fleet": FLEET}).json()
        budget = services[0].upload_budget
        cap_per_hour = None
        if budget is not None:
            # a sustained day: the budget less a day of telemetry, spread over 24 hours
            day_of_telemetry = 86400 / budget.telemetry_interval_s * budget.message_cost()
            cap_per_hour = max(0.0, budget.limit_bytes - day_of_telemetry) / 24
        requests = len(sources)
        sent = sum(b.sent + b.received for b in samples_bytes)
        limit = max_samples_per_hour or CaptureSettings().max_samples_per_hour or 0
        captured_per_request = sum(st.captured + st.skipped_rate for st in states) / requests
        per_request = sent / requests
        figures = {
            "devices": devices,
            "requests": requests,
            "serve_seconds": serve_s,
            "escalated": float(np.mean([src == "cloud" for src in sources])),
            "captured": sum(st.captured for st in states),
            "uploaded": sum(st.uploaded for st in states),
            "duplicates": sum(st.duplicates for st in states),
            "skipped_budget": sum(st.skipped_budget for st in states),
            "skipped_rate": sum(st.skipped_rate for st in states),
            "max_samples_per_hour": max_samples_per_hour,
            "stored": sum(m["samples"] for m in summary["models"]),
            "stored_by_kind": _by_kind(summary["models"]),
            "stored_payload_bytes": sum(m["bytes"] for m in summary["models"]),
            "samples_bytes_sent": sum(b.sent for b in samples_bytes),
            "samples_bytes_received": sum(b.received for b in samples_bytes),
            "bytes_per_request": per_request,
            "bytes_per_captured_sample": sent / max(1, sum(st.uploaded for st in states)),
            "rate_per_s": rate,
            "bytes_per_device_hour": per_request * rate * 3600,
            # a steady hour at the limit (no bucket to empty first): limit x bytes a sample
            "limited_bytes_per_device_hour": min(captured_per_request * rate * 3600, float(limit))
            * sent
            / max(1, sum(st.uploaded for st in states)),
            "limit_for_projection": limit,
            "daily_budget_bytes": budget.limit_bytes if budget is not None else None,
            "budget_cap_bytes_per_hour": cap_per_hour,
        }
    return figures, registry, out / "keys" / "demo.key", out / "cloud"


def _by_kind(models: list[dict[str, Any]]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for m in models:
        for kind, n in m["by_kind"].items():
            kinds[kind] = kinds.get(kind, 0) + int(n)
    return kinds


def retrain(
    out: Path,
    registry: Path,
    key: Path,
    state: Path,
    seed: int,
    epochs: int,
    max_escalation: str | None,
    hidden: str | None,
    samples: Path | None = None,
    extra: list[str] | None = None,
) -> dict[str, Any]:
    """``tandem-cloud model retrain digits`` on the sample store (or ``samples``, a .npz),
    against release 1 (what the agents serve: earlier seeds' candidates are never rolled
    out), with ``extra`` flags; the published version."""
    run = out / f"retrain-seed{seed}{'-control' if samples is not None else ''}"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "cloud.cli",
        "model",
        "retrain",
        MODEL,
        "--registry",
        str(registry),
        "--key",
        str(key),
        *(
            ["--samples", str(samples)]
            if samples is not None
            else ["--state-dir", str(state), "--fleet", FLEET]
        ),
        "--data",
        str(dataset.DEFAULT_DATA),
        "--teacher",
        str(TEACHER),
        "--out",
        str(run),
        "--seed",
        str(seed),
        "--epochs",
        str(epochs),
        *(["--max-escalation", max_escalation] if max_escalation is not None else []),
        *(["--hidden", hidden] if hidden is not None else []),
        "--serving-version",
        "1",
        *(extra or []),
    ]
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd,
        cwd=dataset.ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"retrain failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["seconds"] = time.monotonic() - t0
    result["seed"] = seed
    result["bundle"] = str(Registry(registry).release_dir(MODEL, int(result["version"])))
    return result


def control_samples(out: Path, n: int = 16) -> Path:
    """``n`` clean training images (already in the split) as the "field": the retrain needs
    some samples, and these carry nothing new."""
    path = out / "control_samples.npz"
    np.savez(path, x=dataset.load().train.x[:n])
    return path


def measure(
    edge: Path, sets: dict[str, Any], match: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Each set's figures at the bundle's own threshold; with ``match`` (the serving
    model's figures) also the operating point, swept on that same set, of the fewest
    escalations at a hybrid accuracy at least ``match``'s: what the candidate could give
    with another threshold (chosen on held-out data, so an upper bound, not a result)."""
    models = shifted_digits.Models(edge_dir=edge)
    try:
        threshold = models.threshold
        out: dict[str, dict[str, Any]] = {}
        for name, split in sets.items():
            answers = models.answers(split)
            out[name] = {**answers.figures(threshold), "threshold": threshold}
            if match is not None:
                out[name]["at_equal_hybrid"] = equal_hybrid(answers, match[name])
        return out
    finally:
        models.close()


def equal_hybrid(answers: shifted_digits.Answers, serving: dict[str, Any]) -> dict[str, Any] | None:
    best = None
    for t in np.round(np.arange(0.0, 1.0001, 0.01), 2):
        f = answers.figures(float(t))
        if f["hybrid_accuracy"] >= serving["hybrid_accuracy"] - 1e-12 and (
            best is None or f["escalated"] < best["escalated"]
        ):
            best = {**f, "threshold": float(t)}
    return best


def spread(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(a.mean()),
        "min": float(a.min()),
        "max": float(a.max()),
        "stdev": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--field", type=int, default=shifted_digits.FIELD_SIZE)
    parser.add_argument("--stream-seed", type=int, default=shifted_digits.DEFAULT_SEED)
    parser.add_argument("--seeds", default="7,8,9", help="retrain seeds, comma-separated")
    parser.add_argument("--epochs", type=int, default=120, help="the retrain's epochs")
    parser.add_argument(
        "--max-escalation", help="the retrain's escalation budget (its default 0.2; none)"
    )
    parser.add_argument("--hidden", help="the candidate's hidden widths (default: serving's)")
    parser.add_argument("--threshold-rule", choices=("match", "budget"), help="(default match)")
    parser.add_argument("--match-tolerance", help="the match rule's tolerance (default 0)")
    parser.add_argument("--match-weighting", choices=("captured", "importance"))
    parser.add_argument(
        "--control",
        action="store_true",
        help="also retrain each seed without field data (16 clean training images)",
    )
    parser.add_argument("--audit-rate", type=float, default=0.02)
    parser.add_argument("--rate", type=float, default=1.0, help="requests/s a device serves")
    parser.add_argument(
        "--max-samples-per-hour",
        type=int,
        help="each device's [capture] limit, on the stream's time at --rate (default: none, "
        "the retrain needs every sample; the default setting is 240)",
    )
    parser.add_argument(
        "--capture-only", action="store_true", help="measure the capture and upload, no retrain"
    )
    parser.add_argument("--out", type=Path, default=dataset.ROOT / "out" / "bench")
    args = parser.parse_args(argv)
    if not 0 < args.field <= shifted_digits.FIELD_SIZE:
        parser.error(f"--field: 1..{shifted_digits.FIELD_SIZE} (the issue's cap)")
    extra = [
        item
        for flag in ("threshold_rule", "match_tolerance", "match_weighting")
        if (value := getattr(args, flag)) is not None
        for item in (f"--{flag.replace('_', '-')}", str(value))
    ]
    name = (
        "learning_loop"
        + (f"-hidden{args.hidden}" if args.hidden else "")
        + (f"-{args.threshold_rule}" if args.threshold_rule else "")
        + (f"-{args.match_weighting}" if args.match_weighting else "")
    )
    work = args.out / name
    work.mkdir(parents=True, exist_ok=True)
    stream = shifted_digits.make_stream(seed=args.stream_seed, field_size=args.field)
    if args.max_samples_per_hour is not None:
        work = work.with_name(f"{work.name}-limit{args.max_samples_per_hour}")
    capture, registry, key, state = capture_phase(
        work,
        stream,
        args.devices,
        args.audit_rate,
        args.rate,
        args.max_samples_per_hour,
        args.stream_seed,
    )
    print(
        f"capture: {capture['requests']} shifted requests through {args.devices} agents, "
        f"{100 * capture['escalated']:.1f}% escalated; {capture['captured']} samples captured, "
        f"{capture['uploaded']} uploaded, {capture['stored']} stored; "
        f"{capture['bytes_per_captured_sample']:.0f} B per sample on the wire, "
        f"{capture['bytes_per_request']:.1f} B per request: "
        f"{capture['bytes_per_device_hour'] / 1000:.1f} kB per device-hour at "
        f"{args.rate:g} request/s (the daily budget shared with telemetry caps uploads at "
        f"{(capture['budget_cap_bytes_per_hour'] or 0) / 1000:.1f} kB per hour sustained); "
        f"{capture['skipped_rate']} over the hourly limit; a steady hour at "
        f"{capture['limit_for_projection']} samples: "
        f"{capture['limited_bytes_per_device_hour'] / 1000:.1f} kB",
        flush=True,
    )
    if args.capture_only:
        write_json(work / "capture.json", {"stream_seed": args.stream_seed, "capture": capture})
        return 0
    sets = {
        "shifted held-out": stream.heldout,
        "clean test": dataset.load().test,
    }
    before = measure(shifted_digits.EDGE_DIR, sets)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    candidates = []

    def measured_retrain(seed: int, samples: Path | None = None) -> dict[str, Any]:
        """One retrain (on the field samples, or ``samples``), its model measured."""
        out = retrain(
            work,
            registry,
            key,
            state,
            seed,
            args.epochs,
            args.max_escalation,
            args.hidden,
            samples,
            extra,
        )
        out["figures"] = measure(Path(out["bundle"]), sets, before)
        return out

    for seed in seeds:
        result = measured_retrain(seed)
        candidates.append(result)
        print(
            f"retrain seed {seed}: release {result['version']} in {result['seconds']:.0f}s, "
            f"threshold {result['threshold']:.3f} chosen by {result.get('chosen_by')}"
        )
        if args.control:
            # the same retrain with (next to) no field data: what the recipe alone gives
            result["control"] = measured_retrain(seed, control_samples(work))
    print(table(before, candidates))
    for c in candidates:
        eq = c["figures"]["shifted held-out"]["at_equal_hybrid"]
        if eq is not None:
            print(
                f"  seed {c['seed']}: at threshold {eq['threshold']:.2f} (swept on the held-out "
                f"set: an upper bound) it escalates {100 * eq['escalated']:.1f}% at hybrid "
                f"{100 * eq['hybrid_accuracy']:.2f}%, serving's hybrid accuracy or better"
            )
    b = before["shifted held-out"]
    gains = {
        "escalation_reduction": spread(
            [1 - c["figures"]["shifted held-out"]["escalated"] / b["escalated"] for c in candidates]
        ),
        "hybrid_accuracy_change": spread(
            [
                c["figures"]["shifted held-out"]["hybrid_accuracy"] - b["hybrid_accuracy"]
                for c in candidates
            ]
        ),
    }
    if all("control" in c for c in candidates):
        gains["control_escalation_reduction"] = spread(
            [
                1 - c["control"]["figures"]["shifted held-out"]["escalated"] / b["escalated"]
                for c in candidates
            ]
        )
        gains["control_hybrid_accuracy_change"] = spread(
            [
                c["control"]["figures"]["shifted held-out"]["hybrid_accuracy"]
                - b["hybrid_accuracy"]
                for c in candidates
            ]
        )
    r, h = gains["escalation_reduction"], gains["hybrid_accuracy_change"]
    print(
        f"over {len(seeds)} retrain seeds, on the held-out shifted set: escalations "
        f"{100 * r['mean']:.1f}% fewer (min {100 * r['min']:.1f}%, max {100 * r['max']:.1f}%, "
        f"stdev {100 * r['stdev']:.1f} pt), hybrid accuracy {100 * h['mean']:+.2f} pt "
        f"(min {100 * h['min']:+.2f}, max {100 * h['max']:+.2f}, stdev {100 * h['stdev']:.2f})"
    )
    if "control_escalation_reduction" in gains:
        r, h = gains["control_escalation_reduction"], gains["control_hybrid_accuracy_change"]
        print(
            f"without field data (control): escalations {100 * r['mean']:.1f}% fewer "
            f"(min {100 * r['min']:.1f}%, max {100 * r['max']:.1f}%), hybrid accuracy "
            f"{100 * h['mean']:+.2f} pt (min {100 * h['min']:+.2f}, max {100 * h['max']:+.2f})"
        )
    write_json(
        args.out / f"{name}.json",
        {
            "stream_seed": args.stream_seed,
            "shift": asdict(stream.shift),
            "capture": capture,
            "before": before,
            "candidates": candidates,
            "gains": gains,
            "retrain": {
                "epochs": args.epochs,
                "hidden": args.hidden,
                "max_escalation": args.max_escalation,
                "flags": extra,
            },
        },
    )
    return 0


def table(before: dict[str, Any], candidates: list[dict[str, Any]]) -> str:
    head = (
        f"{'model':<22}{'set':<18}{'thr':>6}{'escalated':>11}{'hybrid acc':>12}"
        f"{'edge acc':>10}{'kept err':>10}"
    )
    lines = [head, "-" * len(head)]
    rows = [("serving (release 1)", before)]
    for c in candidates:
        rows.append((f"retrained seed {c['seed']} (r{c['version']})", c["figures"]))
        if "control" in c:
            rows.append((f"  no field data (r{c['control']['version']})", c["control"]["figures"]))
    for name, figs in rows:
        for part, f in figs.items():
            lines.append(
                f"{name:<22}{part:<18}{f['threshold']:>6.2f}{100 * f['escalated']:>10.1f}%"
                f"{100 * f['hybrid_accuracy']:>11.2f}%{100 * f['edge_accuracy']:>9.1f}%"
                f"{100 * f['edge_kept_error']:>9.2f}%"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
