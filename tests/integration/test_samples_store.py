"""The sample store on both engines (real SQLite, real PostgreSQL): files by content, dedup
on (fleet, device, id), the daily quota (atomic, per UTC day), paged listing with filters,
operators' labels, the summary, and the export that training reads."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cloud.fleet.samples.store import QuotaExceededError, SampleStore
from cloud.fleet.store import FleetStore
from shared.errors import InvalidRequestError
from shared.samples import Answer, SampleMeta, sample_id
from shared.utc_day import seconds_to_utc_midnight
from tests.sample_items import feature_sample

FLEET = "samplefleet"
T0 = datetime(2026, 12, 1, 23, 0, tzinfo=timezone.utc)


class Clock:
    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def fleet_store(store_url: str) -> Iterator[FleetStore]:
    s = FleetStore(store_url)
    yield s
    s.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def samples(fleet_store: FleetStore, tmp_path: Path, clock: Clock) -> SampleStore:
    return SampleStore(fleet_store, tmp_path / "samples", clock=clock)


def feature_item(
    seed: int, *, kind: str = "escalation", version: int = 1, cloud: int | None = 7
) -> tuple[SampleMeta, bytes]:
    return feature_sample(
        (np.arange(64) * (seed + 1)) % 17,
        kind=kind,
        ts=T0,
        cloud=Answer(index=cloud, confidence=0.9) if cloud is not None else None,
        version=version,
        cloud_model="digits-cloud" if cloud is not None else None,
        threshold=0.7,
    )


def image_item() -> tuple[SampleMeta, bytes]:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(out, format="PNG")
    payload = out.getvalue()
    meta = SampleMeta(
        id=sample_id(payload),
        kind="audit",
        model="cats",
        version=2,
        ts=T0,
        encoding="encoded",
        media_type="image/png",
        size=len(payload),
        edge=Answer(index=0, confidence=0.97),
        cloud=Answer(index=1, confidence=0.8),
    )
    return meta, payload


def test_add_stores_files_by_content_and_dedups_per_device(
    samples: SampleStore, tmp_path: Path
) -> None:
    items = [feature_item(i) for i in range(3)]
    assert samples.add(FLEET, "dev-1", items).model_dump() == {"stored": 3, "duplicates": 0}
    # a retry: nothing stored twice; a repeat inside one upload counts as a duplicate
    again = samples.add(FLEET, "dev-1", [*items, items[0]])
    assert again.model_dump() == {"stored": 0, "duplicates": 4}
    mixed = samples.add(FLEET, "dev-1", [items[1], feature_item(9), feature_item(9)])
    assert mixed.model_dump() == {"stored": 1, "duplicates": 2}
    # another device's identical bytes: its own row, the same file
    assert samples.add(FLEET, "dev-2", items[:1]).stored == 1
    files = [p for p in (tmp_path / "samples").rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == sorted({m.id for m, _ in [*items, feature_item(9)]})
    assert not [p for p in files if p.name.startswith(".tmp")]
    meta, payload = items[0]
    assert (tmp_path / "samples" / FLEET / meta.id[:2] / meta.id).read_bytes() == payload
    assert samples.quota_used(FLEET, "dev-1") == (4 * 64, 4)
    assert samples.quota_used(FLEET, "dev-2") == (64, 1)


def test_quota_is_per_device_and_utc_day(samples: SampleStore, clock: Clock) -> None:
    items = [feature_item(i) for i in range(6)]
    limits: dict[str, Any] = {"quota_bytes": 4 * 64, "quota_samples": 100}
    assert samples.add(FLEET, "dev-1", items[:3], **limits).stored == 3
    with pytest.raises(QuotaExceededError) as info:
        samples.add(FLEET, "dev-1", items[3:5], **limits)  # 5 x 64 > 4 x 64
    assert info.value.retry_after_s == pytest.approx(3600)  # T0 is 23:00 UTC
    assert samples.quota_used(FLEET, "dev-1") == (3 * 64, 3)  # nothing of it stored
    assert samples.list(FLEET, device="dev-1").samples.__len__() == 3
    # duplicates are free; what still fits is stored
    assert samples.add(FLEET, "dev-1", [*items[:3], items[3]], **limits).stored == 1
    # another device has its own quota
    assert samples.add(FLEET, "dev-2", items[:4], **limits).stored == 4
    # count limit too
    with pytest.raises(QuotaExceededError):
        samples.add(FLEET, "dev-3", items, quota_bytes=10**9, quota_samples=5)
    # the next UTC day starts again
    clock.now = T0 + timedelta(hours=1, seconds=1)
    assert samples.add(FLEET, "dev-1", items[4:], **limits).stored == 2
    assert samples.quota_used(FLEET, "dev-1") == (2 * 64, 2)


def test_seconds_to_utc_midnight() -> None:
    assert seconds_to_utc_midnight(T0) == 3600
    other = datetime(2026, 12, 2, 1, 30, tzinfo=timezone(timedelta(hours=2)))  # 23:30 UTC
    assert seconds_to_utc_midnight(other) == 1800


def test_list_pages_by_cursor_with_filters(samples: SampleStore, clock: Clock) -> None:
    for i in range(7):
        clock.now = T0 + timedelta(microseconds=i % 3)  # ties on received, split by id
        samples.add(FLEET, "dev-1" if i % 2 else "dev-2", [feature_item(i, version=1 + i % 2)])
    samples.add(FLEET, "dev-1", [feature_item(50, kind="audit", cloud=None)])
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        page = samples.list(FLEET, limit=3, after=after)
        seen += [s["id"] for s in page.samples]
        pages += 1
        if page.next is None:
            break
        after = page.next
    assert pages == 3 and len(seen) == len(set(seen)) == 8
    row = samples.list(FLEET, limit=1).samples[0]
    assert "path" not in row and row["shape"] == [64] and row["model"] == "digits"
    assert len(samples.list(FLEET, device="dev-1").samples) == 4
    assert len(samples.list(FLEET, version=2).samples) == 3
    assert len(samples.list(FLEET, kind="audit").samples) == 1
    assert len(samples.list(FLEET, label_source="none").samples) == 1
    assert len(samples.list(FLEET, label_source="cloud").samples) == 7
    assert len(samples.list(FLEET, model="other").samples) == 0
    assert samples.list("otherfleet").samples == []
    with pytest.raises(InvalidRequestError):
        samples.list(FLEET, after="garbage")


def test_operator_label_wins_and_shows_in_summary_and_export(samples: SampleStore) -> None:
    items = [feature_item(i) for i in range(3)]
    samples.add(FLEET, "dev-1", items)
    samples.add(FLEET, "dev-2", [feature_item(5, kind="audit", cloud=None), image_item()])
    target = items[1][0].id
    assert samples.label(FLEET, "dev-1", target, 4)
    assert not samples.label(FLEET, "dev-2", target, 4)  # dev-2 has no such sample
    assert not samples.label(FLEET, "dev-1", "0" * 64, 4)
    with pytest.raises(InvalidRequestError):
        samples.label(FLEET, "dev-1", target, -1)
    summary = {(s["model"], s["version"]): s for s in samples.summary(FLEET)}
    digits = summary[("digits", 1)]
    assert digits["samples"] == 4 and digits["bytes"] == 4 * 64
    assert digits["by_kind"] == {"escalation": 3, "audit": 1}
    assert digits["by_label_source"] == {"cloud": 2, "operator": 1, "none": 1}
    assert digits["by_device"] == {"dev-1": 3, "dev-2": 1}
    assert summary[("cats", 2)]["by_kind"] == {"audit": 1}

    exported = {s.id: s for s in samples.export(FLEET, "digits")}
    assert len(exported) == 4
    labelled = exported[target]
    assert (labelled.label, labelled.label_source, labelled.cloud_index) == (4, "operator", 7)
    assert labelled.features is not None and labelled.features.dtype == np.float32
    assert np.array_equal(labelled.features, (np.arange(64) * 2) % 17)
    unlabelled = exported[feature_item(5)[0].id]
    assert (unlabelled.label, unlabelled.label_source, unlabelled.kind) == (None, None, "audit")
    assert len(samples.export(FLEET, "digits", limit=2)) == 2
    (cat,) = samples.export(FLEET, "cats")
    assert cat.features is None and cat.encoded == image_item()[1]
    assert cat.media_type == "image/png" and cat.label == 1


def test_get_returns_the_bytes_and_a_lost_file_is_skipped(
    samples: SampleStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    meta, payload = feature_item(1)
    samples.add(FLEET, "dev-1", [(meta, payload), feature_item(2)])
    found = samples.get(FLEET, "dev-1", meta.id)
    assert found is not None and found[1] == payload and found[0]["encoding"] == "uint8"
    assert samples.get(FLEET, "dev-2", meta.id) is None
    (tmp_path / "samples" / FLEET / meta.id[:2] / meta.id).unlink()
    assert samples.get(FLEET, "dev-1", meta.id) is None
    assert [s.id for s in samples.export(FLEET, "digits")] == [feature_item(2)[0].id]
    assert "file is gone" in caplog.text


def _file(tmp_path: Path, meta: SampleMeta) -> Path:
    return tmp_path / "samples" / FLEET / meta.id[:2] / meta.id


def test_a_file_is_fsynced_before_its_row_and_a_damaged_one_rewritten(
    samples: SampleStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device deletes its copy on the 200: the file must be on disk by then (a power
    loss must not leave a truncated file behind a row), and a file left truncated by one
    is written again by the next upload of those bytes, not trusted for existing."""
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    meta, payload = feature_item(1)
    samples.add(FLEET, "dev-1", [(meta, payload)])
    assert len(synced) >= 2  # the file, and the folder holding its new name
    # a crash's leftover: the file there, truncated, and no row (or another device's)
    other, other_payload = feature_item(2)
    _file(tmp_path, other).parent.mkdir(parents=True, exist_ok=True)
    _file(tmp_path, other).write_bytes(other_payload[:10])
    assert samples.add(FLEET, "dev-1", [(other, other_payload)]).stored == 1
    assert _file(tmp_path, other).read_bytes() == other_payload
    # same size, other bytes: the sha256 (the id) tells
    _file(tmp_path, meta).write_bytes(bytes(len(payload)))
    assert samples.add(FLEET, "dev-2", [(meta, payload)]).stored == 1
    assert _file(tmp_path, meta).read_bytes() == payload


def test_export_skips_damaged_files_and_says_so_once(
    samples: SampleStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    items = [feature_item(i) for i in range(5)]
    samples.add(FLEET, "dev-1", items)
    _file(tmp_path, items[1][0]).write_bytes(items[1][1][:7])  # truncated: does not decode
    _file(tmp_path, items[3][0]).write_bytes(bytes(64))  # decodes, but not those bytes
    with caplog.at_level(logging.WARNING, logger="cloud.fleet.samples.store"):
        out = samples.export(FLEET, "digits")
    assert sorted(s.id for s in out) == sorted(items[i][0].id for i in (0, 2, 4))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 samples skipped" in warnings[0]


def test_export_newest_keeps_the_last_n_oldest_first(samples: SampleStore, clock: Clock) -> None:
    ids = []
    for i in range(6):
        clock.now = T0 + timedelta(minutes=i)  # received in this order
        meta, payload = feature_item(i)
        samples.add(FLEET, "dev-1", [(meta, payload)])
        ids.append(meta.id)
    samples.add(FLEET, "dev-1", [image_item()])  # another model's: not exported
    assert [s.id for s in samples.export_newest(FLEET, "digits", 3)] == ids[3:]
    assert [s.id for s in samples.export_newest(FLEET, "digits", 100)] == ids
    assert samples.export_newest(FLEET, "digits", 0) == []
