"""Bearer-token auth for the cloud server. Health, server metadata and ``/metrics`` stay
open (load balancers and Prometheus probe them); inference, model metadata, the
repository, registry and fleet routes need ``Authorization: Bearer <token>``. Tokens are
compared in constant time and never logged; revoke one by restarting with a new list.
The dashboard's page is open, its data is not: it sends the token given in its URL
fragment (``/dashboard/#token=...``)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

OPEN_PREFIXES = ("/v2/health/", "/metrics", "/dashboard", "/docs", "/openapi.json")
OPEN_EXACT = ("/", "/v2")
#: (method, path) of routes that check a credential of their own instead: a device's upload
#: token (``cloud/fleet/samples/api.py``). An operator's token does not open them, and a
#: device's token opens nothing else.
OWN_AUTH = frozenset({("POST", "/fleet/samples")})


def install_bearer_auth(app: FastAPI, tokens: list[str]) -> None:
    expected = [t.encode() for t in tokens]

    def allowed(header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        given = header[7:].strip().encode()
        return any(hmac.compare_digest(given, t) for t in expected)

    @app.middleware("http")
    async def bearer(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        path = request.url.path
        if path in OPEN_EXACT or path.startswith(OPEN_PREFIXES):
            return await call_next(request)
        if (request.method, path) in OWN_AUTH:
            return await call_next(request)
        if not allowed(request.headers.get("authorization")):
            return JSONResponse(
                {"error": "missing or invalid bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await call_next(request)
