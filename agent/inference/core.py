"""``Agent``: the edge runtime's Python API. One request: preprocess, local invoke, confidence,
routing decision, maybe a cloud call within the remaining deadline, result.

Guarantees a caller can build on:

- the cloud never causes an error: cloud down, slow, misconfigured or breaker-open all give
  the local answer, with the reason;
- a request never outlives its deadline by more than the local inference itself: a cloud
  call's timeout is what remains of the deadline (minus a margin), and in ``cloud`` mode the
  time a local answer takes is held back so the fallback still fits;
- thread-safe: many threads may call ``infer`` at once; a model swap (``activate``) takes
  effect for the next request while in-flight ones finish on the model they started with;
- a batch (``infer_batch``) is one request: one local invoke of all its rows, one deadline,
  and at most one cloud call, carrying the rows that escalate.

A cloud that keeps failing is logged once when the breaker opens (WARNING, with the last
error) and once when it closes again (INFO); a cloud that refuses requests (4xx: a wrong
model name, a bad token) is logged at WARNING when the refusal first comes and whenever its
message changes. Never per request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from agent.errors import BackendError, CloudError, CloudRefusedError
from agent.inference.breaker import CircuitBreaker
from agent.inference.cloud_client import CloudAnswer, CloudClient, CloudTensors
from agent.inference.confidence import score
from agent.inference.latency import LatencyEstimator
from agent.inference.model import LoadedModel, load_model
from agent.inference.observe import Observation, Observer
from agent.inference.result import InferenceResult, Latency, Reason, Source
from agent.inference.routing import ROUTE_MODES, Decision, RouteMode, Router, RoutingPolicy
from agent.inference.stats import RequestStats
from agent.settings import AgentSettings
from shared.contract import OutputSpec
from shared.errors import InvalidRequestError
from shared.manifest import CloudTarget, ConfidenceMetric, Manifest, OutputKind
from shared.oip.types import InferTensor
from shared.placement import Placement

if TYPE_CHECKING:
    from shared.decode import Decoder
    from shared.preprocess import Prepared

_T = TypeVar("_T")
#: Inputs that are never feature rows: an encoded image, named tensors (a set of exact
#: types: the hot path pays a hash lookup, not an ``isinstance`` of four).
_NOT_ROWS = frozenset({bytes, bytearray, memoryview, dict})

log = logging.getLogger(__name__)


class ModelHealth:
    """Counters of one serving model since it was activated: what the updater's health watch
    judges a new model by. Incremented without a lock: a lost increment under a race does
    not change a rate."""

    __slots__ = ("errors", "served", "unsure")

    def __init__(self) -> None:
        self.served = 0
        self.unsure = 0
        self.errors = 0


@dataclass(frozen=True, slots=True)
class _Active:
    """The serving model with its routing knobs resolved (settings override manifest)."""

    model: LoadedModel
    policy: RoutingPolicy
    metric: ConfidenceMetric
    kind: OutputKind
    temperature: float
    cloud: CloudTarget | None
    edge_ref: str
    health: ModelHealth
    #: Every input takes the any-model path (the model is not a flat classifier).
    any_input: bool = False
    #: Decodes a non-flat model's outputs (the model's own decoder, or one rebuilt when
    #: the settings override the manifest's metric or temperature).
    decoder: Decoder | None = None
    #: Decodes the cloud's answer for a non-flat model (its outputs may be named apart).
    cloud_decoder: Decoder | None = None


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        model: LoadedModel | None = None,
        cloud: CloudClient | None = None,
        clock: Callable[[], float] = time.perf_counter,
        cloud_hooks: Mapping[str, list[Callable[..., Any]]] | None = None,
    ) -> None:
        """``cloud_hooks``: httpx event hooks for the cloud client this builds (the
        device's byte counters)."""
        self.settings = settings
        r = settings.routing
        if cloud is None and settings.cloud.url:
            token = settings.cloud.token.get_secret_value() if settings.cloud.token else None
            cloud = CloudClient(
                settings.cloud.url,
                token=token,
                binary=settings.cloud.binary,
                connect_timeout_s=settings.cloud.connect_timeout_s,
                max_connections=settings.cloud.max_connections,
                event_hooks=cloud_hooks,
                tls=settings.cloud.tls,
            )
        self._cloud = cloud
        self.router = Router(
            CircuitBreaker(r.breaker_failures, r.breaker_reset_s, clock),
            LatencyEstimator(r.initial_cloud_estimate_ms, r.latency_window, r.latency_quantile),
            cloud_configured=cloud is not None,
        )
        self._clock = clock
        self._deadline_ms = r.deadline_ms
        self._max_deadline_ms = r.max_deadline_ms
        self._max_rows = r.max_batch_rows
        self._mode: RouteMode = r.mode
        self._last_refusal: str | None = None
        self._swap_lock = threading.Lock()
        self._local_ms = 1.0  # running estimate, held back from cloud-first timeouts
        self._stats = RequestStats()
        #: Called with each classifier answer (``agent.inference.observe``); None: nothing.
        self.observer: Observer | None = None
        #: Decoded pixels an image input may have (``images.max_pixels``).
        self.max_pixels = settings.images.max_pixels
        self._active = self._resolve(
            model
            if model is not None
            else load_model(settings.model_dir, settings.backend, self.max_pixels)
        )

    # ------------------------------------------------------------------------ model

    def _resolve(self, model: LoadedModel) -> _Active:
        r, m = self.settings.routing, model.manifest
        cloud = m.cloud
        if self.settings.cloud.model:
            cloud = (cloud or CloudTarget(model=self.settings.cloud.model)).model_copy(
                update={"model": self.settings.cloud.model}
            )
        if cloud is not None and self.settings.cloud.version:
            cloud = cloud.model_copy(update={"version": self.settings.cloud.version})
        return _Active(
            model=model,
            policy=RoutingPolicy(
                threshold=r.threshold if r.threshold is not None else m.routing.threshold,
                prefer_cloud_above_ms=r.prefer_cloud_above_ms,
                safety_margin_ms=r.safety_margin_ms,
            ),
            metric=r.metric or m.routing.metric,
            kind="logits" if m.outputs[0].activation == "logits" else "probabilities",
            temperature=r.temperature or m.routing.temperature,
            cloud=cloud,
            edge_ref=m.ref,
            health=ModelHealth(),
            any_input=not model.flat,
            decoder=_edge_decoder(model, r.metric, r.temperature),
            cloud_decoder=_cloud_decoder(model, cloud, r.metric),
        )

    @property
    def model(self) -> LoadedModel:
        return self._active.model

    @property
    def threshold(self) -> float:
        return self._active.policy.threshold

    @property
    def cloud_target(self) -> CloudTarget | None:
        """The cloud model the serving model escalates to (settings over the manifest)."""
        return self._active.cloud

    def swap_stats(self) -> RequestStats:
        """Start a new statistics interval; returns the one that just ended."""
        old, self._stats = self._stats, RequestStats()
        return old

    @property
    def health(self) -> ModelHealth:
        """Counters of the serving model since its activation."""
        return self._active.health

    def activate(self, model: LoadedModel) -> LoadedModel:
        """Serve ``model`` from the next request on; returns the model it replaced, which
        the caller closes once in-flight requests are done with it."""
        with self._swap_lock:
            old = self._active.model
            self._active = self._resolve(model)
        log.info("activated %s (was %s)", model.manifest.ref, old.manifest.ref)
        return old

    # -------------------------------------------------------------------- inference

    def infer(
        self,
        features: Any,
        *,
        deadline_ms: float | None = None,
        mode: RouteMode | None = None,
    ) -> InferenceResult:
        """Classify one sample of raw features. Raises ``InvalidRequestError`` for input that
        does not fit the model or a deadline that is not a positive number of at most
        ``routing.max_deadline_ms``, ``BackendError`` only when the local model fails *and*
        the cloud cannot stand in; never for a cloud failure."""
        # This is the hot path: the benchmark holds it to a few microseconds over the raw
        # interpreter, so it avoids keyword calls, attribute chains and temporary objects.
        clock = self._clock
        t0 = clock()
        active = self._active
        model = active.model
        if active.any_input or type(features) in _NOT_ROWS:
            return self._infer_any(active, features, t0, deadline_ms, mode)
        raw = np.asarray(features, dtype=np.float32)
        if raw.size != model.features:
            raise InvalidRequestError(
                f"expected {model.features} features, got {raw.size} (shape {raw.shape})"
            )
        budget = self._deadline_ms if deadline_ms is None else deadline_ms
        if not 0.0 < budget <= self._max_deadline_ms:  # NaN fails both comparisons
            raise InvalidRequestError(_deadline_error(budget, self._max_deadline_ms))
        if mode is None:
            mode = self._mode
        elif mode not in ROUTE_MODES:
            raise InvalidRequestError(_mode_error(mode))
        raw = raw.reshape(1, model.features)
        if mode == "cloud":
            return self._cloud_first(active, raw, t0, budget)

        try:
            out, scale, zero = model.backend.infer_one(raw)
        except BackendError:
            return self._edge_failed(active, raw, t0, budget)[0]
        local_ms = (clock() - t0) * 1000.0
        self._local_ms += 0.05 * (local_ms - self._local_ms)
        scored = score(out, active.kind, active.temperature, active.metric, scale, zero)
        conf = scored[1]
        health = active.health
        health.served += 1
        if conf < active.policy.threshold:
            health.unsure += 1
        decision = self.router.decide(mode, conf, budget - local_ms, active.policy)
        if decision.escalate:
            answer = self._call_cloud(active, raw, budget - (clock() - t0) * 1000.0)
            if isinstance(answer, CloudAnswer):
                result = self._from_cloud(active, answer, decision.reason, t0, local_ms)
                if self.observer is not None:
                    self._observe(active, raw[0], None, scored, result)
                return result
            decision = Decision(False, answer.reason)
        total_ms = (clock() - t0) * 1000.0
        result = self._result(
            active, scored, "edge", decision.reason, None, total_ms, local_ms, None
        )
        if self.observer is not None:
            self._observe(active, raw[0], None, scored, result)
        return result

    def infer_batch(
        self,
        rows: Any,
        *,
        deadline_ms: float | None = None,
        mode: RouteMode | None = None,
    ) -> list[InferenceResult]:
        """Classify ``rows`` (``[n, features]``) as one request: one local invoke of all of
        them, one deadline, and at most one cloud call, carrying the rows that escalate; on
        a cloud failure those rows keep their local answers. Every row reports the batch's
        latency. In ``cloud`` mode the local batch runs first, so that every row has its
        fallback at once whatever the cloud does (a lone row, like ``infer``, asks the
        cloud first). Raises like ``infer``, and ``InvalidRequestError`` for more than
        ``routing.max_batch_rows`` rows."""
        t0 = self._clock()
        active = self._active
        model = active.model
        if not model.flat:
            items = list(rows) if isinstance(rows, (list, tuple, np.ndarray)) else []
            if not 0 < len(items) <= self._max_rows:
                raise InvalidRequestError(
                    f"a batch holds 1 to {self._max_rows} inputs (routing.max_batch_rows), "
                    f"got {len(items)}"
                )
            return [self.infer(item, deadline_ms=deadline_ms, mode=mode) for item in items]
        raw = np.asarray(rows, dtype=np.float32)
        n = len(raw) if raw.ndim else 0
        if raw.ndim < 2 or n == 0 or raw.size != n * model.features:
            raise InvalidRequestError(
                f"expected rows of {model.features} features, got shape {list(raw.shape)}"
            )
        if n > self._max_rows:
            raise InvalidRequestError(
                f"{n} rows in one request; at most {self._max_rows} (routing.max_batch_rows)"
            )
        if n == 1:
            return [self.infer(raw[0], deadline_ms=deadline_ms, mode=mode)]
        budget = self._deadline_ms if deadline_ms is None else deadline_ms
        if not 0.0 < budget <= self._max_deadline_ms:
            raise InvalidRequestError(_deadline_error(budget, self._max_deadline_ms))
        if mode is None:
            mode = self._mode
        elif mode not in ROUTE_MODES:
            raise InvalidRequestError(_mode_error(mode))
        raw = raw.reshape(n, model.features)
        try:
            out = model.backend.infer(raw)
        except BackendError:
            return self._edge_failed(active, raw, t0, budget)
        local_ms = (self._clock() - t0) * 1000.0
        kind, temperature, metric = active.kind, active.temperature, active.metric
        scored = [score(row, kind, temperature, metric) for row in out]
        confidences = [conf for _, conf, _ in scored]
        active.health.served += n
        active.health.unsure += sum(c < active.policy.threshold for c in confidences)
        decisions = self.router.decide_batch(mode, confidences, budget - local_ms, active.policy)
        up = [i for i, d in enumerate(decisions) if d.escalate]
        answer: CloudAnswer | CloudError | None = None
        if up:
            answer = self._call_cloud(active, raw[up], budget - (self._clock() - t0) * 1000.0)
        total_ms = (self._clock() - t0) * 1000.0
        from_cloud: dict[int, InferenceResult] = {}
        if isinstance(answer, CloudAnswer):
            reasons = [decisions[i].reason for i in up]
            answers = self._cloud_results(active, answer, reasons, total_ms, local_ms)
            from_cloud = dict(zip(up, answers))
        failed = answer.reason if isinstance(answer, CloudError) else None
        results = []
        for i, (decision, row) in enumerate(zip(decisions, scored)):
            result = from_cloud.get(i)
            if result is None:
                reason = failed if failed and decision.escalate else decision.reason
                result = self._result(active, row, "edge", reason, None, total_ms, local_ms, None)
            if self.observer is not None:
                self._observe(active, raw[i], None, row, result)
            results.append(result)
        return results

    def _observe(
        self,
        active: _Active,
        features: np.ndarray | None,
        encoded: bytes | None,
        edge: tuple[list[float], float, int],
        result: InferenceResult,
    ) -> None:
        """Hand one classifier answer to ``observer`` (set: the caller checked)."""
        assert self.observer is not None
        probs, conf, index = edge
        cloud = result.source == "cloud"
        m = active.model.manifest
        self.observer(
            Observation(
                features=None if features is None else np.array(features, dtype=np.float32),
                encoded=encoded,
                edge_index=index,
                edge_confidence=conf,
                edge_probs=probs,
                source=result.source,
                reason=result.reason,
                cloud_index=result.index if cloud else None,
                cloud_confidence=result.confidence if cloud else None,
                cloud_probs=result.probs if cloud else None,
                model=m.model,
                version=m.version,
                threshold=active.policy.threshold,
                ts=time.time(),
            )
        )

    def _result(
        self,
        active: _Active,
        scored: tuple[list[float], float, int],
        source: Source,
        reason: str,
        cloud_model: str | None,
        total_ms: float,
        local_ms: float | None,
        cloud_ms: float | None,
    ) -> InferenceResult:
        """The one place an ``InferenceResult`` is made (from ``score``'s probabilities,
        confidence and index), and counted in the interval's statistics."""
        probs, conf, index = scored
        self._stats.add(source, reason, total_ms, local_ms, cloud_ms, conf)
        return InferenceResult(
            active.model.labels[index],
            index,
            probs,
            conf,
            source,
            reason,
            active.edge_ref,
            cloud_model,
            Latency(total_ms, local_ms, cloud_ms),
        )

    def _cloud_results(
        self,
        active: _Active,
        answer: CloudAnswer,
        reasons: list[str],
        total_ms: float,
        local_ms: float | None,
    ) -> list[InferenceResult]:
        """A result for each row of a cloud answer, with that row's reason."""
        assert active.cloud is not None
        kind, metric, model_ref = active.cloud.output_kind, active.metric, answer.model_ref
        cloud_ms = total_ms - (local_ms or 0.0)
        return [
            self._result(
                active,
                score(output, kind, 1.0, metric),
                "cloud",
                reason,
                model_ref,
                total_ms,
                local_ms,
                cloud_ms,
            )
            for output, reason in zip(answer.output, reasons)
        ]

    def _from_cloud(
        self,
        active: _Active,
        answer: CloudAnswer,
        reason: str,
        t0: float,
        local_ms: float | None,
    ) -> InferenceResult:
        total_ms = (self._clock() - t0) * 1000.0
        return self._cloud_results(active, answer, [reason], total_ms, local_ms)[0]

    def _edge_failed(
        self, active: _Active, raw: np.ndarray, t0: float, budget: float
    ) -> list[InferenceResult]:
        """The local model raised on ``raw`` (one row or a batch): the cloud stands in for
        every row if it can, else ``BackendError``."""
        log.warning("local inference failed for %s", active.edge_ref, exc_info=True)
        n = len(raw)
        active.health.errors += n
        self._stats.errors += n
        elapsed = (self._clock() - t0) * 1000.0
        if self.router.decide("cloud", 0.0, budget - elapsed, active.policy).escalate:
            answer = self._call_cloud(active, raw, budget - elapsed)
            if isinstance(answer, CloudAnswer):
                total_ms = (self._clock() - t0) * 1000.0
                reasons = [Reason.EDGE_ERROR] * n
                return self._cloud_results(active, answer, reasons, total_ms, None)
        raise BackendError(f"local model {active.edge_ref} failed and the cloud cannot answer")

    def _call_cloud(
        self, active: _Active, raw: np.ndarray, remaining_ms: float
    ) -> CloudAnswer | CloudError:
        """One cloud call of the flat path (one row or the escalated rows of a batch)."""
        assert self._cloud is not None and active.cloud is not None
        cloud, target, classes = self._cloud, active.cloud, len(active.model.labels)

        def call(timeout_s: float) -> CloudAnswer:
            answer = cloud.infer(active.model.preprocess(raw), target, timeout_s)
            if answer.output.shape[-1] != classes:
                raise CloudError(
                    f"cloud returned {answer.output.shape[-1]} classes, "
                    f"the model has {classes} labels"
                )
            return answer

        return self._guarded_cloud_call(active, call, remaining_ms)

    def _guarded_cloud_call(
        self, active: _Active, call: Callable[[float], _T], remaining_ms: float
    ) -> _T | CloudError:
        """``call(timeout_s)`` with what remains of the deadline (minus the margin), fed
        back to the router and logged as the module says; a failure is returned, never
        raised."""
        assert active.cloud is not None
        timeout_ms = remaining_ms - active.policy.safety_margin_ms
        start = self._clock()
        try:
            answer = call(timeout_ms / 1000.0)
        except CloudRefusedError as exc:
            # the server is up and said no to this request: not an outage, a message
            if self.router.record_cloud(True, None):
                log.info("cloud reachable again: breaker closed")
            if exc.message != self._last_refusal:
                self._last_refusal = exc.message
                log.warning(
                    "cloud refused a request for %s with %d: %s (answering locally)",
                    active.cloud.model,
                    exc.status,
                    exc.detail,
                )
            return exc
        except CloudError as exc:
            elapsed = (self._clock() - start) * 1000.0
            timed_out = exc.reason == Reason.CLOUD_TIMEOUT
            if self.router.record_cloud(False, elapsed if timed_out else None):
                log.warning(
                    "cloud failing: breaker open, answering locally until a probe succeeds "
                    "(every %.1f s); last error: %s",
                    self.router.breaker.reset_timeout_s,
                    exc.message,
                )
            else:
                log.debug("cloud failed after %.1f ms: %s", elapsed, exc.message)
            return exc
        if self.router.record_cloud(True, (self._clock() - start) * 1000.0):
            log.info("cloud answers again: breaker closed")
        return answer

    def _cloud_first(
        self, active: _Active, x: np.ndarray, t0: float, budget: float
    ) -> InferenceResult:
        decision = self.router.decide("cloud", 0.0, budget, active.policy)
        if decision.escalate:
            reserve = 2.0 * self._local_ms + active.policy.safety_margin_ms
            elapsed = (self._clock() - t0) * 1000.0
            answer = self._call_cloud(active, x, budget - elapsed - reserve)
            if isinstance(answer, CloudAnswer):
                return self._from_cloud(active, answer, decision.reason, t0, None)
            decision = Decision(False, answer.reason)
        return self._local_only(active, x, t0, decision.reason)

    def _local_only(
        self, active: _Active, x: np.ndarray, t0: float, reason: str
    ) -> InferenceResult:
        start = self._clock()
        out, scale, zero = active.model.backend.infer_one(x)
        local_ms = (self._clock() - start) * 1000.0
        scored = score(out, active.kind, active.temperature, active.metric, scale, zero)
        total_ms = (self._clock() - t0) * 1000.0
        return self._result(active, scored, "edge", reason, None, total_ms, local_ms, None)

    # ------------------------------------------------------------- any model, any input

    def _infer_any(
        self,
        active: _Active,
        value: Any,
        t0: float,
        deadline_ms: float | None,
        mode: RouteMode | None,
    ) -> InferenceResult:
        """One request on any model: preprocess (``shared.preprocess``), ``backend.run``,
        decode and score (``shared.decode``), route, maybe ask the cloud; the same
        guarantees as the flat path."""
        model = active.model
        decoder = active.decoder
        assert model.preprocessor is not None and decoder is not None
        budget = self._deadline_ms if deadline_ms is None else deadline_ms
        if not 0.0 < budget <= self._max_deadline_ms:  # NaN fails both comparisons
            raise InvalidRequestError(_deadline_error(budget, self._max_deadline_ms))
        if mode is None:
            mode = self._mode
        elif mode not in ROUTE_MODES:
            raise InvalidRequestError(_mode_error(mode))
        prepared = model.preprocessor.prepare(value)
        reason: str = Reason.FORCED_EDGE
        if mode == "cloud":
            decision = self.router.decide("cloud", 0.0, budget, active.policy)
            if decision.escalate:
                reserve = 2.0 * self._local_ms + active.policy.safety_margin_ms
                elapsed = (self._clock() - t0) * 1000.0
                answer = self._ask_cloud(active, prepared, budget - elapsed - reserve)
                if not isinstance(answer, CloudError):
                    return self._any_result(active, answer, decision.reason, t0, None)
                decision = Decision(False, answer.reason)
            reason = decision.reason
        start = self._clock()
        try:
            outputs = model.backend.run(prepared.tensors)
        except BackendError:
            log.warning("local inference failed for %s", active.edge_ref, exc_info=True)
            active.health.errors += 1
            self._stats.errors += 1
            elapsed = (self._clock() - t0) * 1000.0
            if self.router.decide("cloud", 0.0, budget - elapsed, active.policy).escalate:
                answer = self._ask_cloud(active, prepared, budget - elapsed)
                if not isinstance(answer, CloudError):
                    return self._any_result(active, answer, Reason.EDGE_ERROR, t0, None)
            raise BackendError(
                f"local model {active.edge_ref} failed and the cloud cannot answer"
            ) from None
        prediction = decoder.decode(outputs, prepared.placement)
        conf = decoder.confidence(prediction)
        local_ms = (self._clock() - start) * 1000.0
        self._local_ms += 0.05 * (local_ms - self._local_ms)
        local: tuple[Any, float, Source, str | None] = (prediction, conf, "edge", None)
        if mode == "cloud":
            return self._any_result(active, local, reason, t0, local_ms)
        active.health.served += 1
        if conf < active.policy.threshold:
            active.health.unsure += 1
        decision = self.router.decide(
            mode, conf, budget - (self._clock() - t0) * 1000.0, active.policy
        )
        result: InferenceResult | None = None
        if decision.escalate:
            answer = self._ask_cloud(active, prepared, budget - (self._clock() - t0) * 1000.0)
            if not isinstance(answer, CloudError):
                result = self._any_result(active, answer, decision.reason, t0, local_ms)
            else:
                decision = Decision(False, answer.reason)
        if result is None:
            result = self._any_result(active, local, decision.reason, t0, local_ms)
        if self.observer is not None and model.manifest.task == "classification":
            top: Any = prediction  # a Classification: the task says so
            edge = (top.probs, conf, top.index)
            self._observe(active, None, prepared.encoded, edge, result)
        return result

    def _any_result(
        self,
        active: _Active,
        answer: tuple[Any, float, Source, str | None],
        reason: str,
        t0: float,
        local_ms: float | None,
    ) -> InferenceResult:
        """The result of ``_infer_any`` from a decoded ``(prediction, confidence, source,
        cloud model)``, counted in the interval's statistics."""
        prediction, conf, source, cloud_model = answer
        total_ms = (self._clock() - t0) * 1000.0
        cloud_ms = total_ms - (local_ms or 0.0) if source == "cloud" else None
        self._stats.add(source, reason, total_ms, local_ms, cloud_ms, conf)
        label, index, probs = "", -1, []
        if active.model.manifest.task == "classification":
            label, index, probs = prediction.label, prediction.index, prediction.probs
        return InferenceResult(
            label,
            index,
            probs,
            conf,
            source,
            reason,
            active.edge_ref,
            cloud_model,
            Latency(total_ms, local_ms, cloud_ms),
            prediction,
            active.model.manifest.task,
        )

    def _ask_cloud(
        self, active: _Active, prepared: Prepared, remaining_ms: float
    ) -> tuple[Any, float, Source, str | None] | CloudError:
        """The cloud's decoded answer for one prepared input, or the failure (never raised).
        What is sent follows ``cloud.send``: the preprocessed tensor, the caller's uint8
        frame, or the encoded image (falling back to the tensor when the caller gave no
        frame, or no encoded image)."""
        if self._cloud is None or active.cloud is None or active.cloud_decoder is None:
            return CloudError("no cloud configured")
        target, manifest = active.cloud, active.model.manifest
        placement = prepared.placement
        if target.send == "encoded" and prepared.encoded is not None:
            data = np.array([prepared.encoded], dtype=np.object_)
            inputs = [InferTensor(name=target.input, datatype="BYTES", data=data)]
            placement = _frame_placement(prepared, placement)
        elif target.send in ("frame", "encoded") and prepared.frame is not None:
            frame = prepared.frame[None]
            inputs = [InferTensor(name=target.input, datatype="UINT8", data=frame)]
            placement = _frame_placement(prepared, placement)
        elif len(manifest.inputs) == 1:
            x = prepared.real(manifest.inputs[0].name)
            inputs = [InferTensor(name=target.input, datatype="FP32", data=x)]
        else:
            inputs = [
                InferTensor(name=t.name, datatype="FP32", data=prepared.real(t.name))
                for t in manifest.inputs
            ]
        names = [o.name for o in _cloud_outputs(manifest, target)]
        answer = self._guarded_cloud_call(
            active,
            lambda timeout_s: self._cloud_tensors(inputs, names, target, timeout_s),
            remaining_ms,
        )
        if isinstance(answer, CloudError):
            return answer
        try:
            prediction = active.cloud_decoder.decode(answer.outputs, placement)
            conf = active.cloud_decoder.confidence(prediction)
        except Exception as exc:  # a wrong shape from the cloud is the cloud's error
            return CloudError(f"cloud answer does not decode: {exc}")
        return prediction, conf, "cloud", answer.model_ref

    def _cloud_tensors(
        self, inputs: list[InferTensor], names: list[str], target: CloudTarget, timeout_s: float
    ) -> CloudTensors:
        assert self._cloud is not None
        return self._cloud.infer_tensors(inputs, names, target, timeout_s)

    # ---------------------------------------------------------------------- lifecycle

    @property
    def cloud_configured(self) -> bool:
        return self._cloud is not None

    @property
    def cloud_client(self) -> CloudClient | None:
        return self._cloud

    def close(self) -> None:
        if self._cloud is not None:
            self._cloud.close()
        self._active.model.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mode_error(mode: object) -> str:
    return f"mode must be one of {ROUTE_MODES}, got {mode!r}"


def _deadline_error(budget: object, max_ms: float) -> str:
    return (
        f"deadline_ms must be a positive number of at most {max_ms:g} ms "
        f"(routing.max_deadline_ms), got {budget}"
    )


def _frame_placement(prepared: Prepared, fallback: Placement | None) -> Placement | None:
    """Where the cloud's answer sits when it was sent the caller's whole frame: its
    normalised boxes span the frame, so model pixels stretch to the frame (a squash)."""
    if fallback is None:
        return None
    h, w = fallback.frame_h, fallback.frame_w  # reading ``prepared.frame`` would decode it
    return Placement(
        h, w, fallback.model_h, fallback.model_w, w / fallback.model_w, h / fallback.model_h
    )


def _edge_decoder(
    model: LoadedModel, metric: ConfidenceMetric | None, temperature: float | None
) -> Decoder | None:
    """A non-flat model's decoder with the settings' metric and temperature, when they
    override the manifest's (else the model's own)."""
    if model.flat or model.decoder is None or (metric is None and temperature is None):
        return model.decoder
    from shared.decode import build_decoder

    m = model.manifest
    return build_decoder(
        m,
        model.label_maps or {},
        temperature=temperature or m.routing.temperature,
        metric=metric or m.routing.metric,
    )


def _cloud_outputs(manifest: Manifest, cloud: CloudTarget) -> list[OutputSpec]:
    """The outputs asked of the cloud: ``cloud.outputs`` when given; for a model with one
    output, that output under the cloud's name ``cloud.output`` (read per
    ``cloud.output_kind`` when it holds scores: a cloud classifier names its own output);
    else the edge's own outputs."""
    if cloud.outputs:
        return list(cloud.outputs)
    if len(manifest.outputs) == 1 and not manifest.is_v1:
        (edge,) = manifest.outputs
        update: dict[str, object] = {"name": cloud.output, "quantization": None}
        if edge.role == "scores":
            update["activation"] = cloud.output_kind
        return [edge.model_copy(update=update)]
    return list(manifest.outputs)


def _cloud_decoder(
    model: LoadedModel, cloud: CloudTarget | None, metric: ConfidenceMetric | None
) -> Decoder | None:
    """The decoder of a non-flat model's cloud answers: built for the outputs asked of
    the cloud (``_cloud_outputs``), each taking the labels of the edge output with its
    role; temperature 1 (a temperature is fitted to the edge model)."""
    if cloud is None or model.decoder is None or model.flat:
        return None
    from shared.decode import build_decoder

    m = model.manifest
    outputs = _cloud_outputs(m, cloud)
    if outputs == list(m.outputs) and m.routing.temperature == 1.0 and metric is None:
        return model.decoder
    maps = model.label_maps or {}
    by_role = {o.role: maps[o.name] for o in m.outputs if o.name in maps}
    labels = {o.name: by_role[o.role] for o in outputs if o.role in by_role}
    return build_decoder(
        m.model_copy(update={"outputs": outputs}),
        labels,
        temperature=1.0,
        metric=metric or m.routing.metric,
    )
