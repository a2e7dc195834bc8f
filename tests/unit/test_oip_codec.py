"""The one OIP codec: round trips in JSON and binary, and a clear 400 for every malformed body."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared.errors import InvalidRequestError
from shared.oip.codec import (
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    parse_header_length,
)
from shared.oip.types import (
    HEADER_LENGTH,
    InferRequest,
    InferResponse,
    InferTensor,
    RequestedOutput,
)

NUMERIC = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
]


def _roundtrip_request(req: InferRequest, binary: bool) -> InferRequest:
    body, headers = encode_request(req, binary_inputs=binary)
    return decode_request(body, parse_header_length(headers))


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("datatype", NUMERIC)
def test_numeric_tensor_round_trip(datatype: str, binary: bool) -> None:
    from shared.oip.types import numpy_dtype

    data = (np.arange(6) % 2 == 0) if datatype == "BOOL" else np.arange(6)
    data = data.astype(numpy_dtype(datatype)).reshape(2, 3)
    req = InferRequest(
        inputs=[InferTensor("x", datatype, data)], id="r1", parameters={"mode": "auto"}
    )
    got = _roundtrip_request(req, binary)
    assert got.id == "r1" and got.parameters == {"mode": "auto"}
    assert got.inputs[0].datatype == datatype
    np.testing.assert_array_equal(got.inputs[0].data, data)


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_tensor_round_trip(binary: bool) -> None:
    data = np.array([b"seven", b"", "ünï".encode()], dtype=object)
    got = _roundtrip_request(InferRequest(inputs=[InferTensor("s", "BYTES", data)]), binary)
    assert list(got.inputs[0].data) == list(data)


def test_binary_body_layout_matches_triton() -> None:
    x = np.array([[1.0, 2.0]], dtype=np.float32)
    body, headers = encode_request(InferRequest(inputs=[InferTensor.of("x", x)]))
    n = int(headers[HEADER_LENGTH])
    header = json.loads(body[:n])
    assert header["inputs"][0]["parameters"] == {"binary_data_size": 8}
    assert body[n:] == x.tobytes()


def test_response_binary_per_output_and_request_wide() -> None:
    a = InferTensor.of("a", np.ones((1, 2), np.float32))
    b = InferTensor.of("b", np.zeros((1, 2), np.float32))
    resp = InferResponse(model_name="m", model_version="1", outputs=[a, b], id="q")
    # request-wide binary, overridden to JSON for "b"
    req = InferRequest(
        inputs=[a],
        parameters={"binary_data_output": True},
        outputs=[RequestedOutput("a"), RequestedOutput("b", binary_data=False)],
    )
    body, headers = encode_response(resp, req)
    n = int(headers[HEADER_LENGTH])
    doc = json.loads(body[:n])
    assert "data" not in doc["outputs"][0] and doc["outputs"][1]["data"] == [0.0, 0.0]
    back = decode_response(body, n)
    assert back.id == "q" and back.model_version == "1"
    np.testing.assert_array_equal(back.output("a").data, a.data)
    # no request: all JSON
    body, headers = encode_response(resp)
    assert HEADER_LENGTH not in headers and json.loads(body)["outputs"][0]["data"] == [1.0, 1.0]


def test_repeated_binary_responses_keep_their_own_data_and_parameters() -> None:
    req = InferRequest(inputs=[], outputs=[RequestedOutput("p", binary_data=True)])
    for value in (1.0, 2.0):  # a response-header cache once answered the second from the first
        out = InferTensor.of("p", np.full((1, 3), value, np.float32))
        body, headers = encode_response(InferResponse("cached", [out], "1"), req)
        back = decode_response(body, int(headers[HEADER_LENGTH]))
        np.testing.assert_array_equal(back.output("p").data, out.data)
    # same model, name and shape, but a tensor parameter: it was answered without it
    tagged = InferTensor("p", "FP32", np.zeros((1, 3), np.float32), {"unit": "prob"})
    body, headers = encode_response(InferResponse("cached", [tagged], "1"), req)
    back = decode_response(body, int(headers[HEADER_LENGTH]))
    assert back.output("p").parameters == {"unit": "prob"}


BAD_BODIES = [
    (b"{not json", None, "not valid JSON"),
    (b"[]", None, "JSON object"),
    (b"{}", None, "'inputs'"),
    (b'{"inputs": []}', None, "'inputs'"),
    (b'{"inputs": [1]}', None, "must be an object"),
    (b'{"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}', None, "'name'"),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP99", "data": [1]}]}',
        None,
        "unknown datatype",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}',
        None,
        "non-negative",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]}',
        None,
        "needs 2",
    ),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}]}', None, "kind"),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": [1.5]}]}',
        None,
        "kind",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [300]}]}',
        None,
        "out of range",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [[1], [2, 3]]}]}',
        None,
        "regular",
    ),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}', None, "needs 'data'"),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],'
        b' "parameters": {"a": [1]}}',
        None,
        "scalar",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},'
        b' {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
        None,
        "unique",
    ),
    (
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],'
        b' "outputs": [{"name": "y", "parameters": {"classification": 2}}]}',
        None,
        "classification",
    ),
]


@pytest.mark.parametrize(("body", "header", "needle"), BAD_BODIES)
def test_malformed_requests_are_invalid_request_errors(
    body: bytes, header: int | None, needle: str
) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        decode_request(body, header)


def _binary_body(size_claimed: int, blob: bytes) -> tuple[bytes, int]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": size_claimed},
                }
            ]
        }
    ).encode()
    return header + blob, len(header)


@pytest.mark.parametrize(
    ("claimed", "blob", "needle"),
    [
        (8, b"\0" * 4, "exceeds the body"),
        (4, b"\0" * 4, "does not match shape"),
        (8, b"\0" * 12, "no tensor claims"),
    ],
)
def test_malformed_binary_bodies(claimed: int, blob: bytes, needle: str) -> None:
    body, n = _binary_body(claimed, blob)
    with pytest.raises(InvalidRequestError, match=needle):
        decode_request(body, n)


def test_header_length_outside_body_and_not_a_number() -> None:
    with pytest.raises(InvalidRequestError, match="outside"):
        decode_request(b"{}", 99)
    with pytest.raises(InvalidRequestError, match="integer"):
        parse_header_length({HEADER_LENGTH: "ten"})


@settings(max_examples=60, deadline=None)
@given(
    data=hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.int32, np.int64, np.uint8, np.int8]),
        shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
    ),
    binary=st.booleans(),
)
def test_round_trip_property(data: np.ndarray, binary: bool) -> None:
    req = InferRequest(inputs=[InferTensor.of("t", data)])
    got = _roundtrip_request(req, binary).inputs[0].data
    np.testing.assert_array_equal(got, data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.one_of(st.none(), st.integers(-5, 250)))
def test_garbage_never_raises_anything_but_invalid_request(body: bytes, n: int | None) -> None:
    with contextlib.suppress(InvalidRequestError):
        decode_request(body, n)


def _tensor_body(shape: object, data: object, datatype: str = "FP32") -> bytes:
    doc = {"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]}
    return json.dumps(doc).encode()


def _deep(depth: int, leaf: bytes = b"0") -> bytes:
    return b"[" * depth + leaf + b"]" * depth


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (_tensor_body([1] * 33, [0]), "33 dimensions"),  # NumPy's ValueError, once
        (_tensor_body([0] * 33, []), "33 dimensions"),
        (_tensor_body([0, 2**62], []), "too large"),  # no data, yet NumPy refuses the shape
        (_tensor_body([2**62, 2**62], [0]), "too large"),
        # deeper than orjson reads, then than the standard library can recurse
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": '
            + _deep(2000)
            + b"}]}",
            "nested too deeply",
        ),
        (b'{"inputs": ' + _deep(100_000, b"") + b"}", "nested too deeply"),
        # an unpaired surrogate escape: no encoder could write it back (an echoed id)
        (
            b'{"id": "\\ud800", "inputs": [{"name": "x", "shape": [1], "datatype": "FP32",'
            b' "data": [NaN]}]}',
            "surrogate",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["\\udc00"]}]}',
            "surrogate",
        ),
        (_tensor_body([1], [1e300], "FP16"), "out of range"),
        (_tensor_body([1], [70000], "FP16"), "out of range"),
    ],
)
def test_client_mistakes_numpy_and_json_refuse_are_invalid_requests(
    body: bytes, needle: str
) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        decode_request(body)


@pytest.mark.parametrize("datatype", ["FP32", "BYTES"])
def test_binary_shape_of_more_than_32_dimensions(datatype: str) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1] * 33,
                    "datatype": datatype,
                    "parameters": {"binary_data_size": 5 if datatype == "BYTES" else 4},
                }
            ]
        }
    ).encode()
    blob = b"\x01\0\0\0a" if datatype == "BYTES" else b"\0" * 4
    with pytest.raises(InvalidRequestError, match="33 dimensions"):
        decode_request(header + blob, len(header))


def test_bytes_data_nested_a_thousand_deep_is_read() -> None:
    # within orjson's nesting limit: flattened without recursion, shaped as declared
    body = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": '
    got = decode_request(body + _deep(1000, b'"deep"') + b"}]}")
    assert list(got.inputs[0].data) == [b"deep"]


def test_huge_bytes_count_is_refused_before_any_allocation() -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2**40],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    ).encode()
    with pytest.raises(InvalidRequestError, match="truncated"):
        decode_request(header + b"\0" * 8, len(header))


def test_bytes_serialisation_size_without_building_it() -> None:
    from shared.oip.codec import bytes_tensor_size, serialize_bytes_tensor

    values = np.array([b"", b"a", "ünï", 7, b"x" * 300], dtype=object).reshape(5, 1)
    wire = serialize_bytes_tensor(values)
    assert isinstance(wire, bytes) and bytes_tensor_size(values) == len(wire)
    assert wire[:9] == b"\0\0\0\0\x01\0\0\0a"
    assert wire[9:13] == len("ünï".encode()).to_bytes(4, "little")
    back = decode_request(*_binary_bytes_body(wire, [5, 1]))
    assert list(back.inputs[0].data.ravel()) == [b"", b"a", "ünï".encode(), b"7", b"x" * 300]


def _binary_bytes_body(wire: bytes, shape: list[int]) -> tuple[bytes, int]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "s",
                    "shape": shape,
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(wire)},
                }
            ]
        }
    ).encode()
    return header + wire, len(header)


def test_the_header_cache_never_answers_for_another_body() -> None:
    """Binary requests that repeat a header are decoded from it as remembered
    (``codec._HEADERS``). What that must never do: answer with an earlier body's tensors,
    take a body of another size, let a caller's change to one request reach the next, or
    read a tensor whose data is in the header from the binary part."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    request = InferRequest(
        inputs=[InferTensor.of("x", x, unit="cm")],
        outputs=[RequestedOutput("y", binary_data=True)],
        parameters={"mode": "auto"},
    )
    body, headers = encode_request(request)
    n = int(headers[HEADER_LENGTH])
    decode_request(body, n)
    for k in range(1, 4):  # from the cache, a bytes body or a bytearray (a large one)
        again = body[:n] + (x + k).tobytes()
        got = decode_request(again if k % 2 else bytearray(again), n)
        np.testing.assert_array_equal(got.inputs[0].data, x + k)
        assert got.parameters == {"mode": "auto"} and got.inputs[0].parameters == {"unit": "cm"}
        assert got.outputs == [RequestedOutput("y", binary_data=True)]
        got.parameters["mode"] = "changed"  # what a caller does to its request stays there
        got.inputs[0].parameters["unit"] = "m"
        got.outputs.append(RequestedOutput("z"))
    with pytest.raises(InvalidRequestError, match="exceeds the body"):
        decode_request(body[:-4], n)
    with pytest.raises(InvalidRequestError, match="no tensor claims"):
        decode_request(body + bytes(4), n)
    # one tensor in binary, one as JSON data in the header: the binary part is the first's
    # alone, whichever time the header comes
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2, 3],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 24},
                },
                {"name": "j", "shape": [2], "datatype": "INT32", "data": [1, 2]},
            ]
        }
    ).encode()
    for _ in range(2):
        got = decode_request(header + x.tobytes(), len(header))
        np.testing.assert_array_equal(got.inputs[1].data, [1, 2])
        with pytest.raises(InvalidRequestError, match="no tensor claims"):
            decode_request(header + x.tobytes() + bytes(8), len(header))


# a JSON value of any kind, nested a little
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=12,
)
_SHAPES = st.one_of(
    st.lists(st.integers(0, 2), max_size=40),  # right but for the number of dimensions
    st.lists(st.sampled_from([0, 1, 2**31, 2**62, 2**63 - 1]), max_size=4),  # huge products
    st.lists(st.one_of(st.integers(-2, 3), st.booleans(), st.floats(0, 3)), max_size=3),
    _JSON,
)


@st.composite
def _tensors(draw: st.DrawFn, blobs: list[bytes]) -> dict[str, object]:
    """A tensor document that is right more often than not: its data (JSON, or binary
    appended to ``blobs``) matches its shape's count, so decoding gets past the first checks."""
    datatype = draw(st.sampled_from([*NUMERIC, "BYTES", "FP99"]))
    shape = draw(_SHAPES)
    count = 1
    if isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape):
        count = math.prod(shape)
    count = count if count <= 8 else draw(st.integers(0, 8))
    doc: dict[str, object] = {"name": draw(st.sampled_from(["x", "y", "", 7])), "shape": shape}
    doc["datatype"] = draw(st.one_of(st.just(datatype), _JSON))
    how = draw(st.sampled_from(["json", "binary", "garbage"]))
    if how == "json":
        leaf = st.text(max_size=3) if datatype == "BYTES" else st.integers(-300, 300)
        data = draw(st.lists(leaf | st.floats(), min_size=count, max_size=count))
        for _ in range(draw(st.integers(0, 3))):
            data = [data]
        doc["data"] = data
    elif how == "binary":
        if datatype == "BYTES":
            blob = b"".join(len(e).to_bytes(4, "little") + e for e in [b"ab"] * count)
        else:
            blob = b"\0" * (count * (np.dtype(np.float64).itemsize if datatype == "FP99" else 4))
        blob = blob[: draw(st.integers(0, len(blob)))] if draw(st.booleans()) else blob
        blobs.append(blob)
        doc["parameters"] = {"binary_data_size": len(blob)}
    else:
        doc["data"] = draw(_JSON)
        if draw(st.booleans()):
            doc["parameters"] = draw(st.dictionaries(st.text(max_size=3), _JSON, max_size=2))
    return doc


@st.composite
def _bodies(draw: st.DrawFn) -> tuple[bytes, int | None]:
    blobs: list[bytes] = []
    doc: dict[str, object] = {
        "inputs": draw(st.lists(_tensors(blobs), min_size=1, max_size=3) | _JSON)
    }
    for key in ("id", "parameters", "outputs"):
        if draw(st.booleans()):
            doc[key] = draw(_JSON | st.lists(st.fixed_dictionaries({"name": _JSON}), max_size=2))
    header = json.dumps(doc).encode()
    depth = draw(st.sampled_from([0, 0, 0, 40, 1100, 5000]))  # nesting orjson, then json refuse
    if depth:
        header = header.replace(b'"inputs": ', b'"inputs": ' + b"[" * depth, 1)
        header = header[:-1] + b"]" * depth + b"}"
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(body=_bodies())
def test_structured_garbage_is_a_400_or_a_request_that_encodes_back(
    body: tuple[bytes, int | None],
) -> None:
    """Documents of the right outline with wrong parts anywhere (what a byte-level fuzz never
    reaches): decoding raises only ``InvalidRequestError``, and what decodes can be encoded
    again, as a request and as a response."""
    try:
        request = decode_request(*body)
    except InvalidRequestError:
        return
    encode_request(request, binary_inputs=body[1] is not None)
    encode_response(InferResponse("m", request.inputs, "1", request.id))
