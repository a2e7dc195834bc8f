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
"""

from __future__ import annotations

import logging
import threading
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


def sample(
    obs: Observation, kind: SampleKind, cloud_model: str | None = None
) -> tuple[SampleMeta, bytes] | None:
    """The upload's metadata and payload of one labelled observation (None: nothing the
    format can carry, e.g. an image in a format other than JPEG/PNG)."""
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
        cloud = Answer(
            index=obs.cloud_index, confidence=_unit(obs.cloud_confidence), probs=obs.cloud_probs
        )
    meta = SampleMeta(
        id=sample_id(payload),
        kind=kind,
        model=obs.model,
        version=obs.version,
        ts=datetime.fromtimestamp(obs.ts, timezone.utc),
        encoding=encoding,
        shape=shape,
        media_type=media_type,  # type: ignore[arg-type]  # one of the two literals
        size=len(payload),
        edge=Answer(
            index=obs.edge_index, confidence=_unit(obs.edge_confidence), probs=obs.edge_probs
        ),
        cloud=cloud,
        cloud_model=cloud_model,
        threshold=_unit(obs.threshold),
    )
    return meta, payload


def _unit(value: float) -> float:
    """Clamp to [0, 1]: float rounding may put a softmax's top a hair above 1."""
    return min(max(float(value), 0.0), 1.0)


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
    ) -> None:
        """``cloud_model``: the cloud model's ref for an observation's sample; ``batch``:
        pending samples that make a full upload (``on_full`` is called then)."""
        self.spool = spool
        self.switch = switch
        self.budget = budget
        self.cloud_model = cloud_model
        self.batch = batch
        #: Called (on the capturing thread) when the spool holds a full batch.
        self.on_full: Callable[[], None] = lambda: None
        self.captured = 0
        self.duplicates = 0
        self.skipped_budget = 0
        self.dropped_full = 0
        self.unsupported = 0
        #: Incremented by the uploader.
        self.uploaded = 0
        self.rejected = 0
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._max_recent = recent
        self._lock = threading.Lock()  # the two producer threads
        self._warned_full = False

    @property
    def enabled(self) -> bool:
        return self.switch.enabled

    def observe(self, obs: Observation) -> None:
        """An observation from the queue: kept when the cloud answered it (an escalation)."""
        if obs.escalated and self.enabled:
            self._take(obs, "escalation")

    def audited(self, obs: Observation) -> None:
        """A labelled audit (``Audit.on_labelled``)."""
        if obs.escalated and self.enabled:
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
        made = sample(obs, kind, self.cloud_model(obs))
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
            stored, dropped = self.spool.put(meta.id, meta.model_dump_json().encode(), payload)
            self._remember(meta.id)
            if not stored:
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
            dropped_full=self.dropped_full,
            pending=self.spool.pending,
            pending_bytes=self.spool.size_bytes,
            uploaded=self.uploaded,
            rejected=self.rejected,
        )

    def section(self) -> dict[str, CaptureState]:
        """Telemetry's ``capture``; left out (``{}``) while capture is off with nothing
        counted and nothing in the spool: an absent section means off, and an idle
        device on a metered link does not pay for saying so every interval."""
        state = self.state()
        return {} if state == CaptureState(enabled=False) else {"capture": state}
