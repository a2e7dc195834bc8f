"""SIGINT and SIGTERM as a request to stop, from the start of ``main`` to its end.

A process-directed signal goes to any thread that does not block it. NumPy's BLAS starts its
threads when NumPy is imported, before ``main`` could block anything, so masking the stop
signals in the main thread (and ``sigwait``) still let the kernel hand a SIGTERM to one of
those threads, where the default action killed the agent without its shutdown (seen: about
one test run in three, when the signal came just before ``sigwait``). Python's own handler
runs whichever thread the signal lands on and records it; the main thread acts on it: during
boot it waits for the boot to finish, while serving it stops uvicorn, then the caller's
shutdown runs. A second signal while stopping asks for a faster exit (uvicorn's force_exit).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: ``listener(count)``: called in the main thread at each stop request (count 1, 2, ...)
Listener = Callable[[int], None]


class StopRequest:
    """Install once in the main thread; then ``wait()``, or ``listen`` to act at once."""

    def __init__(self) -> None:
        self.count = 0
        self._event = threading.Event()
        self._listeners: list[Listener] = []

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self._event.set()
        for listener in list(self._listeners):
            listener(self.count)

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` at every request from now on, and at once if one came already;
        returns what removes it."""
        self._listeners.append(listener)
        if self.count:
            listener(self.count)
        return lambda: self._listeners.remove(listener)

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def wait(self) -> None:
        """Until a stop is requested (in short waits: the handler runs between them)."""
        while not self._event.wait(0.5):
            pass
