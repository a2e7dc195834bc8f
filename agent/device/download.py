"""Resumable, size-capped, digest-checked artifact download into the store's staging file.

Edge links drop. A download that breaks keeps what it got (``.part``) and the next attempt
asks for the rest with ``Range`` (and ``If-Range`` with the ETag it saw, so a changed file
restarts instead of splicing two). It never accepts more bytes than the manifest's size,
checks free disk space before it starts, and checks SHA-256 when the bytes are all there.

Resuming survives a ``kill -9`` or a power cut, not only a broken connection: bytes go to
the ``.part`` file unbuffered as they arrive (forced to disk every few MiB), and the ETag is
kept beside it (``.part.etag``), so the next process asks for the rest under the same
validator. One deadline covers the whole download, every try and every chunk: a server that
trickles a byte a second ends in a clear failure instead of a device downloading forever.

Credentials go only where they belong: ``OriginAuth`` adds the cloud's bearer token to
requests for the configured cloud and registry origins, never to whatever host a
manifest's artifact URL names.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Generator, Iterable
from pathlib import Path

import httpx
from pydantic import SecretStr

from agent.device.store import atomic_write
from agent.errors import DigestError, DownloadError, IncompleteDownloadError
from agent.settings import DownloadSettings
from shared.tls import TlsFiles

log = logging.getLogger(__name__)

_DEFAULT_PORTS = {"http": 80, "https": 443}
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-\d+/(?:\d+|\*)$")


# ---------------------------------------------------------------------- credentials


def origin(url: str | httpx.URL) -> tuple[str, str, int]:
    """Scheme, host and port (the default one spelt out): what a credential is bound to."""
    u = httpx.URL(url)
    return u.scheme, u.host, u.port or _DEFAULT_PORTS.get(u.scheme, 0)


class OriginAuth(httpx.Auth):
    """``Authorization: Bearer`` on requests to the allowed origins only. An artifact URL
    is the manifest's to choose; the token is the cloud's and must not follow it."""

    def __init__(self, token: str, allowed: Iterable[str | None]) -> None:
        self._header = f"Bearer {token}"
        self.origins = frozenset(origin(u) for u in allowed if u)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if origin(request.url) in self.origins:
            request.headers["Authorization"] = self._header
        yield request


def download_client(
    token: SecretStr | None, origins: Iterable[str | None], tls: TlsFiles | None = None
) -> httpx.Client:
    """The HTTP client for artifacts: the token, if any, only for ``origins``. With ``tls``,
    every server is verified against its CA, and its client certificate, like the token,
    is presented to ``origins`` only (an artifact URL on another host does not learn which
    device asks)."""
    allowed = [u for u in origins if u]
    auth = OriginAuth(token.get_secret_value(), allowed) if token is not None else None
    if tls is None:
        return httpx.Client(auth=auth)
    mounts: dict[str, httpx.BaseTransport | None] = {}
    if tls.has_identity:
        identity = tls.context()
        for url in allowed:
            u = httpx.URL(url)
            if u.scheme == "https":  # a URL without a port: its host, at any port
                mounts[f"https://{u.netloc.decode()}"] = httpx.HTTPTransport(verify=identity)
    return httpx.Client(auth=auth, verify=tls.context(identity=False), mounts=mounts)


# ------------------------------------------------------------------------ download


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def etag_file(part: Path) -> Path:
    """Where the validator of a partial download is kept, beside it."""
    return part.with_name(part.name + ".etag")


class Downloader:
    def __init__(
        self,
        http: httpx.Client,
        settings: DownloadSettings,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.http = http
        self.settings = settings
        self._sleep = sleep
        self._clock = clock
        self.resumed = 0  # how many attempts continued a partial file (for tests/telemetry)

    def fetch(self, url: str, part: Path, size: int, sha256: str) -> Path:
        """Download ``url`` to ``part`` (resuming it) and return it, verified."""
        try:
            return self._fetch(url, part, size, sha256)
        except OSError as exc:  # disk full, read-only, gone: the device's side of a download
            raise DownloadError(f"cannot write {part.name}: {exc}") from None

    def _fetch(self, url: str, part: Path, size: int, sha256: str) -> Path:
        self._check_space(part, size)
        deadline = self._clock() + self.settings.deadline_s
        last_error = ""
        for attempt in range(self.settings.attempts):
            have = part.stat().st_size if part.exists() else 0
            if have > size:
                _discard(part)
                have = 0
            if have < size:
                try:
                    self._attempt(url, part, have, size, deadline)
                except (
                    httpx.TransportError,
                    httpx.HTTPStatusError,
                    IncompleteDownloadError,
                ) as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
                    if self._clock() >= deadline:
                        raise self._late(url, part, size) from None
                    log.info("download of %s broke (%s); attempt %d", url, last_error, attempt + 1)
                    if attempt + 1 < self.settings.attempts:
                        self._backoff(
                            self.settings.backoff_s * (2**attempt), deadline, url, part, size
                        )
                    continue
            if part.stat().st_size == size:
                if _sha256(part) != sha256:
                    _discard(part)
                    raise DigestError(f"sha256 of {url} does not match the manifest")
                etag_file(part).unlink(missing_ok=True)
                return part
        raise DownloadError(
            f"download of {url} failed after {self.settings.attempts} tries: {last_error}"
        )

    def _backoff(self, delay: float, deadline: float, url: str, part: Path, size: int) -> None:
        if self._clock() + delay >= deadline:  # the next try could not finish in time
            raise self._late(url, part, size)
        self._sleep(delay)

    def _late(self, url: str, part: Path, size: int) -> DownloadError:
        got = part.stat().st_size if part.exists() else 0
        return DownloadError(
            f"{url} not downloaded within the {self.settings.deadline_s:g} s deadline "
            f"({got} of {size} bytes)"
        )

    def _attempt(self, url: str, part: Path, have: int, size: int, deadline: float) -> None:
        headers = {}
        if have:
            headers["Range"] = f"bytes={have}-"
            etag = _read_etag(part)
            if etag:
                headers["If-Range"] = etag
        timeout = min(self.settings.timeout_s, max(deadline - self._clock(), 0.001))
        with self.http.stream("GET", url, headers=headers, timeout=timeout) as r:
            if r.status_code == 416 and have:  # the server has less than we hold: start over
                _discard(part)
                raise IncompleteDownloadError(f"range bytes={have}- not satisfiable: starting over")
            if r.status_code not in (200, 206):
                r.raise_for_status()
                raise DownloadError(f"{url} answered {r.status_code}")
            if r.status_code == 206:
                sent = _CONTENT_RANGE.match(r.headers.get("content-range", f"bytes {have}-0/*"))
                if not sent or int(sent.group(1)) != have:
                    raise IncompleteDownloadError(
                        f"asked for bytes={have}-, got {sent and sent.group()}"
                    )
                if have:
                    self.resumed += 1
            else:  # the whole file: ours was not resumable, or it changed on the server
                have = 0
            self._write(r, part, have, size, deadline, url)

    def _write(
        self, r: httpx.Response, part: Path, have: int, size: int, deadline: float, url: str
    ) -> None:
        """Stream the body into ``part`` from ``have`` on, unbuffered: what the kernel has
        survives a ``kill -9``; ``fsync`` every ``fsync_every_bytes`` and at the end bounds
        what a power cut can take."""
        got = have
        # buffering=0: every chunk reaches the file when it arrives (a buffer would keep
        # the last few KiB, the whole of a small model, until the end)
        with part.open("r+b" if have else "wb", buffering=0) as f:
            f.seek(have)
            f.truncate()
            if not have:  # a fresh start: its validator replaces the old one
                _save_etag(part, r.headers.get("etag"))
            unsynced = 0
            try:
                for chunk in r.iter_bytes():  # no chunk size: a break keeps what arrived
                    if got + len(chunk) > size:
                        f.truncate(have)
                        raise DownloadError(f"{url} is larger than the manifest's {size} bytes")
                    view, written = memoryview(chunk), 0
                    while written < len(chunk):
                        written += f.write(view[written:])
                    got += len(chunk)
                    unsynced += len(chunk)
                    if unsynced >= self.settings.fsync_every_bytes:
                        os.fsync(f.fileno())
                        unsynced = 0
                    if got < size and self._clock() >= deadline:
                        raise self._late(url, part, size)
            finally:
                os.fsync(f.fileno())
        if got < size:
            raise IncompleteDownloadError(f"connection ended at {got} of {size} bytes")

    def _check_space(self, part: Path, size: int) -> None:
        have = part.stat().st_size if part.exists() else 0
        free = shutil.disk_usage(part.parent).free
        need = size - have + self.settings.disk_margin_bytes
        if free < need:
            raise DownloadError(f"not enough disk space: {free} bytes free, {need} needed")


def _read_etag(part: Path) -> str | None:
    try:
        return etag_file(part).read_text().strip() or None
    except OSError:
        return None


def _save_etag(part: Path, etag: str | None) -> None:
    if etag and etag.isascii():  # sent back verbatim as If-Range
        atomic_write(etag_file(part), etag.encode())
    else:
        etag_file(part).unlink(missing_ok=True)


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    etag_file(part).unlink(missing_ok=True)
