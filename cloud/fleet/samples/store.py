"""``SampleStore``: the field samples devices upload, as files under a folder and an index
in the fleet store's ``samples`` table, with each device's daily quota in ``sample_quota``.

A payload's file is named by its id (the sha256 of its bytes, checked by
``shared.samples.decode_upload``), under ``root/<fleet>/<id[:2]>/``: the same bytes from two
devices are one file, and a file once written never changes. It is written to a temporary
name, fsynced and renamed (and the folder fsynced), so a reader never sees half a file and
the file is on disk before the 200 that lets the device delete its copy; the index row is
inserted after the file, so a row always has its file (a crash in between leaves an
unindexed file, which the next upload of those bytes reuses once its bytes are checked).

Rows are keyed on (fleet, device, id): an upload retried after a lost answer stores nothing
twice, and says how many it already had. Labels: a sample the cloud answered starts with the
cloud model's class (``label_source`` ``"cloud"``); an operator's correction
(``label(...)``, source ``"operator"``) replaces it. Retraining relabels every sample with
the teacher and lets only operator labels win (``cloud/pipeline``): a device's claimed
labels never reach training on their own.

Quota: per device and UTC day, bytes and samples stored (duplicates are free: they store
nothing). The check and the increment are one statement (an upsert whose update is
conditional), so instances sharing a PostgreSQL store cannot together let a device past it.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cloud.fleet.queries import utc_text
from cloud.fleet.store import FleetStore
from shared.errors import InvalidRequestError, TandemError
from shared.identifiers import IDENTIFIER_RE, check_identifier
from shared.samples import SampleMeta, UploadResult, decode_features
from shared.utc_day import seconds_to_utc_midnight

log = logging.getLogger(__name__)

_COLUMNS = (
    *("fleet", "device", "id", "model", "version", "kind", "ts", "received", "encoding"),
    *("shape", "media_type", "size", "edge_index", "edge_conf", "cloud_index", "cloud_conf"),
    *("cloud_model", "threshold", "label", "label_source", "path"),
)
#: Rows per INSERT: well under both engines' limits on bound parameters.
_INSERT_ROWS = 100
#: ``list``'s page size, by default and at most.
DEFAULT_PAGE = 100
MAX_PAGE = 1000
#: ``summary``'s devices named per version, by default and at most.
DEFAULT_TOP = 10
MAX_TOP = 100
#: What ``list`` and ``summary`` may filter on (the names go into SQL).
_FILTERS = ("model", "version", "device", "kind", "label_source")
#: Days of ``sample_quota`` rows kept (older ones are deleted as a new day starts).
_QUOTA_DAYS_KEPT = 3


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class QuotaExceededError(Exception):
    """A device's upload would pass its daily quota; nothing of it was stored. Not a
    ``TandemError``: the API answers it itself (429 with ``Retry-After``)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class BatchOverQuotaError(QuotaExceededError):
    """An upload larger than the device's whole daily quota: it would never be accepted,
    whatever the hour, so the API answers 413 (the uploader halves its batch) rather than
    429 (wait until midnight, then send the same batch again)."""


@dataclass(frozen=True)
class FieldSample:
    """One stored sample, for training. ``features`` is the decoded feature row (float32),
    or None for an encoded image, whose bytes are ``encoded`` (``media_type``). ``label`` is
    the best label the store has (an operator's over the cloud model's), ``cloud_index``
    what the cloud model answered on the device."""

    features: np.ndarray | None
    label: int | None
    label_source: str | None
    cloud_index: int | None
    kind: str
    device: str
    version: int
    id: str
    edge_index: int = 0
    encoded: bytes | None = None
    media_type: str | None = None


@dataclass(frozen=True)
class SamplePage:
    samples: list[dict[str, Any]]
    #: the cursor of the next page (``after=``), None on the last one
    next: str | None


class SampleStore:
    """Field samples of every fleet in one fleet store and one folder. ``clock`` is for
    tests (a quota's day ending without waiting for midnight)."""

    def __init__(
        self,
        store: FleetStore,
        root: Path,
        *,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.store = store
        self.root = root
        self._clock = clock
        self._quota_day: str | None = None

    # ------------------------------------------------------------------ uploads

    def add(
        self,
        fleet: str,
        device: str,
        items: Sequence[tuple[SampleMeta, bytes]],
        *,
        quota_bytes: int | None = None,
        quota_samples: int | None = None,
    ) -> UploadResult:
        """Store the samples not stored yet for this device; all of them or, over the
        device's quota for today, none (``QuotaExceededError``)."""
        check_identifier(fleet, "fleet")
        check_identifier(device, "device")
        fresh = self._not_stored(fleet, device, items)
        if not fresh:
            return UploadResult(stored=0, duplicates=len(items))
        now = self._clock()
        size = sum(meta.size for meta, _ in fresh)
        self._reserve(fleet, device, now, size, len(fresh), quota_bytes, quota_samples)
        received = utc_text(now)
        rows = []
        for meta, payload in fresh:
            rows.append(self._row(fleet, device, meta, received, self._write(fleet, meta, payload)))
        stored = 0
        for at in range(0, len(rows), _INSERT_ROWS):
            part = rows[at : at + _INSERT_ROWS]
            stored += self.store.execute(_insert_sql(len(part)), [v for r in part for v in r])
        # fewer stored than reserved: another instance stored some of them meanwhile (their
        # quota was counted twice, in the device's disfavour, for today only)
        return UploadResult(stored=stored, duplicates=len(items) - stored)

    def _not_stored(
        self, fleet: str, device: str, items: Sequence[tuple[SampleMeta, bytes]]
    ) -> list[tuple[SampleMeta, bytes]]:
        """The items whose id this device has not stored, each id once."""
        ids = sorted({meta.id for meta, _ in items})
        have: set[str] = set()
        for at in range(0, len(ids), _INSERT_ROWS * 5):
            part = ids[at : at + _INSERT_ROWS * 5]
            rows = self.store.query(
                "SELECT id FROM samples WHERE fleet=? AND device=? AND id IN"
                f" ({','.join('?' * len(part))})",
                [fleet, device, *part],
            )
            have.update(r["id"] for r in rows)
        out = []
        for meta, payload in items:
            if meta.id not in have:
                have.add(meta.id)
                out.append((meta, payload))
        return out

    def _reserve(
        self,
        fleet: str,
        device: str,
        now: datetime,
        size: int,
        count: int,
        quota_bytes: int | None,
        quota_samples: int | None,
    ) -> None:
        day = now.astimezone(timezone.utc).date().isoformat()
        if day != self._quota_day:
            self._quota_day = day
            oldest = (now - timedelta(days=_QUOTA_DAYS_KEPT)).date().isoformat()
            self.store.execute("DELETE FROM sample_quota WHERE day < ?", (oldest,))
        max_bytes = quota_bytes if quota_bytes is not None else 2**62
        max_samples = quota_samples if quota_samples is not None else 2**62
        retry = seconds_to_utc_midnight(now)
        if size > max_bytes or count > max_samples:
            raise BatchOverQuotaError(
                f"{count} samples of {size} bytes exceed device {device}'s daily quota "
                f"({max_samples} samples, {max_bytes} bytes) on their own",
                retry,
            )
        done = self.store.execute(
            "INSERT INTO sample_quota (fleet, device, day, bytes, samples) VALUES (?,?,?,?,?)"
            " ON CONFLICT (fleet, device, day) DO UPDATE SET"
            " bytes = sample_quota.bytes + excluded.bytes,"
            " samples = sample_quota.samples + excluded.samples"
            " WHERE sample_quota.bytes + excluded.bytes <= ?"
            " AND sample_quota.samples + excluded.samples <= ?",
            (fleet, device, day, size, count, max_bytes, max_samples),
        )
        if not done:
            used = self.quota_used(fleet, device, now)
            raise QuotaExceededError(
                f"device {device} has stored {used[1]} samples of {used[0]} bytes today; "
                f"{count} more of {size} bytes would pass its daily quota ({max_samples} "
                f"samples, {max_bytes} bytes)",
                retry,
            )

    def quota_used(self, fleet: str, device: str, now: datetime | None = None) -> tuple[int, int]:
        """Bytes and samples the device has stored today (UTC)."""
        day = (now or self._clock()).astimezone(timezone.utc).date().isoformat()
        rows = self.store.query(
            "SELECT bytes, samples FROM sample_quota WHERE fleet=? AND device=? AND day=?",
            (fleet, device, day),
        )
        return (int(rows[0]["bytes"]), int(rows[0]["samples"])) if rows else (0, 0)

    def _write(self, fleet: str, meta: SampleMeta, payload: bytes) -> str:
        """The payload's file (relative to ``root``), durable before its row is inserted
        (the device deletes its copy on the 200): written and fsynced under a temporary
        name, renamed, then the folder fsynced. A file already there is kept only if it
        holds these bytes (its size, then its sha256, which is the id): one truncated by a
        crash before this fix, or damaged since, is written again."""
        rel = Path(fleet) / meta.id[:2] / meta.id
        path = self.root / rel
        if _holds(path, meta.id, len(payload)):
            return rel.as_posix()
        created = not path.parent.is_dir()
        path.parent.mkdir(parents=True, exist_ok=True)
        if created:
            _fsync_dir(path.parent.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            Path(tmp).replace(path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return rel.as_posix()

    @staticmethod
    def _row(
        fleet: str, device: str, meta: SampleMeta, received: str, path: str
    ) -> tuple[Any, ...]:
        cloud = meta.cloud
        return (
            fleet,
            device,
            meta.id,
            meta.model,
            meta.version,
            meta.kind,
            utc_text(meta.ts),
            received,
            meta.encoding,
            json.dumps(meta.shape),
            meta.media_type,
            meta.size,
            meta.edge.index,
            meta.edge.confidence,
            cloud.index if cloud else None,
            cloud.confidence if cloud else None,
            meta.cloud_model,
            meta.threshold,
            cloud.index if cloud else None,
            "cloud" if cloud else None,
            path,
        )

    # ------------------------------------------------------------------ reading

    def list(
        self,
        fleet: str,
        *,
        limit: int = DEFAULT_PAGE,
        after: str | None = None,
        **filters: Any,
    ) -> SamplePage:
        """A page of samples, oldest received first; ``after``: the previous page's
        ``next``. Filters: ``model``, ``version``, ``device``, ``kind``, ``label_source``
        (``"none"``: unlabelled)."""
        limit = max(1, min(limit, MAX_PAGE))
        where, args = _where(fleet, filters)
        if after is not None:
            received, device, sample = _parse_cursor(after)
            where += (
                " AND (received > ? OR (received = ? AND (device > ? OR (device = ? AND id > ?))))"
            )
            args += [received, received, device, device, sample]
        rows = self.store.query(
            f"SELECT * FROM samples WHERE {where} ORDER BY received, device, id LIMIT ?",
            [*args, limit + 1],
        )
        more = len(rows) > limit
        rows = rows[:limit]
        page = [_public(r) for r in rows]
        last = rows[-1] if rows else None
        cursor = f"{last['received']},{last['device']},{last['id']}" if more and last else None
        return SamplePage(page, cursor)

    def get(self, fleet: str, device: str, sample: str) -> tuple[dict[str, Any], bytes] | None:
        """One sample's row and bytes (None: not stored, or its file is gone)."""
        rows = self.store.query(
            "SELECT * FROM samples WHERE fleet=? AND device=? AND id=?", (fleet, device, sample)
        )
        if not rows:
            return None
        data = self._read(rows[0]["path"])
        return (_public(rows[0]), data) if data is not None else None

    def label(
        self, fleet: str, device: str, sample: str, label: int, source: str = "operator"
    ) -> bool:
        """Set a sample's label (an operator's correction); False if there is no such
        sample."""
        if label < 0:
            raise InvalidRequestError(f"label {label} must be a class index (>= 0)")
        check_identifier(source, "label source")
        return bool(
            self.store.execute(
                "UPDATE samples SET label=?, label_source=? WHERE fleet=? AND device=? AND id=?",
                (label, source, fleet, device, sample),
            )
        )

    def summary(
        self, fleet: str, *, model: str | None = None, top: int = DEFAULT_TOP
    ) -> builtins.list[dict[str, Any]]:
        """Per model and version (``model``'s only, if given): samples and bytes, counts by
        kind and by label source (``"none"``: unlabelled), how many devices hold some, and
        the ``top`` of them with the most (``by_device``; ties in device order). Bounded by
        ``top``, not by the fleet: every device's count made it 137 KB at 10,000 devices."""
        top = max(0, min(top, MAX_TOP))
        where, args = _where(fleet, {"model": model})
        out: dict[tuple[str, int], dict[str, Any]] = {}

        def entry(r: dict[str, Any]) -> dict[str, Any]:
            key = (r["model"], int(r["version"]))
            if key not in out:
                out[key] = {
                    "model": key[0],
                    "version": key[1],
                    "samples": 0,
                    "bytes": 0,
                    "by_kind": {},
                    "by_label_source": {},
                    "devices": 0,
                    "by_device": {},
                }
            return out[key]

        for r in self.store.query(
            "SELECT model, version, kind, COUNT(*) AS n, SUM(size) AS bytes FROM samples"
            f" WHERE {where} GROUP BY model, version, kind",
            args,
        ):
            e = entry(r)
            e["samples"] += int(r["n"])
            e["bytes"] += int(r["bytes"])
            e["by_kind"][r["kind"]] = int(r["n"])
        for r in self.store.query(
            "SELECT model, version, label_source, COUNT(*) AS n FROM samples"
            f" WHERE {where} GROUP BY model, version, label_source",
            args,
        ):
            entry(r)["by_label_source"][r["label_source"] or "none"] = int(r["n"])
        # each version's devices ranked by their samples, with how many there are; the first
        # row of each is kept even at top=0, for that count
        for r in self.store.query(
            "SELECT model, version, device, n, rank, devices FROM (SELECT model, version,"
            " device, COUNT(*) AS n, ROW_NUMBER() OVER (PARTITION BY model, version"
            " ORDER BY COUNT(*) DESC, device) AS rank,"
            " COUNT(*) OVER (PARTITION BY model, version) AS devices"
            f" FROM samples WHERE {where} GROUP BY model, version, device) ranked"
            " WHERE rank <= ? ORDER BY model, version, rank",
            [*args, max(top, 1)],
        ):
            e = entry(r)
            e["devices"] = int(r["devices"])
            if int(r["rank"]) <= top:
                e["by_device"][r["device"]] = int(r["n"])
        return [out[k] for k in sorted(out)]

    def model_names(self, fleet: str) -> builtins.list[str]:
        """The models with samples in ``fleet`` (those no device serves any more too)."""
        rows = self.store.query(
            "SELECT DISTINCT model FROM samples WHERE fleet=? ORDER BY model", (fleet,)
        )
        return [r["model"] for r in rows]

    def counts(
        self, fleet: str, *, model: str | None = None, device: str | None = None
    ) -> builtins.list[dict[str, Any]]:
        """Per model, version and device: samples, bytes, and counts by kind and by label
        source (the CLI's table)."""
        where, args = _where(fleet, {"model": model, "device": device})
        rows = self.store.query(
            "SELECT model, version, device, COUNT(*) AS samples, SUM(size) AS bytes,"
            " SUM(CASE WHEN kind='escalation' THEN 1 ELSE 0 END) AS escalation,"
            " SUM(CASE WHEN kind='audit' THEN 1 ELSE 0 END) AS audit,"
            " SUM(CASE WHEN label_source='cloud' THEN 1 ELSE 0 END) AS cloud,"
            " SUM(CASE WHEN label_source='operator' THEN 1 ELSE 0 END) AS operator"
            f" FROM samples WHERE {where} GROUP BY model, version, device"
            " ORDER BY model, version, device",
            args,
        )
        return [{k: v if isinstance(v, str) else int(v) for k, v in r.items()} for r in rows]

    def export(
        self, fleet: str, model: str, limit: int | None = None
    ) -> builtins.list[FieldSample]:
        """The model's samples (every version), oldest first, decoded for training (the
        first ``limit``, if given). A row whose file is gone or does not decode is skipped:
        one damaged file must not stop a retrain (logged once per export, with the count)."""
        sql = "SELECT * FROM samples WHERE fleet=? AND model=? ORDER BY received, device, id"
        args: list[Any] = [fleet, model]
        if limit is not None:
            sql += " LIMIT ?"
            args.append(max(0, limit))
        return self._decoded(self.store.query(sql, args))

    def export_newest(self, fleet: str, model: str, n: int) -> builtins.list[FieldSample]:
        """The model's ``n`` newest samples (by ``received``), returned oldest first: what
        a retrain keeps, without reading the whole store into memory."""
        rows = self.store.query(
            "SELECT * FROM samples WHERE fleet=? AND model=?"
            " ORDER BY received DESC, device DESC, id DESC LIMIT ?",
            [fleet, model, max(0, n)],
        )
        rows.reverse()
        return self._decoded(rows)

    def _decoded(self, rows: builtins.list[dict[str, Any]]) -> builtins.list[FieldSample]:
        out = []
        gone: builtins.list[str] = []
        damaged: builtins.list[str] = []
        for r in rows:
            data = self._read(r["path"])
            if data is None:
                gone.append(f"{r['device']}/{r['id']}")
                continue
            meta = _meta(r)
            if hashlib.sha256(data).hexdigest() != r["id"]:
                damaged.append(f"{r['device']}/{r['id']} ({len(data)} bytes, not its sha256)")
                continue
            try:
                features = decode_features(meta, data) if meta.encoding != "encoded" else None
            except (TandemError, ValueError) as exc:
                damaged.append(f"{r['device']}/{r['id']} ({exc})")
                continue
            out.append(
                FieldSample(
                    features=features,
                    label=r["label"],
                    label_source=r["label_source"],
                    cloud_index=r["cloud_index"],
                    kind=r["kind"],
                    device=r["device"],
                    version=int(r["version"]),
                    id=r["id"],
                    edge_index=int(r["edge_index"]),
                    encoded=data if features is None else None,
                    media_type=r["media_type"],
                )
            )
        if gone:
            log.warning(
                "export: %d samples skipped, their file is gone (first: %s)", len(gone), gone[0]
            )
        if damaged:
            log.warning(
                "export: %d samples skipped, their file is damaged (first: %s)",
                len(damaged),
                damaged[0],
            )
        return out

    def _read(self, rel: str) -> bytes | None:
        try:
            return (self.root / rel).read_bytes()
        except FileNotFoundError:
            return None


def _holds(path: Path, sample_id: str, size: int) -> bool:
    """Whether ``path`` holds the payload ``sample_id`` (its sha256) of ``size`` bytes."""
    try:
        if path.stat().st_size != size:
            return False
        return hashlib.sha256(path.read_bytes()).hexdigest() == sample_id
    except FileNotFoundError:
        return False


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _insert_sql(n_rows: int) -> str:
    row = "(" + ",".join("?" * len(_COLUMNS)) + ")"
    return (
        f"INSERT INTO samples ({', '.join(_COLUMNS)}) VALUES {','.join([row] * n_rows)}"
        " ON CONFLICT (fleet, device, id) DO NOTHING"
    )


def _where(fleet: str, filters: dict[str, Any]) -> tuple[str, list[Any]]:
    where, args = "fleet=?", [fleet]
    for name, value in filters.items():
        if name not in _FILTERS:
            raise TypeError(f"unknown filter {name!r}")
        if value is None:
            continue
        if name == "label_source" and value == "none":
            where += " AND label_source IS NULL"
            continue
        where += f" AND {name}=?"
        args.append(value)
    return where, args


def _parse_cursor(cursor: str) -> tuple[str, str, str]:
    parts = cursor.split(",")
    if len(parts) != 3 or not IDENTIFIER_RE.match(parts[1]) or len(parts[2]) != 64:
        raise InvalidRequestError(f"invalid cursor {cursor[:100]!r}")
    try:
        datetime.fromisoformat(parts[0])
    except ValueError:
        raise InvalidRequestError(f"invalid cursor {cursor[:100]!r}") from None
    return parts[0], parts[1], parts[2]


def _public(r: dict[str, Any]) -> dict[str, Any]:
    """A row as the API shows it (no file path)."""
    out = {k: v for k, v in r.items() if k not in ("path", "fleet")}
    out["shape"] = json.loads(r["shape"])
    return out


def _meta(r: dict[str, Any]) -> SampleMeta:
    """Enough of a row's ``SampleMeta`` to decode its payload."""
    return SampleMeta.model_construct(
        id=r["id"], encoding=r["encoding"], shape=json.loads(r["shape"]), size=int(r["size"])
    )
