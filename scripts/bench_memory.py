"""Benchmark: peak memory of hostile and huge requests, in the process that serves them.

Each case runs the real thing in a child process (``tandem-cloud serve``, ``tandem-agent
serve``, or a small encoder) and reads that process's peak resident set, ``VmHWM`` in
``/proc/PID/status``, reset to the current RSS first (``5`` written to
``/proc/PID/clear_refs``): the growth is what the request cost at its worst moment. Cases:

- ``cloud_gzip_bomb``: 64 KB of gzip inflating to 63 MiB of JSON zeros (a valid request of
  [rows, 64] FP32, just under the cloud's 64 MiB body limit), with the longest answer time
  of ``/v2/health/live`` polled meanwhile (the event loop's longest stall);
- ``agent_gzip_bomb``: the same, inflating to just under the agent's 8 MiB body limit;
- ``cloud_json_8mib``: a valid JSON request of zeros just under the cloud's JSON limit
  (65k rows): what the largest accepted JSON body costs;
- ``cloud_bytes_2m``: a binary request of 2M BYTES elements of 12 bytes (32 MB on the wire)
  to the cloud (its model takes FP32, so it is refused after decoding);
- ``encode_bytes_2m``: ``encode_request`` of that tensor (the client side);
- ``json_*``: RSS growth per MiB of JSON number arrays decoded by ``decode_request``
  (flat zeros, floats, rows of 64): what a JSON body costs beyond its own bytes.

    python scripts/bench_memory.py [--only cloud_gzip_bomb ...] [--out out/bench/memory.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset
from procs import free_port
from results import write_json

from shared.oip.codec import decode_request, encode_request
from shared.oip.types import InferRequest, InferTensor

ROOT = dataset.ROOT
CLOUD_REPO = ROOT / "models/cloud"
EDGE_INT8 = ROOT / "models/edge/digits-int8"
MiB = 1024 * 1024
T = TypeVar("T")


# ------------------------------------------------------------------------------ measuring


def status_kb(pid: int, field: str) -> int:
    """A ``VmHWM``/``VmRSS``-style field of ``/proc/PID/status``, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    """Sets the process's peak RSS (VmHWM) back to its current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_growth(pid: int, action: Callable[[], T]) -> tuple[int, T]:
    """Bytes the process's peak RSS rose above its RSS before ``action``, and what it returned."""
    reset_peak(pid)
    before = status_kb(pid, "VmRSS")
    result = action()
    return (status_kb(pid, "VmHWM") - before) * 1024, result


class LoopWatch:
    """Polls ``GET /v2/health/live`` in a thread: the longest answer is how long the server's
    event loop was busy at a stretch (a request handled on it blocks every other)."""

    def __init__(self, url: str, every_s: float = 0.01) -> None:
        self.url, self.every_s = url, every_s
        self.longest_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                client.get(f"{self.url}/v2/health/live")
                self.longest_s = max(self.longest_s, time.monotonic() - start)
                self._stop.wait(self.every_s)

    def __enter__(self) -> LoopWatch:
        self._thread.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


class Server:
    """A server in a child process, started on a free port and waited for until ready."""

    def __init__(self, argv: list[str], port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self._argv = argv
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def __enter__(self) -> Server:
        self._proc = subprocess.Popen(
            [sys.executable, *self._argv],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self._argv} exited with {self._proc.returncode}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.__exit__(None, None, None)
        raise RuntimeError(f"{self._argv} not ready after 60 s")

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


def cloud_server(*extra: str) -> Server:
    """``tandem-cloud serve`` on the demo repository."""
    port = free_port()
    argv = ["-m", "cloud.cli", "serve", "--repo", str(CLOUD_REPO), "--port", str(port), *extra]
    return Server(argv, port)


def agent_server() -> Server:
    """``tandem-agent serve`` on the demo's int8 model (no cloud)."""
    port = free_port()
    argv = ["-m", "agent.cli", "--model-dir", str(EDGE_INT8), "serve", "--port", str(port)]
    return Server(argv, port)


# ------------------------------------------------------------------------------ requests


def zeros_json(size: int, features: int = 64) -> bytes:
    """A valid JSON request of [rows, features] FP32 zeros, as close to ``size`` bytes as fits."""
    head = b'{"inputs":[{"name":"input","shape":[%d,%d],"datatype":"FP32","data":['
    tail = b"]}]}"
    rows = (size - len(head % (10**7, features)) - len(tail)) // (2 * features)
    n = rows * features
    return head % (rows, features) + b"0," * (n - 1) + b"0" + tail


def gzip_bomb(size: int) -> bytes:
    """``zeros_json(size)``, gzipped (about a thousandth of its size)."""
    return gzip.compress(zeros_json(size), 9)


def bytes_tensor(count: int) -> np.ndarray:
    """``count`` BYTES elements of 12 bytes: 16 bytes each on the wire."""
    out = np.empty(count, dtype=object)
    out[:] = [b"%012d" % i for i in range(count)]
    return out


def bytes_request(count: int) -> tuple[bytes, dict[str, str]]:
    """A binary-extension infer request of one BYTES input of ``count`` elements."""
    return encode_request(InferRequest(inputs=[InferTensor("input", "BYTES", bytes_tensor(count))]))


def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    return httpx.post(url, content=body, headers=headers, timeout=120).status_code


# ------------------------------------------------------------------------------ cases


def case_gzip_bomb(server: Server, model: str, size: int) -> dict[str, Any]:
    bomb = gzip_bomb(size)
    infer = f"{server.url}/v2/models/{model}/infer"
    with LoopWatch(server.url) as watch:
        growth, status = peak_growth(
            server.pid, lambda: post(infer, bomb, {"Content-Encoding": "gzip"})
        )
    return {
        "status": status,
        "sent_bytes": len(bomb),
        "inflated_bytes": size,
        "peak_growth_bytes": growth,
        "loop_stall_ms": round(watch.longest_s * 1000, 1),
    }


def case_bytes_request(server: Server, model: str, count: int) -> dict[str, Any]:
    body, headers = bytes_request(count)
    infer = f"{server.url}/v2/models/{model}/infer"
    with LoopWatch(server.url) as watch:
        growth, status = peak_growth(server.pid, lambda: post(infer, body, headers))
    return {
        "status": status,
        "sent_bytes": len(body),
        "peak_growth_bytes": growth,
        "loop_stall_ms": round(watch.longest_s * 1000, 1),
    }


def case_json_request(server: Server, model: str, size: int) -> dict[str, Any]:
    """A valid JSON request just under the cloud's JSON limit: what an accepted one costs."""
    body = zeros_json(size)
    infer = f"{server.url}/v2/models/{model}/infer"
    with LoopWatch(server.url) as watch:
        growth, status = peak_growth(
            server.pid, lambda: post(infer, body, {"Content-Type": "application/json"})
        )
    return {
        "status": status,
        "sent_bytes": len(body),
        "peak_growth_bytes": growth,
        "loop_stall_ms": round(watch.longest_s * 1000, 1),
    }


def _child(argv: list[str]) -> dict[str, Any]:
    """Runs this script's ``--child`` mode in a fresh interpreter; its JSON answer."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", *argv],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    answer: dict[str, Any] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return answer


def case_encode_bytes(count: int) -> dict[str, Any]:
    return _child(["encode_bytes", str(count)])


def case_json(kind: str, size: int) -> dict[str, Any]:
    return _child(["json", kind, str(size)])


def json_doc(kind: str, size: int) -> bytes:
    """A JSON request of about ``size`` bytes of number arrays: ``zeros`` (``0,``), ``floats``
    (``0.123456,``), or ``rows`` (nested rows of 64 zeros)."""
    if kind == "zeros":
        return zeros_json(size)
    if kind == "floats":
        n = (size // 9) // 64 * 64
        data = b",".join(b"0.%06d" % (i % 10**6) for i in range(n))
        return b'{"inputs":[{"name":"input","shape":[%d,64],"datatype":"FP32","data":[%s]}]}' % (
            n // 64,
            data,
        )
    rows = size // 130
    row = b"[" + b",".join([b"0"] * 64) + b"]"
    return b'{"inputs":[{"name":"input","shape":[%d,64],"datatype":"FP32","data":[%s]}]}' % (
        rows,
        b",".join([row] * rows),
    )


def child(argv: list[str]) -> None:
    """In a fresh interpreter: the measured operation alone, its growth as JSON on stdout."""
    me = os.getpid()
    if argv[0] == "encode_bytes":
        tensor = InferTensor("input", "BYTES", bytes_tensor(int(argv[1])))
        growth, (body, _) = peak_growth(me, lambda: encode_request(InferRequest(inputs=[tensor])))
        print(json.dumps({"wire_bytes": len(body), "peak_growth_bytes": growth}))
        return
    kind, size = argv[1], int(argv[2])
    doc = json_doc(kind, size)
    growth, request = peak_growth(me, lambda: decode_request(doc))
    print(
        json.dumps(
            {
                "json_bytes": len(doc),
                "elements": int(request.inputs[0].data.size),
                "peak_growth_bytes": growth,
                "growth_per_json_byte": round(growth / len(doc), 2),
            }
        )
    )


CASES: dict[str, Callable[[], dict[str, Any]]] = {}


def _cloud(action: Callable[[Server], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        with cloud_server() as server:
            return action(server)

    return run


def _agent(action: Callable[[Server], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        with agent_server() as server:
            return action(server)

    return run


CASES["cloud_gzip_bomb"] = _cloud(lambda s: case_gzip_bomb(s, "digits-cloud", 63 * MiB))
CASES["agent_gzip_bomb"] = _agent(lambda s: case_gzip_bomb(s, "digits", 8 * MiB - 4096))
CASES["cloud_json_8mib"] = _cloud(lambda s: case_json_request(s, "digits-cloud", 8 * MiB - 4096))
CASES["cloud_bytes_2m"] = _cloud(lambda s: case_bytes_request(s, "digits-cloud", 2_000_000))
CASES["encode_bytes_2m"] = lambda: case_encode_bytes(2_000_000)
CASES["json_zeros_16mib"] = lambda: case_json("zeros", 16 * MiB)
CASES["json_floats_16mib"] = lambda: case_json("floats", 16 * MiB)
CASES["json_rows_16mib"] = lambda: case_json("rows", 16 * MiB)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(CASES), help="cases to run")
    parser.add_argument("--out", type=Path, default=ROOT / "out/bench/memory.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    results: dict[str, dict[str, Any]] = {}
    print(f"{'case':<20}{'status':>7}{'sent MB':>9}{'peak +MB':>10}{'stall ms':>10}{'per B':>7}")
    for name in args.only or list(CASES):
        r = results[name] = CASES[name]()
        sent = r.get("sent_bytes", r.get("wire_bytes", r.get("json_bytes", 0)))
        print(
            f"{name:<20}{r.get('status', ''):>7}{sent / 1e6:>9.2f}"
            f"{r['peak_growth_bytes'] / 1e6:>10.1f}{r.get('loop_stall_ms', ''):>10}"
            f"{r.get('growth_per_json_byte', ''):>7}"
        )
    write_json(args.out, {"cases": results, "zlib": zlib.ZLIB_RUNTIME_VERSION})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
