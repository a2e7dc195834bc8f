"""Open Inference Protocol (KServe v2 REST) types and the OIP <-> NumPy datatype mapping.

Inference requests and responses are plain dataclasses holding NumPy arrays: they sit on the
hot path, where pydantic validation of tensor data would cost more than the model. Their
wire form (JSON and Triton's binary tensor extension) is owned by ``shared.oip.codec``.
Metadata documents, which are small and rare, are pydantic models so that both servers and
their OpenAPI documents share one definition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from shared.errors import InvalidRequestError

#: A value allowed in an OIP ``parameters`` object.
Param = str | int | float | bool

#: Header that carries the length of the JSON part of a binary-extension body.
HEADER_LENGTH = "Inference-Header-Content-Length"
#: The extensions both Tandem servers implement (reported by ``GET /v2``).
SERVER_EXTENSIONS = ("binary_tensor_data", "model_configuration")

_DATATYPE_TO_NUMPY: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
_NUMPY_TO_DATATYPE = {dt: name for name, dt in _DATATYPE_TO_NUMPY.items()}
DATATYPES = frozenset(_DATATYPE_TO_NUMPY)


def numpy_dtype(datatype: str) -> np.dtype[np.generic]:
    """The NumPy dtype of an OIP datatype name; unknown names are the caller's mistake."""
    try:
        return _DATATYPE_TO_NUMPY[datatype]
    except KeyError:
        raise InvalidRequestError(
            f"unknown datatype {datatype!r}; expected one of {sorted(DATATYPES)}"
        ) from None


def oip_datatype(dtype: np.dtype[np.generic] | type) -> str:
    """The OIP datatype name of a NumPy dtype (``str``/``bytes`` arrays are BYTES)."""
    dt = np.dtype(dtype)
    if dt.kind in "SUO":
        return "BYTES"
    try:
        return _NUMPY_TO_DATATYPE[dt.newbyteorder("=")]
    except KeyError:
        raise InvalidRequestError(f"NumPy dtype {dt} has no OIP datatype") from None


@dataclass(slots=True)
class InferTensor:
    """One named tensor of a request or a response. ``data`` holds the values, shaped."""

    name: str
    datatype: str
    data: np.ndarray
    parameters: dict[str, Param] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, data: np.ndarray, **parameters: Param) -> InferTensor:
        """A tensor whose datatype follows from the array's dtype."""
        return cls(name=name, datatype=oip_datatype(data.dtype), data=data, parameters=parameters)

    @property
    def shape(self) -> list[int]:
        return list(self.data.shape)


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An entry of a request's ``outputs``: which output, and whether it should come as binary.

    ``binary_data`` None means "follow the request-wide ``binary_data_output`` parameter".
    Frozen: the codec's header cache hands the same entries to every request of a header.
    """

    name: str
    binary_data: bool | None = None


@dataclass(slots=True)
class InferRequest:
    inputs: list[InferTensor]
    outputs: list[RequestedOutput] | None = None
    id: str | None = None
    parameters: dict[str, Param] = field(default_factory=dict)

    def input(self, name: str) -> InferTensor:
        for tensor in self.inputs:
            if tensor.name == name:
                return tensor
        raise InvalidRequestError(f"request has no input named {name!r}")

    def wants_binary(self, output_name: str) -> bool:
        """Whether ``output_name`` must be returned in binary form (Triton's rules)."""
        for requested in self.outputs or ():
            if requested.name == output_name and requested.binary_data is not None:
                return requested.binary_data
        return bool(self.parameters.get("binary_data_output", False))


@dataclass(slots=True)
class InferResponse:
    model_name: str
    outputs: list[InferTensor]
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Param] = field(default_factory=dict)

    def output(self, name: str) -> InferTensor:
        for tensor in self.outputs:
            if tensor.name == name:
                return tensor
        raise InvalidRequestError(f"response has no output named {name!r}")


class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow")


class TensorMetadata(_Doc):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(_Doc):
    name: str
    versions: list[str] = []
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(_Doc):
    name: str
    version: str
    extensions: list[str]


class ModelReadyDoc(_Doc):
    name: str
    version: str | None = None
    ready: bool
    reason: str | None = None


class ErrorDoc(_Doc):
    error: str


def triton_data_type(datatype: str) -> str:
    """Triton's name of an OIP datatype (``model_config.proto``): ``TYPE_`` and the name, but
    BYTES is ``TYPE_STRING``."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def triton_model_config(
    name: str,
    platform: str,
    inputs: list[TensorMetadata],
    outputs: list[TensorMetadata],
    max_batch_size: int,
    **sections: Any,
) -> dict[str, Any]:
    """Triton's model configuration as its ``GET /v2/models/{m}/config`` writes it (the
    ``ModelConfig`` message of ``model_config.proto``, field names as in the proto, integers
    as numbers): what tritonclient's ``get_model_config`` reads. With ``max_batch_size`` > 0
    every tensor's first dimension is the batch, left out of ``dims`` (a tensor of the batch
    dimension alone is ``dims: [1]`` reshaped to ``[]``, Triton's way); -1 is a free
    dimension. ``sections``: further fields (``backend``, ``dynamic_batching``, ...)."""

    def tensor(t: TensorMetadata) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": t.name, "data_type": triton_data_type(t.datatype)}
        dims = t.shape[1:] if max_batch_size > 0 else t.shape
        doc["dims"] = dims or [1]
        if not dims:
            doc["reshape"] = {"shape": []}
        return doc

    return {
        "name": name,
        "platform": platform,
        **sections,
        "max_batch_size": max_batch_size,
        "input": [tensor(t) for t in inputs],
        "output": [tensor(t) for t in outputs],
    }
