"""The learning loop's upload: field samples a device sends to ``POST /fleet/samples``.

One request carries a batch. Its headers::

    Authorization: Bearer <device token>          (``device_token``)
    Tandem-Device: <device id>
    Content-Type: application/vnd.tandem.samples
    Tandem-Header-Length: <N>
    Content-Encoding: gzip                        (optional, the whole body)

and its body (after gzip is undone, which is the HTTP layer's business) is N bytes of JSON
``UploadHeader{device, defaults, samples: [WireSample, ...]}`` followed by each sample's
payload, concatenated in order, ``size`` bytes each. A payload is a flat model's feature row
(``uint8`` when every value is an integer in 0..255, the digits' 0..16 taking 64 bytes a
sample, else little-endian ``float32``) or an image model's input as the caller's own
JPEG/PNG bytes. A sample's ``id`` is the sha256 of its payload: the server's dedup key, so
an upload retried after a lost answer stores nothing twice.

The header is small because a digits sample is (64 bytes): what every sample of a batch has
in common (``SHARED_FIELDS``: the model and version, the cloud model, the threshold, the
encoding, shape and size...) is said once in ``defaults`` (``BatchDefaults``), and a sample
(``WireSample``) carries only what differs: its ``ts``, both answers, and any shared field
whose value is not the default (a per-sample override; an explicit ``null`` overrides a
default with nothing). The ``id`` may be left out (``encode_upload`` does, by default: 64
hex characters a sample that gzip cannot shrink, and the server hashes every payload
anyway); when it is present it must be the payload's hash, or the upload is refused.
``decode_upload`` resolves each sample to a complete ``SampleMeta`` (the device's own,
in-memory and spool form), with its id computed. An upload without ``defaults`` whose
samples are complete ``SampleMeta`` documents (the first form of this format) is the same
thing, and accepted.

Everything here comes from a device the server does not trust: ``decode_upload`` bounds
each size before it is used, and the server reads a payload with ``np.frombuffer`` only
(``decode_features``); nothing is executed or unpickled, and an encoded image is kept as
bytes whose magic bytes must say the media type it claims.
"""

from __future__ import annotations

import base64
import gzip as gzip_module
import hashlib
import hmac
import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.errors import InvalidRequestError, PayloadTooLargeError
from shared.identifiers import Identifier
from shared.images import FORMATS

__all__ = [
    "CONTENT_TYPE",
    "DEVICE_HEADER",
    "HEADER_LENGTH",
    "MAX_CLASSES",
    "MAX_HEADER_BYTES",
    "MAX_SAMPLES",
    "SHARED_FIELDS",
    "Answer",
    "BatchDefaults",
    "Encoding",
    "SampleKind",
    "SampleMeta",
    "UploadHeader",
    "UploadResult",
    "WireSample",
    "check_device_token",
    "decode_features",
    "decode_upload",
    "device_token",
    "encode_features",
    "encode_upload",
    "sample_id",
]

CONTENT_TYPE = "application/vnd.tandem.samples"
HEADER_LENGTH = "Tandem-Header-Length"
DEVICE_HEADER = "Tandem-Device"
#: Hard bounds of the format, whatever a server's settings (which are usually lower).
MAX_SAMPLES = 4096
MAX_CLASSES = 1024
MAX_DIMS = 8
#: The default bound of the JSON header (a server may pass its own to ``decode_upload``).
MAX_HEADER_BYTES = 256 * 1024

SampleKind = Literal["escalation", "audit"]
Encoding = Literal["uint8", "float32", "encoded"]
MediaType = Literal["image/jpeg", "image/png"]

_ITEMSIZE: dict[str, int] = {"uint8": 1, "float32": 4}
_DTYPE: dict[str, str] = {"uint8": "u1", "float32": "<f4"}
_MAGIC: dict[str, bytes] = {"image/jpeg": FORMATS["JPEG"], "image/png": FORMATS["PNG"]}
_SHA256_HEX = r"^[0-9a-f]{64}$"


def is_sample_id(text: str) -> bool:
    """Whether ``text`` has the form of a sample id (64 lowercase hex digits)."""
    return re.fullmatch(_SHA256_HEX[1:-1], text) is not None


_DIGITS = re.compile(r"^[0-9]{1,12}$")


class _Msg(BaseModel):
    # allow_inf_nan: a NaN confidence or threshold would poison every sum it enters
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Answer(_Msg):
    """One model's top-1 answer, and optionally its whole probability vector."""

    index: int = Field(ge=0, lt=MAX_CLASSES)
    confidence: float = Field(ge=0.0, le=1.0)
    probs: list[float] | None = Field(default=None, max_length=MAX_CLASSES)


class _Described(_Msg):
    """A sample as described, all but its id (which is its payload's hash)."""

    kind: SampleKind
    model: Identifier
    version: int = Field(ge=0)
    ts: datetime
    encoding: Encoding
    shape: list[int] = Field(default_factory=list, max_length=MAX_DIMS)
    media_type: MediaType | None = None
    size: int = Field(ge=1)
    edge: Answer
    cloud: Answer | None = None
    cloud_model: str | None = Field(default=None, min_length=1, max_length=128)
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> _Described:
        if any(d < 1 for d in self.shape):
            raise ValueError(f"shape {self.shape} has a dimension below 1")
        if self.encoding == "encoded":
            if self.media_type is None:
                raise ValueError("an encoded sample needs its media_type")
            if self.shape:
                raise ValueError("an encoded sample has no shape")
        else:
            if self.media_type is not None:
                raise ValueError(f"a {self.encoding} sample has no media_type")
            if not self.shape:
                raise ValueError(f"a {self.encoding} sample needs its shape")
            expected = math.prod(self.shape) * _ITEMSIZE[self.encoding]
            if expected != self.size:
                raise ValueError(
                    f"shape {self.shape} of {self.encoding} is {expected} bytes, "
                    f"not size {self.size}"
                )
        return self


class SampleMeta(_Described):
    """What the device knows of one sample: where it came from (``kind``: an escalation, or
    an audit of a confident answer), the serving model's answer and the cloud's, and how
    its payload is encoded. ``shape`` is the feature row's (empty for an encoded image).
    Complete and with its ``id``: the device's spool form and what ``decode_upload``
    returns; on the wire it is a ``WireSample`` under the batch's ``BatchDefaults``."""

    id: str = Field(pattern=_SHA256_HEX, description="sha256 hex of the payload")


#: The fields a batch's samples may share, said once in the header's ``defaults``.
SHARED_FIELDS: tuple[str, ...] = (
    "kind",
    "model",
    "version",
    "encoding",
    "shape",
    "media_type",
    "size",
    "cloud_model",
    "threshold",
)


class BatchDefaults(_Msg):
    """The value of each shared field for every sample of the batch that does not set it."""

    kind: SampleKind | None = None
    model: Identifier | None = None
    version: int | None = Field(default=None, ge=0)
    encoding: Encoding | None = None
    shape: list[int] | None = Field(default=None, max_length=MAX_DIMS)
    media_type: MediaType | None = None
    size: int | None = Field(default=None, ge=1)
    cloud_model: str | None = Field(default=None, min_length=1, max_length=128)
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)


class WireSample(BatchDefaults):
    """One sample in an upload's header: its own fields, and overrides of the defaults.
    Checked as a whole (``SampleMeta``'s rules) once the defaults are filled in."""

    id: str | None = Field(
        default=None, pattern=_SHA256_HEX, description="sha256 hex of the payload, optional"
    )
    ts: datetime
    edge: Answer
    cloud: Answer | None = None


class UploadHeader(_Msg):
    """The JSON document that opens an upload's body."""

    device: Identifier
    defaults: BatchDefaults = Field(default_factory=BatchDefaults)
    samples: list[WireSample] = Field(max_length=MAX_SAMPLES)


class UploadResult(_Msg):
    """The server's 200 answer: samples stored, and samples it already had (not stored twice)."""

    stored: int = Field(ge=0)
    duplicates: int = Field(ge=0)


def sample_id(payload: bytes) -> str:
    """A sample's id: the sha256 hex of its payload."""
    return hashlib.sha256(payload).hexdigest()


def encode_features(x: np.ndarray) -> tuple[Encoding, list[int], bytes]:
    """A feature row's encoding, shape and bytes: ``uint8`` when every value is an integer
    in 0..255 (the digits' pixels), else little-endian ``float32``."""
    a = np.asarray(x)
    if a.ndim == 0 or a.size == 0:
        raise InvalidRequestError(f"features of shape {list(a.shape)} cannot be a sample")
    shape = [int(d) for d in a.shape]
    if a.dtype == np.uint8:
        return "uint8", shape, a.tobytes()
    if a.dtype.kind in "biuf":
        with np.errstate(invalid="ignore"):
            small_ints = bool(
                np.all(np.isfinite(a)) and np.all((a >= 0) & (a <= 255) & (a == np.round(a)))
            )
        if small_ints:
            return "uint8", shape, a.astype(np.uint8).tobytes()
        return "float32", shape, a.astype("<f4").tobytes()
    raise InvalidRequestError(f"features of dtype {a.dtype} cannot be a sample")


def decode_features(meta: SampleMeta, payload: bytes) -> np.ndarray:
    """The feature row of a ``uint8``/``float32`` sample, as ``float32`` of its ``shape``
    (``np.frombuffer``: the bytes are numbers, never objects)."""
    if meta.encoding == "encoded":
        raise InvalidRequestError(f"sample {meta.id} is an encoded image, not features")
    expected = math.prod(meta.shape) * _ITEMSIZE[meta.encoding]
    if len(payload) != expected or meta.size != expected:
        raise InvalidRequestError(
            f"sample {meta.id}: {len(payload)} bytes, its shape {meta.shape} "
            f"of {meta.encoding} needs {expected}"
        )
    a = np.frombuffer(payload, dtype=_DTYPE[meta.encoding]).reshape(meta.shape)
    return a.astype(np.float32)


def encode_upload(
    device: str,
    items: Sequence[tuple[SampleMeta, bytes]],
    gzip: bool = True,
    *,
    token: str | None = None,
    ids: bool = False,
) -> tuple[dict[str, str], bytes]:
    """The headers and body of one upload (``token``: the ``Authorization`` header too).
    Each shared field's most common value goes once in ``defaults``, and a sample says only
    where it differs; ``ids``: send each sample's id too (the server recomputes it)."""
    for meta, payload in items:
        if len(payload) != meta.size:
            raise InvalidRequestError(f"sample {meta.id}: {len(payload)} bytes, size {meta.size}")
    doc = _header_json(device, [meta for meta, _ in items], ids)
    body = b"".join([doc, *(payload for _, payload in items)])
    headers = {
        "Content-Type": CONTENT_TYPE,
        DEVICE_HEADER: device,
        HEADER_LENGTH: str(len(doc)),
    }
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if gzip:
        # one gzip stream over the whole body: the JSON of every sample and every payload
        body = gzip_module.compress(body, compresslevel=9, mtime=0)
        headers["Content-Encoding"] = "gzip"
    return headers, body


def _header_json(device: str, metas: Sequence[SampleMeta], ids: bool) -> bytes:
    rows: list[dict[str, Any]] = [m.model_dump(mode="json") for m in metas]
    defaults: dict[str, Any] = {}
    for name in SHARED_FIELDS:
        counts = Counter(json.dumps(r[name]) for r in rows)
        if counts:
            common, _ = counts.most_common(1)[0]
            value = json.loads(common)
            if value is not None:
                defaults[name] = value
    for r in rows:
        if not ids:
            del r["id"]
        for name in SHARED_FIELDS:
            # left out: the default's value, or nothing with no default; else an override
            # (an explicit null included)
            if (r[name] == defaults[name]) if name in defaults else (r[name] is None):
                del r[name]
        for answer in ("edge", "cloud"):
            if r[answer] is None:
                del r[answer]
            elif r[answer].get("probs") is None:
                r[answer].pop("probs", None)
    doc: dict[str, Any] = {"device": device}
    if defaults:
        doc["defaults"] = defaults
    doc["samples"] = rows
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def decode_upload(
    headers: Mapping[str, str],
    body: bytes | bytearray,
    *,
    max_samples: int,
    max_sample_bytes: int,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> tuple[str, list[tuple[SampleMeta, bytes]]]:
    """The device an (already decompressed) upload says it is from, and its samples, each
    resolved against the batch's defaults and given its id (the payload's hash; a sample
    that names another is refused). Malformed: ``InvalidRequestError`` (400); over a bound
    (header, sample count, a sample's size): ``PayloadTooLargeError`` (413), so a client
    can send less."""
    lowered = {k.lower(): v for k, v in headers.items()}
    raw = lowered.get(HEADER_LENGTH.lower())
    if raw is None:
        raise InvalidRequestError(f"the {HEADER_LENGTH} header is missing")
    if not _DIGITS.match(raw.strip()):
        raise InvalidRequestError(f"{HEADER_LENGTH} must be a non-negative integer: {raw[:40]!r}")
    n = int(raw.strip())
    if n > max_header_bytes:
        raise PayloadTooLargeError(
            f"upload header of {n} bytes exceeds the limit of {max_header_bytes}"
        )
    if n == 0 or n > len(body):
        raise InvalidRequestError(f"{HEADER_LENGTH} {n} does not fit a body of {len(body)} bytes")
    header = _parse_header(bytes(body[:n]))
    if len(header.samples) > max_samples:
        raise PayloadTooLargeError(
            f"{len(header.samples)} samples in one upload; at most {max_samples}"
        )
    defaults = header.defaults.model_dump(exclude_unset=True)
    described = [_resolve(i, defaults, s) for i, s in enumerate(header.samples)]
    for i, d in enumerate(described):
        if d.size > max_sample_bytes:
            raise PayloadTooLargeError(
                f"sample {i} of {d.size} bytes exceeds the limit of {max_sample_bytes}"
            )
    total = sum(d.size for d in described)
    if n + total != len(body):
        raise InvalidRequestError(
            f"the samples' sizes add up to {total} bytes, the body holds {len(body) - n} "
            "after its header"
        )
    items: list[tuple[SampleMeta, bytes]] = []
    pos = n
    with memoryview(body) as view:
        for i, (d, wire) in enumerate(zip(described, header.samples)):
            payload = bytes(view[pos : pos + d.size])
            pos += d.size
            meta = SampleMeta(id=sample_id(payload), **dict(d))
            if wire.id is not None and wire.id != meta.id:
                raise InvalidRequestError(f"sample {wire.id}: its payload does not hash to its id")
            _check_payload(i, meta, payload)
            items.append((meta, payload))
    return header.device, items


def _resolve(i: int, defaults: dict[str, Any], sample: WireSample) -> _Described:
    """One sample's complete description: the defaults, then what the sample sets."""
    fields = defaults | sample.model_dump(exclude_unset=True, exclude={"id"})
    try:
        return _Described.model_validate(fields)
    except ValidationError as exc:
        raise InvalidRequestError(f"invalid sample {i}: {_problems(exc)}") from None


def _problems(exc: ValidationError) -> str:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'header'}: {e['msg']}"
        for e in exc.errors(include_url=False)[:3]
    )
    more = f" (and {exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return problems + more


def _parse_header(doc: bytes) -> UploadHeader:
    try:
        return UploadHeader.model_validate_json(doc)
    except ValidationError as exc:
        raise InvalidRequestError(f"invalid upload header: {_problems(exc)}") from None
    except (ValueError, RecursionError) as exc:  # defensive: the parser's own refusals
        raise InvalidRequestError(f"invalid upload header: {type(exc).__name__}") from None


def _check_payload(i: int, meta: SampleMeta, payload: bytes) -> None:
    if meta.media_type is not None and not payload.startswith(_MAGIC[meta.media_type]):
        raise InvalidRequestError(f"sample {i} ({meta.id}): its bytes are not {meta.media_type}")


def _mac(secret: str, fleet: str, device: str) -> bytes:
    message = f"tandem-device:{fleet}:{device}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).digest()


def device_token(secret: str, fleet: str, device: str) -> str:
    """A device's upload token: HMAC-SHA256 of ``tandem-device:{fleet}:{device}`` under the
    cloud's secret, base64url without padding. Stateless: the cloud stores no token, and a
    token opens uploads for its own device and fleet only."""
    return base64.urlsafe_b64encode(_mac(secret, fleet, device)).rstrip(b"=").decode()


def check_device_token(secret: str, fleet: str, device: str, token: str) -> bool:
    """Whether ``token`` is ``device``'s, compared in constant time."""
    expected = device_token(secret, fleet, device).encode()
    return hmac.compare_digest(expected, token.encode("utf-8", "replace"))
