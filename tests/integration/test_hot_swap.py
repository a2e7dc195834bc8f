"""Hot swap under load: requests keep flowing through model swaps, none fails, and every answer
names the model that computed it. The two models differ in version (``digits:1`` int8,
``digits:2`` float32) and in their outputs for every sample used, so a swap can be seen."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np

from agent import Agent, AgentSettings
from agent.inference.backends import TFLiteSettings
from agent.inference.model import load_model
from cloud.pipeline.data import SplitData
from shared.manifest import MANIFEST_FILE, Manifest
from tests.fleet import Fleet, last_state, wait_for
from tests.helpers import EDGE_F32, EDGE_INT8

SAMPLES = 64


class Load:
    """Four threads sending edge requests to ``agent``. Each answer is checked against what
    the model it names answers for that sample (``expected``: model ref -> probabilities per
    sample); ``refs[t]`` is the model each answer of thread ``t`` named, in order."""

    def __init__(self, agent: Agent, x: np.ndarray, expected: dict[str, list[list[float]]]):
        self.agent, self.x, self.expected = agent, x, expected
        self.refs: list[list[str]] = [[] for _ in range(4)]
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._drive, args=(r,)) for r in self.refs]

    def _drive(self, refs: list[str]) -> None:
        i = 0
        while not self._stop.is_set():
            sample = i % len(self.x)
            try:
                r = self.agent.infer(self.x[sample], mode="edge")
                assert r.probs == self.expected[r.edge_model][sample], (
                    f"sample {sample}: the answer is not {r.edge_model}'s"
                )
                refs.append(r.edge_model)
            except BaseException as exc:
                self.errors.append(exc)
            i += 1

    def mark(self) -> list[int]:
        """How many answers each thread has given so far."""
        return [len(refs) for refs in self.refs]

    def all_answered(self, ref: str, since: list[int]) -> bool:
        """Whether every thread has answered twice since ``since`` (a ``mark()``) and its
        latest answer came from ``ref``. The second answer's request began after the mark,
        so only a model active by then can have given it."""
        return all(len(r) - m >= 2 and r[-1] == ref for r, m in zip(self.refs, since))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def _answers(model_dir: Path, x: np.ndarray) -> list[list[float]]:
    """What the model in ``model_dir`` answers for each sample, from an agent of its own."""
    with Agent(AgentSettings(model_dir=model_dir)) as agent:
        return [agent.infer(sample, mode="edge").probs for sample in x]


def _as_version_2(model_dir: Path, tmp: Path) -> Path:
    """A copy of ``model_dir`` whose manifest says version 2."""
    copy = tmp / f"{model_dir.name}-v2"
    shutil.copytree(model_dir, copy)
    manifest = Manifest.load(model_dir).model_copy(update={"version": 2})
    (copy / MANIFEST_FILE).write_text(manifest.to_json())
    return copy


def _expected(v1: Path, v2: Path, x: np.ndarray) -> dict[str, list[list[float]]]:
    expected = {"digits:1": _answers(v1, x), "digits:2": _answers(v2, x)}
    # the positive control: every sample tells the two models apart
    assert all(a != b for a, b in zip(expected["digits:1"], expected["digits:2"]))
    return expected


def test_many_swaps_under_concurrent_load(digits: SplitData, tmp_path: Path) -> None:
    x = digits.test.x[:SAMPLES]
    f32_v2 = _as_version_2(EDGE_F32, tmp_path)
    expected = _expected(EDGE_INT8, f32_v2, x)
    agent = Agent(AgentSettings(model_dir=EDGE_INT8, backend={"kind": "tflite", "pool_size": 2}))
    try:
        with Load(agent, x, expected) as load:
            start = load.mark()
            wait_for(lambda: load.all_answered("digits:1", start), what="answers from v1")
            for k in range(30):
                new = load_model(f32_v2 if k % 2 == 0 else EDGE_INT8, TFLiteSettings(pool_size=2))
                old = agent.activate(new)
                swapped = load.mark()
                old.close()  # closed at once: requests already holding it must still finish
                ref = new.manifest.ref
                wait_for(
                    lambda ref=ref, swapped=swapped: load.all_answered(ref, swapped),
                    what=f"swap {k}: answers from {ref}",
                )
        assert load.errors == []
        assert agent.infer(x[0], mode="edge").edge_model == "digits:1"  # the last swap's
    finally:
        agent.close()


def test_update_under_load_drops_nothing(fleet: Fleet, digits: SplitData) -> None:
    x = digits.test.x[:SAMPLES]
    # v2 is the float32 artifact, released (and so renumbered) by the fleet's registry
    expected = _expected(EDGE_INT8, EDGE_F32, x)
    service = fleet.start_agent("dev-0")
    with Load(service.agent, x, expected) as load:
        start = load.mark()
        wait_for(lambda: load.all_answered("digits:1", start), what="answers from v1")
        fleet.publish(fleet.release())
        wait_for(lambda: last_state(fleet, "dev-0", 2) == ("ACTIVE", ""), what="ACTIVE")
        active = load.mark()  # v2 serves from before ACTIVE is reported
        wait_for(lambda: load.all_answered("digits:2", active), what="answers from v2")
    assert load.errors == []
    for refs in load.refs:  # each thread: v1's answers, then v2's, never v1's again
        switch = refs.index("digits:2")
        assert set(refs[:switch]) == {"digits:1"} and set(refs[switch:]) == {"digits:2"}
