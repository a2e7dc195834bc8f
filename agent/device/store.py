"""The agent's on-disk model store: slots, an atomic pointer, anti-rollback, the job record.

Layout under ``state_dir``::

    models/<model>/slots/v<version>-<sha12>/   manifest.json + the artifact (immutable)
    models/<model>/pointer.json                {"current", "previous", "watching"}
    models/<model>/staging/                    partial downloads (resumable) + their ETags
    models/<model>/job.json                    the update in progress
    models/<model>/shadow/v<version>-<sha12>/  the shadow candidate (at most one)
    accepted.json                              highest version ever accepted, per model

Two kinds of failure, two guarantees:

- ``kill -9`` (the process dies, the kernel keeps its page cache): every file is replaced
  by temp file + rename, so readers see the old or the new content, never a torn one. No
  fsync is needed for this.
- Power cut or kernel crash (what was not forced to disk may be lost, in any order): one
  commit per update is forced to disk, the slot and then the pointer naming it (``install``
  then ``activate``; six fsyncs, each said where it is made). A pointer that survives names
  a slot whose files survived. Nothing else is forced: what a power cut may take of the rest
  is harmless. The job record lost before the pointer moved means no resume: the retained
  manifest starts the update again (the record is also the in-flight acceptance, see below,
  so the two go together); lost after, the job is re-derived from the commit itself: the
  pointer says its health watch has not ended (``watching``) and the slot holds its
  manifest.
  An ``accepted.json`` that lost its last write still has a floor: ``highest_accepted`` is
  never below a version the pointer names. Only a rollback forces it, since a rolled-back
  version is accepted but named by no pointer.

The pointer names both the current and the previous slot in one file: activation and
rollback are one rename each. Only those two slots are kept; ``prune`` removes the rest.

A shadow candidate (``agent.inference.shadow``) lives apart from the slots, in ``shadow/``:
no pointer names it, boot never looks there, ``prune`` leaves it alone, and
``clear_shadow`` removes it. An update to the candidate's own release takes its folder as
the slot (``adopt_shadow``, one rename) instead of downloading it again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import TandemError
from shared.identifiers import check_identifier
from shared.manifest import MANIFEST_FILE, Manifest

log = logging.getLogger(__name__)


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, whole.

    ``durable``: forced to disk before returning (the file, then the folder's entry), so a
    power cut keeps the new content. Without it the replacement is still atomic for a
    ``kill -9``; after a power cut the file may hold the old content, or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())  # the data, before a name can point at it
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)  # the rename itself


def fsync_dir(path: Path) -> None:
    """Force the names in folder ``path`` (files created, renamed in) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Force the data of file ``path`` to disk."""
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("ignoring unreadable %s: %s", path, exc)
        return None


@dataclass(frozen=True)
class Pointer:
    current: str
    previous: str | None
    #: From an update's activation until its health watch ends: the watch is resumed at
    #: the next start even if a power cut took the job record.
    watching: bool = False


class ModelStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir
        self.root.mkdir(parents=True, exist_ok=True)
        self._clean_temp_files()

    # ------------------------------------------------------------------------ paths

    def model_dir(self, model: str) -> Path:
        return self.root / "models" / check_identifier(model, "model")

    def slot_name(self, manifest: Manifest) -> str:
        return f"v{manifest.version}-{manifest.edge.sha256[:12]}"

    def slot_path(self, model: str, slot: str) -> Path:
        return self.model_dir(model) / "slots" / slot

    def shadow_path(self, manifest: Manifest) -> Path:
        """Where the shadow candidate ``manifest`` is installed."""
        return self.model_dir(manifest.model) / "shadow" / self.slot_name(manifest)

    def staging_file(self, manifest: Manifest, bundle_file: str | None = None) -> Path:
        """Where the artifact (or the bundle file ``bundle_file``) of ``manifest`` is
        downloaded to before it is installed."""
        folder = self.model_dir(manifest.model) / "staging"
        folder.mkdir(parents=True, exist_ok=True)
        name = self.slot_name(manifest) + (f".{bundle_file}" if bundle_file else "")
        return folder / f"{name}.part"

    def _clean_temp_files(self) -> None:
        for tmp in self.root.rglob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        for partial_slot in self.root.glob("models/*/slots/.*"):
            shutil.rmtree(partial_slot, ignore_errors=True)
        for partial_shadow in self.root.glob("models/*/shadow/.*"):
            shutil.rmtree(partial_shadow, ignore_errors=True)

    # ---------------------------------------------------------------------- pointer

    def pointer(self, model: str) -> Pointer | None:
        doc = _read_json(self.model_dir(model) / "pointer.json")
        if not isinstance(doc, dict) or not isinstance(doc.get("current"), str):
            return None
        return Pointer(doc["current"], doc.get("previous"), doc.get("watching") is True)

    def _write_pointer(self, model: str, pointer: Pointer, *, durable: bool = True) -> None:
        """The commit: durable (the pointer's data, then its rename in the model folder),
        made only once the slots it names are (``install``)."""
        doc: dict[str, str | bool | None] = {
            "current": pointer.current,
            "previous": pointer.previous,
        }
        if pointer.watching:
            doc["watching"] = True
        path = self.model_dir(model) / "pointer.json"
        atomic_write(path, json.dumps(doc).encode(), durable=durable)

    def models(self) -> list[str]:
        base = self.root / "models"
        return sorted(p.name for p in base.iterdir()) if base.is_dir() else []

    def bootable_slots(self, model: str) -> list[Path]:
        """Slots to try at boot, best first: current, then previous."""
        pointer = self.pointer(model)
        if pointer is None:
            return []
        names = [pointer.current] + ([pointer.previous] if pointer.previous else [])
        return [
            p for p in (self.slot_path(model, n) for n in names) if (p / MANIFEST_FILE).is_file()
        ]

    # ------------------------------------------------------------------------ slots

    def install(
        self,
        manifest: Manifest,
        artifact: Path,
        bundle: dict[str, Path] | None = None,
        *,
        shadow: bool = False,
    ) -> Path:
        """Make a slot from a verified artifact and bundle files (moved in) and its manifest
        (``shadow``: the shadow folder instead, which no pointer names). The slot is
        written under a hidden name and renamed into place, so it exists whole or not (a
        hidden one is crash debris, removed at the next start).

        Durable on return, being what the pointer is about to name (four fsyncs for a bare
        artifact): each file's data, then the slot folder (the names in it), then after the
        rename the slots folder (the slot's name). The manifest is written straight into the
        hidden folder: nobody reads it before the rename."""
        if shadow:
            final = self.shadow_path(manifest)
        else:
            final = self.slot_path(manifest.model, self.slot_name(manifest))
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        shutil.move(str(artifact), tmp / manifest.edge.file)
        for name, path in (bundle or {}).items():
            shutil.move(str(path), tmp / name)
        (tmp / MANIFEST_FILE).write_bytes(manifest.to_json().encode())
        for name in [manifest.edge.file, *(bundle or {}), MANIFEST_FILE]:
            fsync_file(tmp / name)
        fsync_dir(tmp)
        tmp.replace(final)
        fsync_dir(final.parent)
        return final

    def shadow_of(self, manifest: Manifest) -> Path | None:
        """The shadow folder holding this very manifest (the same signed document), or
        None (none, or one made from another manifest of the same artifact)."""
        folder = self.shadow_path(manifest)
        if not folder.is_dir():
            return None
        try:
            held = Manifest.load(folder)
        except TandemError:
            return None
        return folder if held.document() == manifest.document() else None  # signature too

    def adopt_shadow(self, manifest: Manifest) -> Path | None:
        """Make the shadow folder of this very manifest its slot, by one rename; None when
        there is none. Its files were made durable when it was installed; the rename is
        forced to disk before the pointer may name it."""
        folder = self.shadow_of(manifest)
        if folder is None:
            return None
        final = self.slot_path(manifest.model, self.slot_name(manifest))
        final.parent.mkdir(parents=True, exist_ok=True)
        folder.replace(final)
        fsync_dir(final.parent)
        return final

    def clear_shadow(self, model: str, keep: str | None = None) -> None:
        """Remove the shadow folders of ``model`` (but the one named ``keep``)."""
        folder = self.model_dir(model) / "shadow"
        for candidate in folder.iterdir() if folder.is_dir() else []:
            if candidate.name != keep:
                shutil.rmtree(candidate, ignore_errors=True)

    def import_dir(self, source: Path) -> Path:
        """Copy a model folder (manifest, artifact, bundle files) into a slot: the factory
        model."""
        manifest = Manifest.load(source)
        staged = self.staging_file(manifest)
        shutil.copyfile(source / manifest.edge.file, staged)
        bundle = {}
        for f in manifest.files:
            bundle[f.name] = self.staging_file(manifest, f.name)
            shutil.copyfile(source / f.name, bundle[f.name])
        return self.install(manifest, staged, bundle)

    def activate(self, model: str, slot: Path, *, watching: bool = False) -> None:
        """Make ``slot`` current; what was current becomes previous. One atomic rename.
        ``watching``: an update's activation, whose health watch ``confirm`` ends."""
        old = self.pointer(model)
        previous = (
            old.current if old and old.current != slot.name else (old.previous if old else None)
        )
        self._write_pointer(model, Pointer(slot.name, previous, watching))

    def confirm(self, model: str) -> None:
        """The health watch of the current slot has ended. Not forced to disk: a power cut
        that takes this runs the watch again at the next start, and reports it again."""
        old = self.pointer(model)
        if old is not None and old.watching:
            self._write_pointer(model, Pointer(old.current, old.previous), durable=False)

    def rollback(self, model: str) -> Path | None:
        """Make the previous slot current again; returns it, or None if there is none."""
        old = self.pointer(model)
        if old is None or old.previous is None:
            return None
        # the version rolled back from stays accepted, and no pointer will name it again:
        # only ``accepted.json`` remembers it, so that is forced to disk first
        self.accept(model, _slot_version(old.current) or 0, durable=True)
        self._write_pointer(model, Pointer(old.previous, None))
        return self.slot_path(model, old.previous)

    def prune(self, model: str) -> None:
        """Delete every slot but current and previous, and stale partial downloads."""
        pointer = self.pointer(model)
        keep = {pointer.current, pointer.previous} if pointer else set()
        slots = self.model_dir(model) / "slots"
        for slot in slots.iterdir() if slots.is_dir() else []:
            if slot.name not in keep:
                shutil.rmtree(slot, ignore_errors=True)
        job = self.job(model)
        staging = self.model_dir(model) / "staging"
        keep_parts = (
            {self.staging_file(job.manifest, f).name for f in [None, *_names(job.manifest)]}
            if job
            else set()
        )
        keep_parts |= {f"{name}.etag" for name in keep_parts}  # their validators (If-Range)
        for part in staging.iterdir() if staging.is_dir() else []:
            if part.name not in keep_parts:
                part.unlink(missing_ok=True)

    # ------------------------------------------------------------------ anti-rollback

    def highest_accepted(self, model: str) -> int:
        """The highest version ever accepted: the record, the update in progress (its job
        is its acceptance until it ends) and, as a floor a power cut cannot lower, the
        versions the pointer names."""
        doc = _read_json(self.root / "accepted.json") or {}
        value = doc.get(model, 0) if isinstance(doc, dict) else 0
        recorded = int(value) if isinstance(value, int) else 0
        job = self.job(model)
        pointer = self.pointer(model)
        named = [pointer.current, pointer.previous] if pointer else []
        return max(
            recorded,
            job.manifest.version if job else 0,
            *(_slot_version(n) or 0 for n in named if n),
        )

    def accept(self, model: str, version: int, *, durable: bool = False) -> None:
        """Record ``version`` as accepted; never lowers the recorded value. Not forced to
        disk unless ``durable``: what it adds is covered by the pointer's floor once the
        version is active, and an acceptance still in progress is the job's."""
        doc = _read_json(self.root / "accepted.json")
        doc = doc if isinstance(doc, dict) else {}
        doc[model] = max(version, int(doc.get(model, 0) or 0))
        data = json.dumps(doc, sort_keys=True).encode()
        atomic_write(self.root / "accepted.json", data, durable=durable)

    # ----------------------------------------------------------------------- jobs

    def job(self, model: str) -> Job | None:
        doc = _read_json(self.model_dir(model) / "job.json")
        if not isinstance(doc, dict):
            return None
        try:
            return Job(Manifest.model_validate(doc["manifest"]), str(doc["state"]))
        except (KeyError, ValueError):
            return None

    def save_job(self, manifest: Manifest, state: str) -> None:
        """Record the update in progress (atomic, not forced to disk). After a ``kill -9``
        the next start resumes it; what it has reached is read from the store (a slot whole
        or not, the pointer moved or not), so it is written once, not at every state. A
        power cut may take it: the retained manifest starts the update again, and since
        the job also holds the acceptance, none is left behind to refuse that as a replay."""
        doc = {"manifest": manifest.document(), "state": state}
        path = self.model_dir(manifest.model) / "job.json"
        atomic_write(path, json.dumps(doc).encode(), durable=False)

    def clear_job(self, model: str) -> None:
        """Forget the finished job (not forced: the job a power cut brings back resumes,
        finds its work done and reports its state again)."""
        (self.model_dir(model) / "job.json").unlink(missing_ok=True)


@dataclass(frozen=True)
class Job:
    manifest: Manifest
    state: str


def _names(manifest: Manifest) -> list[str | None]:
    return [f.name for f in manifest.files]


def _slot_version(slot: str) -> int | None:
    """The version in a slot's name (``v<version>-<sha12>``), or None."""
    head = slot.split("-", 1)[0]
    return int(head[1:]) if head.startswith("v") and head[1:].isdigit() else None
