"""Field-data capture: escalated inputs with the edge's and the cloud's answers, and the
audit's labelled confident answers, written to the spool (``agent.device.spool``) for the
uploader.

``observe`` (escalations, on the ``ObservationQueue``'s thread) and ``audited`` (on the
audit's thread) are both off the request path: a request never waits for capture. Nothing
is written unless capture is enabled (``agent.device.switch.CaptureSwitch``: the device's
setting, else the fleet's switch). A flat model's row goes as ``shared.samples``'s
``uint8``/``float32`` bytes, an image model's input as the caller's own encoded JPEG/PNG.

Deduplication is exact: a sample's id is the SHA-256 of its payload, checked against the
ids captured recently (a bounded set in memory, which also remembers ids already uploaded
and gone from the spool) and the spool's primary key; the cloud deduplicates again.

When the day's upload allowance (``agent.device.uploader.UploadBudget``: what
``telemetry.daily_budget_bytes`` leaves after the rest of the day's telemetry) is spent,
new samples are not written (counted ``skipped_budget``): what the spool already holds
waits for the allowance to grow (it does as the day's telemetry reserve shrinks, and at
midnight), and the spool does not fill with a backlog that a metered link would pay for
at once when the new day begins.

What goes on the wire is kept small (``shared.samples``: the batch's shared fields once in
its header, no ids): the probability vectors are left out unless ``include_probs`` (the
cloud relabels every sample with its teacher at retrain time, so they serve nobody by
default), confidences and the threshold are rounded to 4 decimals and times to the
millisecond.

``RateLimit``: at most ``max_samples_per_hour`` samples are written (a token bucket of a
tenth of an hour's share, so at most 1.1 hours' worth in any hour); the rest are counted
``skipped_rate``. Escalations and audits share the bucket, audits first: an escalation
leaves a reserve of a quarter of the bucket that only audits may take. An audit is the
rarer sample and the one the cloud was asked about for its own sake, and it is a random
draw of confident answers, the only unbiased view of the edge's confident mistakes; the
escalations that fill the rest of the allowance are a time-ordered share of the
escalations (the first ones after each refill).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from agent.device.spool import Spool
from agent.device.switch import CaptureSwitch
from agent.inference.observe import Observation
from shared.images import FORMATS
from shared.samples import Answer, SampleKind, SampleMeta, encode_features, sample_id
from shared.telemetry import CaptureState

if TYPE_CHECKING:
    from agent.device.uploader import UploadBudget

log = logging.getLogger(__name__)

_MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png"}


#: Decimals kept of a confidence, a probability and the threshold on the wire.
DECIMALS = 4


def sample(
    obs: Observation,
    kind: SampleKind,
    cloud_model: str | None = None,
    *,
    include_probs: bool = False,
) -> tuple[SampleMeta, bytes] | None:
    """The upload's metadata and payload of one labelled observation (None: nothing the
    format can carry, e.g. an image in a format other than JPEG/PNG). ``include_probs``:
    keep both models' probability vectors (rounded like the confidences)."""
    if obs.features is not None:
        encoding, shape, payload = encode_features(obs.features)
        media_type = None
    elif obs.encoded is not None:
        fmt = next((f for f, magic in FORMATS.items() if obs.encoded.startswith(magic)), None)
        if fmt is None:
            return None
        encoding, shape, payload, media_type = "encoded", [], bytes(obs.encoded), _MEDIA_TYPES[fmt]
    else:
        return None
    cloud = None
    if obs.cloud_index is not None and obs.cloud_confidence is not None:
        cloud = _answer(obs.cloud_index, obs.cloud_confidence, obs.cloud_probs, include_probs)
    meta = SampleMeta(
        id=sample_id(payload),
        kind=kind,
        model=obs.model,
        version=obs.version,
        ts=datetime.fromtimestamp(round(obs.ts, 3), timezone.utc),
        encoding=encoding,
        shape=shape,
        media_type=media_type,  # type: ignore[arg-type]  # one of the two literals
        size=len(payload),
        edge=_answer(obs.edge_index, obs.edge_confidence, obs.edge_probs, include_probs),
        cloud=cloud,
        cloud_model=cloud_model,
        threshold=_unit(obs.threshold),
    )
    return meta, payload


def _answer(index: int, confidence: float, probs: list[float] | None, keep: bool) -> Answer:
    return Answer(
        index=index,
        confidence=_unit(confidence),
        probs=[_unit(p) for p in probs] if keep and probs is not None else None,
    )


def _unit(value: float) -> float:
    """Rounded to ``DECIMALS`` and clamped to [0, 1] (float rounding may put a softmax's
    top a hair above 1)."""
    return min(max(round(float(value), DECIMALS), 0.0), 1.0)


class RateLimit:
    """A token bucket of ``per_hour`` tokens an hour, holding a tenth of that at most (at
    least 1), full at the start. ``take(priority=False)`` leaves a reserve of a quarter of
    the bucket for ``take(priority=True)``."""

    def __init__(self, per_hour: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_hour = per_hour
        self.capacity = max(1.0, per_hour / 10)
        self.reserve = self.capacity // 4
        self.clock = clock
        self.tokens = self.capacity
        self._last = clock()

    def take(self, priority: bool = False) -> bool:
        now = self.clock()
        elapsed = max(now - self._last, 0.0)
        self._last = now
        self.tokens = min(self.capacity, self.tokens + elapsed * self.per_hour / 3600.0)
        if self.tokens < 1.0 + (0.0 if priority else self.reserve):
            return False
        self.tokens -= 1.0
        return True

    def give_back(self) -> None:
        """A token taken for a sample that was not written after all."""
        self.tokens = min(self.capacity, self.tokens + 1.0)


class Capture:
    def __init__(
        self,
        spool: Spool,
        switch: CaptureSwitch,
        *,
        budget: UploadBudget | None = None,
        cloud_model: Callable[[Observation], str | None] = lambda obs: None,
        batch: int = 64,
        recent: int = 4096,
        include_probs: bool = False,
        max_samples_per_hour: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``cloud_model``: the cloud model's ref for an observation's sample; ``batch``:
        pending samples that make a full upload (``on_full`` is called then);
        ``max_samples_per_hour``: the ``RateLimit`` (None: none) on ``clock``."""
        self.spool = spool
        self.include_probs = include_probs
        self.rate_limit = (
            RateLimit(max_samples_per_hour, clock) if max_samples_per_hour is not None else None
        )
        self.switch = switch
        self.budget = budget
        self.cloud_model = cloud_model
        self.batch = batch
        #: Called (on the capturing thread) when the spool holds a full batch.
        self.on_full: Callable[[], None] = lambda: None
        self.captured = 0
        self.duplicates = 0
        self.skipped_budget = 0
        self.skipped_rate = 0
        self.dropped_full = 0
        self.unsupported = 0
        #: Incremented by the uploader.
        self.uploaded = 0
        self.rejected = 0
        #: The observation queue's drop count (the service wires it; telemetry reports it).
        self.queue_dropped: Callable[[], int] = lambda: 0
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._max_recent = recent
        self._lock = threading.Lock()  # the two producer threads
        self._warned_full = False

    @property
    def enabled(self) -> bool:
        return self.switch.enabled

    def observe(self, obs: Observation) -> None:
        """An observation from the queue: kept when the cloud answered it (an escalation)
        while capture was on (``CaptureSwitch.enabled_at``)."""
        if obs.escalated and self.switch.enabled_at(obs.answered):
            self._take(obs, "escalation")

    def audited(self, obs: Observation) -> None:
        """A labelled audit (``Audit.on_labelled``) of an answer given while capture was on."""
        if obs.escalated and self.switch.enabled_at(obs.answered):
            self._take(obs, "audit")

    def seen(self, sample_id: str) -> None:
        """Remember ``sample_id`` as captured (bounded: the oldest forgotten first)."""
        with self._lock:
            self._remember(sample_id)

    def _remember(self, sample_id: str) -> None:
        self._recent[sample_id] = None
        self._recent.move_to_end(sample_id)
        while len(self._recent) > self._max_recent:
            self._recent.popitem(last=False)

    def _take(self, obs: Observation, kind: SampleKind) -> None:
        made = sample(obs, kind, self.cloud_model(obs), include_probs=self.include_probs)
        if made is None:
            self.unsupported += 1
            return
        meta, payload = made
        with self._lock:
            if meta.id in self._recent:
                self.duplicates += 1
                return
            if self.budget is not None and self.budget.available() <= 0:
                self.skipped_budget += 1
                return
            limit = self.rate_limit
            if limit is not None and not limit.take(priority=kind == "audit"):
                self.skipped_rate += 1
                return
            doc = meta.model_dump_json(exclude_none=True).encode()
            stored, dropped = self.spool.put(meta.id, doc, payload)
            self._remember(meta.id)
            if not stored:
                if limit is not None:
                    limit.give_back()
                self.duplicates += 1
                return
            self.captured += 1
            self.dropped_full += dropped
        if dropped and not self._warned_full:
            self._warned_full = True
            log.warning("capture spool full: dropping the oldest samples (counted in telemetry)")
        if self.spool.pending >= self.batch:
            self.on_full()

    def state(self) -> CaptureState:
        return CaptureState(
            enabled=self.enabled,
            captured=self.captured,
            duplicates=self.duplicates,
            skipped_budget=self.skipped_budget,
            skipped_rate=self.skipped_rate,
            dropped_full=self.dropped_full,
            pending=self.spool.pending,
            pending_bytes=self.spool.size_bytes,
            uploaded=self.uploaded,
            rejected=self.rejected,
            observations_dropped=self.queue_dropped(),
        )

    def section(self) -> dict[str, CaptureState]:
        """Telemetry's ``capture``; left out (``{}``) while capture is off with nothing
        counted and nothing in the spool: an absent section means off, and an idle
        device on a metered link does not pay for saying so every interval."""
        state = self.state()
        return {} if state == CaptureState(enabled=False) else {"capture": state}
