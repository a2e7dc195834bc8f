"""The model store: slots, the atomic pointer, anti-rollback, jobs, pruning, crash debris."""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from agent.device.store import ModelStore, Pointer
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


class _DiskLog:
    """What reaches the disk's durable state, in order: fsyncs and renames by name."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
        self.root = root
        self.events: list[str] = []
        self._names: dict[int, str] = {}
        real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

        def os_open(path: Any, flags: int, *a: Any, **kw: Any) -> int:
            fd = real_open(path, flags, *a, **kw)
            self._names[fd] = self._rel(path)
            return fd

        def fsync(fd: Any) -> None:
            n = fd if isinstance(fd, int) else fd.fileno()
            self.events.append(f"fsync {self._names.get(n, '?')}")
            real_fsync(fd)

        def replace(src: Any, dst: Any) -> None:
            real_replace(src, dst)
            self.events.append(f"rename {self._rel(dst)}")

        real_io_open = io.open

        def io_open(file: Any, *a: Any, **kw: Any) -> Any:
            f = real_io_open(file, *a, **kw)
            if not isinstance(file, int):
                self._names[f.fileno()] = self._rel(file)
            return f

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(io, "open", io_open)

    def _rel(self, path: Any) -> str:
        p = Path(os.fspath(path))
        try:
            rel = p.absolute().relative_to(self.root)
        except ValueError:
            return str(p)
        parts = [re.sub(r"^\.?v\d+-\w+.*", "<slot>", part) for part in rel.parts]
        parts = [re.sub(r"^\.(.+)\.\w+\.tmp$", r".\1.tmp", part) for part in parts]
        return "/".join(parts) or "."

    def fsyncs(self) -> list[str]:
        return [e for e in self.events if e.startswith("fsync")]


def _release(store: ModelStore, tmp: Path, version: int) -> tuple[Manifest, Path]:
    """A release's manifest and its artifact in staging, as a finished download leaves it."""
    src = _as_version(EDGE_F32, tmp / f"src{version}", version)
    manifest = Manifest.load(src)
    staged = store.staging_file(manifest)
    shutil.copyfile(src / manifest.edge.file, staged)
    return manifest, staged


def test_an_update_forces_one_commit_to_disk_slot_then_pointer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path)
    store.activate("digits", store.import_dir(EDGE_INT8))
    manifest, staged = _release(store, tmp_path / "src", 2)
    disk = _DiskLog(monkeypatch, tmp_path.absolute())
    # the update's bookkeeping: atomic for a kill -9, never forced to disk
    store.save_job(manifest, "QUEUED")
    slot = store.install(manifest, staged)
    store.activate("digits", slot)
    store.accept("digits", 2)
    store.clear_job("digits")
    store.prune("digits")
    assert disk.fsyncs() == [
        "fsync models/digits/slots/<slot>/model.tflite",  # each file's data,
        "fsync models/digits/slots/<slot>/manifest.json",
        "fsync models/digits/slots/<slot>",  # the names in the slot,
        "fsync models/digits/slots",  # the slot's name (after its rename),
        "fsync models/digits/.pointer.json.tmp",  # then the pointer's data,
        "fsync models/digits",  # and its rename: the commit
    ]
    renames = [e for e in disk.events if e.startswith("rename")]
    assert renames.index("rename models/digits/pointer.json") > renames.index(
        "rename models/digits/slots/<slot>"
    )
    assert disk.events.index("fsync models/digits/slots") < disk.events.index(
        "rename models/digits/pointer.json"
    )
    pointer = store.pointer("digits")
    assert pointer is not None and pointer.current == slot.name


def test_the_anti_rollback_floor_survives_a_lost_record(tmp_path: Path) -> None:
    """A power cut may take the last write of ``accepted.json`` (it is not forced to disk):
    the versions the pointer names still count, and so does the job in progress."""
    store = ModelStore(tmp_path)
    store.activate("digits", store.import_dir(EDGE_INT8))
    manifest, staged = _release(store, tmp_path / "src", 3)
    store.activate("digits", store.install(manifest, staged))
    (tmp_path / "accepted.json").unlink(missing_ok=True)
    assert store.highest_accepted("digits") == 3
    job, _ = _release(store, tmp_path / "src", 4)
    store.save_job(job, "QUEUED")
    assert store.highest_accepted("digits") == 4  # the job is its acceptance until it ends
    store.clear_job("digits")
    assert store.highest_accepted("digits") == 3


def test_a_rolled_back_version_stays_accepted_durably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No pointer names a version rolled back from, so only ``accepted.json`` remembers it:
    the rollback forces that to disk before the pointer moves back."""
    store = ModelStore(tmp_path)
    store.activate("digits", store.import_dir(EDGE_INT8))
    manifest, staged = _release(store, tmp_path / "src", 2)
    store.activate("digits", store.install(manifest, staged))
    disk = _DiskLog(monkeypatch, tmp_path.absolute())
    assert store.rollback("digits") is not None
    assert disk.fsyncs()[:2] == ["fsync .accepted.json.tmp", "fsync ."], disk.events
    assert store.pointer("digits") is not None and store.highest_accepted("digits") == 2


def test_an_update_s_activation_says_its_watch_is_on_until_confirmed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path)
    first = store.import_dir(EDGE_INT8)
    store.activate("digits", first)  # the factory model: no watch
    assert store.pointer("digits") == Pointer(first.name, None)
    manifest, staged = _release(store, tmp_path / "src", 2)
    slot = store.install(manifest, staged)
    store.activate("digits", slot, watching=True)
    assert store.pointer("digits") == Pointer(slot.name, first.name, watching=True)
    disk = _DiskLog(monkeypatch, tmp_path.absolute())
    store.confirm("digits")  # a power cut that takes this only repeats the watch
    assert disk.fsyncs() == []
    assert store.pointer("digits") == Pointer(slot.name, first.name)
    store.activate("digits", slot, watching=True)
    store.rollback("digits")
    assert store.pointer("digits") == Pointer(first.name, None)
