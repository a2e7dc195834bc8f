"""The audit: a random share of the edge's confident answers, asked of the cloud off the
request path, to see the mistakes the edge is sure of (escalations only show the ones it
doubts) and to check the threshold's guarantee live.

``Audit.observe`` runs on the ``ObservationQueue``'s thread. It picks an observation the
edge answered itself with a confidence at or above the threshold (what the manifest's
``Guarantee`` is about) with probability ``rate``, and queues it (bounded: dropped and
counted when full) for a thread of its own, which asks the cloud and hands a labelled copy
(``cloud_*`` filled in, ``reason="audit"``) to each of ``on_labelled`` (capture, shadow).

While a shadow candidate is installed the service raises ``shadow_rate`` (``[shadow]
audit_rate``): confident answers are then audited at the higher of the two rates, so that
the rollout's gate sees the candidate's mistakes on the requests the serving model is sure
of, which escalations never label (see ``cloud.fleet.gate``). One draw decides both: below
``rate`` it is an ordinary audit (every ``on_labelled`` consumer, the live check); between
``rate`` and ``shadow_rate`` it is the shadow's alone (``on_shadow_labelled`` and the live
check): those extra labels are not captured, so a canary's uploads stay what the capture's
rate makes them, and only canary devices during a shadow phase pay the extra cloud calls.

The cloud is asked on the audit's own ``CloudClient`` (the service builds one counted on
the ``audits`` wire category), never through the router: an audit must not move the
breaker or the latency estimate a request's routing depends on, nor take a connection from
the request path's pool. A failed audit is counted and forgotten (no retry).

Only flat classifiers are audited (``Observation.features``): an image model's cloud call
needs the request's own preprocessing and decoder, which stay inside ``Agent``; image
observations are counted as ``skipped``.

The live check (``section``, telemetry ``audit``): per (model, version), audited and wrong
("not the cloud's top-1") per interval and per session, the session's error with its
Clopper-Pearson interval at the manifest's ``delta`` (0.05 without a guarantee), and
``violated`` when even the interval's lower end is above the manifest's ``epsilon`` (logged
once at WARNING when it turns so); with the session's audits lost on the way (``dropped``:
queue full, ``failed``: no cloud answer, ``skipped``: not auditable). With ``reference =
"labels"`` the cloud stands in for the true label: the check then measures disagreement
with the cloud.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from agent.errors import CloudError
from agent.inference.cloud_client import CloudClient
from agent.inference.confidence import score
from agent.inference.core import Agent
from agent.inference.observe import BoundedWorker, Observation
from shared import bounds
from shared.manifest import Guarantee
from shared.telemetry import FieldAccuracy

log = logging.getLogger(__name__)

#: The interval's confidence when the manifest promises nothing.
DEFAULT_DELTA = 0.05
AUDIT_REASON = "audit"


@dataclass
class _Counts:
    audited: int = 0
    wrong: int = 0
    session_audited: int = 0
    session_wrong: int = 0
    guarantee: Guarantee | None = None
    violated: bool = False


class Audit:
    def __init__(
        self,
        agent: Agent,
        rate: float,
        *,
        cloud: CloudClient | None = None,
        max_pending: int = 64,
        timeout_s: float = 5.0,
        rng: random.Random | None = None,
        seed: int | None = None,
    ) -> None:
        """``cloud``: the client audits go through (None: ``agent.cloud_client``);
        ``seed``: of the draw (``rng``'s, when none is given; None: from the OS), so that a
        benchmark's capture of the same stream audits the same answers."""
        self.agent = agent
        #: Share of confident edge answers audited (the capture switch may change it).
        self.rate = rate
        self.cloud = cloud if cloud is not None else agent.cloud_client
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        self._rng = rng if rng is not None else random.Random(seed)
        #: While a shadow is installed: the share audited for it (the higher rate wins).
        self.shadow_rate = 0.0
        #: Called with each labelled copy, on the audit's thread.
        self.on_labelled: list[Callable[[Observation], None]] = []
        #: Called with every labelled copy, the shadow's extra audits included.
        self.on_shadow_labelled: list[Callable[[Observation], None]] = []
        self.dropped = 0  # queue full
        self.failed = 0  # the cloud did not answer
        self.skipped = 0  # not auditable (an image model, a model swapped since)
        #: (observation, an ordinary audit: else a shadow's extra one)
        self._queue: BoundedWorker[tuple[Observation, bool]] = BoundedWorker(
            lambda item: self.audit(*item), max_pending, "tandem-audit"
        )
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, int], _Counts] = {}
        self._failed_consumers: set[int] = set()

    # ----------------------------------------------------------------- the queue side

    def observe(self, obs: Observation) -> None:
        """Maybe queue ``obs`` for an audit (never blocks)."""
        if self.cloud is None or obs.escalated or obs.edge_confidence < obs.threshold:
            return
        rate, shadow_rate = self.rate, self.shadow_rate
        if max(rate, shadow_rate) <= 0.0:
            return
        draw = self._rng.random()
        if draw >= rate and draw >= shadow_rate:
            return
        if obs.features is None:
            self.skipped += 1
            return
        if not self._queue.put((obs, draw < rate)):
            self.dropped += 1

    def start(self) -> None:
        self._queue.start()

    def stop(self, timeout_s: float = 5.0) -> bool:
        """False when the thread is still busy after ``timeout_s`` (a cloud call)."""
        return self._queue.stop(timeout_s)

    @property
    def pending(self) -> int:
        return self._queue.pending

    def drain(self) -> None:
        """Audit everything queued now, on this thread (tests)."""
        self._queue.drain()

    # ---------------------------------------------------------------------- one audit

    def audit(self, obs: Observation, ordinary: bool = True) -> Observation | None:
        """Ask the cloud about ``obs``; count it and hand the labelled copy on (``ordinary``
        False: a shadow's extra audit, to ``on_shadow_labelled`` only). None when it could
        not be audited."""
        labelled = self.label(obs)
        if labelled is None:
            return None
        self._count(labelled)
        consumers = [(i, c) for i, c in enumerate(self.on_labelled) if ordinary]
        consumers += [(-1 - i, c) for i, c in enumerate(self.on_shadow_labelled)]
        for key, consume in consumers:
            try:
                consume(labelled)
            except Exception:
                if key not in self._failed_consumers:
                    self._failed_consumers.add(key)
                    log.exception("an audit consumer failed (logged once)")
        return labelled

    def label(self, obs: Observation) -> Observation | None:
        """A copy of ``obs`` with the cloud's answer, or None (counted)."""
        model = self.agent.model
        m = model.manifest
        target = self.agent.cloud_target
        if (
            self.cloud is None
            or target is None
            or obs.features is None
            or (m.model, m.version) != (obs.model, obs.version)
            or not model.flat
        ):
            self.skipped += 1
            return None
        raw = np.asarray(obs.features, dtype=np.float32).reshape(1, -1)
        try:
            answer = self.cloud.infer(model.preprocess(raw), target, self.timeout_s)
        except CloudError as exc:
            self.failed += 1
            log.debug("audit: the cloud did not answer (%s)", exc)
            return None
        if answer.output.shape[-1] != len(model.labels):
            self.failed += 1
            return None
        metric = self.agent.settings.routing.metric or m.routing.metric
        probs, conf, index = score(answer.output[0], target.output_kind, 1.0, metric)
        return dataclasses.replace(
            obs,
            reason=AUDIT_REASON,
            cloud_index=index,
            cloud_confidence=conf,
            cloud_probs=probs,
        )

    # ------------------------------------------------------------------- the live check

    def _count(self, obs: Observation) -> None:
        assert obs.cloud_index is not None
        wrong = obs.cloud_index != obs.edge_index
        m = self.agent.model.manifest
        guarantee = (
            m.routing.guarantee if (m.model, m.version) == (obs.model, obs.version) else None
        )
        with self._lock:
            c = self._counts.setdefault((obs.model, obs.version), _Counts())
            if guarantee is not None:
                c.guarantee = guarantee
            c.audited += 1
            c.session_audited += 1
            c.wrong += wrong
            c.session_wrong += wrong
            accuracy = _accuracy(obs.model, obs.version, c)
            turned = bool(accuracy.violated) and not c.violated
            c.violated = bool(accuracy.violated)
        if turned:
            log.warning(
                "%s v%d breaks its guarantee on the audit sample: error %.4f (%d of %d), "
                "interval [%.4f, %.4f] above epsilon %.4f",
                obs.model,
                obs.version,
                accuracy.error,
                accuracy.session_wrong,
                accuracy.session_audited,
                accuracy.error_low,
                accuracy.error_high,
                accuracy.epsilon,
            )

    def accuracy(self, model: str, version: int) -> FieldAccuracy | None:
        """The live check of ``model`` v``version`` so far (None: never audited)."""
        with self._lock:
            c = self._counts.get((model, version))
            return None if c is None else _accuracy(model, version, c)

    def section(self) -> dict[str, FieldAccuracy]:
        """Telemetry's ``audit`` for the serving model, closing the interval (``{}`` before
        its first audit, unless some were dropped, failed or skipped: a device whose every
        audit fails says so). The session's ``dropped``, ``failed`` and ``skipped`` ride in
        it, whatever model they were about."""
        m = self.agent.model.manifest
        lost = {"dropped": self.dropped, "failed": self.failed, "skipped": self.skipped}
        with self._lock:
            c = self._counts.get((m.model, m.version))
            if c is None and not any(lost.values()):
                return {}
            out = _accuracy(m.model, m.version, c or _Counts(guarantee=m.routing.guarantee))
            for counts in self._counts.values():
                counts.audited = counts.wrong = 0
        return {"audit": out.model_copy(update=lost)}


def _accuracy(model: str, version: int, c: _Counts) -> FieldAccuracy:
    g = c.guarantee
    delta = g.delta if g is not None else DEFAULT_DELTA
    n, k = c.session_audited, c.session_wrong
    low, high = bounds.interval(k, n, delta) if n else (None, None)
    return FieldAccuracy(
        model=model,
        version=version,
        audited=c.audited,
        wrong=c.wrong,
        session_audited=n,
        session_wrong=k,
        error=k / n if n else None,
        error_low=low,
        error_high=high,
        epsilon=g.epsilon if g is not None else None,
        delta=g.delta if g is not None else None,
        violated=(low is not None and low > g.epsilon) if g is not None else None,
    )
