"""TFLite backend: a small pool of interpreters, int8 quantize/dequantize done here.

A TFLite interpreter is not safe to call from two threads at once, and one interpreter
serialises every request. The backend keeps ``pool_size`` interpreters on a lock-free
``SimpleQueue``: a request takes one, runs it, puts it back, so concurrent requests run in
parallel up to the pool size and wait (never fail) beyond it.

The runtime is found at load time, never at import: ``ai_edge_litert`` (Python 3.12+ and
the maintained successor), then ``tflite_runtime`` (2.14, Python <= 3.11, NumPy 1.x), then
full TensorFlow's ``tf.lite``.
"""

from __future__ import annotations

import importlib
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from agent.backends.base import check_shape
from agent.errors import BackendError, ModelLoadError, RuntimeMissingError
from shared.manifest import Manifest

_RUNTIMES = (
    ("ai_edge_litert", "ai_edge_litert.interpreter"),
    ("tflite_runtime", "tflite_runtime.interpreter"),
    ("tensorflow", "tensorflow.lite"),
)
_MISSING = (
    "no TFLite runtime is installed: `pip install tflite-runtime` (Python <= 3.11, needs "
    "numpy<2) or `pip install ai-edge-litert` (Python >= 3.9, any NumPy)"
)


class TFLiteSettings(BaseModel):
    """Settings of the TFLite backend (``backend.kind = "tflite"``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["tflite"] = "tflite"
    num_threads: int = Field(default=1, ge=1, description="threads per interpreter")
    pool_size: int = Field(default=2, ge=1, description="interpreters serving in parallel")


def find_interpreter_class() -> tuple[str, Any]:
    """The first TFLite ``Interpreter`` class that imports, and its package's name."""
    for package, module in _RUNTIMES:
        try:
            if package == "tensorflow":
                tf = importlib.import_module("tensorflow")
                return package, tf.lite.Interpreter
            return package, importlib.import_module(module).Interpreter
        except ImportError:
            continue
        except Exception as exc:  # a runtime built for another NumPy fails in odd ways
            raise RuntimeMissingError(f"{package} is installed but fails to import: {exc}") from exc
    raise RuntimeMissingError(_MISSING)


@dataclass(frozen=True, slots=True)
class _Affine:
    """Quantization of one tensor, with the reciprocal precomputed for the hot path."""

    scale: float
    inv_scale: float
    zero_point: int
    dtype: Any
    lo: int
    hi: int


def _affine(detail: dict[str, Any]) -> _Affine | None:
    scale, zero = detail["quantization"]
    dtype = detail["dtype"]
    if not scale or dtype not in (np.int8, np.uint8, np.int16):
        return None
    info = np.iinfo(dtype)
    return _Affine(float(scale), 1.0 / float(scale), int(zero), dtype, int(info.min), int(info.max))


class TFLiteBackend:
    """``InferenceBackend`` on the TFLite interpreter."""

    def __init__(self, settings: TFLiteSettings) -> None:
        self.settings = settings
        self.name = "tflite"
        self._pool: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._interpreters: list[Any] = []
        self._in_index = self._out_index = 0
        self._in_q: _Affine | None = None
        self._out_q: _Affine | None = None
        self._in_dtype: Any = np.float32
        self._batch: dict[int, int] = {}

    def load(self, artifact: Path, manifest: Manifest) -> None:
        package, interpreter_cls = find_interpreter_class()
        self.name = f"tflite/{package}"
        try:
            blob = artifact.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"cannot read {artifact}: {exc}") from exc
        for _ in range(self.settings.pool_size):
            try:
                interp = interpreter_cls(model_content=blob, num_threads=self.settings.num_threads)
                interp.allocate_tensors()
            except (ValueError, RuntimeError) as exc:
                raise ModelLoadError(f"{artifact} is not a loadable TFLite model: {exc}") from exc
            self._interpreters.append(interp)
            self._pool.put(interp)
        first = self._interpreters[0]
        inputs, outputs = first.get_input_details(), first.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelLoadError(
                f"{artifact} has {len(inputs)} inputs and {len(outputs)} outputs; Tandem "
                "serves single-input, single-output classifiers"
            )
        inp, out = inputs[0], outputs[0]
        check_shape("TFLite input", inp["shape_signature"].tolist(), manifest.input.shape, "input")
        check_shape(
            "TFLite output", out["shape_signature"].tolist(), manifest.output.shape, "output"
        )
        self._in_index, self._out_index = inp["index"], out["index"]
        self._in_dtype = inp["dtype"]
        self._in_q, self._out_q = _affine(inp), _affine(out)
        self._batch = {id(i): 1 for i in self._interpreters}

    def infer(self, x: np.ndarray) -> np.ndarray:
        q = self._in_q
        if q is not None:
            x = np.clip(np.rint(x * q.inv_scale + q.zero_point), q.lo, q.hi).astype(q.dtype)
        elif x.dtype != self._in_dtype:
            x = x.astype(self._in_dtype)
        interp = self._pool.get()
        try:
            if x.shape[0] != self._batch[id(interp)]:
                interp.resize_tensor_input(self._in_index, list(x.shape))
                interp.allocate_tensors()
                self._batch[id(interp)] = x.shape[0]
            interp.set_tensor(self._in_index, x)
            interp.invoke()
            y = interp.get_tensor(self._out_index)
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"TFLite invoke failed: {exc}") from exc
        finally:
            self._pool.put(interp)
        o = self._out_q
        out: np.ndarray = y if o is None else (y.astype(np.float32) - o.zero_point) * o.scale
        return out if out.dtype == np.float32 else out.astype(np.float32)

    def close(self) -> None:
        self._interpreters.clear()
        while not self._pool.empty():
            self._pool.get_nowait()
