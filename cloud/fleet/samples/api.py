"""The fleet API of field samples: devices upload, operators look and correct.

- ``POST /fleet/samples`` (a device's token, not an operator's): an upload in
  ``shared.samples``' format. Answers: 200 ``UploadResult`` (duplicates counted, not stored
  twice); 400 malformed; 401 no token, no or bad ``Tandem-Device``, or a token that is not
  that device's; 403 uploads off (no ``[samples] device_token_secret``) or a device
  uploading for another (its body's ``device`` is not the one its token is for); 413 over a
  size cap (body, inflated body, header, a sample, samples per upload), or more samples or
  bytes than the device's whole daily quota (a smaller batch may pass); 415 not
  ``application/vnd.tandem.samples``, or a content encoding other than gzip/deflate, or a
  broken gzip stream; 429 the device's daily quota spent (this upload would pass it),
  ``Retry-After`` the seconds to UTC midnight (nothing of that upload is stored).
- ``GET /fleet/samples`` (``?model= &version= &device= &kind= &label_source= &limit=
  &after=``): a page of samples, oldest first, ``next`` the cursor of the next page;
- ``GET /fleet/samples/summary`` (``?model= &top=``): per model and version (``model``'s
  only), counts by kind and label source, the number of devices and the ``top`` with the
  most samples (10 by default, 100 at most), and ``model_names``, every model with samples;
- ``PUT /fleet/samples/{device}/{id}/label`` ``{"label": N}``: an operator's correction;
- ``GET /fleet/samples/{device}/{id}``: the stored bytes (served as an attachment).

The operator routes sit behind the server's bearer tokens (``cloud/auth.py``); the upload
route is let through by it and checks the device's token itself, in constant time
(``shared.samples.check_device_token``). Tokens are stateless HMACs of a device's id, so a
token that is not the claimed device's is a 401: whose it is cannot be told without trying
every device's.

The body is read with a cap before anything is parsed (``shared.oip.http.read_body``: a
declared length over it is refused unread, a chunked one as it arrives, a gzip body
inflated step by step and refused once its output passes the cap), so a hostile request
costs at most the cap in memory. Every refusal is counted by reason
(``tandem_samples_rejected_total``) and logged, at most once per reason every
``LOG_EVERY_S``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from cloud.fleet.samples.store import (
    DEFAULT_PAGE,
    DEFAULT_TOP,
    MAX_PAGE,
    MAX_TOP,
    BatchOverQuotaError,
    QuotaExceededError,
    SampleStore,
)
from cloud.settings import SampleSettings
from shared.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    PayloadTooLargeError,
    TandemError,
    UnsupportedMediaTypeError,
)
from shared.identifiers import IDENTIFIER_RE
from shared.oip.http import read_body
from shared.samples import (
    CONTENT_TYPE,
    DEVICE_HEADER,
    HEADER_LENGTH,
    MAX_CLASSES,
    MAX_HEADER_BYTES,
    UploadResult,
    check_device_token,
    decode_upload,
    is_sample_id,
)

log = logging.getLogger(__name__)

#: A refusal's reason is logged at most this often (with the count since the last line).
LOG_EVERY_S = 10.0
REASONS = (
    *("malformed", "unauthenticated", "disabled", "wrong_device", "too_large"),
    *("media_type", "quota"),
)

_UPLOAD_DOC: dict[str, Any] = {
    "parameters": [
        {"name": "Tandem-Device", "in": "header", "required": True, "schema": {"type": "string"}},
        {"name": HEADER_LENGTH, "in": "header", "required": True, "schema": {"type": "integer"}},
    ],
    "requestBody": {
        "required": True,
        "content": {CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    },
}


class _RefusalError(Exception):
    """An upload refused: its status, the reason it is counted under, and the message."""

    def __init__(
        self, status: int, reason: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message
        self.headers = headers or {}


_BY_ERROR: tuple[tuple[type[TandemError], int, str], ...] = (
    (PayloadTooLargeError, 413, "too_large"),
    (UnsupportedMediaTypeError, 415, "media_type"),
    (InvalidRequestError, 400, "malformed"),
)


def _refusal(exc: TandemError) -> _RefusalError:
    for cls, status, reason in _BY_ERROR:
        if isinstance(exc, cls):
            return _RefusalError(status, reason, exc.message)
    raise exc


class SampleMetrics:
    """Uploads' counts for ``/metrics`` (a ``prometheus_client`` custom collector):
    refusals by reason, samples stored and duplicates. Refusals are logged here too, at
    most once per reason every ``LOG_EVERY_S``: a misbehaving device cannot fill the log."""

    def __init__(self, fleet: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.fleet = fleet
        self._clock = clock
        self.rejected: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.stored = 0
        self.duplicates = 0
        self._lock = threading.Lock()
        self._logged: dict[str, tuple[float, int]] = {}  # reason -> (last logged, at count)

    def refused(self, refusal: _RefusalError, device: str | None) -> None:
        with self._lock:
            n = self.rejected[refusal.reason] = self.rejected.get(refusal.reason, 0) + 1
            last, at = self._logged.get(refusal.reason, (-math.inf, 0))
            now = self._clock()
            if now - last < LOG_EVERY_S:
                return
            self._logged[refusal.reason] = (now, n)
        more = f" ({n - at - 1} more since the last line)" if n - at > 1 and at else ""
        log.warning(
            "sample upload refused (%s, %d) from %s: %s%s",
            refusal.reason,
            refusal.status,
            device or "unknown device",
            refusal.message,
            more,
        )

    def accepted(self, result: UploadResult) -> None:
        with self._lock:
            self.stored += result.stored
            self.duplicates += result.duplicates

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            rejected = dict(self.rejected)
            stored, duplicates = self.stored, self.duplicates
        family = CounterMetricFamily(
            "tandem_samples_rejected_total",
            "Sample uploads refused, by reason.",
            labels=["fleet", "reason"],
        )
        for reason, n in sorted(rejected.items()):
            family.add_metric([self.fleet, reason], n)
        yield family
        samples = CounterMetricFamily(
            "tandem_samples_received_total",
            "Samples received in accepted uploads: stored, or duplicates of stored ones.",
            labels=["fleet", "outcome"],
        )
        samples.add_metric([self.fleet, "stored"], stored)
        samples.add_metric([self.fleet, "duplicate"], duplicates)
        yield samples


class LabelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: int = Field(ge=0, lt=MAX_CLASSES)


def samples_router(
    samples: SampleStore, fleet: str, settings: SampleSettings, metrics: SampleMetrics
) -> APIRouter:
    router = APIRouter(tags=["samples"])

    async def _upload(request: Request, device: str | None) -> UploadResult:
        secret = settings.device_token_secret
        if secret is None:
            raise _RefusalError(
                403,
                "disabled",
                "sample uploads are off on this server: set [samples] device_token_secret "
                "(or TANDEM_CLOUD_SAMPLES__DEVICE_TOKEN_SECRET) and give each device its "
                "token (tandem-cloud fleet device-token DEVICE)",
            )
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            raise _RefusalError(401, "unauthenticated", "missing device token (Bearer)", _CHALLENGE)
        if device is None or not IDENTIFIER_RE.match(device):
            raise _RefusalError(
                401,
                "unauthenticated",
                f"missing or invalid {DEVICE_HEADER} header (the token is checked against it)",
                _CHALLENGE,
            )
        if not check_device_token(secret.get_secret_value(), fleet, device, auth[7:].strip()):
            raise _RefusalError(
                401,
                "unauthenticated",
                f"the token is not device {device}'s in fleet {fleet}",
                _CHALLENGE,
            )
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != CONTENT_TYPE:
            raise _RefusalError(
                415, "media_type", f"content type {media[:80]!r}: expected {CONTENT_TYPE}"
            )
        try:
            body, _ = await read_body(
                request, settings.max_upload_bytes, max_json_bytes=settings.max_upload_bytes
            )
            claimed, items = await run_in_threadpool(
                decode_upload,
                request.headers,
                body,
                max_samples=settings.max_samples_per_upload,
                max_sample_bytes=settings.max_sample_bytes,
                max_header_bytes=min(MAX_HEADER_BYTES, settings.max_upload_bytes),
            )
        except TandemError as exc:
            raise _refusal(exc) from None
        del body
        if claimed != device:
            raise _RefusalError(
                403,
                "wrong_device",
                f"device {device}'s token cannot upload samples for device {claimed}",
            )
        try:
            return await run_in_threadpool(
                lambda: samples.add(
                    fleet,
                    device,
                    items,
                    quota_bytes=settings.daily_quota_bytes,
                    quota_samples=settings.daily_quota_samples,
                )
            )
        except BatchOverQuotaError as exc:  # never accepted as it is: a smaller one may be
            raise _RefusalError(413, "quota", exc.message) from None
        except QuotaExceededError as exc:
            retry = str(max(1, math.ceil(exc.retry_after_s)))
            raise _RefusalError(429, "quota", exc.message, {"Retry-After": retry}) from None

    @router.post("/fleet/samples", openapi_extra=_UPLOAD_DOC, response_model=UploadResult)
    async def upload(request: Request) -> Response:
        device = request.headers.get(DEVICE_HEADER)
        try:
            result = await _upload(request, device)
        except _RefusalError as refusal:
            metrics.refused(refusal, device if device and IDENTIFIER_RE.match(device) else None)
            return JSONResponse(
                {"error": refusal.message}, status_code=refusal.status, headers=refusal.headers
            )
        metrics.accepted(result)
        return JSONResponse(result.model_dump())

    @router.get("/fleet/samples")
    def page(
        model: Annotated[str | None, Query(pattern=IDENTIFIER_RE.pattern)] = None,
        version: Annotated[int | None, Query(ge=0, le=2**62)] = None,
        device: Annotated[str | None, Query(pattern=IDENTIFIER_RE.pattern)] = None,
        kind: Literal["escalation", "audit"] | None = None,
        label_source: Annotated[str | None, Query(pattern=IDENTIFIER_RE.pattern)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
        after: Annotated[str | None, Query(max_length=200)] = None,
    ) -> dict[str, Any]:
        found = samples.list(
            fleet,
            limit=limit,
            after=after,
            model=model,
            version=version,
            device=device,
            kind=kind,
            label_source=label_source,
        )
        return {"samples": found.samples, "next": found.next}

    @router.get("/fleet/samples/summary")
    def summary(
        model: Annotated[str | None, Query(pattern=IDENTIFIER_RE.pattern)] = None,
        top: Annotated[int, Query(ge=0, le=MAX_TOP)] = DEFAULT_TOP,
    ) -> dict[str, Any]:
        return {
            "fleet": fleet,
            "models": samples.summary(fleet, model=model, top=top),
            "model_names": samples.model_names(fleet),
        }

    def _known(device: str, sample: str) -> None:
        if not (IDENTIFIER_RE.match(device) and is_sample_id(sample)):
            raise ModelNotFoundError(f"no sample {sample[:64]!r} of device {device[:64]!r}")

    @router.put("/fleet/samples/{device}/{sample}/label")
    def label(device: str, sample: str, body: LabelBody) -> dict[str, Any]:
        _known(device, sample)
        if not samples.label(fleet, device, sample, body.label, source="operator"):
            raise ModelNotFoundError(f"no sample {sample} of device {device}")
        return {"device": device, "id": sample, "label": body.label, "label_source": "operator"}

    @router.get("/fleet/samples/{device}/{sample}")
    def payload(device: str, sample: str) -> Response:
        _known(device, sample)
        found = samples.get(fleet, device, sample)
        if found is None:
            raise ModelNotFoundError(f"no sample {sample} of device {device}")
        row, data = found
        return Response(
            data,
            media_type=row["media_type"] or "application/octet-stream",
            headers={
                # the bytes are a device's: never rendered in an operator's browser as a page
                "Content-Disposition": f'attachment; filename="{sample}"',
                "X-Content-Type-Options": "nosniff",
                "Tandem-Sample-Encoding": row["encoding"],
                "Tandem-Sample-Shape": ",".join(str(d) for d in row["shape"]),
            },
        )

    return router


_CHALLENGE = {"WWW-Authenticate": "Bearer"}
