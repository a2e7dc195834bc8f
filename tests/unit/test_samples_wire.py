"""The sample upload's wire format (shared/samples.py): round trips, and every hostile body
``decode_upload`` must refuse with a 4xx error rather than crash, allocate or accept."""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import io
import json
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from shared.errors import InvalidRequestError, PayloadTooLargeError, TandemError
from shared.samples import (
    CONTENT_TYPE,
    HEADER_LENGTH,
    Answer,
    SampleMeta,
    UploadHeader,
    UploadResult,
    check_device_token,
    decode_features,
    decode_upload,
    device_token,
    encode_features,
    encode_upload,
    sample_id,
)

LIMITS: dict[str, int] = {"max_samples": 16, "max_sample_bytes": 4096, "max_header_bytes": 65536}
TS = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def feature_meta(x: np.ndarray, **overrides: Any) -> tuple[SampleMeta, bytes]:
    encoding, shape, payload = encode_features(x)
    fields: dict[str, Any] = {
        "id": sample_id(payload),
        "kind": "escalation",
        "model": "digits",
        "version": 3,
        "ts": TS,
        "encoding": encoding,
        "shape": shape,
        "size": len(payload),
        "edge": Answer(index=1, confidence=0.4),
        "cloud": Answer(index=7, confidence=0.99, probs=[0.1] * 10),
        "cloud_model": "digits-cloud",
        "threshold": 0.7,
    }
    fields.update(overrides)
    return SampleMeta(**fields), payload


def png_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("L", (4, 4), 128).save(out, format="PNG")
    return out.getvalue()


def image_meta(payload: bytes, media_type: str = "image/png") -> tuple[SampleMeta, bytes]:
    meta = SampleMeta(
        id=sample_id(payload),
        kind="audit",
        model="cats",
        version=1,
        ts=TS,
        encoding="encoded",
        media_type=media_type,  # type: ignore[arg-type]
        size=len(payload),
        edge=Answer(index=0, confidence=0.95),
    )
    return meta, payload


def raw_body(header: bytes | str, payloads: list[bytes]) -> tuple[dict[str, str], bytes]:
    doc = header.encode() if isinstance(header, str) else header
    return {HEADER_LENGTH: str(len(doc))}, doc + b"".join(payloads)


def header_doc(items: list[tuple[SampleMeta, bytes]], device: str = "dev-1") -> dict[str, Any]:
    """The header in its full form: every sample a complete ``SampleMeta``, no defaults."""
    return {"device": device, "samples": [json.loads(m.model_dump_json()) for m, _ in items]}


# --- features ---------------------------------------------------------------------------


def test_small_integer_features_go_as_one_byte_each() -> None:
    x = np.arange(64, dtype=np.float64) % 17  # the digits' 0..16
    encoding, shape, payload = encode_features(x)
    assert (encoding, shape, len(payload)) == ("uint8", [64], 64)
    meta, _ = feature_meta(x)
    back = decode_features(meta, payload)
    assert back.dtype == np.float32 and np.array_equal(back, x)


def test_other_features_go_as_little_endian_float32() -> None:
    x = np.array([[0.5, -1.0], [300.0, 2.0]])
    encoding, shape, payload = encode_features(x)
    assert (encoding, shape, len(payload)) == ("float32", [2, 2], 16)
    assert payload[:4] == b"\x00\x00\x00\x3f"  # 0.5, little-endian
    meta, _ = feature_meta(x)
    assert np.array_equal(decode_features(meta, payload), x.astype(np.float32))


def test_non_finite_features_are_not_taken_for_integers() -> None:
    encoding, _, _ = encode_features(np.array([1.0, np.nan, 3.0]))
    assert encoding == "float32"


def test_decode_features_checks_the_size() -> None:
    meta, payload = feature_meta(np.arange(8, dtype=np.uint8))
    with pytest.raises(InvalidRequestError):
        decode_features(meta, payload[:-1])
    image, data = image_meta(png_bytes())
    with pytest.raises(InvalidRequestError, match="encoded image"):
        decode_features(image, data)


# --- models -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"size": 63},  # shape says 64
        {"shape": []},
        {"shape": [0, 64]},
        {"shape": [1] * 9},
        {"media_type": "image/png"},
        {"model": "../etc"},
        {"id": "A" * 64},
        {"threshold": float("nan")},
        {"edge": {"index": 1, "confidence": float("inf")}},
        {"edge": {"index": 1, "confidence": 0.5, "probs": [0.1] * 2000}},
        {"kind": "mine"},
    ],
)
def test_sample_meta_refuses_inconsistent_fields(overrides: dict[str, Any]) -> None:
    meta, _ = feature_meta(np.arange(64, dtype=np.uint8) % 17)
    fields = meta.model_dump() | overrides
    with pytest.raises(ValidationError):
        SampleMeta(**fields)


def test_encoded_samples_need_a_media_type_and_no_shape() -> None:
    meta, _ = image_meta(png_bytes())
    with pytest.raises(ValidationError):
        SampleMeta(**(meta.model_dump() | {"media_type": None}))
    with pytest.raises(ValidationError):
        SampleMeta(**(meta.model_dump() | {"shape": [4, 4]}))


def test_upload_result_and_header_forbid_extras() -> None:
    assert UploadResult(stored=1, duplicates=2).model_dump() == {"stored": 1, "duplicates": 2}
    with pytest.raises(ValidationError):
        UploadHeader.model_validate({"device": "d", "samples": [], "extra": 1})
    with pytest.raises(ValidationError):
        UploadHeader.model_validate({"device": "a/b", "samples": []})


# --- round trips ------------------------------------------------------------------------


def test_upload_round_trip_with_gzip() -> None:
    items = [feature_meta(np.full(64, i % 17)) for i in range(5)] + [image_meta(png_bytes())]
    headers, body = encode_upload("dev-1", items, token="tok")
    assert headers["Content-Type"] == CONTENT_TYPE
    assert headers["Content-Encoding"] == "gzip" and headers["Authorization"] == "Bearer tok"
    assert headers["Tandem-Device"] == "dev-1"
    device, decoded = decode_upload(headers, gzip.decompress(body), **LIMITS)
    assert device == "dev-1"
    assert decoded == items


def test_upload_round_trip_without_gzip_and_header_case() -> None:
    items = [feature_meta(np.arange(64, dtype=np.uint8))]
    headers, body = encode_upload("dev-1", items, gzip=False)
    assert "Content-Encoding" not in headers
    lowered = {k.lower(): v for k, v in headers.items()}
    assert decode_upload(lowered, body, **LIMITS) == ("dev-1", items)


def test_an_empty_upload_is_valid() -> None:
    headers, body = encode_upload("dev-1", [], gzip=False)
    assert decode_upload(headers, body, **LIMITS) == ("dev-1", [])


def test_encode_upload_checks_payload_sizes() -> None:
    meta, payload = feature_meta(np.arange(64, dtype=np.uint8))
    with pytest.raises(InvalidRequestError):
        encode_upload("dev-1", [(meta, payload[:10])])


# --- the batch's defaults ---------------------------------------------------------------


def wire_doc(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(body[: int(headers[HEADER_LENGTH])])
    return doc


def test_shared_fields_go_once_in_the_defaults_and_ids_stay_home() -> None:
    items = [
        feature_meta(np.full(64, i % 17), cloud=Answer(index=7, confidence=0.9)) for i in range(4)
    ]
    headers, body = encode_upload("dev-1", items, gzip=False)
    doc = wire_doc(headers, body)
    assert doc["defaults"] == {
        "kind": "escalation",
        "model": "digits",
        "version": 3,
        "encoding": "uint8",
        "shape": [64],
        "size": 64,
        "cloud_model": "digits-cloud",
        "threshold": 0.7,
    }
    for sample in doc["samples"]:
        assert set(sample) == {"ts", "edge", "cloud"}
        assert "probs" not in sample["edge"]
    assert decode_upload(headers, body, **LIMITS) == ("dev-1", items)


def test_samples_that_differ_override_the_defaults() -> None:
    items = [
        feature_meta(np.full(64, 1)),
        feature_meta(np.full(64, 2)),
        feature_meta(np.full(64, 3), kind="audit", version=4, threshold=0.8),
        feature_meta(np.full(64, 4), cloud_model=None, threshold=None, cloud=None),
        feature_meta(np.arange(32, dtype=np.uint8)),
        image_meta(png_bytes()),
    ]
    headers, body = encode_upload("dev-1", items, gzip=False)
    doc = wire_doc(headers, body)
    assert doc["samples"][2]["kind"] == "audit" and doc["samples"][2]["version"] == 4
    assert doc["samples"][3]["cloud_model"] is None  # an explicit null beats the default
    assert doc["samples"][4]["shape"] == [32] and doc["samples"][4]["size"] == 32
    assert doc["samples"][5]["encoding"] == "encoded" and doc["samples"][5]["shape"] == []
    assert decode_upload(headers, body, **LIMITS) == ("dev-1", items)
    # the ids on request: checked, and the same samples come out
    headers, body = encode_upload("dev-1", items, gzip=False, ids=True)
    assert [s["id"] for s in wire_doc(headers, body)["samples"]] == [m.id for m, _ in items]
    assert decode_upload(headers, body, **LIMITS) == ("dev-1", items)


def test_a_digits_sample_costs_little_more_than_its_payload() -> None:
    """64 escalations of the digits with different answers and times: the gzip body per
    sample, payload (64 B) included: 59 B (108 B with ids and every field in each sample)."""
    rng = np.random.default_rng(1)
    items = [
        feature_meta(
            rng.integers(0, 17, 64),
            ts=datetime.fromtimestamp(TS.timestamp() + 1.234 * i, timezone.utc),
            edge=Answer(index=int(rng.integers(10)), confidence=round(float(rng.random()), 4)),
            cloud=Answer(index=int(rng.integers(10)), confidence=round(float(rng.random()), 4)),
        )
        for i in range(64)
    ]
    headers, body = encode_upload("dev-1", items)
    assert len(body) / 64 < 80
    assert (
        decode_upload(headers, gzip.decompress(body), **(LIMITS | {"max_samples": 64}))[1] == items
    )


def defaults_body(
    defaults: dict[str, Any], samples: list[dict[str, Any]], payloads: list[bytes]
) -> tuple[dict[str, str], bytes]:
    return raw_body(
        json.dumps({"device": "dev-1", "defaults": defaults, "samples": samples}), payloads
    )


DEFAULTS: dict[str, Any] = {
    "kind": "escalation",
    "model": "digits",
    "version": 3,
    "encoding": "uint8",
    "shape": [64],
    "size": 64,
}
SAMPLE: dict[str, Any] = {"ts": "2026-12-01T12:00:00Z", "edge": {"index": 1, "confidence": 0.4}}


@pytest.mark.parametrize(
    ("defaults", "sample"),
    [
        (DEFAULTS | {"size": -1}, SAMPLE),
        (DEFAULTS | {"version": "three"}, SAMPLE),
        (DEFAULTS | {"model": "../etc"}, SAMPLE),
        (DEFAULTS | {"threshold": 2.0}, SAMPLE),
        (DEFAULTS | {"admin": True}, SAMPLE),  # extra field in the defaults
        (DEFAULTS | {"ts": "2026-12-01T12:00:00Z"}, SAMPLE),  # not a shared field
        (DEFAULTS | {"media_type": "image/png"}, SAMPLE),  # a uint8 sample has none
        (DEFAULTS | {"shape": [32]}, SAMPLE),  # 32 bytes, size says 64
        ({k: v for k, v in DEFAULTS.items() if k != "model"}, SAMPLE),  # no model at all
        (DEFAULTS, {"edge": SAMPLE["edge"]}),  # no ts
        (DEFAULTS, SAMPLE | {"size": None}),  # a null override of a required field
        (DEFAULTS, SAMPLE | {"shape": [8, 8], "encoding": "float32"}),  # 256 bytes
        (DEFAULTS, SAMPLE | {"id": "not hex"}),
        ("not an object", SAMPLE),
    ],
)
def test_defaults_and_overrides_are_checked_as_a_whole(
    defaults: Any, sample: dict[str, Any]
) -> None:
    payload = bytes(range(64))
    headers, body = defaults_body(defaults, [sample], [payload])
    exc = refused(headers, body)
    assert isinstance(exc, InvalidRequestError) and len(exc.message) < 1000


def test_defaults_form_is_decoded() -> None:
    payload = bytes(range(64))
    headers, body = defaults_body(
        DEFAULTS, [SAMPLE, SAMPLE | {"kind": "audit"}], [payload, payload]
    )
    _, items = decode_upload(headers, body, **LIMITS)
    assert [m.kind for m, _ in items] == ["escalation", "audit"]
    assert {m.id for m, _ in items} == {sample_id(payload)}


def test_a_wrong_id_is_refused_in_the_defaults_form_too() -> None:
    payload = bytes(range(64))
    wrong = hashlib.sha256(b"other").hexdigest()
    headers, body = defaults_body(DEFAULTS, [SAMPLE | {"id": wrong}], [payload])
    exc = refused(headers, body)
    assert "hash" in exc.message


def test_a_huge_size_in_the_defaults_is_413_before_any_slicing() -> None:
    headers, body = defaults_body(
        DEFAULTS | {"size": 10**15, "shape": [10**15]}, [SAMPLE], [bytes(64)]
    )
    assert isinstance(refused(headers, body), PayloadTooLargeError)


# --- hostile bodies ---------------------------------------------------------------------


def good() -> tuple[list[tuple[SampleMeta, bytes]], dict[str, str], bytes]:
    items = [feature_meta(np.full(64, i % 17)) for i in range(3)]
    headers, body = encode_upload("dev-1", items, gzip=False)
    return items, headers, body


def refused(headers: dict[str, str], body: bytes, **limits: int) -> TandemError:
    with pytest.raises(TandemError) as info:
        decode_upload(headers, body, **(LIMITS | limits))
    assert 400 <= info.value.http_status < 500
    return info.value


def test_missing_header_length() -> None:
    _, headers, body = good()
    del headers[HEADER_LENGTH]
    assert isinstance(refused(headers, body), InvalidRequestError)


@pytest.mark.parametrize("value", ["", "abc", "-5", "1e3", "0x10", " 12 3", "9" * 40, "٣"])
def test_header_length_not_a_non_negative_integer(value: str) -> None:
    _, headers, body = good()
    headers[HEADER_LENGTH] = value
    assert isinstance(refused(headers, body), InvalidRequestError)


def test_header_length_larger_than_the_body() -> None:
    _, headers, body = good()
    headers[HEADER_LENGTH] = str(len(body) + 1)
    assert isinstance(refused(headers, body), InvalidRequestError)


def test_header_length_zero() -> None:
    _, headers, body = good()
    headers[HEADER_LENGTH] = "0"
    assert isinstance(refused(headers, body), InvalidRequestError)


def test_header_over_its_limit_is_413_before_parsing() -> None:
    _, headers, body = good()
    exc = refused(headers, body, max_header_bytes=int(headers[HEADER_LENGTH]) - 1)
    assert isinstance(exc, PayloadTooLargeError)


@pytest.mark.parametrize("cut", [1, 64, 100])
def test_truncated_body(cut: int) -> None:
    _, headers, body = good()
    assert isinstance(refused(headers, body[:-cut]), InvalidRequestError)


def test_body_longer_than_its_samples() -> None:
    _, headers, body = good()
    assert isinstance(refused(headers, body + b"\x00"), InvalidRequestError)


def test_header_length_pointing_into_the_header() -> None:
    _, headers, body = good()
    headers[HEADER_LENGTH] = str(int(headers[HEADER_LENGTH]) - 5)
    assert isinstance(refused(headers, body), InvalidRequestError)


@pytest.mark.parametrize(
    "doc",
    [
        b"\xff\xfe\x00garbage",  # not UTF-8
        b'{"device": "dev-1", "samples": [',  # not JSON
        b"[" * 200_000,  # deeply nested
        b'{"device": "dev-1", "samples": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"device": "dev-1", "samples": {"a": 1}}',  # wrong type
        b'{"device": 5, "samples": []}',
        b'{"device": "dev-1"}',
        b"null",
        b'"a string"',
        b'{"device": "dev-1", "samples": [], "admin": true}',
    ],
)
def test_header_that_is_not_an_upload_header(doc: bytes) -> None:
    headers, body = raw_body(doc, [])
    exc = refused(headers, body, max_header_bytes=len(doc))
    assert isinstance(exc, InvalidRequestError)
    assert len(exc.message) < 1000


def test_wrong_field_types_inside_a_sample() -> None:
    items, _, _ = good()
    doc = header_doc(items)
    doc["samples"][0]["shape"] = "64"
    doc["samples"][1]["size"] = -64
    headers, body = raw_body(json.dumps(doc), [p for _, p in items])
    assert isinstance(refused(headers, body), InvalidRequestError)


def test_size_that_does_not_match_the_shape() -> None:
    items, _, _ = good()
    doc = header_doc(items)
    doc["samples"][0]["shape"] = [32]
    headers, body = raw_body(json.dumps(doc), [p for _, p in items])
    assert isinstance(refused(headers, body), InvalidRequestError)


def test_sizes_shifted_between_samples() -> None:
    """The sizes still add up to the body, but each payload is cut at the wrong place: the
    ids no longer match."""
    a = feature_meta(np.arange(64, dtype=np.uint8))
    b = feature_meta(np.arange(32, dtype=np.uint8))
    doc = header_doc([a, b])
    doc["samples"][0]["size"], doc["samples"][0]["shape"] = 32, [32]
    doc["samples"][1]["size"], doc["samples"][1]["shape"] = 64, [64]
    headers, body = raw_body(json.dumps(doc), [a[1], b[1]])
    assert isinstance(refused(headers, body), InvalidRequestError)


def test_encoding_changed_after_hashing() -> None:
    items, _, _ = good()
    doc = header_doc(items[:1])
    doc["samples"][0]["encoding"], doc["samples"][0]["shape"] = "float32", [16]
    headers, body = raw_body(json.dumps(doc), [items[0][1]])
    # the shape/size check passes (16 x 4 = 64): what stops it is nothing but the format;
    # decoded as float32 it would be garbage, but it is the device's garbage, and its id
    # is still the payload's hash: accepted, and decodes to 16 numbers, not a crash
    _, decoded = decode_upload(headers, body, **LIMITS)
    assert decode_features(decoded[0][0], decoded[0][1]).shape == (16,)


def test_id_that_is_not_the_payloads_hash() -> None:
    items, _, _ = good()
    doc = header_doc(items)
    doc["samples"][2]["id"] = hashlib.sha256(b"something else").hexdigest()
    headers, body = raw_body(json.dumps(doc), [p for _, p in items])
    exc = refused(headers, body)
    assert isinstance(exc, InvalidRequestError) and "hash" in exc.message


def test_too_many_samples_is_413() -> None:
    items = [feature_meta(np.full(8, i, dtype=np.uint8)) for i in range(5)]
    headers, body = encode_upload("dev-1", items, gzip=False)
    assert isinstance(refused(headers, body, max_samples=4), PayloadTooLargeError)


def test_too_many_samples_for_the_format_is_refused_in_parsing() -> None:
    meta, payload = feature_meta(np.arange(8, dtype=np.uint8))
    sample = json.loads(meta.model_dump_json())
    doc = json.dumps({"device": "dev-1", "samples": [sample] * 5000})
    headers, body = raw_body(doc, [payload] * 5000)
    exc = refused(headers, body, max_samples=10_000, max_header_bytes=len(doc))
    assert isinstance(exc, InvalidRequestError)


def test_sample_over_its_size_limit_is_413() -> None:
    _, headers, body = good()
    assert isinstance(refused(headers, body, max_sample_bytes=63), PayloadTooLargeError)


def test_huge_claimed_sizes_allocate_nothing() -> None:
    """A size of 10**15 with a shape to match: refused by the limits before any slicing."""
    items, _, _ = good()
    doc = header_doc(items[:1])
    doc["samples"][0]["size"], doc["samples"][0]["shape"] = 10**15, [10**15]
    headers, body = raw_body(json.dumps(doc), [items[0][1]])
    assert isinstance(refused(headers, body), PayloadTooLargeError)
    exc = refused(headers, body, max_sample_bytes=10**16)
    assert isinstance(exc, InvalidRequestError)


def test_image_whose_bytes_are_not_its_media_type() -> None:
    png = png_bytes()
    meta, payload = image_meta(png, media_type="image/jpeg")
    headers, body = encode_upload("dev-1", [(meta, payload)], gzip=False)
    exc = refused(headers, body)
    assert "image/jpeg" in exc.message
    pickled = b"\x80\x04\x95" + b"\x00" * 20  # a pickle's opening bytes, claimed to be a PNG
    meta, payload = image_meta(pickled, media_type="image/png")
    headers, body = encode_upload("dev-1", [(meta, payload)], gzip=False)
    refused(headers, body)


def test_a_real_png_is_accepted() -> None:
    item = image_meta(png_bytes())
    headers, body = encode_upload("dev-1", [item], gzip=False)
    assert decode_upload(headers, body, **LIMITS)[1] == [item]


# --- device tokens ----------------------------------------------------------------------


def test_device_token_is_the_documented_hmac() -> None:
    mac = hmac.new(b"s3cret", b"tandem-device:fleet-a:dev-1", hashlib.sha256).digest()
    expected = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    assert device_token("s3cret", "fleet-a", "dev-1") == expected
    assert "=" not in expected and len(expected) == 43


def test_device_token_is_bound_to_fleet_device_and_secret() -> None:
    token = device_token("s3cret", "fleet-a", "dev-1")
    assert check_device_token("s3cret", "fleet-a", "dev-1", token)
    assert not check_device_token("s3cret", "fleet-a", "dev-2", token)
    assert not check_device_token("s3cret", "fleet-b", "dev-1", token)
    assert not check_device_token("other", "fleet-a", "dev-1", token)
    assert not check_device_token("s3cret", "fleet-a", "dev-1", token[:-1])
    assert not check_device_token("s3cret", "fleet-a", "dev-1", "\udcff" + token)
