"""Capture, its spool and the capture switch, on a temporary folder: what is written, what
is not (switch off, duplicates, budget spent), the spool's bound and its persistence, and
the switch's scopes."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest

from agent.device.capture import Capture, sample
from agent.device.spool import Spool
from agent.device.switch import CaptureSwitch
from shared import topics
from shared.commands import MAX_COMMAND_BYTES, CaptureCommand
from shared.samples import SampleMeta, decode_features, sample_id
from tests.unit.test_audit import observation

FLEET, DEVICE, GROUP = "f", "dev-1", "g"
ON = CaptureCommand(enabled=True).model_dump_json().encode()
OFF = CaptureCommand(enabled=False).model_dump_json().encode()


def topic(scope: str) -> str:
    if scope == "device":
        return topics.capture_command(FLEET, device=DEVICE).name
    if scope == "group":
        return topics.capture_command(FLEET, group=GROUP).name
    return topics.capture_command(FLEET).name


class Budget:
    def __init__(self, left: int) -> None:
        self.left = left

    def available(self) -> int:
        return self.left


def capture(tmp_path: Path, enabled: bool | None = True, **kw: object) -> Capture:
    spool = Spool(tmp_path / "samples.db", 1 << 20)
    return Capture(spool, CaptureSwitch(tmp_path / "capture.json", enabled), **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- spool


def test_spool_dedups_bounds_by_bytes_and_survives_reopening(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1000)
    assert spool.put("a", b"m", b"x" * 299) == (True, 0)
    assert spool.put("a", b"m", b"x" * 299) == (False, 0)
    assert spool.put("b", b"m", b"x" * 299) == (True, 0)
    assert spool.put("c", b"m", b"x" * 299) == (True, 0)
    assert spool.put("d", b"m", b"x" * 299) == (True, 1)  # 1,200 bytes: "a" goes
    assert [i for i, _, _ in spool.oldest(10)] == ["b", "c", "d"]
    assert (spool.pending, spool.size_bytes) == (3, 900)
    spool.close()
    again = Spool(tmp_path / "s.db", max_bytes=1000)
    assert (again.pending, again.size_bytes) == (3, 900)
    assert again.delete(["b", "zz"]) == 1
    assert [i for i, _, _ in again.oldest(1)] == ["c"]
    again.close()


# ------------------------------------------------------------------------- capture


def test_an_escalation_is_spooled_with_both_answers_as_uint8(tmp_path: Path) -> None:
    c = capture(tmp_path, cloud_model=lambda obs: "toy-cloud:7")
    c.observe(observation(confidence=0.4, cloud=2))
    c.observe(observation())  # the edge answered it: not an escalation
    assert (c.captured, c.spool.pending) == (1, 1)
    ((sid, meta_json, payload),) = c.spool.oldest(10)
    meta = SampleMeta.model_validate_json(meta_json)
    assert sid == meta.id == sample_id(payload)
    assert (meta.kind, meta.encoding, meta.shape, meta.size) == ("escalation", "uint8", [4], 4)
    assert (meta.edge.index, meta.cloud.index if meta.cloud else None) == (0, 2)
    assert meta.cloud_model == "toy-cloud:7" and meta.threshold == 0.8
    assert decode_features(meta, payload).tolist() == [10.0, 0, 0, 0]


def test_audits_are_spooled_as_audits_and_duplicates_once(tmp_path: Path) -> None:
    c = capture(tmp_path)
    audited = dataclasses.replace(
        observation(), reason="audit", cloud_index=2, cloud_confidence=0.9
    )
    c.audited(audited)
    c.audited(audited)
    c.observe(dataclasses.replace(audited, reason="low_confidence"))  # same input escalated
    assert (c.captured, c.duplicates, c.spool.pending) == (1, 2, 1)
    meta = SampleMeta.model_validate_json(c.spool.oldest(1)[0][1])
    assert meta.kind == "audit"
    # ids already uploaded (gone from the spool) are still known
    c.spool.delete([meta.id])
    c.audited(audited)
    assert (c.duplicates, c.spool.pending) == (3, 0)


def test_floats_go_as_float32_and_images_as_their_bytes(tmp_path: Path) -> None:
    obs = observation(cloud=2)
    obs.features = np.array([0.5, 1, 2, 3], np.float32)
    made = sample(obs, "escalation")
    assert made is not None and made[0].encoding == "float32" and made[0].size == 16
    png = b"\x89PNG\r\n\x1a\n" + b"rest"
    obs.features, obs.encoded = None, png
    made = sample(obs, "escalation")
    assert made is not None
    assert (made[0].encoding, made[0].media_type, made[0].shape, made[1]) == (
        "encoded",
        "image/png",
        [],
        png,
    )
    obs.encoded = b"GIF89a..."
    assert sample(obs, "escalation") is None


def test_nothing_is_written_while_capture_is_off(tmp_path: Path) -> None:
    c = capture(tmp_path, enabled=None)  # follows the fleet: off until it says on
    c.observe(observation(cloud=2))
    assert (c.captured, c.spool.pending, c.state().enabled) == (0, 0, False)
    assert c.section() == {}  # off and idle: telemetry carries nothing
    c.switch.on_message(topic("fleet"), ON, True)
    c.observe(observation(cloud=2))
    assert (c.captured, c.state().enabled) == (1, True)
    c.switch.on_message(topic("fleet"), OFF, True)
    assert c.section()["capture"].pending == 1  # off, with samples waiting: said


def test_an_answer_given_while_off_is_not_kept_once_the_switch_comes_on(tmp_path: Path) -> None:
    """The consumers run behind a queue: an answer from before the switch came on may be
    handled after it; it was given while capture was off and must not be kept."""
    c = capture(tmp_path, enabled=None)
    before = observation(confidence=0.3, cloud=2)  # answered while off, still queued
    c.switch.on_message(topic("fleet"), ON, True)
    c.observe(before)
    c.audited(dataclasses.replace(before, reason="audit"))
    assert (c.captured, c.spool.pending) == (0, 0)
    c.observe(observation(confidence=0.4, cloud=2))  # answered while on: kept
    assert c.captured == 1
    # on, off, on: what was answered in the first on-period and is handled late is dropped
    first = observation(confidence=0.5, cloud=2)
    c.switch.on_message(topic("device"), OFF, True)
    c.switch.on_message(topic("device"), b"", True)
    c.observe(first)
    assert c.captured == 1
    # a device whose settings fix capture on keeps everything it answers
    fixed = capture(tmp_path / "fixed", enabled=True)
    fixed.observe(before)
    assert fixed.captured == 1


def test_a_spent_budget_skips_writing(tmp_path: Path) -> None:
    budget = Budget(0)
    c = capture(tmp_path, budget=budget)
    c.observe(observation(cloud=2))
    assert (c.skipped_budget, c.spool.pending) == (1, 0)
    budget.left = 10_000
    c.observe(observation(cloud=2))
    assert (c.captured, c.spool.pending) == (1, 1)


def test_a_full_batch_wakes_the_uploader(tmp_path: Path) -> None:
    c = capture(tmp_path, batch=2)
    woken: list[int] = []
    c.on_full = lambda: woken.append(c.spool.pending)
    c.observe(observation(cloud=2, x0=10))
    assert woken == []
    c.observe(observation(cloud=2, x0=11))
    assert woken == [2]


# -------------------------------------------------------------------------- switch


def test_the_most_specific_scope_wins_and_an_empty_payload_deletes(tmp_path: Path) -> None:
    switch = CaptureSwitch(tmp_path / "capture.json")
    changes: list[bool] = []
    switch.listeners.append(lambda: changes.append(switch.enabled))
    switch.on_message(topic("fleet"), ON, True)
    switch.on_message(topic("device"), OFF, True)
    assert switch.enabled is False
    switch.on_message(topic("group"), ON, True)
    assert switch.enabled is False  # the device scope still holds
    switch.on_message(topic("device"), b"", True)
    assert switch.enabled is True  # the group's now
    switch.on_message(topic("group"), b"", True)
    switch.on_message(topic("fleet"), b"", True)
    assert switch.enabled is False
    assert changes == [True, False, True, False]


def test_the_switch_state_survives_a_restart(tmp_path: Path) -> None:
    switch = CaptureSwitch(tmp_path / "capture.json")
    rate = CaptureCommand(enabled=True, audit_rate=0.5).model_dump_json().encode()
    switch.on_message(topic("group"), rate, True)
    again = CaptureSwitch(tmp_path / "capture.json")
    assert (again.enabled, again.audit_rate) == (True, 0.5)


def test_malformed_and_oversized_commands_are_counted_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    switch = CaptureSwitch(tmp_path / "capture.json")
    switch.on_message(topic("fleet"), ON, True)
    for payload in (b"{", b'{"enabled": "maybe"}', b'{"enabled": true, "x": 1}', b"\xff"):
        switch.on_message(topic("fleet"), payload, True)
    switch.on_message(topic("fleet"), b" " * (MAX_COMMAND_BYTES + 1), True)
    switch.on_message("tandem/v1/elsewhere", ON, True)
    assert (switch.malformed, switch.oversized, switch.enabled) == (5, 1, True)


def test_a_fixed_setting_ignores_the_switch_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    switch = CaptureSwitch(tmp_path / "capture.json", fixed=False)
    with caplog.at_level(logging.INFO, logger="agent.device.switch"):
        switch.on_message(topic("device"), ON, True)
        switch.on_message(topic("fleet"), ON, True)
    assert (switch.enabled, switch.audit_rate) == (False, None)
    assert sum("ignored" in r.getMessage() for r in caplog.records) == 1
    assert not (tmp_path / "capture.json").exists()


# ---------------------------------------------------------------- what goes on the wire


def test_probabilities_stay_home_unless_asked_and_numbers_are_rounded(tmp_path: Path) -> None:
    obs = dataclasses.replace(
        observation(confidence=0.123456789, cloud=2),
        cloud_confidence=0.987654321,
        cloud_probs=[0.0123456, 0.0000001, 0.987654321],
        threshold=0.85000002384,
        ts=1_700_000_000.123456,
    )
    c = capture(tmp_path)
    c.observe(obs)
    meta = SampleMeta.model_validate_json(c.spool.oldest(1)[0][1])
    assert meta.edge.probs is None and meta.cloud is not None and meta.cloud.probs is None
    assert (meta.edge.confidence, meta.cloud.confidence, meta.threshold) == (0.1235, 0.9877, 0.85)
    assert meta.ts.timestamp() == 1_700_000_000.123
    kept = sample(obs, "escalation", include_probs=True)
    assert kept is not None and kept[0].cloud is not None
    assert kept[0].cloud.probs == [0.0123, 0.0, 0.9877]
    assert kept[0].edge.probs == [0.1235, 0.4383, 0.4383]


# -------------------------------------------------------------------------- rate limit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_hourly_limit_keeps_a_reserve_for_audits(tmp_path: Path) -> None:
    clock = Clock()
    # 360 an hour: a bucket of 36 (a tenth), 9 of them (a quarter) only for audits
    c = capture(tmp_path, max_samples_per_hour=360, clock=clock)
    for i in range(40):
        c.observe(observation(confidence=0.4, cloud=2, x0=i))
    assert (c.captured, c.skipped_rate) == (27, 13)
    for i in range(12):
        c.audited(dataclasses.replace(observation(x0=100 + i), cloud_index=0, cloud_confidence=0.9))
    assert (c.captured, c.skipped_rate) == (36, 16)
    clock.now += 10.0  # one token back (360 an hour): an audit may take it, not an escalation
    c.observe(observation(confidence=0.4, cloud=2, x0=200))
    assert c.skipped_rate == 17
    c.audited(dataclasses.replace(observation(x0=201), cloud_index=0, cloud_confidence=0.9))
    assert (c.captured, c.state().skipped_rate) == (37, 17)
    # a duplicate is counted as one, not as skipped
    c.observe(observation(confidence=0.4, cloud=2, x0=0))
    assert (c.duplicates, c.skipped_rate) == (1, 17)


def test_an_hour_of_escalations_stays_within_the_limit(tmp_path: Path) -> None:
    clock = Clock()
    c = capture(tmp_path, max_samples_per_hour=240, clock=clock)
    for i in range(3600):  # an escalation a second for an hour
        c.observe(observation(confidence=0.4, cloud=2, x0=i))
        clock.now += 1.0
    # the bucket's first 18 (24 less the audits' 6), then 240 an hour
    assert 240 <= c.captured <= 240 + 24
    assert c.captured + c.skipped_rate == 3600


def test_no_limit_when_none(tmp_path: Path) -> None:
    c = capture(tmp_path, max_samples_per_hour=None)
    for i in range(500):
        c.observe(observation(confidence=0.4, cloud=2, x0=i))
    assert (c.captured, c.skipped_rate) == (500, 0)


def test_answers_the_queue_dropped_are_reported_even_with_capture_off(tmp_path: Path) -> None:
    c = capture(tmp_path, enabled=False)
    assert c.section() == {}
    drops = [0]
    c.queue_dropped = lambda: drops[0]
    drops[0] = 3
    section = c.section()["capture"]
    assert section.observations_dropped == 3 and not section.enabled
