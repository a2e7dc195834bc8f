"""Running an edge artifact at packaging time: its tensors as the runtime reports them, and
its real-valued outputs for model-ready inputs.

Packaging reads the contract from the artifact and runs it before anything is signed: once
on the load-time probe, zeros of its declared shape (the agent's own load check, so a model
a device would refuse is refused here, naming the reason), and once per golden sample. It
uses its own small runner rather than the agent's backends (``cloud`` does not import
``agent``): two implementations agreeing on the golden outputs is itself a check.

Both runtimes are imported lazily and say which package is missing. Every failure of the
runtime is a ``ContractError`` with its message, never a traceback.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cloud.releases.tflite_file import TFLiteFile, is_tflite, read_tflite
from shared.contract import InputSpec, Quantization, TensorSpec, probe_inputs
from shared.errors import ContractError, InvalidRequestError
from shared.manifest import EdgeFormat
from shared.oip.types import numpy_dtype, oip_datatype

_ONNX_TYPES = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(double)": "FP64",
    "tensor(uint8)": "UINT8",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(uint16)": "UINT16",
    "tensor(int32)": "INT32",
    "tensor(uint32)": "UINT32",
    "tensor(int64)": "INT64",
    "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL",
}


class ModelRunner(Protocol):
    """A loaded artifact: ``inputs``/``outputs`` as the runtime reports them (-1 for a
    dynamic dimension), and ``run``: model-ready tensors by input name in, real-valued
    (dequantized) float32 outputs by output name out."""

    format: EdgeFormat
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def edge_format(blob: bytes) -> EdgeFormat:
    """Which runtime ``blob`` is for, from its bytes (never from the file name alone)."""
    if is_tflite(blob):
        return "tflite"
    # an ONNX model is a protobuf ModelProto that starts with its ir_version (field 1,
    # varint: tag 0x08); ONNX Runtime checks the rest when it loads it
    if blob[:1] == b"\x08":
        return "onnx"
    raise ContractError("the edge artifact is neither a TFLite (.tflite) nor an ONNX model")


def open_model(blob: bytes) -> ModelRunner:
    """Load ``blob`` in its runtime. ``ContractError`` when it cannot be loaded."""
    if edge_format(blob) == "tflite":
        return TFLiteRunner(blob)
    return OnnxRunner(blob)


def check_runs(runner: ModelRunner, inputs: list[InputSpec]) -> dict[str, np.ndarray]:
    """Run ``runner`` once on the load-time probe of ``inputs`` (the contract's, which may
    have fixed a dynamic dimension or a probe value): the agent refuses at load a model
    that fails it (``shared.contract.probe_inputs``, one definition for both)."""
    try:
        return runner.run(probe_inputs(inputs))
    except ContractError as exc:
        probes = ", ".join(
            f"{s.name} {s.shape}" + (f" = {s.probe:g}" if s.probe else "") for s in inputs
        )
        raise ContractError(
            f"the model does not run on zeros of its declared input shapes ({probes}): "
            f"{exc.message} (an input that refuses zeros can say its probe value in the "
            "contract file)"
        ) from None


def _datatype(dtype: Any, name: str) -> str:
    try:
        return oip_datatype(np.dtype(dtype))
    except (InvalidRequestError, TypeError):
        raise ContractError(
            f"tensor {name!r} has dtype {dtype}, which Tandem cannot carry"
        ) from None


def _real(value: np.ndarray, quant: Quantization | None) -> np.ndarray:
    if quant is not None and value.dtype.kind in "iu":
        return ((value.astype(np.float32) - quant.zero_point) * quant.scale).astype(np.float32)
    if value.dtype.kind in "fiub":
        return value.astype(np.float32)
    raise ContractError(f"an output of dtype {value.dtype} has no real value")


def _check_fed(specs: list[TensorSpec], tensors: dict[str, np.ndarray]) -> None:
    want = {s.name for s in specs}
    if want != tensors.keys():
        raise ContractError(f"the model takes inputs {sorted(want)}, was given {sorted(tensors)}")
    for s in specs:
        t = tensors[s.name]
        if t.dtype != numpy_dtype(s.datatype):
            raise ContractError(f"input {s.name} is {s.datatype}, was given {t.dtype}")
        if not s.accepts(t.shape):
            raise ContractError(f"input {s.name} has shape {s.shape}, was given {list(t.shape)}")


def _find_interpreter() -> Any:
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            return importlib.import_module(module).Interpreter
        except ImportError:
            continue
    try:
        return importlib.import_module("tensorflow").lite.Interpreter
    except ImportError:
        raise ContractError(
            "packaging a .tflite runs it: install tflite-runtime or ai-edge-litert"
        ) from None


_UNRESOLVED = re.compile(r"unresolved custom op: ([A-Za-z0-9_]+)")


@dataclass
class TFLiteRunner:
    """The TFLite interpreter on a model in memory."""

    blob: bytes
    format: EdgeFormat = "tflite"

    def __post_init__(self) -> None:
        self.file: TFLiteFile = read_tflite(self.blob)
        self._cls = _find_interpreter()
        interp = self._load()
        self._details_in = interp.get_input_details()
        self._details_out = interp.get_output_details()
        self.inputs = [self._spec(d) for d in self._details_in]
        self.outputs = [self._spec(d) for d in self._details_out]

    def _load(self) -> Any:
        try:
            interp = self._cls(model_content=self.blob)
            interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            text = str(exc)
            ops = sorted(set(_UNRESOLVED.findall(text)) | set(self.file.custom_ops))
            if "custom op" in text and ops:
                raise ContractError(
                    f"the model needs custom operator(s) {', '.join(ops)}, which the TFLite "
                    "runtime does not have: a device could not run it"
                ) from None
            raise ContractError(f"the TFLite runtime cannot load the model: {text}") from None
        return interp

    def _spec(self, detail: dict[str, Any]) -> TensorSpec:
        name = str(detail["name"])
        scale, zero = detail["quantization"]
        params = detail.get("quantization_parameters") or {}
        if len(params.get("scales", ())) > 1:
            raise ContractError(f"tensor {name!r} is quantized per channel; Tandem needs one scale")
        signature = detail.get("shape_signature")
        shape = signature if signature is not None and len(signature) else detail["shape"]
        return TensorSpec(
            name=name,
            shape=[int(d) for d in shape] or [],
            datatype=_datatype(detail["dtype"], name),
            quantization=Quantization(scale=float(scale), zero_point=int(zero)) if scale else None,
        )

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call on a fresh interpreter: a model that keeps state between calls
        (keyword spotters keep it in variables) gives each sample from its initial state."""
        _check_fed(self.inputs, tensors)
        interp = self._load()
        try:
            for d in self._details_in:
                t = tensors[str(d["name"])]
                if tuple(t.shape) != tuple(d["shape"]):
                    interp.resize_tensor_input(d["index"], list(t.shape), strict=True)
            interp.allocate_tensors()
            for d in self._details_in:
                # asarray, not ascontiguousarray: that makes a 0-d scalar input 1-d
                interp.set_tensor(d["index"], np.asarray(tensors[str(d["name"])], order="C"))
            interp.invoke()
            raw = {
                str(d["name"]): np.array(interp.get_tensor(d["index"])) for d in self._details_out
            }
        except (ValueError, RuntimeError) as exc:
            raise ContractError(f"the TFLite runtime failed to run the model: {exc}") from None
        return {s.name: _real(raw[s.name], s.quantization) for s in self.outputs}


@dataclass
class OnnxRunner:
    """ONNX Runtime (CPU) on a model in memory."""

    blob: bytes
    format: EdgeFormat = "onnx"

    def __post_init__(self) -> None:
        try:
            ort = importlib.import_module("onnxruntime")
        except ImportError:
            raise ContractError("packaging an .onnx runs it: install onnxruntime") from None
        options = ort.SessionOptions()
        options.log_severity_level = 4  # errors come back as exceptions; keep stderr quiet
        try:
            self._session = ort.InferenceSession(
                self.blob, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise ContractError(f"ONNX Runtime cannot load the model: {exc}") from None
        self.inputs = [self._spec(a) for a in self._session.get_inputs()]
        self.outputs = [self._spec(a) for a in self._session.get_outputs()]

    @staticmethod
    def _spec(arg: Any) -> TensorSpec:
        datatype = _ONNX_TYPES.get(arg.type)
        if datatype is None:
            raise ContractError(f"tensor {arg.name!r} is {arg.type}, which Tandem cannot carry")
        shape = [d if isinstance(d, int) and d > 0 else -1 for d in (arg.shape or [])]
        return TensorSpec(name=arg.name, shape=shape, datatype=datatype)

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _check_fed(self.inputs, tensors)
        try:
            values = self._session.run(None, tensors)
        except Exception as exc:  # onnxruntime's own exception types
            raise ContractError(f"ONNX Runtime failed to run the model: {exc}") from None
        return {
            s.name: _real(np.asarray(v), None) for s, v in zip(self.outputs, values, strict=True)
        }
