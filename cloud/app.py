"""The cloud server's ASGI app: the OIP routes over ``CloudDataPlane``."""

from __future__ import annotations

from fastapi import FastAPI

from cloud import __version__
from cloud.dataplane import CloudDataPlane
from cloud.registry import Registry, registry_router
from cloud.repository import ModelRepository
from cloud.settings import CloudSettings
from shared.oip_http import install_error_handlers, oip_router


def create_app(settings: CloudSettings, repository: ModelRepository | None = None) -> FastAPI:
    """An app serving ``settings.repo`` (scanned now unless a repository is given)."""
    if repository is None:
        repository = ModelRepository(settings.repo, settings.ort)
        repository.scan()
    plane = CloudDataPlane(settings, repository)
    app = FastAPI(title="tandem-cloud", version=__version__)
    install_error_handlers(app)
    app.include_router(oip_router(plane, settings.max_body_bytes))
    if settings.registry is not None:
        app.include_router(registry_router(Registry(settings.registry)))
    app.state.plane = plane
    return app
