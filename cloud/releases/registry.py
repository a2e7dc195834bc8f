"""The artifact registry: signed model bundles on disk, served over HTTP with ETag and Range.

Layout: ``<registry>/<model>/<version>/manifest.json`` (signed) beside the edge artifact it
names and the bundle files it lists (labels, golden samples). Releases are immutable: a
rollback is a new version pointing at an old artifact, with its bundle files copied (they
are small; the artifact is not).

HTTP (mounted by the cloud server when a registry folder is configured):

- ``GET /registry/{model}``: the releases, newest first;
- ``GET /registry/{model}/{version}/manifest.json``: a signed manifest;
- ``GET /registry/{model}/{version}/{file}``: the artifact or a bundle file, so an edge
  device on a flaky link resumes instead of starting over. A strong ETag (the file's
  SHA-256 from the manifest) and the 304 on
  ``If-None-Match`` are ours; ``Range`` (206, or 416 with ``Content-Range: bytes */size``;
  a malformed one is a 400) and ``If-Range`` are Starlette's ``FileResponse`` (1.3 or later:
  its ``If-Range`` compares the ETag we set, and an oversized suffix range is the whole file).
"""

from __future__ import annotations

from collections.abc import Mapping
from hashlib import sha256
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse

from shared.errors import ContractError, ModelNotFoundError
from shared.identifiers import IDENTIFIER_RE
from shared.manifest import MANIFEST_FILE, Manifest


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

    def publish(
        self,
        manifest: Manifest,
        artifact: bytes | None,
        files: Mapping[str, bytes] | None = None,
    ) -> Path:
        """Write a release. Versions only go up and a release is never overwritten.
        ``artifact`` None: the manifest's URL points at an earlier release's file.
        ``files``: the bundle files, exactly those the manifest lists, with their digests."""
        files = dict(files or {})
        listed = {f.name: f for f in manifest.files}
        if files.keys() != listed.keys():
            raise ContractError(
                f"the release lists bundle files {sorted(listed)} but brings {sorted(files)}"
            )
        for name, data in files.items():
            if len(data) != listed[name].size or sha256(data).hexdigest() != listed[name].sha256:
                raise ContractError(f"bundle file {name} does not match its digest")
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
        for name, data in files.items():
            (folder / name).write_bytes(data)
        # the manifest last: a release is listed (``versions``) only once it is complete
        (folder / MANIFEST_FILE).write_text(manifest.to_json())
        return folder

    def artifact(self, model: str, version: int, file: str) -> tuple[Path, str]:
        """The path of the release's artifact or bundle file ``file``, and its strong ETag
        (the file's SHA-256 as the manifest lists it)."""
        manifest = self.manifest(model, version)
        if file == manifest.edge.file:
            digest = manifest.edge.sha256
        else:
            digest = next((f.sha256 for f in manifest.files if f.name == file), "")
            if not digest:
                raise ModelNotFoundError(f"release {model}/{version} has no file {file!r}")
        return self.release_dir(model, version) / file, f'"{digest}"'


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
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={**headers, "Accept-Ranges": "bytes"})
        return FileResponse(path, headers=headers, media_type="application/octet-stream")

    return router
