"""Resumable, size-capped, digest-checked artifact download into the store's staging file.

Edge links drop. A download that breaks keeps what it got (``.part``) and the next attempt
asks for the rest with ``Range`` (and ``If-Range`` with the ETag it saw, so a changed file
restarts instead of splicing two). It never accepts more bytes than the manifest's size,
checks free disk space before it starts, and checks SHA-256 when the bytes are all there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from agent.errors import AgentError
from agent.settings import DownloadSettings

log = logging.getLogger(__name__)


class DownloadError(AgentError):
    """The artifact could not be fetched (after retries), or the disk is too full."""


class DigestError(AgentError):
    """All bytes arrived but they are not the manifest's: tampered or corrupted."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Downloader:
    def __init__(
        self,
        http: httpx.Client,
        settings: DownloadSettings,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.http = http
        self.settings = settings
        self._sleep = sleep
        self.resumed = 0  # how many attempts continued a partial file (for tests/telemetry)
        self._etag: str | None = None

    def fetch(self, url: str, part: Path, size: int, sha256: str) -> Path:
        """Download ``url`` to ``part`` (resuming it) and return it, verified."""
        self._check_space(part, size)
        last_error = ""
        self._etag = None  # learnt from the first response, sent as If-Range
        for attempt in range(self.settings.attempts):
            have = part.stat().st_size if part.exists() else 0
            if have > size:
                part.unlink()
                have = 0
            if have < size:
                try:
                    self._attempt(url, part, have, size)
                except (httpx.TransportError, httpx.HTTPStatusError, _IncompleteError) as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
                    log.info("download of %s broke (%s); attempt %d", url, last_error, attempt + 1)
                    self._sleep(self.settings.backoff_s * (2**attempt))
                    continue
            if part.stat().st_size == size:
                if _sha256(part) != sha256:
                    part.unlink()
                    raise DigestError(f"sha256 of {url} does not match the manifest")
                return part
        raise DownloadError(
            f"download of {url} failed after {self.settings.attempts} tries: {last_error}"
        )

    def _attempt(self, url: str, part: Path, have: int, size: int) -> None:
        headers = {}
        if have:
            headers["Range"] = f"bytes={have}-"
            if self._etag:
                headers["If-Range"] = self._etag
        with self.http.stream("GET", url, headers=headers, timeout=self.settings.timeout_s) as r:
            if r.status_code == 416 and have:  # nothing left to send: let the size check decide
                return
            if r.status_code not in (200, 206):
                r.raise_for_status()
                raise DownloadError(f"{url} answered {r.status_code}")
            self._etag = r.headers.get("etag", self._etag)
            if r.status_code == 200 and have:  # the server ignored Range, or the file changed
                have = 0
            elif have:
                self.resumed += 1
            got = have
            with part.open("r+b" if have else "wb") as f:
                f.seek(have)
                f.truncate()
                for chunk in r.iter_bytes():  # no chunk size: a break keeps what arrived
                    got += len(chunk)
                    if got > size:
                        f.truncate(have)
                        raise DownloadError(f"{url} is larger than the manifest's {size} bytes")
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if got < size:
                raise _IncompleteError(f"connection ended at {got} of {size} bytes")

    def _check_space(self, part: Path, size: int) -> None:
        have = part.stat().st_size if part.exists() else 0
        free = shutil.disk_usage(part.parent).free
        need = size - have + self.settings.disk_margin_bytes
        if free < need:
            raise DownloadError(f"not enough disk space: {free} bytes free, {need} needed")


class _IncompleteError(Exception):
    pass
