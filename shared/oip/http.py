"""The Open Inference Protocol's HTTP routes, once, for both Tandem servers.

``tandem-cloud`` (ONNX Runtime) and the agent's local endpoint implement ``DataPlane``;
``add_oip_routes`` turns either into the KServe v2 REST routes, with the binary tensor extension,
gzip/deflate bodies, a body size limit, and every ``TandemError`` mapped to its status as
``{"error": message}``. Routes only convert and delegate.

Imports FastAPI: only the servers import this module, never ``import agent``.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import (
    InvalidRequestError,
    PayloadTooLargeError,
    ServerBusyError,
    TandemError,
    UnsupportedMediaTypeError,
)
from shared.oip.codec import decode_request, encode_response, header_length_value
from shared.oip.types import (
    HEADER_LENGTH,
    ErrorDoc,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelReadyDoc,
    ServerMetadata,
)

log = logging.getLogger(__name__)


class DataPlane(Protocol):
    """What a server must answer; the routes below do the HTTP."""

    def server_metadata(self) -> ServerMetadata: ...

    def live(self) -> bool: ...

    def ready(self) -> bool: ...

    def model_metadata(self, name: str, version: str | None) -> ModelMetadata: ...

    def model_ready(self, name: str, version: str | None) -> ModelReadyDoc: ...

    def model_config(self, name: str, version: str | None) -> dict[str, Any]:
        """Triton's model configuration JSON (``shared.oip.types.triton_model_config``)."""
        ...

    async def infer(
        self, name: str, version: str | None, request: InferRequest
    ) -> InferResponse: ...


class BlockingDataPlane(DataPlane, Protocol):
    """A plane whose inference is blocking work (the agent's: an interpreter call). The
    routes then run decode, ``infer_blocking`` and encode in *one* worker thread: each hop
    to a thread and back costs the request a scheduling round, which for a 20 ms model on
    a busy Pi is a visible share."""

    def infer_blocking(
        self, name: str, version: str | None, request: InferRequest
    ) -> InferResponse: ...


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorDoc, "description": text}
    for code, text in (
        (400, "malformed request"),
        (401, "missing or wrong bearer token"),
        (404, "unknown model or version"),
        (413, "body too large"),
        (415, "unsupported content encoding"),
        (503, "model not ready, or server busy (see Retry-After)"),
    )
}

_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string"},
                                    "parameters": {"type": "object"},
                                    "data": {"type": "array"},
                                },
                            },
                        },
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "parameters": {"type": "object"},
                                },
                            },
                        },
                    },
                }
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"binary tensor extension: JSON header of {HEADER_LENGTH} bytes, "
                "then tensor data",
            },
        },
    }
}


#: The infer routes' path parameters, as FastAPI documents a ``str`` one.
_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "title": "Name"},
}
_VERSION = {
    "name": "version",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "title": "Version"},
}


class LeanRoute(APIRoute):
    """A route whose endpoint is its request handler, ``async (request) -> Response``: it
    reads its path parameters and its body itself, and FastAPI's per-request dependency
    solving is skipped, which is a fifth of the HTTP stack's cost on a small model
    (``scripts/bench_cloud.py``). The endpoint's signature has only the request, so the path
    parameters are documented by the route's ``openapi_extra``. Used for infer, and for the
    benchmark's bare route, so both measure the same stack."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler: Callable[[Request], Coroutine[Any, Any, Response]] = self.endpoint
        return handler


def error_response(exc: TandemError) -> JSONResponse:
    headers = {}
    if isinstance(exc, ServerBusyError):
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    return JSONResponse({"error": exc.message}, status_code=exc.http_status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as ``{"error": ...}``: ours with their status, FastAPI's own
    validation and routing errors as 4xx, and anything unexpected as a logged 500."""

    async def tandem(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, TandemError)
        return error_response(exc)

    async def validation(_: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"invalid request: {exc}"}, status_code=400)

    async def http(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return JSONResponse(
            {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    async def unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse({"error": "internal server error"}, status_code=500)

    app.add_exception_handler(TandemError, tandem)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(Exception, unexpected)


_HEADER_LENGTH_KEY = HEADER_LENGTH.lower().encode()

#: The largest JSON document a body may hold unless the server says otherwise: the whole body
#: for pure JSON, the header for the binary extension. Parsed, JSON number arrays take about
#: 13 times their size in memory (``scripts/bench_memory.py``): this bounds what one request
#: can cost, however large the body limit (big tensors go as binary, which costs its size).
DEFAULT_MAX_JSON_BYTES = 1024 * 1024
#: A body larger than this is read into one buffer of its declared size (Starlette's
#: ``request.body()`` holds the chunks and their join at once), decoded and its response
#: encoded in a worker thread (parsing megabytes on the event loop stalls every other
#: request). Smaller ones, every request of the hot path, go as before.
LARGE_BODY_BYTES = 256 * 1024
#: Decompressed bytes per step: between steps the event loop serves others.
_INFLATE_STEP = 1024 * 1024


async def read_body(
    request: Request, max_bytes: int, max_json_bytes: int = DEFAULT_MAX_JSON_BYTES
) -> tuple[bytes | bytearray, int | None]:
    """The request body, decompressed, and its ``Inference-Header-Content-Length``, refusing
    (413) a body over ``max_bytes`` and a JSON document over ``max_json_bytes`` as early as
    the headers say so, else as the bytes come. A compressed body is inflated as it streams
    in, the limits applied to what it inflates to. The raw ASGI headers (lower-case by the
    spec) go into one dict in C: this runs on every inference."""
    headers: dict[bytes, bytes] = dict(request.scope["headers"])
    raw_length = headers.get(_HEADER_LENGTH_KEY)
    if raw_length is None:  # pure JSON: the whole body is the document
        header_length = None
        limit = min(max_json_bytes, max_bytes)
    else:
        header_length = header_length_value(raw_length.decode("latin-1"))
        if header_length > max_json_bytes:
            raise PayloadTooLargeError(
                f"JSON header of {header_length} bytes exceeds the limit of {max_json_bytes}"
            )
        limit = max_bytes
    raw_encoding = headers.get(b"content-encoding")
    if raw_encoding is not None:
        encoding = raw_encoding.decode("latin-1").strip().lower()
        if encoding not in ("", "identity"):
            body = await _inflate(request, headers, encoding, max_bytes, limit)
            return body, header_length
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit():
        try:
            size = int(declared)
        except ValueError:  # more than 4300 digits
            size = limit + 1
        if size > limit:
            raise _too_large(f"body of {size} bytes", limit, max_bytes)
        if size <= LARGE_BODY_BYTES:  # the HTTP parser holds the body to its declared length
            return await request.body(), header_length
        return await _read_into(request, size), header_length
    # chunked: counted as it comes
    parts: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _too_large("body", limit, max_bytes)
        parts.append(chunk)
    return b"".join(parts), header_length


def _too_large(what: str, limit: int, max_bytes: int) -> PayloadTooLargeError:
    """The refusal of a body past ``limit``: the body limit, or (lower) the JSON one."""
    if limit < max_bytes:
        return PayloadTooLargeError(
            f"JSON {what} exceeds the limit of {limit} bytes for JSON; send large tensors with "
            "the binary tensor extension"
        )
    return PayloadTooLargeError(f"{what} exceeds the limit of {limit} bytes")


async def _read_into(request: Request, size: int) -> bytearray:
    """A body of a declared ``size``, in one buffer of that size."""
    body = bytearray(size)
    with memoryview(body) as view:
        pos = 0
        async for chunk in request.stream():
            end = pos + len(chunk)
            if end > size:
                raise InvalidRequestError(f"body is longer than its Content-Length {size}")
            view[pos:end] = chunk
            pos = end
    if pos != size:
        raise InvalidRequestError(f"body is shorter than its Content-Length {size}")
    return body


async def _inflate(
    request: Request,
    headers: dict[bytes, bytes],
    encoding: str,
    max_bytes: int,
    limit: int,
) -> bytearray:
    """A gzip or deflate body, inflated step by step as its chunks arrive: never more than
    ``limit`` bytes of output (plus one step) however small the input, the event loop
    turning between steps."""
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaTypeError(f"content encoding {encoding!r} is not supported")
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared[:19]) > max_bytes:
        raise PayloadTooLargeError(
            f"body of {declared.decode()} bytes exceeds the limit of {max_bytes}"
        )
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    out = bytearray()
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise PayloadTooLargeError(f"body exceeds the limit of {max_bytes} bytes")
        data = chunk
        while data and not inflater.eof:  # what follows the end of the stream is ignored
            try:
                out += inflater.decompress(data, min(_INFLATE_STEP, limit + 1 - len(out)))
            except zlib.error as exc:
                raise UnsupportedMediaTypeError(f"body is not valid {encoding}: {exc}") from None
            if len(out) > limit:
                raise _too_large("decompressed body", limit, max_bytes)
            data = inflater.unconsumed_tail
            if data:
                await asyncio.sleep(0)
    if not inflater.eof:
        raise UnsupportedMediaTypeError(f"body is not valid {encoding}: it ends early")
    return out


def _reply(payload: bytes, headers: dict[str, str]) -> Response:
    """An encoded response with its headers (content type, and the JSON header's length)."""
    return Response(payload, headers=headers)


def docs_routes_last(app: FastAPI) -> None:
    """Moves FastAPI's own documentation routes (added first, at construction) to the end of
    the route table: routes are tried in order, and every request paid for failing them.
    Call once, after every route is added and before the first request."""
    docs = {app.openapi_url, app.docs_url, app.swagger_ui_oauth2_redirect_url, app.redoc_url}
    routes = app.router.routes
    moved = [r for r in routes if getattr(r, "path", None) in docs]
    routes[:] = [r for r in routes if r not in moved] + moved


def add_oip_routes(
    router: APIRouter,
    plane: DataPlane,
    max_body_bytes: int,
    *,
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
) -> None:
    """The KServe v2 routes over ``plane``, added to ``router`` itself (an app's
    ``app.router``): an included router is matched through one more layer on every request.
    Infer goes first; routes are matched in order and infer is the hot one. Bodies are
    limited to ``max_body_bytes``, their JSON (all of a JSON body, the header of a binary
    one) to ``max_json_bytes``."""

    blocking = getattr(plane, "infer_blocking", None)

    def serve_blocking(
        name: str, version: str | None, body: bytes | bytearray, header_length: int | None
    ) -> tuple[bytes, dict[str, str]]:
        assert blocking is not None
        infer_request = decode_request(body, header_length)
        response: InferResponse = blocking(name, version, infer_request)
        if response.id is None:
            response.id = infer_request.id
        return encode_response(response, infer_request)

    async def serve_infer(request: Request) -> Response:
        params = request.path_params
        name, version = params["name"], params.get("version")
        body, header_length = await read_body(request, max_body_bytes, max_json_bytes)
        if blocking is not None:
            return _reply(
                *await run_in_threadpool(serve_blocking, name, version, body, header_length)
            )
        if len(body) > LARGE_BODY_BYTES:
            return await serve_large(name, version, body, header_length)
        infer_request = decode_request(body, header_length)
        response = await plane.infer(name, version, infer_request)
        if response.id is None:
            response.id = infer_request.id
        return _reply(*encode_response(response, infer_request))

    async def serve_large(
        name: str, version: str | None, body: bytes | bytearray, header_length: int | None
    ) -> Response:
        """``serve_infer`` with the decoding and encoding in a worker thread."""
        infer_request = await run_in_threadpool(decode_request, body, header_length)
        del body  # what is still needed of it, the tensors hold
        response = await plane.infer(name, version, infer_request)
        if response.id is None:
            response.id = infer_request.id
        return _reply(*await run_in_threadpool(encode_response, response, infer_request))

    for name, path, parameters in (
        ("infer", "/v2/models/{name}/infer", [_NAME]),
        ("infer_version", "/v2/models/{name}/versions/{version}/infer", [_NAME, _VERSION]),
    ):
        router.add_api_route(
            path,
            serve_infer,
            name=name,
            methods=["POST"],
            openapi_extra={**_INFER_BODY, "parameters": parameters},
            responses=_ERRORS,
            route_class_override=LeanRoute,
        )

    @router.get("/v2/health/live", responses=_ERRORS)
    def live() -> Response:
        ok = plane.live()
        return JSONResponse({"live": ok}, status_code=200 if ok else 503)

    @router.get("/v2/health/ready", responses=_ERRORS)
    def ready() -> Response:
        ok = plane.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @router.get("/v2", response_model=ServerMetadata, responses=_ERRORS)
    def server_metadata() -> ServerMetadata:
        return plane.server_metadata()

    @router.get("/v2/models/{name}", response_model=ModelMetadata, responses=_ERRORS)
    def model_metadata(name: str) -> ModelMetadata:
        return plane.model_metadata(name, None)

    @router.get(
        "/v2/models/{name}/versions/{version}", response_model=ModelMetadata, responses=_ERRORS
    )
    def version_metadata(name: str, version: str) -> ModelMetadata:
        return plane.model_metadata(name, version)

    @router.get("/v2/models/{name}/config", responses=_ERRORS)
    def model_config(name: str) -> dict[str, Any]:
        """Triton's model configuration extension."""
        return plane.model_config(name, None)

    @router.get("/v2/models/{name}/versions/{version}/config", responses=_ERRORS)
    def version_config(name: str, version: str) -> dict[str, Any]:
        """Triton's model configuration extension, for one version."""
        return plane.model_config(name, version)

    def _ready_response(doc: ModelReadyDoc) -> Response:
        return JSONResponse(
            doc.model_dump(exclude_none=True), status_code=200 if doc.ready else 503
        )

    @router.get("/v2/models/{name}/ready", response_model=ModelReadyDoc, responses=_ERRORS)
    def model_ready(name: str) -> Response:
        return _ready_response(plane.model_ready(name, None))

    @router.get(
        "/v2/models/{name}/versions/{version}/ready",
        response_model=ModelReadyDoc,
        responses=_ERRORS,
    )
    def version_ready(name: str, version: str) -> Response:
        return _ready_response(plane.model_ready(name, version))
