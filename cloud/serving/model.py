"""One ONNX model version served by the cloud: an ONNX Runtime session and its OIP face.

Checks every request against the session's own inputs (names, datatype, shape, with symbolic
dimensions free) before running it, so a client's mistake is a 400 with a message, never an
onnxruntime exception turned into a 500. An input with an image section in ``config.toml``
also takes pictures (``cloud/serving/image_inputs.py``), made into its tensor by
``with_tensors`` before ``prepare`` checks it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cloud.serving.config import ImageInputConfig
from cloud.serving.image_inputs import ImageInput
from cloud.serving.settings import OrtSettings
from shared.errors import ContractError, InvalidRequestError
from shared.oip.types import InferRequest, InferResponse, InferTensor, TensorMetadata

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

_NUMPY_TYPES = {
    "FP32": "float32",
    "FP64": "float64",
    "FP16": "float16",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "BOOL": "bool",
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
        self,
        name: str,
        version: str,
        path: Path,
        ort_settings: OrtSettings,
        instances: int = 1,
        images: Mapping[str, ImageInputConfig] | None = None,
    ) -> None:
        """``images``: the image sections of ``config.toml``, by input name."""
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
        #: Execution providers the session really got (a GPU one only if one is there).
        self.providers: list[str] = list(self._session.get_providers())
        self._next = itertools.count()
        self.inputs = [_tensor_meta(n) for n in self._session.get_inputs()]
        self.outputs = [_tensor_meta(n) for n in self._session.get_outputs()]
        self._input_names = {t.name: t for t in self.inputs}
        self._fixed_dims = {
            t.name: [(i, d) for i, d in enumerate(t.shape) if d != -1] for t in self.inputs
        }
        self._output_names = [t.name for t in self.outputs]
        self._output_types = {t.name: t.datatype for t in self.outputs}
        self._output_set = frozenset(self._output_types)
        unknown = sorted(set(images or {}) - set(self._input_names))
        if unknown:
            raise ContractError(
                f"config.toml has image sections for {unknown}, which {path} does not take; "
                f"its inputs are {sorted(self._input_names)}"
            )
        #: Inputs that take pictures too, by name (empty: the model takes tensors only).
        self.images = {
            n: ImageInput(self._input_names[n], config) for n, config in (images or {}).items()
        }
        #: Dynamic batching applies when every input and output has a free first dimension.
        self.batchable = all(t.shape and t.shape[0] == -1 for t in self.inputs + self.outputs)
        #: CPU seconds of one single-row call, measured at load; None if zeros are refused.
        self.warm_s = self._warm_up()

    def _warm_up(self) -> float | None:
        """Runs a zeros input (free dimensions 1) a few times: the first real request does not
        pay ONNX Runtime's lazy initialisation, and the batcher learns whether calls are cheap
        enough to run on the event loop before it has seen one."""
        feeds: dict[str, np.ndarray] = {}
        for t in self.inputs:
            shape = [max(d, 1) for d in t.shape]
            if t.datatype == "BYTES":
                feeds[t.name] = np.full(shape, "", dtype=object)
            else:
                feeds[t.name] = np.zeros(shape, dtype=np.dtype(_NUMPY_TYPES[t.datatype]))
        times = []
        for _ in range(3):
            start = time.thread_time()
            try:
                self._session.run(self._output_names, feeds)
            except Exception:  # a graph that needs real data; the batcher measures later
                return None
            times.append(time.thread_time() - start)
        return sorted(times)[1]

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
            shape[i] != want for i, want in self._fixed_dims[tensor.name]
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

    def pictures(self, request: InferRequest) -> tuple[int, bool]:
        """The most pictures one image input of ``request`` holds (0: none, tensors only;
        a 400 for a tensor that is neither), and whether all of them are small enough to
        convert on the event loop."""
        rows, inline = 0, True
        for tensor in request.inputs:
            image = self.images.get(tensor.name)
            if image is not None:
                n = image.pictures(tensor)
                if n:
                    rows, inline = max(rows, n), inline and image.inline(tensor)
        return rows, inline

    def with_tensors(self, request: InferRequest) -> InferRequest:
        """``request`` with its pictures made the model's tensors (for ``prepare`` to check
        as any others): a new request, the caller's left as it was."""
        inputs = []
        for tensor in request.inputs:
            image = self.images.get(tensor.name)
            if image is not None and image.pictures(tensor):
                tensor = InferTensor(tensor.name, image.datatype, image.convert(tensor))
            inputs.append(tensor)
        return InferRequest(inputs, request.outputs, request.id, request.parameters)

    def prepare(self, request: InferRequest) -> tuple[dict[str, np.ndarray], list[str]]:
        """Checked feeds and the output names to compute; ``InvalidRequestError`` if not."""
        feeds = {t.name: self._check(t) for t in request.inputs}
        if len(feeds) != len(self._input_names):  # every name was checked to be an input
            missing = set(self._input_names) - set(feeds)
            raise InvalidRequestError(f"missing inputs {sorted(missing)}")
        if request.outputs is None:
            return feeds, self._output_names
        wanted = [o.name for o in request.outputs]
        if not self._output_set.issuperset(wanted):
            unknown = [n for n in wanted if n not in self._output_types]
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
        """``values`` as ``compute`` returned them: arrays of the outputs' declared types."""
        types = self._output_types
        outputs = [InferTensor(n, types[n], v) for n, v in zip(wanted, values, strict=True)]
        return InferResponse(self.name, outputs, self.version)
