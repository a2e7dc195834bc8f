"""The one OIP codec: round trips in JSON and binary, and a clear 400 for every malformed body."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared.errors import InvalidRequestError
from shared.oip import HEADER_LENGTH, InferRequest, InferResponse, InferTensor, RequestedOutput
from shared.oip_codec import (
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    parse_header_length,
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
    from shared.oip import numpy_dtype

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
    for value in (1.0, 2.0):  # the second is encoded from the remembered header
        out = InferTensor.of("p", np.full((1, 3), value, np.float32))
        body, headers = encode_response(InferResponse("cached", [out], "1"), req)
        back = decode_response(body, int(headers[HEADER_LENGTH]))
        np.testing.assert_array_equal(back.output("p").data, out.data)
    # same model, name and shape, but a tensor parameter: never answered from that header
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
