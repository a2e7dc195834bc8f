"""What the learning loop sees of each answered request, handed over off the request path.

``Agent.observer`` (None by default: then a request pays one attribute test) is called on
the request's thread with an ``Observation`` after the answer is known: the edge model's
own answer, and the cloud's when the request escalated. It must return at once: the
device's consumers (capture, audit, shadow) sit behind an ``ObservationQueue``, whose
``offer`` appends to a bounded queue that a thread of its own drains; when the queue is
full the observation is dropped and counted, never waited for.

Only classifiers are observed (flat rows, and any-input models whose task is
``classification``): the loop's labels, agreement and error rates are top-1 classes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(slots=True)
class Observation:
    """One answered request. ``features`` is the raw row of a flat model (a copy: the
    caller may reuse its array), ``encoded`` the caller's encoded image for an image model
    (JPEG/PNG bytes as sent), one of them set. ``edge_*`` is the serving edge model's own
    answer, ``cloud_*`` the cloud's when the request was answered there (else None)."""

    features: np.ndarray | None
    encoded: bytes | None
    edge_index: int
    edge_confidence: float
    edge_probs: list[float]
    source: str
    reason: str
    cloud_index: int | None
    cloud_confidence: float | None
    cloud_probs: list[float] | None
    model: str
    version: int
    threshold: float
    #: wall-clock time of the answer (``time.time()``)
    ts: float
    #: ``time.monotonic()`` of the answer: capture keeps only answers given while it was on
    answered: float = field(default_factory=time.monotonic)

    @property
    def escalated(self) -> bool:
        return self.cloud_index is not None


Observer = Callable[[Observation], None]


class BoundedWorker(Generic[T]):
    """A bounded hand-over to one daemon thread of its own: the learning loop's consumers
    (the observation queue, the audit, the shadow) each sit behind one. ``put`` is O(1) and
    never blocks: False when ``max_pending`` items wait (the caller counts the drop). The
    thread calls ``handle`` on each item in order; one that raises is logged (the first
    time) and the thread goes on."""

    def __init__(self, handle: Callable[[T], object], max_pending: int, name: str) -> None:
        self.handle = handle
        self.max_pending = max_pending
        self.name = name
        self._items: deque[T] = deque()
        self._ready = threading.Condition()
        self._stop = False
        self._failed = False
        self._thread: threading.Thread | None = None

    def put(self, item: T) -> bool:
        if len(self._items) >= self.max_pending:
            return False
        self._items.append(item)
        with self._ready:
            self._ready.notify()
        return True

    @property
    def pending(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        """Forget what is queued (not what is being handled)."""
        self._items.clear()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> bool:
        """End the thread after the item it is on (what is still queued stays for
        ``drain``). False when it is still busy after ``timeout_s`` (a slow ``handle``): it
        ends once that returns, so what ``handle`` writes to must stay open."""
        with self._ready:
            self._stop = True
            self._ready.notify()
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def drain(self) -> None:
        """Handle every queued item now, on this thread (tests, and ``stop`` callers that
        want nothing left behind). Safe beside the worker's own thread (a ``stop`` that
        timed out): each item is popped once, by one of them."""
        self._drain(until_stopped=False)

    def _drain(self, until_stopped: bool) -> None:
        while not (until_stopped and self._stop):
            try:
                item = self._items.popleft()
            except IndexError:  # empty, or another thread took the last one
                return
            try:
                self.handle(item)
            except Exception:  # the thread must outlive any one item
                if not self._failed:
                    self._failed = True
                    log.exception("%s: handling an item failed (logged once)", self.name)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._items and not self._stop:
                    self._ready.wait(1.0)
                if self._stop:
                    return
            self._drain(until_stopped=True)


class ObservationQueue(BoundedWorker[Observation]):
    """The hand-over from request threads to the loop's consumers: ``offer`` is O(1) and
    never blocks; one daemon thread calls every consumer on each observation, in order. A
    consumer that raises is logged (once per consumer) and does not stop the others."""

    def __init__(self, consumers: list[Observer], max_pending: int = 1024) -> None:
        super().__init__(self._dispatch, max_pending, "tandem-observe")
        self.consumers = consumers
        self.dropped = 0
        self._failed_consumers: set[int] = set()

    def offer(self, observation: Observation) -> None:
        """Queue one observation (dropped and counted when ``max_pending`` are waiting)."""
        if not self.put(observation):
            self.dropped += 1

    def _dispatch(self, observation: Observation) -> None:
        for i, consume in enumerate(self.consumers):
            try:
                consume(observation)
            except Exception:
                if i not in self._failed_consumers:
                    self._failed_consumers.add(i)
                    log.exception("an observation consumer failed (logged once)")
