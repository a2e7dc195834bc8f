"""One ONNX model version served by the cloud: an ONNX Runtime session and its OIP face.

Checks every request against the session's own inputs (names, datatype, shape, with symbolic
dimensions free) before running it, so a client's mistake is a 400 with a message, never an
onnxruntime exception turned into a 500.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from cloud.settings import OrtSettings
from shared.errors import ContractError, InvalidRequestError
from shared.oip import InferRequest, InferResponse, InferTensor, TensorMetadata, oip_datatype

# onnxruntime's type strings for the datatypes OIP can carry
_ORT_TYPES = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}


def _tensor_meta(node: Any) -> TensorMetadata:
    datatype = _ORT_TYPES.get(node.type)
    if datatype is None:
        raise ContractError(f"tensor {node.name!r} has type {node.type}, which OIP cannot carry")
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in node.shape]
    return TensorMetadata(name=node.name, datatype=datatype, shape=shape)


class OnnxModel:
    """A loaded version: ``prepare`` checks a request, ``compute`` runs it (safe from many
    threads: ONNX Runtime sessions are), ``response`` wraps the outputs."""

    def __init__(
        self, name: str, version: str, path: Path, ort_settings: OrtSettings, instances: int = 1
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = ort_settings.intra_op_threads
        options.inter_op_num_threads = ort_settings.inter_op_threads
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[ort_settings.graph_optimization]
        available = set(ort.get_available_providers())
        providers = [p for p in ort_settings.providers if p in available] or [
            "CPUExecutionProvider"
        ]
        self.name, self.version, self.path = name, version, path
        try:
            self._sessions = [
                ort.InferenceSession(str(path), options, providers=providers)
                for _ in range(max(1, instances))
            ]
        except Exception as exc:  # onnxruntime raises untyped errors
            raise ContractError(f"cannot load {path}: {exc}") from exc
        self._session = self._sessions[0]
        self._next = itertools.count()
        self.inputs = [_tensor_meta(n) for n in self._session.get_inputs()]
        self.outputs = [_tensor_meta(n) for n in self._session.get_outputs()]
        self._input_names = {t.name: t for t in self.inputs}
        self._output_names = [t.name for t in self.outputs]
        #: Dynamic batching applies when every input and output has a free first dimension.
        self.batchable = all(t.shape and t.shape[0] == -1 for t in self.inputs + self.outputs)

    def _check(self, tensor: InferTensor) -> np.ndarray:
        spec = self._input_names.get(tensor.name)
        if spec is None:
            raise InvalidRequestError(
                f"model {self.name!r} has no input {tensor.name!r}; "
                f"inputs are {sorted(self._input_names)}"
            )
        if tensor.datatype != spec.datatype:
            raise InvalidRequestError(
                f"input {tensor.name!r} must be {spec.datatype}, got {tensor.datatype}"
            )
        shape = tensor.data.shape
        if len(shape) != len(spec.shape) or any(
            want not in (-1, have) for want, have in zip(spec.shape, shape, strict=False)
        ):
            raise InvalidRequestError(
                f"input {tensor.name!r} must have shape {spec.shape} (-1: any), got {list(shape)}"
            )
        if spec.datatype == "BYTES":
            return np.asarray(
                [v.decode() if isinstance(v, bytes) else v for v in tensor.data.ravel()],
                dtype=object,
            ).reshape(shape)
        return tensor.data

    def prepare(self, request: InferRequest) -> tuple[dict[str, np.ndarray], list[str]]:
        """Checked feeds and the output names to compute; ``InvalidRequestError`` if not."""
        feeds = {t.name: self._check(t) for t in request.inputs}
        missing = set(self._input_names) - set(feeds)
        if missing:
            raise InvalidRequestError(f"missing inputs {sorted(missing)}")
        wanted = self._output_names
        if request.outputs is not None:
            wanted = [o.name for o in request.outputs]
            unknown = set(wanted) - set(self._output_names)
            if unknown:
                raise InvalidRequestError(
                    f"unknown outputs {sorted(unknown)}; outputs are {self._output_names}"
                )
        return feeds, wanted

    def compute(self, feeds: dict[str, np.ndarray], wanted: list[str]) -> list[np.ndarray]:
        """One ONNX Runtime call (thread-safe; sessions taken in turn)."""
        session = self._sessions[next(self._next) % len(self._sessions)]
        try:
            return [np.asarray(v) for v in session.run(wanted, feeds)]
        except Exception as exc:  # a shape the graph rejects at run time (e.g. fixed dims)
            raise InvalidRequestError(f"model rejected the input: {exc}") from exc

    def response(self, wanted: list[str], values: list[np.ndarray]) -> InferResponse:
        outputs = [
            InferTensor(name=n, datatype=oip_datatype(np.asarray(v).dtype), data=np.asarray(v))
            for n, v in zip(wanted, values, strict=False)
        ]
        return InferResponse(model_name=self.name, model_version=self.version, outputs=outputs)
