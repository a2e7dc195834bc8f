from __future__ import annotations

from agent.inference.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_opens_after_consecutive_failures_and_probes_once() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=3, reset_timeout_s=5.0, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    assert b.state == "closed"
    b.record_failure()
    assert b.state == "open" and not b.allow()
    clock.t = 4.9
    assert not b.allow()
    clock.t = 5.0
    assert b.state == "half_open"
    assert b.allow()  # the probe
    assert not b.allow()  # only one probe at a time
    b.record_failure()
    assert b.state == "open" and not b.allow()
    clock.t = 10.0
    assert b.allow()
    b.record_success()
    assert b.state == "closed" and b.allow() and b.opened_count == 2


def test_success_resets_the_count() -> None:
    b = CircuitBreaker(failure_threshold=2, clock=Clock())
    b.record_failure()
    b.record_success()
    b.record_failure()
    assert b.state == "closed"


def test_says_when_an_outage_starts_and_ends() -> None:
    """True once when it opens (not when a failed probe re-opens it), once when it closes."""
    clock = Clock()
    b = CircuitBreaker(failure_threshold=2, reset_timeout_s=5.0, clock=clock)
    assert [b.record_failure(), b.record_failure(), b.record_failure()] == [False, True, False]
    clock.t = 5.0
    assert b.allow()  # the probe
    assert b.record_failure() is False  # re-opened: still the same outage
    clock.t = 10.0
    assert b.allow()
    assert b.record_success() is True
    assert b.record_success() is False  # closed already
