"""TFLite backend: a small pool of interpreters, int8 quantize/dequantize done here.

A TFLite interpreter is not safe to call from two threads at once, and one interpreter
serialises every request. The backend keeps ``pool_size`` interpreters in a fair pool: a
request takes one, runs it, puts it back, so concurrent requests run in parallel up to the
pool size and queue (first come, first served; never fail) beyond it.

The runtime is found at load time, never at import: ``ai_edge_litert`` (Python 3.12+ and
the maintained successor), then ``tflite_runtime`` (2.14, Python <= 3.11, NumPy 1.x), then
full TensorFlow's ``tf.lite``.
"""

from __future__ import annotations

import importlib
import threading
from collections import deque
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from pydantic import Field

from agent.errors import BackendError, ModelLoadError, RuntimeMissingError
from agent.inference.backends.base import (
    BackendPlugin,
    BaseBackendSettings,
    bind_names,
    check_shape,
    is_flat,
)
from shared.contract import probe_inputs
from shared.manifest import Manifest


def _raw_clip() -> Any:
    """The raw ufunc: np.clip's Python wrapper costs more than the clipping itself. Looked
    up by name, as NumPy 2 (``numpy._core``) and 1.x (``numpy.core``) place it apart."""
    try:
        umath = importlib.import_module("numpy._core.umath")
    except ImportError:  # NumPy 1.x
        umath = importlib.import_module("numpy.core.umath")
    return umath.clip


_clip = _raw_clip()

#: What ``backend.kind`` names this backend by.
BACKEND_KEY: Final = "tflite"
#: The manifest ``edge.format`` it runs.
EDGE_FORMAT: Final = "tflite"

_RUNTIMES = (
    ("ai_edge_litert", "ai_edge_litert.interpreter"),
    ("tflite_runtime", "tflite_runtime.interpreter"),
    ("tensorflow", "tensorflow.lite"),
)
_MISSING = (
    "no TFLite runtime is installed: `pip install tflite-runtime` (Python <= 3.11, needs "
    "numpy<2) or `pip install ai-edge-litert` (Python >= 3.9, any NumPy)"
)


class TFLiteSettings(BaseBackendSettings):
    """Settings of the TFLite backend (``backend.kind = "tflite"``)."""

    kind: Literal["tflite"] = BACKEND_KEY
    num_threads: int = Field(default=1, ge=1, description="threads per interpreter")
    pool_size: int = Field(default=2, ge=1, description="interpreters serving in parallel")


#: The outcome of the one runtime search of this process: (package, class) or the error.
_found: tuple[str, Any] | RuntimeMissingError | None = None
_found_lock = threading.Lock()


def find_interpreter_class() -> tuple[str, Any]:
    """The first TFLite ``Interpreter`` class that imports, and its package's name.

    Searched once per process, under a lock: a failed import is not cached by Python, so
    retrying ``ai_edge_litert`` at every model load walks ``sys.path`` again under the
    import lock, and models loading at once convoy on it. The answer (found or missing)
    holds until the process ends; installing a runtime takes a restart anyway."""
    global _found
    with _found_lock:
        if _found is None:
            try:
                _found = _search_runtimes()
            except RuntimeMissingError as exc:
                _found = exc
        found = _found
    if isinstance(found, RuntimeMissingError):
        raise RuntimeMissingError(found.message) from found
    return found


def _search_runtimes() -> tuple[str, Any]:
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


class _FairPool:
    """Interpreters handed out first come, first served. A plain queue lets the thread that
    just returned an interpreter take it straight back, so under load one caller (say the
    updater's golden check) can wait forever; here a returned interpreter goes to the
    longest waiter directly."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[_Slot] = []
        self._waiters: deque[_Waiter] = deque()

    def get(self) -> _Slot:
        with self._lock:
            if self._free:  # free interpreters exist only while nobody waits
                return self._free.pop()
            waiter = _Waiter()
            self._waiters.append(waiter)
        waiter.ready.wait()
        assert waiter.slot is not None
        return waiter.slot

    def put(self, slot: _Slot) -> None:
        with self._lock:
            if self._waiters:
                waiter = self._waiters.popleft()
                waiter.slot = slot
                waiter.ready.set()
            else:
                self._free.append(slot)


class _Waiter:
    __slots__ = ("ready", "slot")

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.slot: _Slot | None = None


class _Slot:
    """One interpreter and the scratch buffers only its holder may touch.

    ``native`` says the runtime exposes its pybind wrapper (``_interpreter``), whose methods
    the hot path calls directly, skipping the Python wrappers: those re-check on every
    ``invoke`` that no NumPy view of an internal buffer is alive (about a microsecond), and
    this backend never creates such views (``set_tensor``/``get_tensor`` copy). The wrapper
    is looked up per call, never stored: the runtime's own check counts references to it."""

    __slots__ = ("batch", "buf", "interp", "native", "qbuf", "shapes")

    def __init__(self, interp: Any, features: int, in_dtype: Any) -> None:
        self.interp = interp
        wrapper = getattr(interp, "_interpreter", None)
        self.native = wrapper is not None and all(
            hasattr(wrapper, m) for m in ("SetTensor", "Invoke", "GetTensor")
        )
        del wrapper
        self.batch = 1
        self.buf = np.empty((1, features), dtype=np.float32)
        self.qbuf = np.empty((1, features), dtype=in_dtype)
        #: the shape each input is allocated at now (``run`` resizes on a change)
        self.shapes: dict[str, tuple[int, ...]] = {}


class TFLiteBackend:
    """``InferenceBackend`` on the TFLite interpreter.

    ``run`` takes and gives any number of tensors by name. On the flat path (``infer``),
    input: ``raw * mul + add``, where ``mul``/``add`` fold the manifest's preprocessing into
    the input tensor's quantization; then round and saturate for an integer input. Output:
    ``(q - zero_point) * scale`` for an integer output. For one sample (the hot path) all of
    it runs in the slot's preallocated buffers.
    """

    def __init__(self, settings: TFLiteSettings) -> None:
        self.settings = settings
        self.name = "tflite"
        self._pool = _FairPool()
        self._slots: list[_Slot] = []
        self._in_index = self._out_index = 0
        self._quantized_in = False
        self._identity = True
        self._mul = self._add = self._lo = self._hi = np.ones(1, dtype=np.float32)
        self._out_offset: np.ndarray | None = None
        self._out_scale = np.ones(1, dtype=np.float32)
        self._row_scale, self._row_zero = 1.0, 0.0
        self.flat = False
        self._features = 1
        self._in_dtype: Any = np.float32
        #: contract input name -> tensor index; output name -> (index, (scale, zero) or None)
        self._inputs: dict[str, int] = {}
        self._outputs: dict[str, tuple[int, tuple[float, float] | None]] = {}

    def load(self, artifact: Path, manifest: Manifest) -> None:
        package, interpreter_cls = find_interpreter_class()
        self.name = f"tflite/{package}"
        try:
            blob = artifact.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"cannot read {artifact}: {exc}") from exc
        # a streaming model keeps its state in the interpreter: one interpreter, calls in order
        pool_size = 1 if manifest.streaming else self.settings.pool_size
        interpreters = []
        for _ in range(pool_size):
            try:
                interp = interpreter_cls(model_content=blob, num_threads=self.settings.num_threads)
                interp.allocate_tensors()
            except (ValueError, RuntimeError) as exc:
                raise ModelLoadError(f"{artifact} is not a loadable TFLite model: {exc}") from exc
            interpreters.append(interp)
        inputs, outputs = interpreters[0].get_input_details(), interpreters[0].get_output_details()
        by_name_in = {d["name"]: d for d in inputs}
        by_name_out = {d["name"]: d for d in outputs}
        bound_in, bound_out = bind_names(manifest, list(by_name_in), list(by_name_out))
        by_name_in = {c: by_name_in[r] for c, r in bound_in.items()}
        by_name_out = {c: by_name_out[r] for c, r in bound_out.items()}
        for spec in manifest.inputs:
            d = by_name_in[spec.name]
            check_shape(f"TFLite input {spec.name!r}", d["shape_signature"].tolist(), spec)
            self._inputs[spec.name] = int(d["index"])
        for ospec in manifest.outputs:
            d = by_name_out[ospec.name]
            check_shape(f"TFLite output {ospec.name!r}", d["shape_signature"].tolist(), ospec)
            scale, zero = d["quantization"]
            quantized = bool(scale) and d["dtype"] != np.float32
            self._outputs[ospec.name] = (
                int(d["index"]),
                (float(scale), float(zero)) if quantized else None,
            )
        self.flat = is_flat(manifest)
        if self.flat:
            self._load_flat(manifest, by_name_in, by_name_out)
        for interp in interpreters:
            slot = _Slot(interp, self._features, self._in_dtype)
            slot.shapes = {n: tuple(by_name_in[n]["shape"].tolist()) for n in self._inputs}
            self._slots.append(slot)
            self._pool.put(slot)
        try:
            self.run(probe_inputs(manifest.inputs))
        except BackendError as exc:
            raise ModelLoadError(
                f"{artifact} fails on its load-time probe (zeros of its declared shape): {exc}"
            ) from exc

    def _load_flat(
        self, manifest: Manifest, by_name_in: dict[str, Any], by_name_out: dict[str, Any]
    ) -> None:
        """Constants of the flat-classifier hot path (``infer``/``infer_one``)."""
        spec_in, spec_out = manifest.inputs[0], manifest.outputs[0]
        inp, out = by_name_in[spec_in.name], by_name_out[spec_out.name]
        self._in_index, self._out_index = inp["index"], out["index"]
        features = self._features = int(inp["shape"][-1])
        self._in_dtype = inp["dtype"]
        mul, add = spec_in.scale, spec_in.offset
        in_scale, in_zero = inp["quantization"]
        self._quantized_in = bool(in_scale) and inp["dtype"] != np.float32
        if self._quantized_in:
            info = np.iinfo(inp["dtype"])
            mul, add = mul / in_scale, add / in_scale + in_zero
            # array-shaped constants: NumPy converts a Python scalar on every call
            self._lo = np.full((1, features), info.min, dtype=np.float32)
            self._hi = np.full((1, features), info.max, dtype=np.float32)
        self._identity = not self._quantized_in and mul == 1.0 and add == 0.0
        self._mul = np.full((1, features), mul, dtype=np.float32)
        self._add = np.full((1, features), add, dtype=np.float32)
        out_scale, out_zero = out["quantization"]
        if out_scale and out["dtype"] != np.float32:
            classes = int(out["shape"][-1])
            self._out_scale = np.full(classes, out_scale, dtype=np.float32)
            self._row_scale, self._row_zero = float(out_scale), float(out_zero)
            self._out_offset = np.full(classes, out_scale * out_zero, dtype=np.float32)

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        slot = self._pool.get()
        try:
            interp = slot.interp
            resized = False
            for name, index in self._inputs.items():
                shape = tensors[name].shape
                if slot.shapes.get(name) != shape:
                    interp.resize_tensor_input(index, list(shape))
                    slot.shapes[name] = shape
                    resized = True
            if resized:
                interp.allocate_tensors()
                slot.batch = -1  # the flat path re-sizes on its next call
            for name, index in self._inputs.items():
                interp.set_tensor(index, tensors[name])
            interp.invoke()
            raw = {name: interp.get_tensor(index) for name, (index, _) in self._outputs.items()}
        except (ValueError, RuntimeError, KeyError) as exc:
            raise BackendError(f"TFLite invoke failed: {exc}") from exc
        finally:
            self._pool.put(slot)
        out = {}
        for name, (_, quant) in self._outputs.items():
            y = raw[name]
            if quant is not None:
                y = (y.astype(np.float32) - np.float32(quant[1])) * np.float32(quant[0])
            elif y.dtype != np.float32:
                y = y.astype(np.float32)
            out[name] = y
        return out

    def _input(self, raw: np.ndarray, slot: _Slot) -> np.ndarray:
        if self._identity:
            return raw
        if raw.shape[0] == 1:  # the hot path: no allocation
            buf = slot.buf
            np.multiply(raw, self._mul, out=buf)
            np.add(buf, self._add, out=buf)
        else:
            buf = raw * self._mul + self._add
        if not self._quantized_in:
            return buf
        if raw.shape[0] == 1:
            _clip(buf, self._lo, self._hi, out=buf)
            np.rint(buf, out=slot.qbuf, casting="unsafe")  # in range: the cast is exact
            return slot.qbuf
        batch: np.ndarray = np.rint(np.clip(buf, self._lo[0, 0], self._hi[0, 0]))
        return batch.astype(slot.qbuf.dtype)

    def infer(self, x: np.ndarray) -> np.ndarray:
        y = self._run(x)
        if self._out_offset is None:
            return y if y.dtype == np.float32 else y.astype(np.float32)
        # scale * (q - zero) as scale * q - scale * zero: two ops, the cast inside the first
        out: np.ndarray = np.multiply(y, self._out_scale, dtype=np.float32)
        np.subtract(out, self._out_offset, out=out)
        return out

    def infer_one(self, x: np.ndarray) -> tuple[np.ndarray, float, float]:
        return self._run(x)[0], self._row_scale, self._row_zero

    def _run(self, x: np.ndarray) -> np.ndarray:
        slot = self._pool.get()
        try:
            interp = slot.interp
            if x.shape[0] != slot.batch:
                interp.resize_tensor_input(self._in_index, [x.shape[0], x.shape[1]])
                interp.allocate_tensors()
                slot.batch = x.shape[0]
                slot.shapes = {}  # ``run`` re-sizes on its next call
            y: np.ndarray
            if slot.native:
                native = interp._interpreter
                native.SetTensor(self._in_index, self._input(x, slot))
                native.Invoke()
                y = native.GetTensor(self._out_index)
            else:
                interp.set_tensor(self._in_index, self._input(x, slot))
                interp.invoke()
                y = interp.get_tensor(self._out_index)
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"TFLite invoke failed: {exc}") from exc
        finally:
            self._pool.put(slot)
        return y

    def reset_state(self) -> None:
        for slot in list(self._slots):
            held = self._pool.get() if len(self._slots) == 1 else None
            try:
                slot.interp.reset_all_variables()
            except (AttributeError, ValueError, RuntimeError) as exc:
                raise BackendError(f"cannot reset the model's state: {exc}") from exc
            finally:
                if held is not None:
                    self._pool.put(held)

    def close(self) -> None:
        """Forget the interpreters. A request that picked this model before a swap may
        still be about to take one from the pool, so the pool stays: the interpreters are
        freed with the backend, when the last request lets go of it."""
        self._slots.clear()


PLUGIN = BackendPlugin(BACKEND_KEY, EDGE_FORMAT, "tensorflowlite", TFLiteSettings, TFLiteBackend)
