"""Hot swap under load: requests keep flowing through model swaps and none fails."""

from __future__ import annotations

import threading

from agent import Agent, AgentSettings
from agent.inference.backends import TFLiteSettings
from agent.inference.model import load_model
from cloud.pipeline.data import SplitData
from tests.fleet import Fleet, last_state, wait_for
from tests.helpers import EDGE_F32, EDGE_INT8


def _drive(
    agent: Agent,
    digits: SplitData,
    stop: threading.Event,
    seen: set[str],
    errors: list[BaseException],
) -> None:
    i = 0
    while not stop.is_set():
        try:
            r = agent.infer(digits.test.x[i % len(digits.test)], mode="edge")
            assert r.label in {str(c) for c in range(10)}
            seen.add(r.edge_model)
        except BaseException as exc:
            errors.append(exc)
        i += 1


def test_many_swaps_under_concurrent_load(digits: SplitData) -> None:
    agent = Agent(AgentSettings(model_dir=EDGE_INT8, backend={"kind": "tflite", "pool_size": 2}))
    v2 = load_model(EDGE_F32, TFLiteSettings(pool_size=2))
    stop, seen, errors = threading.Event(), set[str](), list[BaseException]()
    threads = [
        threading.Thread(target=_drive, args=(agent, digits, stop, seen, errors)) for _ in range(4)
    ]
    for t in threads:
        t.start()
    try:
        for k in range(30):
            new = load_model(EDGE_F32 if k % 2 == 0 else EDGE_INT8, TFLiteSettings(pool_size=2))
            new = new if k else v2
            old = agent.activate(new)
            old.close()  # closed at once: requests already holding it must still finish
            stop.wait(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert agent.model.manifest.ref in seen


def test_update_under_load_drops_nothing(fleet: Fleet, digits: SplitData) -> None:
    service = fleet.start_agent("dev-0")
    stop, seen, errors = threading.Event(), set[str](), list[BaseException]()
    threads = [
        threading.Thread(target=_drive, args=(service.agent, digits, stop, seen, errors))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    try:
        fleet.publish(fleet.release())
        wait_for(lambda: last_state(fleet, "dev-0", 2) == ("ACTIVE", ""), what="ACTIVE")
        stop.wait(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert seen == {"digits:1", "digits:2"}
