"""The artifact registry: signed model bundles on disk, served over HTTP with ETag and Range.

Layout: ``<registry>/<model>/<version>/manifest.json`` (signed) beside the edge artifact it
names. Releases are immutable: a rollback is a new version pointing at an old artifact.

HTTP (mounted by the cloud server when a registry folder is configured):

- ``GET /registry/{model}``: the releases, newest first;
- ``GET /registry/{model}/{version}/manifest.json``: a signed manifest;
- ``GET /registry/{model}/{version}/{file}``: the artifact. Strong ETag (the SHA-256),
  ``Range: bytes=a-b`` (206, or 416), ``If-Range``, ``If-None-Match`` (304), so an edge
  device on a flaky link resumes instead of starting over.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from shared.errors import ContractError, InvalidRequestError, ModelNotFoundError
from shared.identifiers import IDENTIFIER_RE
from shared.manifest import MANIFEST_FILE, Manifest

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
CHUNK = 64 * 1024


class RangeNotSatisfiableError(InvalidRequestError):
    http_status = 416


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _model_dir(self, model: str) -> Path:
        if not IDENTIFIER_RE.match(model):
            raise ModelNotFoundError(f"unknown model {model!r}")
        return self.root / model

    def versions(self, model: str) -> list[int]:
        folder = self._model_dir(model)
        if not folder.is_dir():
            return []
        return sorted(
            int(p.name)
            for p in folder.iterdir()
            if p.name.isdigit() and (p / MANIFEST_FILE).is_file()
        )

    def manifest(self, model: str, version: int) -> Manifest:
        path = self._model_dir(model) / str(version)
        if not (path / MANIFEST_FILE).is_file():
            raise ModelNotFoundError(f"model {model!r} has no release {version}")
        return Manifest.load(path)

    def release_dir(self, model: str, version: int) -> Path:
        return self._model_dir(model) / str(version)

    def publish(self, manifest: Manifest, artifact: bytes | None) -> Path:
        """Write a release. Versions only go up and a release is never overwritten.
        ``artifact`` None: the manifest's URL points at an earlier release's file."""
        versions = self.versions(manifest.model)
        if versions and manifest.version <= versions[-1]:
            raise ContractError(
                f"version {manifest.version} of {manifest.model} must be higher than every "
                f"earlier release (latest is {versions[-1]})"
            )
        folder = self.release_dir(manifest.model, manifest.version)
        folder.mkdir(parents=True, exist_ok=False)
        if artifact is not None:
            (folder / manifest.edge.file).write_bytes(artifact)
        (folder / MANIFEST_FILE).write_text(manifest.to_json())
        return folder

    def artifact(self, model: str, version: int, file: str) -> tuple[Path, str]:
        """The artifact path and its strong ETag (the manifest's SHA-256)."""
        manifest = self.manifest(model, version)
        if file != manifest.edge.file:
            raise ModelNotFoundError(f"release {model}/{version} has no file {file!r}")
        return self.release_dir(model, version) / file, f'"{manifest.edge.sha256}"'


def _parse_range(header: str, size: int) -> tuple[int, int]:
    """The inclusive byte range a ``Range`` header asks for (one range only)."""
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        raise RangeNotSatisfiableError(f"unsupported Range {header!r}")
    start_s, end_s = m.groups()
    if start_s:
        start = int(start_s)
        end = min(int(end_s), size - 1) if end_s else size - 1
    else:  # suffix: the last N bytes
        n = int(end_s)
        start, end = max(0, size - n), size - 1
    if start >= size or start > end:
        raise RangeNotSatisfiableError(f"range {header!r} is outside {size} bytes")
    return start, end


def _file_chunks(path: Path, start: int, end: int) -> Iterator[bytes]:
    with path.open("rb") as f:
        f.seek(start)
        left = end - start + 1
        while left > 0:
            block = f.read(min(CHUNK, left))
            if not block:
                return
            left -= len(block)
            yield block


def registry_router(registry: Registry) -> APIRouter:
    router = APIRouter(prefix="/registry", tags=["registry"])

    @router.get("/{model}")
    def releases(model: str) -> list[dict[str, Any]]:
        out = []
        for v in reversed(registry.versions(model)):
            m = registry.manifest(model, v)
            out.append(
                {
                    "version": v,
                    "created": m.created.isoformat(),
                    "sha256": m.edge.sha256,
                    "size": m.edge.size,
                    "key_id": m.key_id,
                }
            )
        if not out:
            raise ModelNotFoundError(f"unknown model {model!r}")
        return out

    @router.get("/{model}/{version}/manifest.json")
    def manifest(model: str, version: int) -> Response:
        m = registry.manifest(model, version)
        return Response(m.to_json(), media_type="application/json")

    @router.get("/{model}/{version}/{file}")
    def artifact(model: str, version: int, file: str, request: Request) -> Response:
        path, etag = registry.artifact(model, version, file)
        size = path.stat().st_size
        headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        wanted = request.headers.get("range")
        if_range = request.headers.get("if-range")
        if wanted and (if_range is None or if_range == etag):
            try:
                start, end = _parse_range(wanted, size)
            except RangeNotSatisfiableError as exc:
                return JSONResponse(
                    {"error": exc.message},
                    status_code=416,
                    headers={**headers, "Content-Range": f"bytes */{size}"},
                )
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            headers["Content-Length"] = str(end - start + 1)
            return StreamingResponse(
                _file_chunks(path, start, end),
                status_code=206,
                media_type="application/octet-stream",
                headers=headers,
            )
        headers["Content-Length"] = str(size)
        return StreamingResponse(
            _file_chunks(path, 0, size - 1), media_type="application/octet-stream", headers=headers
        )

    return router
