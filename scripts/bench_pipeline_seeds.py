"""Benchmark: how much the model pipeline's figures move with the seed alone.

``tandem-cloud model optimize`` is reproducible (the same data, settings and seed give the
same figures, ``cloud/pipeline/determinism.py``), but a figure measured on one seed still
carries the luck of that seed's initial weights and batch order: 270 calibration and 360
held-out samples make one sample worth 0.37 and 0.28 points. This runs the pipeline for a
few seeds, each in its own process as an operator runs it, and reports the spread (mean,
min, max) of the shipped edge model's held-out accuracy, the threshold, the held-out
escalation and hybrid accuracy, and the temperature: the noise a retrain's gain must beat.

    python scripts/bench_pipeline_seeds.py [--seeds 7,8,9,10,11] [--epochs 120]
        [--hidden 128,64] [--sparsities none] [--epsilon E --delta D]
        [--out out/bench/bench_pipeline_seeds.json]

Pruning (``--sparsities``) does not change the shipped model: off by default here, to save
time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from results import write_json

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("edge_accuracy", "threshold", "escalation", "hybrid_accuracy", "temperature")


def run_seed(seed: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One ``model optimize`` in a child process (TensorFlow in its own process); its
    headline figures from the report."""
    settings = out / f"seed{seed}.toml"
    lines = [
        f"hidden = {json.dumps([int(v) for v in args.hidden.split(',')])}",
        f"epochs = {args.epochs}",
        "latency_calls = 12",
        "sparsities = "
        + json.dumps(
            [] if args.sparsities == "none" else [float(v) for v in args.sparsities.split(",")]
        ),
    ]
    settings.write_text("\n".join(lines) + "\n")
    cmd = [
        sys.executable,
        "-m",
        "cloud.cli",
        "model",
        "optimize",
        "--settings",
        str(settings),
        "--data",
        str(args.data),
        "--teacher",
        str(args.teacher),
        "--out",
        str(out / f"seed{seed}"),
        "--seed",
        str(seed),
    ]
    if args.epsilon is not None:
        cmd += ["--epsilon", str(args.epsilon), "--delta", str(args.delta)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed}: model optimize failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / f"seed{seed}" / "report.json").read_text())
    routing = report["routing"]
    op = routing["operating_point"]
    row: dict[str, Any] = {
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 1),
        "edge_accuracy": routing["edge_test_accuracy"],
        "threshold": op["threshold"],
        "escalation": op["test"]["escalation"],
        "hybrid_accuracy": op["test"]["accuracy"],
        "temperature": report["calibration"]["temperature"],
        "chosen_by": routing["chosen_by"],
        "budget_threshold": routing["budget_threshold"],
        "distillation_chosen": report["distillation"]["chosen"],
    }
    if "guarantee" in routing:
        g = routing["guarantee"]
        row["guarantee_met"] = g["met"]
        row["guarantee_test_error"] = g["test"]["error"]
        row["guarantee_test_coverage"] = g["test"]["coverage"]
    return row


def spread(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    out = {}
    for key in keys:
        values = [float(r[key]) for r in rows if key in r]
        if values:
            out[key] = {
                "mean": statistics.fmean(values),
                "min": min(values),
                "max": max(values),
                "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="7,8,9,10,11")
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--hidden", default="128,64")
    parser.add_argument("--sparsities", default="none", help="e.g. 0.5,0.8; none: no pruning")
    parser.add_argument("--epsilon", type=float)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--data", type=Path, default=ROOT / "models/data/digits.npz")
    parser.add_argument(
        "--teacher", type=Path, default=ROOT / "models/cloud/digits-cloud/1/model.onnx"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "out/bench/bench_pipeline_seeds.json")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tandem-seeds-") as tmp:
        for seed in seeds:
            rows.append(run_seed(seed, args, Path(tmp)))
            r = rows[-1]
            print(
                f"seed {seed:>4}: edge {100 * r['edge_accuracy']:.2f}%  threshold "
                f"{r['threshold']:.3f}  escalated {100 * r['escalation']:.2f}%  hybrid "
                f"{100 * r['hybrid_accuracy']:.2f}%  T {r['temperature']:.3f}  ({r['seconds']} s)",
                flush=True,
            )
    keys = FIGURES + (
        ("guarantee_test_error", "guarantee_test_coverage") if args.epsilon is not None else ()
    )
    summary = spread(rows, keys)
    print(f"\n{'figure':<24}{'mean':>10}{'min':>10}{'max':>10}{'stdev':>10}")
    for key, s in summary.items():
        print(f"{key:<24}{s['mean']:>10.4f}{s['min']:>10.4f}{s['max']:>10.4f}{s['stdev']:>10.4f}")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write_json(args.out, {"settings": settings, "runs": rows, "spread": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
