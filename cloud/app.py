"""The cloud server's ASGI app: OIP inference always; the registry when a registry folder is
set; the collector, fleet API, ``/metrics`` and the dashboard when a broker is set."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.concurrency import run_in_threadpool

from cloud import __version__
from cloud.auth import install_bearer_auth
from cloud.fleet.api import DASHBOARD_DIR, FleetMetrics, fleet_router
from cloud.fleet.collector import Collector
from cloud.fleet.samples.api import SampleMetrics, samples_router
from cloud.fleet.samples.store import SampleStore
from cloud.fleet.store import FleetStore, open_store
from cloud.releases.registry import Registry, registry_router
from cloud.serving.dataplane import CloudDataPlane
from cloud.serving.repository import ModelRepository, repository_router
from cloud.settings import CloudSettings
from shared.mqtt import MqttClient
from shared.oip.http import LeanRoute, add_oip_routes, docs_routes_last, install_error_handlers

if TYPE_CHECKING:
    from cloud.fleet.controller import BackgroundController

log = logging.getLogger(__name__)


def create_app(settings: CloudSettings, repository: ModelRepository | None = None) -> FastAPI:
    """An app serving ``settings.repo`` (scanned now unless a repository is given)."""
    if repository is None:
        repository = ModelRepository(settings.repo, settings.ort)
        repository.scan()
    metrics = repository.metrics
    plane = CloudDataPlane(repository, simulated_delay_ms=settings.testing.simulated_delay_ms)
    store: FleetStore | None = None
    collector: Collector | None = None
    mqtt: MqttClient | None = None
    if settings.mqtt is not None:
        store = open_store(settings.database_url, settings.state_dir)
        collector = Collector(
            store,
            settings.fleet,
            retention_days=settings.retention_days,
            share_group=settings.collector_share_group,
        )
        # persistent, under this instance's own id: a restarted instance drains the share of
        # telemetry the broker queued for it (another instance's id would push that one off)
        mqtt_settings = settings.mqtt.model_copy(update={"persistent_session": True})
        mqtt = MqttClient(
            mqtt_settings, client_id=f"collector-{settings.fleet}-{settings.instance}"
        )
        collector.attach(mqtt)
    controller = _background_controller(settings, store)

    async def poll_repository() -> None:
        while True:
            await asyncio.sleep(settings.repo_poll_s)
            try:
                await run_in_threadpool(repository.scan)
            except Exception:  # a bad scan is logged; serving goes on with what is loaded
                log.exception("repository scan failed")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if mqtt is not None:
            mqtt.start()  # connects in the background, retrying: the server never waits on it
        if controller is not None:
            controller.start()
        poller = asyncio.create_task(poll_repository()) if settings.repo_poll_s else None
        try:
            yield
        finally:
            if poller is not None:
                poller.cancel()
            # here, not in a signal handler: uvicorn re-raises SIGTERM once this has run
            if controller is not None:
                await run_in_threadpool(controller.stop)  # releases the lease
            if mqtt is not None:
                mqtt.stop()
            if store is not None:
                store.close()

    app = FastAPI(title="tandem-cloud", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    if settings.tokens:
        install_bearer_auth(app, [t.get_secret_value() for t in settings.tokens])
    if settings.testing.bare_route:

        async def serve_bare(request: Request) -> Response:
            """The HTTP stack alone (body read, a fixed answer): a benchmark's ceiling. The
            same route class as infer and registered before it, so it is the first route
            tried, as infer is on a server without it."""
            await request.body()
            return Response(b'{"model_name":"bare","outputs":[]}', media_type="application/json")

        app.router.add_api_route(
            "/bench/bare",
            serve_bare,
            methods=["POST"],
            include_in_schema=False,
            route_class_override=LeanRoute,
        )

    add_oip_routes(
        app.router, plane, settings.max_body_bytes, max_json_bytes=settings.max_json_bytes
    )
    app.include_router(repository_router(repository))

    registry = CollectorRegistry()  # the app's own: a process may hold many apps
    registry.register(metrics)
    if store is not None:
        registry.register(FleetMetrics(store, settings.fleet, collector))
        sample_metrics = SampleMetrics(settings.fleet)
        registry.register(sample_metrics)

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    if settings.registry is not None:
        app.include_router(registry_router(Registry(settings.registry)))
    if store is not None:
        app.include_router(fleet_router(store, settings.fleet, collector))
        sample_root = settings.samples.root or settings.state_dir / "samples"
        app.include_router(
            samples_router(
                SampleStore(store, sample_root), settings.fleet, settings.samples, sample_metrics
            )
        )
        app.mount("/dashboard", StaticFiles(directory=DASHBOARD_DIR, html=True), name="dashboard")

        @app.get("/", include_in_schema=False)
        def root() -> RedirectResponse:
            return RedirectResponse("/dashboard/")

    docs_routes_last(app)
    app.state.plane = plane
    app.state.collector = collector
    app.state.store = store
    app.state.controller = controller
    return app


def _background_controller(
    settings: CloudSettings, store: FleetStore | None
) -> BackgroundController | None:
    """The rollout controller this instance runs beside serving, when ``controller.
    run_in_server`` and a broker and a registry are set: over an MQTT connection of its own
    (the collector's is persistent, for its share of telemetry), under a client id unique to
    this instance. Imported only then: a server without it does not load the rollout code."""
    if not settings.controller.run_in_server:
        return None
    if settings.mqtt is None or store is None or settings.registry is None:
        log.warning("controller.run_in_server needs mqtt and registry: no controller here")
        return None
    from cloud.fleet.controller import BackgroundController, FleetController

    mqtt = MqttClient(
        settings.mqtt.model_copy(update={"persistent_session": False}),
        client_id=f"controller-{settings.fleet}-{settings.instance}",
    )
    controller = FleetController(
        store,
        mqtt,
        Registry(settings.registry),
        settings.fleet,
        settings.controller,
        progress=log.info,
    )
    return BackgroundController(controller, mqtt)
