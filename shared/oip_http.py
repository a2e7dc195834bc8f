"""The Open Inference Protocol's HTTP routes, once, for both Tandem servers.

``tandem-cloud`` (ONNX Runtime) and the agent's local endpoint implement ``DataPlane``;
``add_oip_routes`` turns either into the KServe v2 REST routes, with the binary tensor extension,
gzip/deflate bodies, a body size limit, and every ``TandemError`` mapped to its status as
``{"error": message}``. Routes only convert and delegate.

Imports FastAPI: only the servers import this module, never ``import agent``.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import (
    PayloadTooLargeError,
    ServerBusyError,
    TandemError,
    UnsupportedMediaTypeError,
)
from shared.oip import (
    HEADER_LENGTH,
    ErrorDoc,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelReadyDoc,
    ServerMetadata,
)
from shared.oip_codec import decode_request, encode_response, header_length_value

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


class DataPlane(Protocol):
    """What a server must answer; the routes below do the HTTP."""

    def server_metadata(self) -> ServerMetadata: ...

    def live(self) -> bool: ...

    def ready(self) -> bool: ...

    def model_metadata(self, name: str, version: str | None) -> ModelMetadata: ...

    def model_ready(self, name: str, version: str | None) -> ModelReadyDoc: ...

    def infer(
        self, name: str, version: str | None, request: InferRequest
    ) -> Awaitable[InferResponse]:
        """An ``async def``, or a plain method handing back another awaitable (one coroutine
        frame fewer on every request)."""
        ...


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


class LeanRoute(APIRoute):
    """A route whose endpoint takes the ``Request`` and its path parameters (strings), and
    parses the body itself: FastAPI's per-request dependency solving is skipped, which is a
    fifth of the HTTP stack's cost on a small model (``scripts/bench_cloud.py``). The OpenAPI
    document is still generated from the endpoint's signature. Used for infer, and for the
    benchmark's bare route, so both measure the same stack."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint
        direct: Callable[[Request], Coroutine[Any, Any, Response]] | None = getattr(
            endpoint, LEAN_HANDLER, None
        )
        if direct is not None:  # one coroutine frame per request, not two
            return direct

        async def handler(request: Request) -> Response:
            response: Response = await endpoint(request=request, **request.path_params)
            return response

        return handler


#: An endpoint's attribute naming the ``async (request) -> Response`` that ``LeanRoute``
#: runs in its place (reading the path parameters itself); the endpoint then only
#: documents the route.
LEAN_HANDLER = "lean_handler"


def lean(handler: Callable[[Request], Coroutine[Any, Any, Response]]) -> Callable[[F], F]:
    """Marks a ``LeanRoute`` endpoint as documentation for ``handler``, which serves it."""

    def mark(endpoint: F) -> F:
        setattr(endpoint, LEAN_HANDLER, handler)
        return endpoint

    return mark


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


async def read_body(request: Request, max_bytes: int) -> tuple[bytes, int | None]:
    """The request body, decompressed, refusing anything over ``max_bytes`` early, and its
    ``Inference-Header-Content-Length``. The raw ASGI headers (lower-case by the spec) go
    into one dict in C: this runs on every inference."""
    headers: dict[bytes, bytes] = dict(request.scope["headers"])
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit():
        if int(declared) > max_bytes:
            raise PayloadTooLargeError(
                f"body of {declared.decode()} bytes exceeds the limit of {max_bytes}"
            )
        # the HTTP parser holds the body to its declared length, which is within the limit
        body = await request.body()
    else:  # chunked: counted as it comes
        parts: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLargeError(f"body exceeds the limit of {max_bytes} bytes")
            parts.append(chunk)
        body = b"".join(parts)
    raw_length = headers.get(_HEADER_LENGTH_KEY)
    header_length = None
    if raw_length is not None:
        if raw_length.isdigit():  # int() of ASCII digits, without decoding them first
            header_length = int(raw_length)
        else:  # says what is wrong (or reads a sign and spaces, as int() does)
            header_length = header_length_value(raw_length.decode("latin-1"))
    raw_encoding = headers.get(b"content-encoding")
    if raw_encoding is None:
        return body, header_length
    encoding = raw_encoding.decode("latin-1").strip().lower()
    if encoding in ("", "identity"):
        return body, header_length
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaTypeError(f"content encoding {encoding!r} is not supported")
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise UnsupportedMediaTypeError(f"body is not valid {encoding}: {exc}") from None
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise PayloadTooLargeError(f"decompressed body exceeds the limit of {max_bytes} bytes")
    return out, header_length


def docs_routes_last(app: FastAPI) -> None:
    """Moves FastAPI's own documentation routes (added first, at construction) to the end of
    the route table: routes are tried in order, and every request paid for failing them.
    Call once, after every route is added and before the first request."""
    docs = {app.openapi_url, app.docs_url, app.swagger_ui_oauth2_redirect_url, app.redoc_url}
    routes = app.router.routes
    moved = [r for r in routes if getattr(r, "path", None) in docs]
    routes[:] = [r for r in routes if r not in moved] + moved


def add_oip_routes(router: APIRouter, plane: DataPlane, max_body_bytes: int) -> None:
    """The KServe v2 routes over ``plane``, added to ``router`` itself (an app's
    ``app.router``): an included router is matched through one more layer on every request.
    Infer goes first; routes are matched in order and infer is the hot one."""

    async def serve_infer(request: Request) -> Response:
        params = request.path_params
        name, version = params["name"], params.get("version")
        body, header_length = await read_body(request, max_body_bytes)
        infer_request = decode_request(body, header_length)
        response = await plane.infer(name, version, infer_request)
        if response.id is None:
            response.id = infer_request.id
        payload, headers = encode_response(response, infer_request)
        # the content type as media_type, the header length appended raw: Starlette's
        # per-request encoding of a headers mapping is skipped
        reply = Response(payload, media_type=headers["Content-Type"])
        length = headers.get(HEADER_LENGTH)
        if length is not None:
            reply.raw_headers.append((_HEADER_LENGTH_KEY, length.encode()))
        return reply

    @lean(serve_infer)
    async def infer(name: str, request: Request) -> Response:
        return await serve_infer(request)

    @lean(serve_infer)
    async def infer_version(name: str, version: str, request: Request) -> Response:
        return await serve_infer(request)

    for path, endpoint in (
        ("/v2/models/{name}/infer", infer),
        ("/v2/models/{name}/versions/{version}/infer", infer_version),
    ):
        router.add_api_route(
            path,
            endpoint,
            methods=["POST"],
            openapi_extra=_INFER_BODY,
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
