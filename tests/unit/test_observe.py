"""``ObservationQueue``'s stop and drain when its thread is still busy: a stop whose join
timed out leaves the thread running beside the caller's ``drain``; each observation must be
handed on once, by one of them, without an error on either (an ``IndexError`` on the
service's thread skipped the rest of ``AgentService.stop``)."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import pytest

from agent.inference.observe import Observation, ObservationQueue
from tests.unit.test_audit import observation


class _GatedDeque(deque[Observation]):
    """Holds the queue's own thread just before its first pop until the test says go: the
    moment another thread can empty the queue under it."""

    def __init__(self) -> None:
        super().__init__()
        self.about_to_pop = threading.Event()
        self.go = threading.Event()
        self._gated = False

    def popleft(self) -> Observation:
        if threading.current_thread().name == "tandem-observe" and not self._gated:
            self._gated = True
            self.about_to_pop.set()
            assert self.go.wait(10)
        return super().popleft()


@pytest.fixture
def thread_errors(monkeypatch: pytest.MonkeyPatch) -> list[BaseException | None]:
    errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    return errors


def test_drain_beside_the_queues_own_thread_hands_each_observation_on_once(
    thread_errors: list[BaseException | None],
) -> None:
    seen: list[float] = []
    q = ObservationQueue([lambda o: seen.append(float(o.features[0]))])  # type: ignore[index]
    gated = _GatedDeque()
    q._items = gated  # the one seam: where the other thread's pop lands
    q.start()
    for i in range(3):
        q.offer(observation(x0=float(i)))
    assert gated.about_to_pop.wait(10)
    q.drain()  # the service's thread empties the queue while the queue's is about to pop
    gated.go.set()
    joined = q.stop()
    assert thread_errors == []
    assert sorted(seen) == [0.0, 1.0, 2.0]
    assert joined


def test_a_stop_that_times_out_says_so_and_the_thread_stops_after_its_observation(
    thread_errors: list[BaseException | None],
) -> None:
    entered, release = threading.Event(), threading.Event()
    by: list[tuple[str, float]] = []

    def slow(o: Observation) -> None:
        assert o.features is not None
        by.append((threading.current_thread().name, float(o.features[0])))
        if threading.current_thread().name == "tandem-observe":
            entered.set()
            assert release.wait(10)

    q = ObservationQueue([slow])
    q.start()
    q.offer(observation(x0=0.0))
    assert entered.wait(10)
    for i in range(1, 4):
        q.offer(observation(x0=float(i)))
    joined = q.stop(timeout_s=0.01)
    q.drain()  # the rest, on this thread
    release.set()
    assert q._thread is not None
    q._thread.join(10)
    assert not q._thread.is_alive() and thread_errors == []
    # the queue's thread handled the one it was on, and no more
    main = threading.current_thread().name
    assert by == [("tandem-observe", 0.0), *((main, float(i)) for i in range(1, 4))]
    assert joined is False  # it was busy in a consumer


def test_stop_without_a_thread(thread_errors: list[Any]) -> None:
    assert ObservationQueue([]).stop()
