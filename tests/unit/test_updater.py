"""The updater's checks with a fake model and a scripted registry (httpx MockTransport):
agent version requirements by PEP 440, times without a zone, forged copies and dedupe."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent import Agent, AgentSettings
from agent.device.store import ModelStore, Pointer
from agent.device.updater import REFUSED_MEMORY, Updater
from agent.inference.backends import TFLiteSettings
from agent.settings import UpdateSettings
from agent.version import older_than
from shared.manifest import Manifest
from shared.signing import SigningKey, TrustStore
from shared.update import UpdateReport
from tests.fakes import fake_model, manifest

KEY = SigningKey.generate()


class Harness:
    def __init__(self, tmp: Path) -> None:
        trust = TrustStore()
        trust.add(KEY.public_b64)
        self.reports: list[UpdateReport] = []
        self.agent = Agent(AgentSettings(), model=fake_model())
        self.updater = Updater(
            self.agent,
            ModelStore(tmp),
            trust,
            UpdateSettings(download={"attempts": 1, "backoff_s": 0}),
            device="dev-0",
            backend=TFLiteSettings(),
            report=self.reports.append,
            # no artifact anywhere: a manifest that passes every check ends FAILED
            http=httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(404))),
            registry_url="http://registry.test",
        )

    def states(self) -> list[tuple[str, str]]:
        return [(r.state.value, r.reason) for r in self.reports]


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    yield h
    h.agent.close()


def release(**update: Any) -> Manifest:
    return KEY.sign(manifest(version=2).model_copy(update=update))


def passed_its_checks(h: Harness) -> bool:
    return [s for s, _ in h.states()][:2] == ["QUEUED", "DOWNLOADING"]


def test_agent_versions_compare_by_pep_440() -> None:
    assert older_than("1.0.5", "1.0rc1")  # a release candidate comes before the release
    assert not older_than("1.0rc1", "1.0.5")
    assert not older_than("1.0", "1.0.0") and older_than("1.0.post1", "1.0")
    assert older_than("0.10", "0.9")
    with pytest.raises(ValueError, match="not a version"):
        older_than("latest", "1.0")


@pytest.mark.parametrize("minimum", ["0.1.0rc1", "0.1.0", "0.0.9", "0.1"])
def test_a_met_agent_requirement_passes(harness: Harness, minimum: str) -> None:
    harness.updater.process(release(min_agent_version=minimum))
    assert passed_its_checks(harness), harness.states()


@pytest.mark.parametrize("minimum", ["0.1.1rc1", "0.1.0.post1", "0.2", "1!0.0.1"])
def test_an_unmet_agent_requirement_is_rejected(harness: Harness, minimum: str) -> None:
    harness.updater.process(release(min_agent_version=minimum))
    assert harness.states() == [("REJECTED", f"needs agent {minimum}, this is 0.1.0")]


def test_an_unreadable_agent_requirement_is_rejected(harness: Harness) -> None:
    harness.updater.process(release(min_agent_version="newest please"))
    assert harness.states() == [("REJECTED", "min_agent_version 'newest please' is not a version")]


@pytest.mark.parametrize("field", ["expires", "created"])
def test_a_time_without_zone_is_a_rejection(harness: Harness, field: str) -> None:
    naive = datetime(2099, 1, 1, 12, 0)
    harness.updater.process(release(**{field: naive}))
    assert harness.states() == [("REJECTED", f"{field} 2099-01-01 12:00:00 has no time zone")]


def test_a_zoned_time_in_any_offset_passes(harness: Harness) -> None:
    later = datetime.fromisoformat("2099-01-01T12:00:00+05:30")
    harness.updater.process(release(expires=later, created=later - timedelta(days=400)))
    assert passed_its_checks(harness), harness.states()


def test_a_tampered_copy_does_not_stand_in_for_the_genuine(harness: Harness) -> None:
    genuine = release()
    tampered = genuine.model_copy(update={"labels": ["x", "y", "z"]})  # same signature
    assert harness.updater.process(tampered) is not None
    assert harness.states()[0][0] == "REJECTED" and "does not verify" in harness.states()[0][1]
    harness.updater.process(genuine)
    assert [s for s, _ in harness.states()][1:3] == ["QUEUED", "DOWNLOADING"]


def test_the_same_forged_manifest_is_reported_once(harness: Harness) -> None:
    forged = SigningKey.generate().sign(manifest(version=2))
    assert harness.updater.process(forged) is not None
    assert harness.updater.process(forged) is None  # the retained copy, delivered again
    assert harness.updater.process(forged.model_copy()) is None  # equal content, same digest
    other = SigningKey.generate().sign(manifest(version=3))
    assert harness.updater.process(other) is not None  # a different one is still reported
    assert [s for s, _ in harness.states()] == ["REJECTED", "REJECTED"]


def test_forged_manifests_are_remembered_within_a_bound(harness: Harness) -> None:
    """Anyone who can publish can forge without end: memory of them is bounded."""
    forger = SigningKey.generate()
    first = forger.sign(manifest(version=2))
    harness.updater.process(first)
    for v in range(3, 3 + REFUSED_MEMORY - 1):
        harness.updater.process(forger.sign(manifest(version=v)))
    assert harness.updater.process(first) is None  # still remembered
    harness.updater.process(forger.sign(manifest(version=9999)))
    harness.updater.process(forger.sign(manifest(version=10000)))
    assert harness.updater.process(first) is not None  # forgotten: reported again


class _PowerCut(BaseException):
    """The machine stops here: nothing after this line runs, nothing is cleaned up."""


def test_a_crash_before_the_job_is_recorded_leaves_no_acceptance_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job record is the acceptance while the job runs: a crash before it is written
    (or a power cut that takes it) must not leave the genuine manifest refused as a replay
    at the next start."""
    genuine = release()
    first = Harness(tmp_path)

    def cut(*_: object) -> None:
        raise _PowerCut

    monkeypatch.setattr(first.updater.store, "save_job", cut)
    with pytest.raises(_PowerCut):
        first.updater.process(genuine)
    first.agent.close()
    again = Harness(tmp_path)  # the next start, same store
    try:
        again.updater.process(genuine)
        assert passed_its_checks(again), again.states()
        # once the job has ended its acceptance is on record: the same manifest is a replay
        assert again.updater.store.highest_accepted("toy") == 2
        third = Harness(tmp_path)
        third.updater.process(genuine)
        assert third.states()[0][0] == "REJECTED" and "not newer" in third.states()[0][1]
        third.agent.close()
    finally:
        again.agent.close()


def test_a_health_watch_a_power_cut_interrupted_resumes_without_its_job_record(
    tmp_path: Path,
) -> None:
    """The job record is not forced to disk; the pointer is, and says a watch was on: the
    next start watches the served model and reports the job's end."""
    h = Harness(tmp_path)
    try:
        h.updater.settings = UpdateSettings(health_watch_s=0)
        store = h.updater.store
        served = h.agent.model.manifest
        store._write_pointer("toy", Pointer(store.slot_name(served), None, watching=True))
        assert store.job("toy") is None  # what the power cut left
        h.updater._resume_job()
        assert [(r.state.value, r.version) for r in h.reports] == [("ACTIVE", served.version)]
        pointer = store.pointer("toy")
        assert pointer is not None and not pointer.watching
        h.updater._resume_job()  # the watch is over: nothing more to resume
        assert len(h.reports) == 1
    finally:
        h.agent.close()
