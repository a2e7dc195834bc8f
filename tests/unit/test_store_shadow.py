"""The store's shadow folder: apart from the slots (no pointer, no boot, no prune), cleared
on demand, crash debris removed, and adopted as a slot only by its very manifest."""

from __future__ import annotations

import shutil
from pathlib import Path

from agent.device.store import ModelStore
from shared.manifest import Manifest, RoutingDefaults
from tests.helpers import EDGE_F32, EDGE_INT8


def _staged(store: ModelStore, manifest: Manifest, source: Path) -> Path:
    staged = store.staging_file(manifest)
    shutil.copyfile(source / manifest.edge.file, staged)
    return staged


def _v2(source: Path = EDGE_F32, **update: object) -> Manifest:
    return Manifest.load(source).model_copy(update={"version": 2, **update})


def test_a_shadow_is_no_slot(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    s1 = store.import_dir(EDGE_INT8)
    store.activate("digits", s1)
    candidate = _v2()
    folder = store.install(candidate, _staged(store, candidate, EDGE_F32), shadow=True)
    assert folder == store.shadow_path(candidate) and folder.is_dir()
    assert Manifest.load(folder) == candidate
    assert store.bootable_slots("digits") == [s1]  # boot never looks there
    pointer = store.pointer("digits")
    assert pointer is not None and pointer.current == s1.name and pointer.previous is None
    assert store.highest_accepted("digits") == 1
    store.prune("digits")
    assert folder.is_dir()  # prune keeps slots tidy, not the shadow
    store.clear_shadow("digits", keep=folder.name)
    assert folder.is_dir()
    store.clear_shadow("digits")
    assert not folder.exists()


def test_a_half_made_shadow_is_crash_debris(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    debris = store.model_dir("digits") / "shadow" / ".v2-0123456789ab.123"
    debris.mkdir(parents=True)
    ModelStore(tmp_path)
    assert not debris.exists()


def test_only_its_own_manifest_adopts_the_shadow(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    candidate = _v2()
    assert store.adopt_shadow(candidate) is None  # no shadow yet
    folder = store.install(candidate, _staged(store, candidate, EDGE_F32), shadow=True)
    # the same artifact under another document (other routing): not the shadow's manifest
    other = candidate.model_copy(update={"routing": RoutingDefaults(threshold=0.5)})
    assert store.slot_name(other) == store.slot_name(candidate)
    assert store.adopt_shadow(other) is None and folder.is_dir()
    slot = store.adopt_shadow(candidate)
    assert slot == store.slot_path("digits", store.slot_name(candidate))
    assert not folder.exists()
    assert Manifest.load(slot) == candidate
    assert (slot / candidate.edge.file).read_bytes() == (EDGE_F32 / "model.tflite").read_bytes()
