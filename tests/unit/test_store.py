"""The model store: slots, the atomic pointer, anti-rollback, jobs, pruning, crash debris."""

from __future__ import annotations

import shutil
from pathlib import Path

from agent.device.store import ModelStore
from shared.manifest import Manifest
from tests.helpers import EDGE_F32, EDGE_INT8


def _as_version(src: Path, dst: Path, version: int) -> Path:
    dst.mkdir(parents=True)
    m = Manifest.load(src)
    shutil.copy(src / m.edge.file, dst / m.edge.file)
    (dst / "manifest.json").write_text(m.model_copy(update={"version": version}).to_json())
    return dst


def test_activate_rollback_and_prune(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "state")
    s1 = store.import_dir(EDGE_INT8)
    store.activate("digits", s1)
    assert store.bootable_slots("digits") == [s1]
    s2 = store.import_dir(_as_version(EDGE_F32, tmp_path / "v2", 2))
    store.activate("digits", s2)
    assert store.bootable_slots("digits") == [s2, s1]
    s3 = store.import_dir(_as_version(EDGE_INT8, tmp_path / "v3", 3))
    store.activate("digits", s3)
    store.prune("digits")
    assert sorted(p.name for p in (s1.parent).iterdir()) == sorted([s2.name, s3.name])
    assert store.rollback("digits") == s2
    assert store.bootable_slots("digits") == [s2]
    assert store.rollback("digits") is None


def test_anti_rollback_record_only_goes_up_and_survives(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.accept("digits", 5)
    store.accept("digits", 3)
    assert ModelStore(tmp_path).highest_accepted("digits") == 5
    assert store.highest_accepted("other") == 0


def test_jobs_and_crash_debris(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    m = Manifest.load(EDGE_INT8)
    store.save_job(m, "DOWNLOADING")
    job = store.job("digits")
    assert job is not None and job.state == "DOWNLOADING" and job.manifest == m
    (store.model_dir("digits") / ".pointer.json.123.tmp").write_text("torn")
    (store.model_dir("digits") / "slots" / ".v9-half").mkdir(parents=True)
    (store.model_dir("digits") / "pointer.json").write_text("{not json")
    again = ModelStore(tmp_path)  # a restart after a crash
    assert not list(again.model_dir("digits").rglob(".*"))
    assert again.pointer("digits") is None  # unreadable pointer: boot falls back
    again.clear_job("digits")
    assert again.job("digits") is None
