"""The local endpoint on uvicorn in the main thread, until SIGINT or SIGTERM, then *return*.

``uvicorn.run`` (0.29 and later, ``Server.capture_signals``) re-raises the signal once its
own shutdown is done, with the default handler back in place: the process dies there, and
whatever its caller had left to shut down (``AgentService.stop``: the last telemetry
interval, the clean MQTT goodbye) never runs. This server takes the same signals to stop
but does not re-raise them.

Callers block SIGINT and SIGTERM before they start anything (``block_stop_signals`` in
``agent/device/systemd.py``), so a signal that comes while the agent boots waits, and is handled
as soon as uvicorn listens for it; while the caller shuts down afterwards, a second one
waits too.

uvicorn (the ``serve`` extra) is imported when it serves, not with this module.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from agent.device.systemd import STOP_SIGNALS
from agent.settings import ServerSettings

if TYPE_CHECKING:
    import uvicorn


def _server_class() -> Callable[[uvicorn.Config, Callable[[], None]], uvicorn.Server]:
    """Built on first use: the agent imports web frameworks only inside functions
    (tests/unit/test_boundaries.py)."""
    import uvicorn

    class Server(uvicorn.Server):
        def __init__(self, config: uvicorn.Config, on_listening: Callable[[], None]) -> None:
            super().__init__(config)
            self._on_listening = on_listening

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # one held since boot: now
            try:
                yield
            finally:
                signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                self._on_listening()

    return Server


def serve(
    app: Any,
    settings: ServerSettings,
    log_level: str,
    on_listening: Callable[[], None] = lambda: None,
) -> None:
    """Serve ``app`` until SIGINT/SIGTERM; ``on_listening`` runs once the socket listens."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level.lower(),
        access_log=False,
    )
    _server_class()(config, on_listening).run()
