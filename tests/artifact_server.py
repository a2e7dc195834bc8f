"""A second HTTP origin for artifacts, on a real uvicorn: one blob at any path, with ETag,
``Range: bytes=N-`` and ``If-Range``. It records every request's headers, and can send
slowly (``trickle``) or send the first bytes and then hold the connection (``stall_at``,
for killing an agent mid-download). Slow and stalled responses end when the client goes
away or when the server is released, so a test never waits on them at teardown.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.helpers import serve_in_thread


class ArtifactServer:
    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.etag = f'"{hashlib.sha256(blob).hexdigest()[:16]}"'
        self.requests: list[dict[str, str]] = []
        self.trickle: tuple[int, float] | None = None  # (bytes per piece, seconds between)
        self.stall_next_at: int | None = None  # the next response stops after this many bytes
        self.sent = 0  # body bytes sent, all responses
        self._released = threading.Event()

    def release(self) -> None:
        """End every slow or stalled response now (teardown)."""
        self._released.set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.requests.append(headers)
        gone = asyncio.Event()

        async def watch() -> None:  # the request has no body: the next message is the end
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        try:
            await self._respond(headers, send, gone)
        finally:
            watcher.cancel()

    async def _respond(self, headers: dict[str, str], send: Any, gone: asyncio.Event) -> None:
        start, size = 0, len(self.blob)
        status = 200
        out = [
            (b"etag", self.etag.encode()),
            (b"accept-ranges", b"bytes"),
            (b"content-type", b"application/octet-stream"),
        ]
        wanted = headers.get("range", "")
        validator_holds = headers.get("if-range") in (None, self.etag)
        if wanted.startswith("bytes=") and wanted.endswith("-") and validator_holds:
            start, status = int(wanted[6:-1]), 206
            out.append((b"content-range", f"bytes {start}-{size - 1}/{size}".encode()))
        body = self.blob[start:]
        out.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": out})
        stall, self.stall_next_at = self.stall_next_at, None
        if stall is not None:
            await self._send(send, body[:stall])
            while not (gone.is_set() or self._released.is_set()):
                await asyncio.sleep(0.05)
            return
        if self.trickle is None:
            await self._send(send, body)
            await send({"type": "http.response.body", "body": b""})
            return
        piece, every = self.trickle
        for i in range(0, len(body), piece):
            if gone.is_set() or self._released.is_set():
                return
            await self._send(send, body[i : i + piece])
            await asyncio.sleep(every)
        await send({"type": "http.response.body", "body": b""})

    async def _send(self, send: Any, data: bytes) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": True})
        self.sent += len(data)


@contextmanager
def serve_artifact(blob: bytes) -> Iterator[tuple[ArtifactServer, str]]:
    """An ``ArtifactServer`` for ``blob`` on a free port: (server, base URL)."""
    server = ArtifactServer(blob)
    with serve_in_thread(server) as url:
        try:
            yield server, url
        finally:
            server.release()
