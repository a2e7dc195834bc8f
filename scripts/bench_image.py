"""Benchmark: the agent on a 224x224 uint8 image classifier, against the raw interpreter and
a bare FastAPI route, and the bytes an image escalation costs per ``cloud.send``.

1. **Overhead** (same process, interleaved blocks): the raw loop is ``set_tensor(frame);
   invoke(); get_tensor()`` on the model's own interpreter; the agent path is
   ``Agent.infer(frame)`` (preprocessing, which for a uint8 frame of the model's size into a
   uint8 model is the identity and copies nothing, the invoke, dequantization, decoding, the
   confidence, the routing decision, the result). Reported: the median over blocks of
   (agent median - raw median), and that as a share of the raw median. Also checked: the
   tensor handed to the interpreter shares memory with the caller's frame (0 copies added).
2. **Local endpoint throughput** at c=1 and c=8: ``tandem-agent``'s OIP endpoint (binary
   request, one UINT8 frame) against a bare FastAPI route that takes the same frame bytes
   and calls an interpreter directly (a pool of as many interpreters as the agent has).
3. **Bytes per escalation** of one photo, per ``cloud.send``: the preprocessed tensor (FP32
   of the model's shape), the caller's uint8 frame, the encoded JPEG; as OIP binary bodies.

The model is MobileNetV2 (alpha 0.35, random weights: speed does not depend on them),
full-integer quantized with a uint8 input, built once with TensorFlow (the ``build`` extra)
into ``out/bench/mobilenet`` and packaged as a v2 release with its contract.

    python scripts/bench_image.py [--blocks 15] [--per-block 40] [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import queue

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from results import write_json
from starlette.concurrency import run_in_threadpool

from agent import Agent, AgentSettings
from agent.inference.backends.tflite import TFLiteSettings, find_interpreter_class
from agent.server import create_app
from cloud.releases.package_model import ModelPackageRequest, package_model
from cloud.releases.registry import Registry
from shared.oip.codec import encode_request
from shared.oip.types import InferRequest, InferTensor, RequestedOutput
from shared.signing import SigningKey

OUT = Path("out/bench")
SIZE = 224
CONTRACT = """task = "classification"
[inputs."serving_default_keras_tensor:0"]
kind = "image"
mean = [0.0]
std = [1.0]
"""


def build_model(folder: Path) -> Path:
    """MobileNetV2 0.35 at 224x224, int8 inside with a uint8 input (cached). Built in a
    child process: TensorFlow and tflite-runtime loaded in one process break each other
    (``vector::reserve`` when the runtime then loads a model)."""
    path = folder / "mobilenet_v2_035_uint8.tflite"
    if not path.exists():
        subprocess.run([sys.executable, __file__, "--build", str(path)], check=True)
    return path


def _build(path: Path) -> None:
    import tensorflow as tf

    model = tf.keras.applications.MobileNetV2(
        input_shape=(SIZE, SIZE, 3), alpha=0.35, weights=None, classes=100
    )
    rng = np.random.default_rng(0)

    def representative() -> Any:
        for _ in range(20):
            yield [rng.uniform(0, 255, (1, SIZE, SIZE, 3)).astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(converter.convert())


def release(edge: Path, root: Path) -> Path:
    (root / "contract.toml").write_text(CONTRACT)
    (root / "labels.txt").write_text("\n".join(f"class {i}" for i in range(100)) + "\n")
    registry = Registry(root / "reg")
    request = ModelPackageRequest(
        edge=edge, name="mobilenet", contract=root / "contract.toml", labels=root / "labels.txt"
    )
    manifest = package_model(request, SigningKey.generate(), registry)
    return registry.release_dir("mobilenet", manifest.version)


def overhead(agent: Agent, edge: Path, frame: np.ndarray, blocks: int, per: int) -> dict[str, Any]:
    _, cls = find_interpreter_class()
    interp = cls(model_path=str(edge), num_threads=1)
    interp.allocate_tensors()
    i_in = interp.get_input_details()[0]["index"]
    i_out = interp.get_output_details()[0]["index"]
    batch = frame[None]
    clock = time.perf_counter_ns
    raw_medians, agent_medians, diffs = [], [], []
    for _ in range(blocks):
        raw, ours = [], []
        for _ in range(per):
            t0 = clock()
            interp.set_tensor(i_in, batch)
            interp.invoke()
            interp.get_tensor(i_out)
            raw.append(clock() - t0)
            t0 = clock()
            agent.infer(frame, mode="edge")
            ours.append(clock() - t0)
        r, a = statistics.median(raw), statistics.median(ours)
        raw_medians.append(r)
        agent_medians.append(a)
        diffs.append(a - r)
    prepared = agent.model.preprocessor.prepare(frame)  # type: ignore[union-attr]
    (tensor,) = prepared.tensors.values()
    shares = bool(np.shares_memory(tensor, frame))
    raw_ms = statistics.median(raw_medians) / 1e6
    over_ms = statistics.median(diffs) / 1e6
    return {
        "raw_ms": round(raw_ms, 3),
        "agent_ms": round(statistics.median(agent_medians) / 1e6, 3),
        "overhead_ms": round(over_ms, 3),
        "overhead_pct": round(100 * over_ms / raw_ms, 2),
        "frame_goes_straight_in": shares,
    }


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # a thread, not the main one
        pass


def serve(app: Any) -> tuple[str, _Server, threading.Thread]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = _Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


def bare_app(edge: Path, pool_size: int) -> Any:
    """The floor: a FastAPI route that reads the frame's bytes and runs an interpreter."""
    _, cls = find_interpreter_class()
    pool: queue.Queue[Any] = queue.Queue()
    for _ in range(pool_size):
        interp = cls(model_path=str(edge), num_threads=1)
        interp.allocate_tensors()
        pool.put(interp)

    def run(frame: np.ndarray) -> bytes:
        interp = pool.get()
        try:
            interp.set_tensor(interp.get_input_details()[0]["index"], frame)
            interp.invoke()
            out: np.ndarray = interp.get_tensor(interp.get_output_details()[0]["index"])
        finally:
            pool.put(interp)
        return out.tobytes()

    app = FastAPI()

    @app.post("/infer")
    async def infer(request: Request) -> Response:
        body = await request.body()
        frame = np.frombuffer(body, dtype=np.uint8).reshape(1, SIZE, SIZE, 3)
        return Response(await run_in_threadpool(run, frame))

    return app


def throughput(url: str, body: bytes, headers: dict[str, str], conc: int, n: int) -> float:
    def worker(k: int) -> None:
        with httpx.Client(timeout=30) as client:
            for _ in range(k):
                reply = client.post(url, content=body, headers=headers)
                assert reply.status_code == 200, reply.text

    per = [n // conc] * conc
    with ThreadPoolExecutor(conc) as ex:
        list(ex.map(worker, [max(1, n // 20)] * conc))  # warm-up
        t0 = time.perf_counter()
        list(ex.map(worker, per))
        return sum(per) / (time.perf_counter() - t0)


def endpoint(agent: Agent, edge: Path, frame: np.ndarray, n: int) -> dict[str, Any]:
    name = agent.model.manifest.inputs[0].name
    request = InferRequest(
        inputs=[InferTensor(name, "UINT8", frame[None])],
        outputs=[RequestedOutput("probabilities", binary_data=True)],
    )
    oip_body, oip_headers = encode_request(request, binary_inputs=True)
    pool = agent.settings.backend.pool_size  # type: ignore[attr-defined]
    agent_url, agent_srv, agent_thread = serve(create_app(agent))
    bare_url, bare_srv, bare_thread = serve(bare_app(edge, pool))
    rows = {}
    try:
        for conc in (1, 8):
            ours, bare = [], []
            for _ in range(3):  # interleaved
                ours.append(
                    throughput(
                        f"{agent_url}/v2/models/mobilenet/infer", oip_body, oip_headers, conc, n
                    )
                )
                bare.append(throughput(f"{bare_url}/infer", frame.tobytes(), {}, conc, n))
            o, b = statistics.median(ours), statistics.median(bare)
            rows[f"c{conc}"] = {
                "agent_rps": round(o, 1),
                "bare_rps": round(b, 1),
                "ratio": round(o / b, 3),
            }
    finally:
        for srv, thread in ((agent_srv, agent_thread), (bare_srv, bare_thread)):
            srv.should_exit = True
            thread.join(timeout=10)
    return rows


def escalation_bytes() -> dict[str, int]:
    """One photo (scikit-learn's china.jpg, 427x640) escalated, per ``cloud.send``."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photo = load_sample_images().images[0]
    encoded = io.BytesIO()
    Image.fromarray(photo).save(encoded, format="JPEG", quality=90)
    model_in = np.zeros((1, SIZE, SIZE, 3), dtype=np.float32)
    bodies = {
        "tensor (FP32 1x224x224x3)": InferTensor("input", "FP32", model_in),
        "frame (UINT8 427x640x3)": InferTensor("input", "UINT8", photo[None]),
        "frame at model size (UINT8 224x224x3)": InferTensor(
            "input", "UINT8", np.zeros((1, SIZE, SIZE, 3), np.uint8)
        ),
        "encoded (JPEG q90)": InferTensor(
            "input", "BYTES", np.array([encoded.getvalue()], dtype=np.object_)
        ),
    }
    sizes = {}
    for name, tensor in bodies.items():
        body, _ = encode_request(InferRequest(inputs=[tensor]), binary_inputs=True)
        sizes[name] = len(body)
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--per-block", type=int, default=40)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--out", type=Path, default=OUT / "bench_image.json")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        _build(args.build)
        return 0
    edge = build_model(OUT / "mobilenet")
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        folder = release(edge, Path(tmp))
        settings = AgentSettings(model_dir=folder, backend=TFLiteSettings(num_threads=1))
        with Agent(settings) as agent:
            over = overhead(agent, edge, frame, args.blocks, args.per_block)
            print(
                f"overhead: raw {over['raw_ms']:.3f} ms, agent {over['agent_ms']:.3f} ms, "
                f"+{over['overhead_ms']:.3f} ms ({over['overhead_pct']:.2f}%); "
                f"frame straight in: {over['frame_goes_straight_in']}"
            )
            ep = endpoint(agent, edge, frame, args.requests)
    print(f"{'concurrency':<12} {'agent req/s':>12} {'bare req/s':>12} {'ratio':>7}")
    for key, row in ep.items():
        print(f"{key:<12} {row['agent_rps']:>12.1f} {row['bare_rps']:>12.1f} {row['ratio']:>7.3f}")
    sizes = escalation_bytes()
    print(f"{'escalation body':<40} {'bytes':>10}")
    for key, size in sizes.items():
        print(f"{key:<40} {size:>10,}")
    write_json(
        args.out,
        {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "overhead": over,
            "endpoint": ep,
            "escalation_bytes": sizes,
        },
    )
    return 0


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    raise SystemExit(main())
