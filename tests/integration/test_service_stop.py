"""``AgentService.stop`` with the observation queue's thread still busy in a consumer past
its join's timeout: the service's thread captures what is still queued beside it, nothing
raises, and the spool stays open for the observation that thread finishes afterwards
(it used to be closed under it: the sample was lost, the consumer's error logged)."""

from __future__ import annotations

import functools
import sqlite3
import threading
from pathlib import Path

import pytest

from agent.device.service import AgentService
from agent.inference.observe import Observation
from agent.settings import AgentSettings
from tests.helpers import EDGE_INT8
from tests.unit.test_audit import observation


def spooled(state_dir: Path) -> int:
    db = sqlite3.connect(f"file:{state_dir / 'samples.db'}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])
    finally:
        db.close()


def test_stop_leaves_the_spool_open_while_a_consumer_is_still_busy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = AgentSettings(
        model_dir=EDGE_INT8,
        device="dev-stop",
        fleet="stopfleet",
        state_dir=tmp_path / "agent",
        capture={"enabled": True, "max_samples_per_hour": None, "audit_rate": 0.0},
    )
    service = AgentService(settings)
    service.start()
    entered, release = threading.Event(), threading.Event()

    def slow(o: Observation) -> None:  # a consumer busy past the join's timeout
        if threading.current_thread().name == "tandem-observe":
            entered.set()
            assert release.wait(10)

    q = service.observations
    q.consumers.insert(0, slow)
    monkeypatch.setattr(q, "stop", functools.partial(q.stop, timeout_s=0.05))
    q.offer(observation(cloud=2, x0=1.0))
    assert entered.wait(10)
    q.offer(observation(cloud=2, x0=2.0))  # still queued when stop begins
    service.stop()
    assert spooled(settings.state_dir) == 1  # the queued one, captured on this thread
    release.set()
    assert q._thread is not None
    q._thread.join(10)
    assert not q._thread.is_alive()
    assert spooled(settings.state_dir) == 2  # the busy one's too: the spool was open
    assert not [r for r in caplog.records if "consumer failed" in r.getMessage()]
    assert "spool is left open" in caplog.text
    service.spool.close()
