"""Benchmark: the cloud endpoint against in-process ONNX Runtime and its own HTTP ceiling.

In one invocation, on the same models:

- in-process ONNX Runtime: a batch-1 loop, and batches of 32;
- ``tandem-cloud serve`` (a child process) in JSON and in binary mode, and a bare route of
  the same HTTP stack that reads the body and answers without inference (the ceiling), on a
  second server of the same build where it is the first route tried, as infer is on the
  first;
- a generated wide MLP (compute dominates, ~1 ms per single-sample call) with dynamic
  batching on and off;

at concurrency 1, 8, 32 and 128, with ``wrk`` (Debian's package) as the load generator in
its own process. Prints a table of throughput and p50/p99 latency and writes JSON.

    python scripts/bench_cloud.py [--duration 5] [--out out/bench/bench_cloud.json]
"""

from __future__ import annotations

import argparse
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset
from procs import CloudProcess
from results import write_json

from shared.oip.codec import encode_request
from shared.oip.types import InferRequest, InferTensor, RequestedOutput

DIGITS = dataset.ROOT / "models/cloud/digits-cloud/1/model.onnx"
CONCURRENCY = (1, 8, 32, 128)


def wide_mlp(path: Path, width: int = 2048, layers: int = 3) -> None:
    """A wide MLP whose single-sample call is compute-bound (about a millisecond here)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, current, fan_in = [], [], "input", 64
    for i in range(layers):
        w = (rng.standard_normal((fan_in, width)) / np.sqrt(fan_in)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [f"g{i}"]),
            helper.make_node("Relu", [f"g{i}"], [f"r{i}"]),
        ]
        current, fan_in = f"r{i}", width
    w = (rng.standard_normal((fan_in, 10)) / np.sqrt(fan_in)).astype(np.float32)
    inits.append(numpy_helper.from_array(w, "wo"))
    nodes += [
        helper.make_node("MatMul", [current, "wo"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "wide",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["b", 10])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))


def in_process(model: Path, x: np.ndarray, seconds: float) -> list[dict[str, Any]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options)
    rows = []
    for batch in (1, 32):
        lat = []
        done = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            xb = x[(done % 300) : (done % 300) + batch]
            t0 = time.perf_counter()
            session.run(None, {"input": xb})
            lat.append(time.perf_counter() - t0)
            done += batch
        total = sum(lat)
        rows.append(
            {
                "path": f"in-process ORT, batch {batch}",
                "concurrency": 1,
                "rps": done / total,
                "p50_ms": 1000 * float(np.median(lat)),
                "p99_ms": 1000 * float(np.percentile(lat, 99)),
            }
        )
    return rows


def _lua(work: Path, name: str, path: str, body: bytes, headers: dict[str, str]) -> Path:
    (work / f"{name}.body").write_bytes(body)
    lines = [
        'wrk.method = "POST"',
        f'local f = io.open("{work / (name + ".body")}", "rb")',
        'wrk.body = f:read("*all")',
        "f:close()",
    ]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    script = work / f"{name}.lua"
    script.write_text("\n".join(lines) + "\n")
    return script


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, script: Path, connections: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            f"-t{min(2, connections)}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": p50,
        "p99_ms": p99,
        "errors": float(non2xx.group(1)) if non2xx else 0.0,
    }


def bodies(model: str, x: np.ndarray) -> dict[str, tuple[bytes, dict[str, str]]]:
    req = InferRequest(
        inputs=[InferTensor.of("input", x)],
        outputs=[RequestedOutput("probabilities", binary_data=True)],
    )
    binary, bh = encode_request(req, binary_inputs=True)
    req_json = InferRequest(inputs=[InferTensor.of("input", x)])
    text, th = encode_request(req_json, binary_inputs=False)
    return {"json": (text, th), "binary": (binary, bh)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--pairs", type=int, default=60, help="back-to-back c=32 pairs")
    parser.add_argument(
        "--pair-duration", type=float, default=1.0, help="seconds per run of a pair"
    )
    parser.add_argument("--out", type=Path, default=dataset.ROOT / "out/bench/bench_cloud.json")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        raise SystemExit("bench_cloud needs wrk: apt-get install wrk")
    work = Path(tempfile.mkdtemp(prefix="tandem-bench-cloud-"))
    repo = work / "repo"
    (repo / "digits" / "1").mkdir(parents=True)
    shutil.copy(DIGITS, repo / "digits" / "1" / "model.onnx")
    wide_mlp(repo / "wide" / "1" / "model.onnx")
    (repo / "wide-nobatch" / "1").mkdir(parents=True)
    shutil.copy(repo / "wide" / "1" / "model.onnx", repo / "wide-nobatch" / "1" / "model.onnx")
    (repo / "wide" / "config.toml").write_text(
        "max_batch_size = 64\nmax_queue_delay_us = 2000\nmax_queue_size = 1024\n"
    )
    (repo / "wide-nobatch" / "config.toml").write_text(
        "max_batch_size = 0\nmax_queue_size = 1024\n"
    )
    (repo / "digits" / "config.toml").write_text("max_queue_size = 1024\n")
    x = dataset.load().test.x
    rows: list[dict[str, Any]] = []
    pairs: list[float] = []
    rows += [{"model": "digits", **r} for r in in_process(repo / "digits/1/model.onnx", x, 2)]
    rows += [{"model": "wide", **r} for r in in_process(repo / "wide/1/model.onnx", x, 2)]
    try:
        # two servers of the same build: one serving as in production, one with the bare
        # route first in its table, so each route under test is the first its server tries
        with (
            CloudProcess(repo, extra=["--repo-poll-s", "0"]) as cloud,
            CloudProcess(repo, extra=["--bare-route", "--repo-poll-s", "0"]) as ceiling_server,
        ):
            bare_url = f"{ceiling_server.url}/bench/bare"
            one = x[:1]
            for model in ("digits", "wide", "wide-nobatch"):
                for mode, (body, headers) in bodies(model, one).items():
                    if model != "digits" and mode == "json":
                        continue
                    script = _lua(work, f"{model}-{mode}", "", body, headers)
                    for c in CONCURRENCY:
                        r = wrk(f"{cloud.url}/v2/models/{model}/infer", script, c, args.duration)
                        rows.append(
                            {"model": model, "path": f"server {mode}", "concurrency": c, **r}
                        )
                        print(rows[-1], flush=True)
            body, headers = bodies("digits", one)["binary"]
            script = _lua(work, "bare", "", body, headers)
            for c in CONCURRENCY:
                r = wrk(bare_url, script, c, args.duration)
                rows.append({"model": "-", "path": "bare route", "concurrency": c, **r})
                print(rows[-1], flush=True)
            # the target ratio, from many short back-to-back pairs: this machine's speed
            # swings by a third from one second to the next, which a ratio of rows measured
            # far apart (or of a few long pairs) would carry
            infer_url, binary_script = (
                f"{cloud.url}/v2/models/digits/infer",
                work / "digits-binary.lua",
            )
            for i in range(args.pairs):
                # alternate which goes first, so a drift within a pair favours neither
                if i % 2 == 0:
                    served = wrk(infer_url, binary_script, 32, args.pair_duration)
                    ceiling = wrk(bare_url, script, 32, args.pair_duration)
                else:
                    ceiling = wrk(bare_url, script, 32, args.pair_duration)
                    served = wrk(infer_url, binary_script, 32, args.pair_duration)
                pairs.append(served["rps"] / ceiling["rps"])
                print(f"pair at c=32: {served['rps']:.0f} / {ceiling['rps']:.0f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    head = f"{'model':<14}{'path':<28}{'conc':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
    print(f"\ncloud endpoint on {platform.machine()}, wrk {args.duration:g}s per row")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['model']:<14}{r['path']:<28}{r['concurrency']:>6}{r['rps']:>10.0f}"
            f"{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
        )

    def rps(model: str, path: str, c: int) -> float:
        return next(
            r["rps"]
            for r in rows
            if r["model"] == model and r["path"] == path and r["concurrency"] == c
        )

    ratio = float(np.median(pairs))
    speedup = rps("wide", "server binary", 128) / rps("wide-nobatch", "server binary", 128)
    print(
        f"\nbinary server / bare route at concurrency 32: {ratio:.0%} (median of "
        f"{len(pairs)} back-to-back pairs: {', '.join(f'{p:.0%}' for p in pairs)})"
    )
    print(f"wide MLP, batching on / off at concurrency 128: {speedup:.2f}x")
    write_json(
        args.out,
        {
            "machine": platform.machine(),
            "rows": rows,
            "binary_vs_bare_c32": ratio,
            "binary_vs_bare_c32_pairs": pairs,
            "batching_speedup_c128": speedup,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
