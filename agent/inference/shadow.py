"""Shadow mode: a candidate model runs beside the serving one on a sampled share of requests,
never answers, and is scored against the serving model and against cloud labels.

The updater installs a verified, validated candidate (``install``) and drops it (``clear``);
the learning loop's observation thread hands over every classifier answer (``observe``) and
the audit its cloud-labelled ones (``labelled``). Running the candidate is left to a thread
of its own behind a bounded queue (``max_pending``; when full, the observation is counted
``dropped``): an image candidate costs milliseconds, which the observation thread's other
consumers (capture, audit) must not wait for. The request's thread never runs it.

What is counted, per telemetry interval (``section``): on each run, whether the candidate's
top-1 is the serving model's (``obs.edge_index``); on runs with a cloud label (the request
escalated, or the audit asked the cloud), whether the candidate and the serving model each
matched it; and whether the candidate's confidence (its own manifest's metric, temperature
and threshold, scored as ``agent.inference.core`` scores the serving model) is below its
threshold: the escalations it would have caused. Audited answers are run whatever the
sample rate (labels are what the rollout's gate needs). An audited request can thus be run
twice, once sampled without a label and once audited with it: ``samples`` may count it
twice, the labelled counts the gate uses count it once (an audit picks confident answers,
which had no label when first seen). A candidate dropped or replaced within an interval
takes that interval's counts with it: by then the gate has decided, or a newer candidate is
what it measures.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from agent.inference.confidence import score
from agent.inference.model import LoadedModel
from agent.inference.observe import BoundedWorker, Observation
from agent.settings import ShadowSettings
from shared.telemetry import ShadowStats

log = logging.getLogger(__name__)


@dataclass
class _Counts:
    """``ShadowStats``' counts for one interval (field names are the message's)."""

    samples: int = 0
    agree_serving: int = 0
    labelled: int = 0
    agree_cloud: int = 0
    serving_agree_cloud: int = 0
    shadow_only_right: int = 0
    serving_only_right: int = 0
    would_escalate: int = 0
    dropped: int = 0


class _Candidate:
    """One installed candidate: its model, its own routing knobs, its counts. ``lock`` is
    held while the candidate runs and while it is closed, so a model is never closed
    under a run."""

    def __init__(self, model: LoadedModel) -> None:
        m = model.manifest
        self.model = model
        self.name = m.model
        self.version = m.version
        self.kind: Any = "logits" if m.outputs[0].activation == "logits" else "probabilities"
        self.temperature = m.routing.temperature
        self.metric = m.routing.metric
        self.threshold = m.routing.threshold
        self.counts = _Counts()
        self.lock = threading.Lock()
        self.closed = False
        self.failed = False  # a run raised (logged once per candidate)

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self.model.close()

    def predict(self, obs: Observation) -> tuple[int, float] | None:
        """The candidate's top-1 and confidence on the observed input, or None when it
        cannot take that input (caller holds ``lock``)."""
        model = self.model
        if obs.features is not None and model.flat:
            raw = np.asarray(obs.features, dtype=np.float32).reshape(1, -1)
            if raw.shape[1] != model.features:
                return None
            out, scale, zero = model.backend.infer_one(raw)
            _, conf, index = score(out, self.kind, self.temperature, self.metric, scale, zero)
            return index, conf
        value: Any = obs.encoded if obs.encoded is not None else obs.features
        if value is None or model.preprocessor is None or model.decoder is None:
            return None
        prepared = model.preprocessor.prepare(value)
        outputs = model.backend.run(prepared.tensors)
        prediction: Any = model.decoder.decode(outputs, prepared.placement)
        return int(prediction.index), model.decoder.confidence(prediction)


class ShadowRunner:
    """The shadow candidate (at most one) and its worker. Thread-safe: ``install`` and
    ``clear`` (the updater's thread) may come while observations are queued or running."""

    def __init__(self, settings: ShadowSettings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self._rng = rng or random.Random()
        self._lock = threading.Lock()  # the current candidate and its counts
        self._current: _Candidate | None = None
        self._queue: BoundedWorker[tuple[_Candidate, Observation]] = BoundedWorker(
            lambda item: self._run_one(*item), settings.max_pending, "tandem-shadow"
        )
        #: Called (on the installing thread) after each install and clear: the service
        #: hands the agent's answers over only while there is a shadow to give them to.
        self.listeners: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ candidate

    @property
    def model(self) -> LoadedModel | None:
        """The installed candidate, if any."""
        current = self._current
        return current.model if current is not None else None

    def install(self, model: LoadedModel) -> None:
        """Run ``model`` as the shadow from now on, replacing (and closing) any other."""
        candidate = _Candidate(model)
        with self._lock:
            old, self._current = self._current, candidate
        if old is not None:
            old.close()
        log.info("shadow %s installed", model.manifest.ref)
        self._changed()

    def clear(self) -> None:
        """Drop the shadow (and close its model); queued runs of it are skipped."""
        with self._lock:
            old, self._current = self._current, None
        self._queue.clear()
        if old is not None:
            old.close()
            log.info("shadow %s:%d cleared", old.name, old.version)
            self._changed()

    def _changed(self) -> None:
        for listener in self.listeners:
            try:
                listener()
            except Exception:
                log.exception("a shadow listener failed")

    # --------------------------------------------------------------- observations

    def observe(self, obs: Observation) -> None:
        """One classifier answer: run the candidate on it with probability ``sample_rate``
        (queued; returns at once)."""
        current = self._current
        if current is None or not self._applies(current, obs):
            return
        rate = self.settings.sample_rate
        if rate < 1.0 and self._rng.random() >= rate:
            return
        self._offer(current, obs)

    def labelled(self, obs: Observation) -> None:
        """An audited answer with the cloud's label (``obs.cloud_index``): always run."""
        current = self._current
        if current is not None and obs.cloud_index is not None and self._applies(current, obs):
            self._offer(current, obs)

    @staticmethod
    def _applies(candidate: _Candidate, obs: Observation) -> bool:
        # a serving model at or past the candidate's version makes it moot (the updater
        # drops it; until then it is not run)
        return obs.model == candidate.name and obs.version < candidate.version

    def _offer(self, candidate: _Candidate, obs: Observation) -> None:
        if not self._queue.put((candidate, obs)):
            with self._lock:
                candidate.counts.dropped += 1

    # --------------------------------------------------------------------- worker

    def start(self) -> None:
        self._queue.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the worker and close the candidate."""
        self._queue.stop(timeout_s)
        self.clear()

    def drain(self) -> None:
        """Run every queued observation now, on this thread (tests)."""
        self._queue.drain()

    def _run_one(self, candidate: _Candidate, obs: Observation) -> None:
        with candidate.lock:
            if candidate.closed:
                return
            try:
                answer = candidate.predict(obs)
            except Exception:
                if not candidate.failed:
                    candidate.failed = True
                    log.exception("shadow %s failed on an input (logged once)", candidate.name)
                return
        if answer is None:
            return
        index, conf = answer
        with self._lock:
            _count(candidate.counts, obs, index, conf < candidate.threshold)

    # ------------------------------------------------------------------ telemetry

    def section(self) -> dict[str, ShadowStats]:
        """This interval's ``shadow`` telemetry section (and a new interval), or ``{}``
        without a shadow. A shadow that ran on nothing still reports: it is installed."""
        with self._lock:
            current = self._current
            if current is None:
                return {}
            counts, current.counts = current.counts, _Counts()
        return {
            "shadow": ShadowStats(model=current.name, version=current.version, **asdict(counts))
        }


def _count(c: _Counts, obs: Observation, index: int, unsure: bool) -> None:
    c.samples += 1
    c.agree_serving += index == obs.edge_index
    c.would_escalate += unsure
    label = obs.cloud_index
    if label is None:
        return
    shadow_right, serving_right = index == label, obs.edge_index == label
    c.labelled += 1
    c.agree_cloud += shadow_right
    c.serving_agree_cloud += serving_right
    c.shadow_only_right += shadow_right and not serving_right
    c.serving_only_right += serving_right and not shadow_right
