"""Every variant measured in the runtime that will run it: the TFLite interpreter for edge
artifacts (one sample per call, quantizing and dequantizing as a device does), ONNX Runtime
for cloud models. Accuracy on the held-out split, top-1 agreement with the float reference,
size on disk (and gzip-compressed: what sparsity can buy), median single-sample latency.
"""

from __future__ import annotations

import gzip
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class VariantResult:
    name: str
    role: str  # "edge" or "cloud"
    runtime: str
    file: str
    bytes: int
    gzip_bytes: int
    accuracy: float
    agreement: float  # top-1 agreement with the role's float reference
    latency_ms: float  # median, one sample per call, on this machine
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _interpreter(blob: bytes) -> Any:
    import tensorflow as tf  # loaded by the pipeline already; tflite_runtime beside it clashes

    with warnings.catch_warnings():
        # its deprecation in favour of ai_edge_litert: the same interpreter, still shipped
        warnings.filterwarnings("ignore", "\\s*Warning: tf.lite.Interpreter is deprecated")
        interp = tf.lite.Interpreter(model_content=blob)
    interp.allocate_tensors()
    return interp


class TfliteRunner:
    """One sample per call, quantizing the input and dequantizing the output as needed."""

    def __init__(self, blob: bytes) -> None:
        self.interp = _interpreter(blob)
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]

    def prepare(self, row: np.ndarray) -> np.ndarray:
        """The input tensor for one raw row (quantized for an integer input)."""
        x = row[None, :].astype(np.float32)
        if self.inp["dtype"] != np.float32:
            s, z = self.inp["quantization"]
            info = np.iinfo(self.inp["dtype"])
            x = np.clip(np.round(x / s + z), info.min, info.max).astype(self.inp["dtype"])
        return x

    def invoke(self, x: np.ndarray) -> np.ndarray:
        """The interpreter alone: what the latency column measures."""
        self.interp.set_tensor(self.inp["index"], x)
        self.interp.invoke()
        return np.asarray(self.interp.get_tensor(self.out["index"]))

    def __call__(self, row: np.ndarray) -> np.ndarray:
        y = self.invoke(self.prepare(row))
        if self.out["dtype"] != np.float32:
            s, z = self.out["quantization"]
            y = (y.astype(np.float32) - z) * s
        return np.asarray(y[0], dtype=np.float32)

    def outputs(self, x: np.ndarray) -> np.ndarray:
        return np.stack([self(row) for row in x])


class OnnxRunner:
    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def prepare(self, row: np.ndarray) -> np.ndarray:
        return row[None, :].astype(np.float32)

    def invoke(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input: x})[0])

    def __call__(self, row: np.ndarray) -> np.ndarray:
        return np.asarray(self.invoke(self.prepare(row))[0])

    def outputs(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input: x.astype(np.float32)})[0])


def median_latency_ms(runners: dict[str, Any], x: np.ndarray, calls: int) -> dict[str, float]:
    """Median single-sample latency of each runner's ``invoke`` (inputs prepared beforehand:
    the runtime, not this script's NumPy), in milliseconds. The runners take turns in rounds
    of a few dozen calls, so a drift in the machine's speed (this one's varies by half from
    minute to minute) lands on all of them alike rather than on whoever ran then."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    prepared = {name: [run.prepare(row) for row in x] for name, run in runners.items()}
    for name, run in runners.items():
        for row in prepared[name][:50]:  # warm up
            run.invoke(row)
    rounds = 6
    for r in range(rounds):
        for name, run in runners.items():
            for i in range(calls // rounds):
                row = prepared[name][(r * calls + i) % len(x)]
                start = time.perf_counter()
                run.invoke(row)
                times[name].append(time.perf_counter() - start)
    return {name: 1000.0 * float(np.median(t)) for name, t in times.items()}


def sizes(path: Path) -> tuple[int, int]:
    blob = path.read_bytes()
    return len(blob), len(gzip.compress(blob, compresslevel=9))


def top1(outputs: np.ndarray) -> np.ndarray:
    return np.asarray(outputs.argmax(axis=1))
