"""ShadowRunner with real digits TFLite models: the serving int8 model answers through a real
``Agent`` (its observer collects the observations), a candidate (the float model, or one made
worse by swapping two classes) runs in the shadow, and every count is checked against the
same numbers computed directly from the two models' outputs."""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent import Agent, AgentSettings
from agent.inference.backends import TFLiteSettings
from agent.inference.confidence import confidence, to_probabilities
from agent.inference.model import LoadedModel, load_model
from agent.inference.observe import Observation
from agent.inference.shadow import ShadowRunner
from agent.settings import ShadowSettings
from cloud.pipeline.data import SplitData
from cloud.releases.packaging import PackageRequest, package
from cloud.releases.registry import Registry
from shared.manifest import Manifest
from shared.signing import SigningKey
from shared.telemetry import ShadowStats
from tests.fleet import wait_for
from tests.helpers import EDGE_F32, EDGE_INT8
from tests.shadow_candidates import swapped_classes

ROWS = 300


def packaged(edge_dir: Path, tmp: Path, version: int = 2) -> LoadedModel:
    """``edge_dir`` packaged and signed as release ``version`` of digits, loaded."""
    registry = Registry(tmp / "registry")
    template = Manifest.load(edge_dir)
    request = PackageRequest(edge=edge_dir / "model.tflite", template=template, version=version)
    package(request, SigningKey.generate(), registry)
    return load_model(registry.release_dir("digits", version), TFLiteSettings())


@pytest.fixture
def agent() -> Iterator[Agent]:
    """The serving model (digits-int8, v1), answering on the edge only."""
    a = Agent(AgentSettings(model_dir=EDGE_INT8, routing={"mode": "edge"}))
    yield a
    a.close()


def observations(agent: Agent, x: np.ndarray) -> list[Observation]:
    seen: list[Observation] = []
    agent.observer = seen.append
    for row in x:
        agent.infer(row)
    agent.observer = None
    return seen


def expected_counts(
    candidate: LoadedModel, x: np.ndarray, serving: list[int], labels: list[int | None]
) -> dict[str, int]:
    """ShadowStats' counts from the candidate's outputs, computed directly."""
    m = candidate.manifest
    assert m.output_kind is not None
    probs = to_probabilities(candidate.backend.infer(x.astype(np.float32)), m.output_kind)
    top = probs.argmax(axis=1)
    conf = [confidence(p, m.routing.metric) for p in probs]
    c = dict.fromkeys(
        [
            "samples",
            "agree_serving",
            "labelled",
            "agree_cloud",
            "serving_agree_cloud",
            "shadow_only_right",
            "serving_only_right",
            "would_escalate",
        ],
        0,
    )
    for i, label in enumerate(labels):
        c["samples"] += 1
        c["agree_serving"] += int(top[i] == serving[i])
        c["would_escalate"] += int(conf[i] < m.routing.threshold)
        if label is None:
            continue
        c["labelled"] += 1
        c["agree_cloud"] += int(top[i] == label)
        c["serving_agree_cloud"] += int(serving[i] == label)
        c["shadow_only_right"] += int(top[i] == label != serving[i])
        c["serving_only_right"] += int(serving[i] == label != top[i])
    return c


def stats(runner: ShadowRunner) -> ShadowStats:
    runner.drain()
    section = runner.section()
    assert set(section) == {"shadow"}
    return section["shadow"]


@pytest.mark.parametrize("worse", [False, True], ids=["f32", "swapped-3-8"])
def test_counts_match_a_direct_computation(
    agent: Agent, digits: SplitData, tmp_path: Path, worse: bool
) -> None:
    edge = swapped_classes(EDGE_F32, tmp_path / "worse") if worse else EDGE_F32
    candidate = packaged(edge, tmp_path)
    runner = ShadowRunner(ShadowSettings(max_pending=ROWS))
    runner.install(candidate)
    x, y = digits.test.x[:ROWS], digits.test.y[:ROWS]
    seen = observations(agent, x)
    # every third answer carries the cloud's label (here the true one), as an escalation
    labels: list[int | None] = [int(y[i]) if i % 3 == 0 else None for i in range(ROWS)]
    for obs, label in zip(seen, labels):
        runner.observe(dataclasses.replace(obs, cloud_index=label))
    got = stats(runner)
    want = expected_counts(candidate, x, [o.edge_index for o in seen], labels)
    assert got.model_dump(exclude={"model", "version", "dropped"}) == want
    assert (got.model, got.version, got.dropped) == ("digits", 2, 0)
    if worse:  # wrong on every 3 and 8: the serving model is clearly better with the cloud
        assert got.agree_cloud < got.serving_agree_cloud - 5
        assert got.serving_only_right > got.shadow_only_right
    else:
        assert got.agree_serving > 0.9 * got.samples
    runner.clear()


def test_audits_are_always_run_and_sampling_follows_the_rate(
    agent: Agent, digits: SplitData, tmp_path: Path
) -> None:
    candidate = packaged(EDGE_F32, tmp_path)
    runner = ShadowRunner(ShadowSettings(sample_rate=0.3, max_pending=ROWS), rng=random.Random(7))
    runner.install(candidate)
    x, y = digits.test.x[:ROWS], digits.test.y[:ROWS]
    seen = observations(agent, x)
    for obs in seen:
        runner.observe(obs)
    draws = random.Random(7)
    sampled = [i for i in range(ROWS) if draws.random() < 0.3]
    got = stats(runner)
    serving = [seen[i].edge_index for i in sampled]
    want = expected_counts(candidate, x[sampled], serving, [None] * len(sampled))
    assert got.model_dump(exclude={"model", "version", "dropped"}) == want
    assert 0 < got.samples < ROWS
    # audited answers (the cloud's label) are run whatever the rate
    for obs, label in zip(seen, y):
        runner.labelled(dataclasses.replace(obs, cloud_index=int(label), reason="audit"))
    got = stats(runner)
    assert got.samples == got.labelled == ROWS
    labels: list[int | None] = [int(v) for v in y]
    want = expected_counts(candidate, x, [o.edge_index for o in seen], labels)
    assert got.model_dump(exclude={"model", "version", "dropped"}) == want
    runner.clear()


def test_a_full_queue_drops_and_counts(agent: Agent, digits: SplitData, tmp_path: Path) -> None:
    runner = ShadowRunner(ShadowSettings(max_pending=4))
    runner.install(packaged(EDGE_F32, tmp_path))
    for obs in observations(agent, digits.test.x[:10]):
        runner.observe(obs)
    got = stats(runner)
    assert (got.samples, got.dropped) == (4, 6)
    runner.clear()


def test_what_is_not_run(agent: Agent, digits: SplitData, tmp_path: Path) -> None:
    runner = ShadowRunner(ShadowSettings())
    (obs,) = observations(agent, digits.test.x[:1])
    runner.observe(obs)
    assert runner.section() == {}  # no shadow: no section
    runner.install(packaged(EDGE_F32, tmp_path))
    assert stats(runner).samples == 0  # installed: reported, even with nothing run
    runner.observe(dataclasses.replace(obs, version=2))  # serving reached the candidate
    runner.observe(dataclasses.replace(obs, model="other"))
    runner.labelled(obs)  # an audit without a label
    assert stats(runner).samples == 0
    runner.observe(obs)  # the positive control
    assert stats(runner).samples == 1
    runner.observe(obs)
    runner.clear()  # queued runs of a cleared shadow are skipped
    runner.drain()
    assert runner.section() == {} and runner.model is None


def test_install_and_clear_while_observing(
    agent: Agent, digits: SplitData, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker runs while another thread installs and clears candidates: no run ever
    meets a closed model, and what the last candidate ran on is counted."""
    models = [packaged(EDGE_F32, tmp_path / str(i), version=2 + i) for i in range(6)]
    seen = observations(agent, digits.test.x[:50])
    runner = ShadowRunner(ShadowSettings(max_pending=10_000))
    runner.start()
    stop = threading.Event()

    def feed() -> None:
        while not stop.is_set():
            for obs in seen:
                runner.observe(obs)

    feeder = threading.Thread(target=feed)
    feeder.start()
    last = packaged(EDGE_F32, tmp_path / "last", version=9)
    try:
        with caplog.at_level(logging.WARNING):
            for model in models:
                runner.install(model)
                runner.section()
                runner.clear()
            runner.install(last)
            wait_for(lambda: runner.section()["shadow"].samples > 0, what="the last one ran")
    finally:
        stop.set()
        feeder.join()
        runner.stop(timeout_s=10)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert runner.model is None  # stop closed it
