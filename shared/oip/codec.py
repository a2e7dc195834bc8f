"""The one codec for OIP bodies: JSON, and Triton's binary tensor extension.

Both servers decode requests and encode responses with it; the agent's cloud client encodes
requests and decodes responses with it. A binary-extension body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw tensors, in the order of the
tensors whose ``parameters.binary_data_size`` is set. Every malformed body raises
``InvalidRequestError`` (a 400), never anything else.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from shared.errors import InvalidRequestError
from shared.oip.types import (
    HEADER_LENGTH,
    InferRequest,
    InferResponse,
    InferTensor,
    Param,
    RequestedOutput,
    numpy_dtype,
)

JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"
_LEN = struct.Struct("<I")
#: NumPy's limit on an array's dimensions.
MAX_DIMS = 32
#: No shape may describe more elements than an array can hold, even one with a zero dimension
#: (NumPy refuses to make it): the product of the non-zero dimensions, 8 bytes each, must fit
#: an ``intp``.
_MAX_ELEMENTS = np.iinfo(np.intp).max // 8


# ---------------------------------------------------------------------------------- tensors


def _element_bytes(value: object) -> bytes:
    """One BYTES element as bytes: ``str`` as UTF-8, anything else by its ``str``."""
    if isinstance(value, bytes):
        return value
    return (value if isinstance(value, str) else str(value)).encode()


def _bytes_elements(values: np.ndarray) -> Iterator[bytes]:
    for v in values.flat:
        yield v if type(v) is bytes else _element_bytes(v)


def bytes_tensor_size(values: np.ndarray) -> int:
    """The size of ``serialize_bytes_tensor(values)``, without building it."""
    size = 4 * values.size
    for v in values.flat:
        size += len(v) if type(v) is bytes else len(_element_bytes(v))
    return size


def _serialize_bytes(values: np.ndarray) -> bytearray:
    """``serialize_bytes_tensor`` into one buffer of its exact size, written in place: no
    temporary object per element (2M elements cost their output, 32 MB, not 260)."""
    out = bytearray(bytes_tensor_size(values))
    pack_into = _LEN.pack_into
    pos = 0
    for e in _bytes_elements(values):
        n = len(e)
        pack_into(out, pos, n)
        pos += 4
        out[pos : pos + n] = e
        pos += n
    return out


def serialize_bytes_tensor(values: np.ndarray) -> bytes:
    """BYTES elements as Triton sends them: each a 4-byte little-endian length, then bytes."""
    return bytes(_serialize_bytes(values))


def deserialize_bytes_tensor(buf: bytes | bytearray | memoryview, count: int) -> np.ndarray:
    view = memoryview(buf)
    end = len(view)
    if 4 * count > end:  # each element takes at least its length: no array of a huge count
        raise InvalidRequestError("BYTES tensor is truncated")
    arr = np.empty(count, dtype=object)
    unpack_from = _LEN.unpack_from
    pos = 0
    for i in range(count):
        if pos + 4 > end:
            raise InvalidRequestError("BYTES tensor is truncated")
        (n,) = unpack_from(view, pos)
        pos += 4
        if pos + n > end:
            raise InvalidRequestError("BYTES tensor element is truncated")
        arr[i] = bytes(view[pos : pos + n])
        pos += n
    if pos != end:
        raise InvalidRequestError("BYTES tensor has trailing bytes")
    return arr


def _tensor_binary(tensor: InferTensor) -> bytes | bytearray:
    if tensor.datatype == "BYTES":
        return _serialize_bytes(tensor.data)
    return np.ascontiguousarray(tensor.data, dtype=_wire_dtype(tensor.datatype)).tobytes()


def _tensor_json_data(tensor: InferTensor) -> list[Any]:
    if tensor.datatype == "BYTES":
        try:  # JSON carries text: anything else would arrive mangled, not refused
            return [e.decode("utf-8") for e in _bytes_elements(tensor.data)]
        except UnicodeDecodeError:
            raise InvalidRequestError(
                f"BYTES tensor {tensor.name!r} holds data that is not UTF-8 text (an encoded "
                "image?): JSON cannot carry it; send it as binary tensor data"
            ) from None
    data: list[Any] = np.asarray(tensor.data).ravel().tolist()
    return data


def _encode_tensor(
    tensor: InferTensor, binary: bool, blobs: list[bytes | bytearray]
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": tensor.name,
        "datatype": tensor.datatype,
        "shape": list(tensor.data.shape),
    }
    params: dict[str, Param] = dict(tensor.parameters)
    if binary:
        blob = _tensor_binary(tensor)
        params["binary_data_size"] = len(blob)
        blobs.append(blob)
    else:
        doc["data"] = _tensor_json_data(tensor)
    if params:
        doc["parameters"] = params
    return doc


def _check_shape(raw: Any, where: str, name: str | None = None) -> list[int]:
    if isinstance(raw, list) and len(raw) <= MAX_DIMS:
        for d in raw:
            if type(d) is not int or d < 0:  # bool is an int subclass: type() excludes it
                break
        else:
            if math.prod(d for d in raw if d) <= _MAX_ELEMENTS:
                return raw
            where = where if name is None else f"{where} {name!r}"
            raise InvalidRequestError(f"{where}: shape {raw} is too large")
    where = where if name is None else f"{where} {name!r}"
    if isinstance(raw, list) and len(raw) > MAX_DIMS:
        raise InvalidRequestError(
            f"{where}: 'shape' has {len(raw)} dimensions; at most {MAX_DIMS} are supported"
        )
    raise InvalidRequestError(f"{where}: 'shape' must be a list of non-negative integers")


def _json_to_array(data: Any, datatype: str, shape: list[int], where: str) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        flat = _flatten(data)
        if not all(isinstance(v, str) for v in flat):
            raise InvalidRequestError(f"{where}: BYTES data must be strings")
        arr = np.empty(len(flat), dtype=object)
        try:
            arr[:] = [v.encode() for v in flat]
        except UnicodeEncodeError:  # an unpaired surrogate escape
            raise InvalidRequestError(f"{where}: BYTES data is not valid Unicode") from None
    else:
        dt = numpy_dtype(datatype)
        try:
            raw = np.asarray(data)
        except (ValueError, TypeError, RecursionError) as exc:
            raise InvalidRequestError(f"{where}: 'data' is not a regular array: {exc}") from None
        raw = raw.reshape(-1)
        if raw.size and not _kind_fits(raw.dtype.kind, dt.kind):
            raise InvalidRequestError(
                f"{where}: 'data' holds {raw.dtype.kind!r}-kind values, not {datatype}"
            )
        if dt.kind in "iu" and raw.size:
            info = np.iinfo(dt.type)  # type: ignore[type-var]
            if raw.min() < info.min or raw.max() > info.max:
                raise InvalidRequestError(f"{where}: a value is out of range for {datatype}")
        try:
            with np.errstate(over="raise"):  # 1e300 as FP16 is a mistake, not infinity
                arr = raw.astype(dt, copy=False)
        except FloatingPointError:
            raise InvalidRequestError(f"{where}: a value is out of range for {datatype}") from None
    if arr.size != count:
        raise InvalidRequestError(
            f"{where}: 'data' has {arr.size} elements but shape {shape} needs {count}"
        )
    return arr.reshape(shape)


def _kind_fits(have: str, want: str) -> bool:
    if want == "b":
        return have == "b"
    if want in "iu":
        return have in "iu"
    if want == "f":
        return have in "iuf"
    return False


def _flatten(data: Any) -> list[Any]:
    """The leaves of nested lists, in order. Iterative: however deep a client nests them, it
    is a 400 later, never a ``RecursionError``."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


class _BinaryReader:
    """Hands out the binary part of a body in order, checking every size."""

    def __init__(self, blob: memoryview) -> None:
        self._blob = blob
        self._pos = 0

    def take(self, size: int, where: str) -> memoryview:
        if size > len(self._blob) - self._pos:
            raise InvalidRequestError(f"{where}: binary_data_size {size} exceeds the body")
        part = self._blob[self._pos : self._pos + size]
        self._pos += size
        return part

    def finish(self) -> None:
        if self._pos != len(self._blob):
            raise InvalidRequestError(
                f"body has {len(self._blob) - self._pos} bytes of binary data no tensor claims"
            )


def _decode_tensor(doc: Any, reader: _BinaryReader, where: str) -> InferTensor:
    """One tensor of a body. Runs once per tensor of every request: the checks are plain
    comparisons, and error texts are only built when there is an error."""
    if not isinstance(doc, dict):
        raise InvalidRequestError(f"{where} must be an object")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"{where}: 'name' must be a non-empty string")
    datatype = doc.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidRequestError(f"{where} {name!r}: 'datatype' must be a string")
    dt = numpy_dtype(datatype)
    shape = _check_shape(doc.get("shape"), where, name)
    params = _decode_params(doc.get("parameters"), where, name)
    size = params.pop("binary_data_size", None)
    if size is not None:
        where = f"{where} {name!r}"
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidRequestError(f"{where}: binary_data_size must be a non-negative integer")
        if "data" in doc:
            raise InvalidRequestError(f"{where}: has both 'data' and binary_data_size")
        buf = reader.take(size, where)
        count = math.prod(shape)
        if datatype == "BYTES":
            arr = deserialize_bytes_tensor(buf, count)
        else:
            if size != count * dt.itemsize:
                raise InvalidRequestError(
                    f"{where}: binary_data_size {size} does not match shape {shape} of {datatype}"
                )
            arr = np.frombuffer(buf, dtype=_wire_dtype(datatype))
        arr = arr.reshape(shape)
    elif "data" in doc:
        arr = _json_to_array(doc["data"], datatype, shape, f"{where} {name!r}")
    else:
        raise InvalidRequestError(f"{where} {name!r}: needs 'data' or parameters.binary_data_size")
    return InferTensor(name=name, datatype=datatype, data=arr, parameters=params)


_WIRE_DTYPES: dict[str, np.dtype[Any]] = {}


def _wire_dtype(datatype: str) -> np.dtype[Any]:
    """The NumPy dtype of ``datatype`` in the wire's byte order (little-endian), cached:
    making one per tensor costs as much as reading the tensor. Unknown names raise."""
    found = _WIRE_DTYPES.get(datatype)
    if found is None:
        found = _WIRE_DTYPES[datatype] = numpy_dtype(datatype).newbyteorder("<")
    return found


def _decode_params(raw: Any, where: str, name: str | None = None) -> dict[str, Param]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        where = where if name is None else f"{where} {name!r}"
        raise InvalidRequestError(f"{where}: 'parameters' must be an object")
    for key, value in raw.items():
        if not isinstance(value, (str, int, float, bool)):
            where = where if name is None else f"{where} {name!r}"
            raise InvalidRequestError(f"{where}: parameter {key!r} must be a scalar")
    return dict(raw)


def _split_body(body: bytes | bytearray, header_length: int | None) -> tuple[Any, _BinaryReader]:
    view = memoryview(body)
    if header_length is None:
        header, blob = view, view[len(view) :]
    else:
        if header_length < 0 or header_length > len(view):
            raise InvalidRequestError(f"{HEADER_LENGTH} {header_length} is outside the body")
        header, blob = view[:header_length], view[header_length:]
    try:
        doc = orjson.loads(header)
    except ValueError:
        doc = _lenient_json(header)
    if not isinstance(doc, dict):
        raise InvalidRequestError("body must be a JSON object")
    return doc, _BinaryReader(blob)


def _lenient_json(text: memoryview) -> Any:
    """What orjson refuses (NaN literals, integers past 64 bits), read by the standard library
    as before, so later checks name the real problem; or what is wrong with it. Unlike
    orjson, it reads unpaired surrogate escapes (which no JSON encoder could write back: an
    echoed id would fail its response) and recurses (a deep nesting would raise
    ``RecursionError``): both are refused here."""
    try:
        doc = json.loads(bytes(text))
        json.dumps(doc, ensure_ascii=False).encode()
    except RecursionError:
        raise InvalidRequestError("body is not valid JSON: nested too deeply") from None
    except UnicodeEncodeError:
        raise InvalidRequestError("body is not valid JSON: an unpaired surrogate") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"body is not valid JSON: {exc}") from None
    return doc


def parse_header_length(headers: Mapping[str, str]) -> int | None:
    """``Inference-Header-Content-Length`` as an int, or None when the body is pure JSON."""
    raw = headers.get(HEADER_LENGTH) or headers.get(HEADER_LENGTH.lower())
    return None if raw is None else header_length_value(raw)


def header_length_value(raw: str) -> int:
    """The value of an ``Inference-Header-Content-Length`` header."""
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequestError(f"{HEADER_LENGTH} must be an integer, got {raw!r}") from None


def _optional_str(doc: dict[str, Any], key: str, where: str) -> str | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidRequestError(f"{where}: {key!r} must be a string")
    return value


def _assemble(
    doc: dict[str, Any], blobs: list[bytes | bytearray], tensors: list[InferTensor]
) -> tuple[bytes, dict[str, str]]:
    """Header then blobs. ``tensors``: those sent as JSON data. orjson writes NaN and
    infinities as null, so a float tensor holding one goes through the standard library,
    which writes them as the NaN/Infinity literals OIP servers and clients read."""
    if any(t.data.dtype.kind == "f" and not np.isfinite(t.data).all() for t in tensors):
        header = json.dumps(doc, separators=(",", ":")).encode()
    else:
        header = orjson.dumps(doc)
    if not blobs:
        return header, {"Content-Type": JSON_CONTENT_TYPE}
    return b"".join([header, *blobs]), {
        "Content-Type": BINARY_CONTENT_TYPE,
        HEADER_LENGTH: str(len(header)),
    }


# --------------------------------------------------------------------------------- requests


def encode_request(
    request: InferRequest, *, binary_inputs: bool = True
) -> tuple[bytes, dict[str, str]]:
    """Body and headers for an infer request (the client side)."""
    blobs: list[bytes | bytearray] = []
    doc: dict[str, Any] = {
        "inputs": [_encode_tensor(t, binary_inputs, blobs) for t in request.inputs]
    }
    if request.id is not None:
        doc["id"] = request.id
    if request.parameters:
        doc["parameters"] = dict(request.parameters)
    if request.outputs is not None:
        doc["outputs"] = [
            {"name": o.name}
            if o.binary_data is None
            else {"name": o.name, "parameters": {"binary_data": o.binary_data}}
            for o in request.outputs
        ]
    return _assemble(doc, blobs, [] if binary_inputs else request.inputs)


@dataclass(frozen=True, slots=True)
class _Header:
    """A binary-extension request header, parsed and checked: what a body with the same
    header bytes decodes to, but for its tensor bytes."""

    inputs: tuple[tuple[str, str, np.dtype[Any], tuple[int, ...], int, dict[str, Param]], ...]
    blob_size: int
    outputs: list[RequestedOutput] | None
    id: str | None
    parameters: dict[str, Param]

    def decode(self, body: bytes | bytearray, pos: int) -> InferRequest:
        """The request whose tensor bytes start at ``pos`` in ``body``."""
        tensors = []
        for name, datatype, dt, shape, size, params in self.inputs:
            if datatype == "BYTES":
                arr = deserialize_bytes_tensor(memoryview(body)[pos : pos + size], math.prod(shape))
            else:
                arr = np.frombuffer(body, dt, size // dt.itemsize, pos)
            pos += size
            tensors.append(InferTensor(name, datatype, arr.reshape(shape), {**params}))
        outputs = self.outputs
        return InferRequest(
            tensors,
            outputs if outputs is None else [*outputs],
            self.id,
            {**self.parameters},
        )


#: Headers seen lately. A client sends the same header for every request of one shape (only
#: the tensor bytes after it change), so parsing and checking it once saves about 520 of the
#: 3,250 Python opcodes of a binary request (``scripts/opcount_cloud.py``).
#: Bounded: emptied when full. What it must never answer (another body's tensors or size, a
#: caller's changes to an earlier request, JSON data from the binary part):
#: ``tests/unit/test_oip_codec.py::test_the_header_cache_never_answers_for_another_body``.
_HEADERS: dict[bytes, _Header] = {}
_HEADERS_MAX = 256
_HEADER_MAX_BYTES = 4096


def decode_request(body: bytes | bytearray, header_length: int | None = None) -> InferRequest:
    """An ``InferRequest`` from a body (the server side). Raises ``InvalidRequestError``.
    A ``bytearray`` (a large body, read into one buffer) is decoded without a copy; its
    tensors are views of it."""
    if header_length is not None and 0 <= header_length <= _HEADER_MAX_BYTES:
        known = _HEADERS.get(bytes(body[:header_length]))  # a bytearray's slice is unhashable
        if known is not None and len(body) - header_length == known.blob_size:
            return known.decode(body, header_length)
    doc, reader = _split_body(body, header_length)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequestError("'inputs' must be a non-empty list")
    tensors = [_decode_tensor(t, reader, f"input {i}") for i, t in enumerate(inputs)]
    reader.finish()
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise InvalidRequestError("input names must be unique")
    outputs = None
    if "outputs" in doc:
        raw_outputs = doc["outputs"]
        if not isinstance(raw_outputs, list):
            raise InvalidRequestError("'outputs' must be a list")
        outputs = [_decode_requested_output(o, i) for i, o in enumerate(raw_outputs)]
    request = InferRequest(
        inputs=tensors,
        outputs=outputs,
        id=_optional_str(doc, "id", "request"),
        parameters=_decode_params(doc.get("parameters"), "request"),
    )
    if (
        header_length is not None
        and header_length <= _HEADER_MAX_BYTES
        and request.id is None  # ids differ per request: such headers never repeat
        and not any("data" in t for t in inputs)  # JSON data lives in the header
    ):
        _remember(bytes(body[:header_length]), request)
    return request


def _remember(header: bytes, request: InferRequest) -> None:
    entries = tuple(
        (
            t.name,
            t.datatype,
            _wire_dtype(t.datatype),
            tuple(t.data.shape),
            size,
            dict(t.parameters),
        )
        for t, size in zip(request.inputs, _binary_sizes(request), strict=True)
    )
    if len(_HEADERS) >= _HEADERS_MAX:
        _HEADERS.clear()
    _HEADERS[header] = _Header(
        inputs=entries,
        blob_size=sum(e[4] for e in entries),
        outputs=None if request.outputs is None else list(request.outputs),
        id=request.id,
        parameters=dict(request.parameters),
    )


def _binary_sizes(request: InferRequest) -> list[int]:
    """Each input's size in the binary part, as its header declared it."""
    return [
        bytes_tensor_size(t.data) if t.datatype == "BYTES" else t.data.nbytes
        for t in request.inputs
    ]


def _decode_requested_output(doc: Any, index: int) -> RequestedOutput:
    where = f"output {index}"
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        raise InvalidRequestError(f"{where} must be an object with a string 'name'")
    params = _decode_params(doc.get("parameters"), where)
    if "classification" in params:
        raise InvalidRequestError(f"{where}: the classification extension is not supported")
    binary = params.get("binary_data")
    if binary is not None and not isinstance(binary, bool):
        raise InvalidRequestError(f"{where}: binary_data must be a boolean")
    return RequestedOutput(name=doc["name"], binary_data=binary)


# -------------------------------------------------------------------------------- responses


def encode_response(
    response: InferResponse, request: InferRequest | None = None
) -> tuple[bytes, dict[str, str]]:
    """Body and headers for a response, binary for the outputs the request asked that of."""
    blobs: list[bytes | bytearray] = []
    as_json: list[InferTensor] = []
    outputs = []
    for t in response.outputs:
        binary = request is not None and request.wants_binary(t.name)
        outputs.append(_encode_tensor(t, binary, blobs))
        if not binary:
            as_json.append(t)
    doc: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version is not None:
        doc["model_version"] = response.model_version
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = dict(response.parameters)
    doc["outputs"] = outputs
    return _assemble(doc, blobs, as_json)


def decode_response(body: bytes | bytearray, header_length: int | None = None) -> InferResponse:
    """An ``InferResponse`` from a body (the client side). Raises ``InvalidRequestError``."""
    doc, reader = _split_body(body, header_length)
    model_name = doc.get("model_name")
    if not isinstance(model_name, str):
        raise InvalidRequestError("response: 'model_name' must be a string")
    outputs = doc.get("outputs")
    if not isinstance(outputs, list):
        raise InvalidRequestError("response: 'outputs' must be a list")
    tensors = [_decode_tensor(t, reader, f"output {i}") for i, t in enumerate(outputs)]
    reader.finish()
    version = doc.get("model_version")
    return InferResponse(
        model_name=model_name,
        outputs=tensors,
        model_version=None if version is None else str(version),
        id=_optional_str(doc, "id", "response"),
        parameters=_decode_params(doc.get("parameters"), "response"),
    )


def error_body(message: str) -> bytes:
    """The OIP error document, ``{"error": message}``."""
    return json.dumps({"error": message}).encode()
