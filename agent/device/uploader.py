"""The uploader: the capture spool, sent to the cloud's ``POST /fleet/samples`` in batches
(``shared.samples.encode_upload``, gzip), at-least-once: a batch leaves the spool only once
the cloud answered 200 (it deduplicates by id, so a batch sent again after a lost answer
stores nothing twice). The spool is on disk, so a restart or a ``kill -9`` resumes where
the last process stopped.

Every ``interval_s``, and as soon as the spool holds a full batch (``notify``), it sends
batches of up to ``max_batch`` until the spool is empty. The answers:

- 200: the batch is deleted from the spool (``uploaded``);
- 429: nothing until ``Retry-After`` has passed;
- 401/403: the token is wrong or revoked, or the cloud does not take uploads yet: one try
  an hour (``REFUSED_RETRY_S``: an operator who fixes the token or sets the cloud's secret
  need not restart every device), ERROR logged once per refusal message; the spool keeps
  what it has (without a token nothing is sent at all);
- 413: the batch is halved and each half sent (the smaller size is kept for the session);
  a single sample refused as too large is dropped (``rejected``). A batch over the
  device's whole daily quota is 413 too, so it shrinks until a day can hold it;
- 400: one bad sample must not cost the good ones: the batch is sent in halves, down to
  the single sample refused, which is dropped (``rejected``, WARNING);
- 415: the upload's form is not this server's, whatever it carries: dropped (``rejected``);
- a spooled row that no longer reads as a ``SampleMeta`` (a damaged spool, a stricter
  schema after an upgrade) is dropped (``rejected``) before the batch is sent;
- a network error, 5xx or another 4xx (a server without the route): sent again later,
  with a capped exponential backoff.

Nothing is sent while capture is disabled: switching capture off stops samples leaving
the device, including those already spooled (they wait for it to be switched on again).

``UploadBudget``: uploads share ``telemetry.daily_budget_bytes`` with the device's own
MQTT chatter, telemetry first. The day's uploads may spend only what is left after the
day's chatter so far, the day's uploads so far, and a reserve for the rest of the day's
telemetry (seconds to UTC midnight / telemetry interval x the average telemetry message
seen so far). The reserve shrinks as the day goes by, so held samples go out later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import date, datetime, timezone

import httpx
from pydantic import ValidationError

from agent.device.capture import Capture
from agent.device.wire import BUDGETED, WireCounter
from shared.samples import SampleMeta, UploadResult, encode_upload
from shared.utc_day import seconds_to_utc_midnight

log = logging.getLogger(__name__)

#: A telemetry message's cost before the first one was sent (an idle one is about 0.5 KB).
DEFAULT_MESSAGE_BYTES = 700
#: What an upload's request line and headers add to its body, about.
REQUEST_OVERHEAD_BYTES = 400
SAMPLES_PATH = "/fleet/samples"
MAX_RETRY_AFTER_S = 3600.0
#: After a 401/403, the wait before the next try (a wrong token does not get better by
#: retrying soon; an operator's fix should reach devices without a restart).
REFUSED_RETRY_S = 3600.0


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class UploadBudget:
    """What uploads may still spend today of ``limit_bytes`` (shared with telemetry)."""

    def __init__(
        self,
        limit_bytes: int,
        wire: WireCounter,
        telemetry_interval_s: float,
        messages: Callable[[], int] | None = None,
        now: Callable[[], datetime] = _utc_now,
    ) -> None:
        """``messages``: telemetry messages sent so far this session (None: the device
        sends no telemetry, nothing is reserved)."""
        self.limit_bytes = limit_bytes
        self.wire = wire
        self.telemetry_interval_s = telemetry_interval_s
        self.messages = messages
        self._now = now
        self._categories = (*BUDGETED, "samples")
        self._day: date = now().date()
        self._base = wire.total(self._categories)

    def spent(self) -> int:
        """Today's chatter and uploads (a new day starts from zero)."""
        total = self.wire.total(self._categories)
        today = self._now().date()
        if today != self._day:
            self._day, self._base = today, total
        return total - self._base

    def message_cost(self) -> float:
        """The average telemetry message so far (bytes on the wire)."""
        n = self.messages() if self.messages is not None else 0
        if n <= 0:
            return float(DEFAULT_MESSAGE_BYTES)
        return self.wire.total(("telemetry",)) / n

    def reserve(self) -> float:
        """Bytes held back for the rest of the day's telemetry."""
        if self.messages is None:
            return 0.0
        remaining_s = seconds_to_utc_midnight(self._now())
        return remaining_s / self.telemetry_interval_s * self.message_cost()

    def available(self) -> int:
        """Bytes uploads may still spend today (0 or less: none)."""
        return int(self.limit_bytes - self.spent() - self.reserve())


class Uploader:
    def __init__(
        self,
        capture: Capture,
        http: httpx.Client,
        base_url: str,
        device: str,
        token: str | None,
        *,
        interval_s: float = 60.0,
        max_batch: int = 64,
        budget: UploadBudget | None = None,
        max_backoff_s: float = 300.0,
        first_backoff_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``http``: a client counted on the ``samples`` wire category; ``base_url``: the
        cloud's (``capture.upload_url``, else ``cloud.url``)."""
        self.capture = capture
        self.http = http
        self.url = base_url.rstrip("/") + SAMPLES_PATH
        self.device = device
        self.token = token
        self.interval_s = interval_s
        self.batch = max_batch
        self.budget = budget
        self.max_backoff_s = max_backoff_s
        self.first_backoff_s = first_backoff_s
        self._clock = clock
        #: True after a 401/403 until an upload is taken again: one try an hour meanwhile.
        self.forbidden = False
        self._refusal: str | None = None
        self.failures = 0  # network errors and 5xx, in a row
        self.held_budget = 0  # rounds held back by the budget
        self._told_no_token = False
        self._backoff = min(first_backoff_s, max_backoff_s)
        self._not_before = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def notify(self) -> None:
        """A full batch is waiting: upload now (unless backing off)."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tandem-uploader", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> bool:
        """False when the thread is still busy after ``timeout_s`` (an upload under way)."""
        self._stop.set()
        self._wake.set()
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.next_wait_s())
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.drain()
            except Exception:  # the uploader must outlive anything one round does
                log.exception("sample upload failed")

    def next_wait_s(self) -> float:
        """The interval, or less when a backoff or a ``Retry-After`` ends sooner."""
        left = self._not_before - self._clock()
        return min(left + 0.01, self.interval_s) if left > 0 else self.interval_s

    def drain(self) -> int:
        """Send batches until the spool is empty or the cloud says stop; returns how many
        samples were uploaded. Called by the thread (and by tests, synchronously)."""
        uploaded = 0
        while not self._stop.is_set():
            sent = self.upload_once()
            if sent <= 0:
                break
            uploaded += sent
        return uploaded

    def upload_once(self) -> int:
        """One batch. Returns the samples that left the spool (uploaded or rejected), 0
        when nothing was sent or it must be sent again later."""
        if not self.capture.enabled or self._clock() < self._not_before:
            return 0
        rows = self.capture.spool.oldest(self.batch)
        if not rows:
            return 0
        if self.token is None:  # the cloud would only say 401: spare the bytes
            if not self._told_no_token:
                self._told_no_token = True
                log.warning(
                    "samples wait in the spool: capture.token is not set "
                    "(tandem-cloud fleet device-token %s)",
                    self.device,
                )
            return 0
        items, invalid = self._readable(rows)
        if not items:
            return invalid
        headers, body = encode_upload(self.device, items, token=self.token)
        if self.budget is not None:
            allowed = self.budget.available()
            cost = len(body) + REQUEST_OVERHEAD_BYTES
            if cost > allowed:
                fit = int(len(items) * allowed / cost) if allowed > 0 else 0
                if fit < 1:
                    self.held_budget += 1
                    return invalid
                items = items[:fit]
                headers, body = encode_upload(self.device, items, token=self.token)
        return invalid + self._send(items, headers, body)

    def _readable(
        self, rows: list[tuple[str, bytes, bytes]]
    ) -> tuple[list[tuple[SampleMeta, bytes]], int]:
        """The rows whose metadata is valid (this version's ``SampleMeta``, its size the
        payload's), and how many were not: those are deleted and counted ``rejected``, or
        one unreadable row (a damaged spool, a stricter schema after an upgrade) would fail
        every round and stall the uploads behind it."""
        items: list[tuple[SampleMeta, bytes]] = []
        bad: list[str] = []
        for sample_id, meta, payload in rows:
            try:
                parsed = SampleMeta.model_validate_json(meta)
            except ValidationError as exc:
                bad.append(sample_id)
                why = f"{exc.error_count()} errors, first: {exc.errors()[0]['msg']}"
                log.warning("upload: spooled sample %s is unreadable (%s): dropped", sample_id, why)
                continue
            if parsed.size != len(payload):
                bad.append(sample_id)
                log.warning(
                    "upload: spooled sample %s is %d bytes, its metadata says %d: dropped",
                    sample_id,
                    len(payload),
                    parsed.size,
                )
                continue
            items.append((parsed, payload))
        if bad:
            self.capture.spool.delete(bad)
            self.capture.rejected += len(bad)
        return items, len(bad)

    def _send(
        self,
        items: list[tuple[SampleMeta, bytes]],
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> int:
        """POST ``items``; the samples that left the spool (uploaded or rejected). A part
        of a split batch (no ``body`` given) is held back like a batch when the byte budget
        cannot pay for it: splitting must not spend past it."""
        if headers is None or body is None:
            headers, body = encode_upload(self.device, items, token=self.token)
            if (
                self.budget is not None
                and len(body) + REQUEST_OVERHEAD_BYTES > self.budget.available()
            ):
                self.held_budget += 1
                return 0
        ids = [meta.id for meta, _ in items]
        try:
            reply = self.http.post(self.url, content=body, headers=headers, timeout=30.0)
        except httpx.HTTPError as exc:
            self._retry_later(f"{exc!r}")
            return 0
        return self._answered(reply, items, ids)

    def _split(self, items: list[tuple[SampleMeta, bytes]]) -> int:
        """Send each half on its own (a 400 or 413 on a batch of several): the good
        samples go, a bad one ends alone and is dropped. The second half waits if the first
        was told to (429, 401/403, a backoff) or the budget held it back."""
        mid = len(items) // 2
        held = self.held_budget
        done = self._send(items[:mid])
        if self.forbidden or self._clock() < self._not_before or self._stop.is_set():
            return done
        if self.held_budget != held:  # the budget is spent: the rest waits too
            return done
        return done + self._send(items[mid:])

    def _answered(
        self, reply: httpx.Response, items: list[tuple[SampleMeta, bytes]], ids: list[str]
    ) -> int:
        status = reply.status_code
        if status == 200:
            try:
                result = UploadResult.model_validate_json(reply.content)
            except ValidationError:
                result = None
            self.capture.spool.delete(ids)
            for sample_id in ids:
                self.capture.seen(sample_id)
            self.capture.uploaded += len(ids)
            if self.forbidden:
                log.info("uploads taken again after a refusal")
            self.forbidden, self._refusal = False, None
            self.failures, self._backoff = 0, min(self.first_backoff_s, self.max_backoff_s)
            if result is not None and result.duplicates:
                log.debug("upload: %d of %d were already in the cloud", result.duplicates, len(ids))
            return len(ids)
        message = reply.text[:200]
        if status == 429:
            self._not_before = self._clock() + _retry_after(reply, self.interval_s)
            log.info("upload: the cloud asks to wait (429: %s)", message)
            return 0
        if status in (401, 403):
            self.forbidden = True
            self._not_before = self._clock() + REFUSED_RETRY_S
            if f"{status} {message}" != self._refusal:
                self._refusal = f"{status} {message}"
                log.error(
                    "upload refused (%d: %s): check capture.token and the cloud's "
                    "[samples] device_token_secret; trying again every %.0f s",
                    status,
                    message,
                    REFUSED_RETRY_S,
                )
            return 0
        if status == 413 and len(ids) > 1:
            self.batch = max(1, min(self.batch, len(ids) // 2))
            log.info("upload: %d samples too large (413); batches of %d now", len(ids), self.batch)
            return self._split(items)
        if status == 400 and len(ids) > 1:
            log.info("upload: %d samples refused as malformed (400); sent in halves", len(ids))
            return self._split(items)
        if status in (400, 413, 415):
            self.capture.spool.delete(ids)
            self.capture.rejected += len(ids)
            log.warning(
                "upload: the cloud refused %d samples for good (%d: %s)", len(ids), status, message
            )
            return len(ids)
        self._retry_later(f"{status}: {message}")
        return 0

    def _retry_later(self, why: str) -> None:
        self.failures += 1
        self._not_before = self._clock() + self._backoff
        log.log(
            logging.WARNING if self.failures == 1 else logging.DEBUG,
            "upload failed (%s); retrying in %.1f s",
            why,
            self._backoff,
        )
        self._backoff = min(self._backoff * 2.0, self.max_backoff_s)


def _retry_after(reply: httpx.Response, default_s: float) -> float:
    raw = reply.headers.get("Retry-After", "")
    try:
        return min(max(float(raw), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        return default_s
