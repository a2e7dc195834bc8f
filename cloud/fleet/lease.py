"""A named lease in the fleet store, held by one holder at a time and renewed in the
background: what makes one rollout controller act at a time across instances.

The store decides who holds it (``FleetStore.try_lease``: one conditional write, atomic across
processes). This side keeps it: a thread renews it every third of its time to live, and the
holder asks ``check()`` before each act. ``check()`` fails the moment a renewal fails, and also
when no renewal has succeeded for a whole time to live (a process paused past its lease must
not act on it when it wakes up, before its renewal thread has had a chance to find out).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from shared.errors import TandemError

log = logging.getLogger(__name__)


class LeaseLostError(TandemError):
    """This instance no longer holds the lease: another one may be acting now."""


class LeaseStore(Protocol):
    """What a lease needs of the fleet store."""

    def try_lease(self, name: str, holder: str, ttl_s: float) -> bool: ...

    def release_lease(self, name: str, holder: str) -> None: ...


class Lease:
    """``acquire()`` takes the lease (or renews it, if this holder has it already) and starts
    the renewal thread; ``check()`` raises ``LeaseLostError`` unless it is still held;
    ``release()`` hands it over at once (the next holder need not wait for it to expire)."""

    def __init__(
        self,
        store: LeaseStore,
        name: str,
        holder: str,
        ttl_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        renew_in_background: bool = True,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError("a lease's time to live must be positive")
        self.store, self.name, self.holder, self.ttl_s = store, name, holder, ttl_s
        self.renew_every_s = ttl_s / 3
        self._clock = clock
        self._background = renew_in_background
        self._lock = threading.Lock()
        self._valid_until = float("-inf")  # clock time; -inf: not held
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        with self._lock:
            return self._clock() < self._valid_until

    def check(self) -> None:
        """Raise ``LeaseLostError`` unless this holder still holds the lease."""
        if not self.held:
            raise LeaseLostError(f"{self.holder} no longer holds the lease {self.name!r}")

    def acquire(self) -> bool:
        """Take or renew the lease; True if this holder has it now."""
        if not self._renew():
            return False
        if self._thread is not None and self._stop.is_set():  # dropped: a fresh thread
            self._thread.join()
            self._thread = None
        if self._background and (self._thread is None or not self._thread.is_alive()):
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._renew_loop, name=f"lease-{self.name}", daemon=True
            )
            self._thread.start()
        return True

    def renew(self) -> bool:
        """One renewal (the background thread's step): False, and the lease counts as lost
        from now on, if the store refused it or could not be asked."""
        return self._renew()

    def _renew(self) -> bool:
        started = self._clock()  # the store counts the time to live from about now, or later
        try:
            ok = self.store.try_lease(self.name, self.holder, self.ttl_s)
        except Exception:  # the store is unreachable: nobody can tell we still hold it
            log.exception("renewing the lease %r failed", self.name)
            ok = False
        with self._lock:
            self._valid_until = started + self.ttl_s if ok else float("-inf")
        return ok

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            if not self._renew():
                log.warning("%s lost the lease %r", self.holder, self.name)
                return

    def drop(self) -> None:
        """Stop acting at once (``check()`` fails from now on), without telling the store
        yet: the holder unwinds, then calls ``release()``."""
        self._stop.set()
        with self._lock:
            self._valid_until = float("-inf")

    def release(self) -> None:
        """Stop renewing and free the lease in the store (if this holder still has it)."""
        self.drop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        try:
            self.store.release_lease(self.name, self.holder)
        except Exception:  # it expires by itself
            log.exception("releasing the lease %r failed", self.name)
