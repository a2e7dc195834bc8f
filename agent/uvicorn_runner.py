"""The local endpoint on uvicorn in the main thread, until SIGINT or SIGTERM, then *return*.

``uvicorn.run`` (0.29 and later, ``Server.capture_signals``) re-raises the signal once its
own shutdown is done, with the default handler back in place: the process dies there, and
whatever its caller had left to shut down (``AgentService.stop``: the last telemetry
interval, the clean MQTT goodbye) never runs. This server takes the same signals to stop
but does not re-raise them.

The signals reach it through the caller's ``StopRequest`` (``agent/stop.py``), installed
before anything started: a request that came while the agent booted stops uvicorn as soon
as it runs, and a second request forces uvicorn's exit.

uvicorn (the ``serve`` extra) is imported when it serves, not with this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from agent.settings import ServerSettings
from agent.stop import StopRequest

if TYPE_CHECKING:
    import uvicorn


def _server_class() -> Callable[[uvicorn.Config, Callable[[], None], StopRequest], uvicorn.Server]:
    """Built on first use: the agent imports web frameworks only inside functions
    (tests/unit/test_boundaries.py)."""
    import uvicorn

    class Server(uvicorn.Server):
        def __init__(
            self, config: uvicorn.Config, on_listening: Callable[[], None], stop: StopRequest
        ) -> None:
            super().__init__(config)
            self._on_listening = on_listening
            self._stop = stop

        def _on_stop(self, count: int) -> None:
            self.should_exit = True
            if count > 1:
                self.force_exit = True

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            """The caller's handlers stay; a stop request ends the serving loop, and nothing
            is re-raised afterwards."""
            forget = self._stop.listen(self._on_stop)
            try:
                yield
            finally:
                forget()

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                self._on_listening()

    return Server


def server_config(app: Any, settings: ServerSettings, log_level: str) -> uvicorn.Config:
    """uvicorn's configuration of the endpoint. The endpoint has no WebSocket route, and
    the standard event loop serves a device's request rate: uvicorn's defaults ("auto")
    would import websockets and uvloop, 2 MB of RSS for nothing (scripts/bench_agent_rss.py)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level.lower(),
        access_log=False,
        ws="none",
        loop="asyncio",
    )


def serve(
    app: Any,
    settings: ServerSettings,
    log_level: str,
    stop: StopRequest,
    on_listening: Callable[[], None] = lambda: None,
) -> None:
    """Serve ``app`` until ``stop`` is requested; ``on_listening`` runs once the socket
    listens."""
    config = server_config(app, settings, log_level)
    _server_class()(config, on_listening, stop).run()
