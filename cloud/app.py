"""The cloud server's ASGI app: OIP inference always; the registry when a registry folder is
set; the collector, fleet API, ``/metrics`` and the dashboard when a broker is set."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from cloud import __version__
from cloud.collector import Collector
from cloud.dataplane import CloudDataPlane
from cloud.fleet_api import fleet_router
from cloud.fleet_store import FleetStore
from cloud.registry import Registry, registry_router
from cloud.repository import ModelRepository
from cloud.settings import CloudSettings
from shared.mqtt import MqttClient
from shared.oip_http import install_error_handlers, oip_router

log = logging.getLogger(__name__)
DASHBOARD = Path(__file__).parent / "dashboard"


def create_app(settings: CloudSettings, repository: ModelRepository | None = None) -> FastAPI:
    """An app serving ``settings.repo`` (scanned now unless a repository is given)."""
    if repository is None:
        repository = ModelRepository(settings.repo, settings.ort)
        repository.scan()
    plane = CloudDataPlane(settings, repository)
    store: FleetStore | None = None
    collector: Collector | None = None
    mqtt: MqttClient | None = None
    if settings.mqtt is not None:
        store = FleetStore(settings.state_dir / "fleet.db")
        collector = Collector(store, settings.fleet, retention_days=settings.retention_days)
        mqtt_settings = settings.mqtt.model_copy(update={"persistent_session": True})
        mqtt = MqttClient(mqtt_settings, client_id=f"collector-{settings.fleet}")
        collector.attach(mqtt)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if mqtt is not None:
            mqtt.start()  # connects in the background, retrying: the server never waits on it
        try:
            yield
        finally:
            if mqtt is not None:
                mqtt.stop()
            if store is not None:
                store.close()

    app = FastAPI(title="tandem-cloud", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(oip_router(plane, settings.max_body_bytes))
    if settings.registry is not None:
        app.include_router(registry_router(Registry(settings.registry)))
    if store is not None:
        app.include_router(fleet_router(store, settings.fleet, collector))
        app.mount("/dashboard", StaticFiles(directory=DASHBOARD, html=True), name="dashboard")

        @app.get("/", include_in_schema=False)
        def root() -> RedirectResponse:
            return RedirectResponse("/dashboard/")

    app.state.plane = plane
    app.state.collector = collector
    app.state.store = store
    return app
