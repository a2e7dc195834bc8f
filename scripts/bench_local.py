"""Benchmark: the agent's in-process local path against the raw TFLite interpreter loop.

Same model, same runtime, same held-out samples, same process, interleaved in short blocks
so that drift in the machine's speed hits both alike. The raw loop is the floor:
``set_tensor(pre-quantized input); invoke(); get_tensor()``. The agent path is
``Agent.infer(raw features)``: preprocessing, quantization, the same invoke, dequantization,
softmax, confidence, the routing decision and the result object. What Tandem adds per
request is reported as the median, over blocks, of (agent median - raw median) within each
block: on a shared machine whose speed drifts, a difference taken seconds apart means little.

    python scripts/bench_local.py [--iterations 20000] [--out out/bench/bench_local.json]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset
from results import write_json

from agent import Agent, AgentSettings
from agent.inference.backends.tflite import find_interpreter_class
from shared.manifest import Manifest

MODELS = {"float32": "digits-f32", "int8": "digits-int8"}


def raw_inputs(model_dir: Path, x: np.ndarray) -> tuple[Any, list[np.ndarray], int, int]:
    manifest = Manifest.load(model_dir)
    _, interpreter_cls = find_interpreter_class()
    interp = interpreter_cls(model_path=str(model_dir / manifest.edge.file), num_threads=1)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    pre = x * manifest.preprocessing.scale + manifest.preprocessing.offset
    if inp["dtype"] == np.int8:
        s, z = inp["quantization"]
        rows = [np.clip(np.rint(r / s + z), -128, 127).astype(np.int8)[None] for r in pre]
    else:
        rows = [r.astype(np.float32)[None] for r in pre]
    return interp, rows, inp["index"], out["index"]


def time_raw(interp: Any, rows: list[np.ndarray], i_in: int, i_out: int, n: int) -> list[int]:
    clock = time.perf_counter_ns
    k = len(rows)
    out = []
    for i in range(n):
        row = rows[i % k]
        t0 = clock()
        interp.set_tensor(i_in, row)
        interp.invoke()
        interp.get_tensor(i_out)
        out.append(clock() - t0)
    return out


def time_agent(agent: Agent, x: np.ndarray, mode: Any, n: int) -> list[int]:
    clock = time.perf_counter_ns
    k = len(x)
    out = []
    for i in range(n):
        row = x[i % k]
        t0 = clock()
        agent.infer(row, mode=mode)
        out.append(clock() - t0)
    return out


def stats(ns: list[int]) -> dict[str, float]:
    us = np.asarray(ns) / 1000.0
    return {
        "median_us": float(np.median(us)),
        "p90_us": float(np.percentile(us, 90)),
        "p99_us": float(np.percentile(us, 99)),
        "mean_us": float(us.mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--out", type=Path, default=dataset.ROOT / "out/bench/bench_local.json")
    args = parser.parse_args(argv)
    x = dataset.load().test.x
    per_block = args.iterations // args.blocks
    rows: list[dict[str, Any]] = []
    for precision, name in MODELS.items():
        model_dir = dataset.ROOT / "models" / "edge" / name
        interp, qrows, i_in, i_out = raw_inputs(model_dir, x)
        settings = AgentSettings(model_dir=model_dir, backend={"kind": "tflite", "pool_size": 1})
        with Agent(settings) as agent:  # no cloud: the local path only
            samples: dict[str, list[int]] = {"raw": [], "edge": [], "auto": []}
            block_overhead: dict[str, list[float]] = {"raw": [], "edge": [], "auto": []}
            time_raw(interp, qrows, i_in, i_out, 2000)  # warm-up
            time_agent(agent, x, "edge", 2000)
            for _ in range(args.blocks):
                raw_block = time_raw(interp, qrows, i_in, i_out, per_block)
                samples["raw"] += raw_block
                block_overhead["raw"].append(0.0)
                for path in ("edge", "auto"):
                    block = time_agent(agent, x, path, per_block)
                    samples[path] += block
                    block_overhead[path].append(
                        (float(np.median(block)) - float(np.median(raw_block))) / 1000.0
                    )
            runtime = agent.model.backend.name
        for path in ("raw", "edge", "auto"):
            rows.append(
                {
                    "model": precision,
                    "path": path,
                    **stats(samples[path]),
                    "overhead_median_us": float(np.median(block_overhead[path])),
                    "runtime": runtime,
                }
            )

    head = f"{'model':<9}{'path':<7}{'median µs':>11}{'p90 µs':>9}{'p99 µs':>9}{'overhead µs':>13}"
    print(
        f"local path, {args.iterations} requests per row, {platform.machine()}, "
        f"{rows[0]['runtime']}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        over = "" if r["path"] == "raw" else f"{r['overhead_median_us']:>13.1f}"
        print(
            f"{r['model']:<9}{r['path']:<7}{r['median_us']:>11.1f}{r['p90_us']:>9.1f}"
            f"{r['p99_us']:>9.1f}{over}"
        )
    write_json(
        args.out,
        {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "iterations": args.iterations,
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
