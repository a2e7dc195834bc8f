"""A circuit breaker for the cloud path: stop paying for calls that keep failing.

Closed: every call goes. After ``failure_threshold`` consecutive failures it opens: no call
goes for ``reset_timeout_s``. Then it is half-open: exactly one probe call goes; its success
closes the breaker, its failure opens it again for another ``reset_timeout_s``.

``record_failure`` and ``record_success`` say when they changed whether the cloud is
considered down (closed to open, and open or half-open to closed; a failed probe re-opening
it changes nothing there), so the caller can log an outage once when it starts and once when
it ends, never per request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 3,
        reset_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self.opened_count = 0

    @property
    def state(self) -> BreakerState:
        with self._lock:
            if self._state == "open" and self._clock() - self._opened_at >= self.reset_timeout_s:
                return "half_open"
            return self._state

    def allow(self) -> bool:
        """Whether a call may go now. In half-open state only the first caller gets True, and
        must report its outcome with ``record_success`` or ``record_failure``."""
        if self._state == "closed":  # the common case, without the lock
            return True
        with self._lock:
            if self._state == "open":
                if self._clock() - self._opened_at < self.reset_timeout_s:
                    return False
                self._state = "half_open"
                self._probe_in_flight = False
            if self._state == "half_open":
                if self._probe_in_flight:
                    return False
                self._probe_in_flight = True
                return True
            return True

    def record_success(self) -> bool:
        """A call went through. True when this closed an open (or half-open) breaker."""
        with self._lock:
            was_down = self._state != "closed"
            self._state = "closed"
            self._failures = 0
            self._probe_in_flight = False
            return was_down

    def record_failure(self) -> bool:
        """A call failed. True when this opened a closed breaker (not when a failed probe
        re-opens it: the cloud was down already)."""
        with self._lock:
            self._failures += 1
            if self._state == "half_open" or self._failures >= self.failure_threshold:
                opened = self._state == "closed"
                if self._state != "open":
                    self.opened_count += 1
                self._state = "open"
                self._opened_at = self._clock()
                self._probe_in_flight = False
                return opened
            return False
