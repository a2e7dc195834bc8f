"""Model updates: from a signed manifest on MQTT to a new model serving, or a clean refusal.

Manifests arrive (retained) at fleet, group and device scope; the most specific one present
wins. A worker thread, never paho's network thread, takes them through the job states:

1. verify, in this order: signature against the pinned trust store; expiry; version
   strictly above the highest ever accepted (persisted: a restart does not reopen the door
   to a replay); compatibility (``min_agent_version``, input contract, artifact format).
   Any failure: ``REJECTED`` with the reason, nothing downloaded.
2. ``DOWNLOADING``: streamed into staging, resumable, size-capped, digest-checked.
3. ``VERIFYING``: the slot is loaded in a fresh interpreter; contract and golden samples.
4. ``ACTIVATING``: the store's pointer moves (one atomic rename), the agent swaps models
   between two requests; in-flight requests finish on the old interpreter.
5. health watch: error rate, share of unsure answers, golden drift at the end. Passing:
   ``ACTIVE``; failing: pointer and agent go back to the previous model, ``ROLLED_BACK``.

The job is recorded in the store at every step, so a ``kill -9`` at any point resumes at
the next start (with the partial download) instead of starting over or being refused.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from urllib.parse import urljoin

import httpx

from agent.backends import FORMATS, OnnxSettings, TFLiteSettings
from agent.core import Agent
from agent.download import DigestError, Downloader, DownloadError
from agent.errors import ModelLoadError
from agent.model import LoadedModel, check_golden, load_model
from agent.settings import UpdateSettings
from agent.store import ModelStore
from agent.version import __version__
from shared.errors import ContractError, TandemError
from shared.manifest import Manifest
from shared.signing import SignatureError, TrustStore
from shared.topics import SCOPE_RANK, Scope
from shared.update import UpdateReport, UpdateState

log = logging.getLogger(__name__)


class _RejectedError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


class Updater:
    def __init__(
        self,
        agent: Agent,
        store: ModelStore,
        trust: TrustStore | None,
        settings: UpdateSettings,
        *,
        device: str,
        backend: TFLiteSettings | OnnxSettings,
        report: Callable[[UpdateReport], None],
        http: httpx.Client,
        registry_url: str | None,
    ) -> None:
        self.agent = agent
        self.store = store
        self.trust = trust
        self.settings = settings
        self.device = device
        self.backend = backend
        self._report = report
        self.downloader = Downloader(http, settings.download)
        self.registry_url = settings.registry_url or registry_url
        self._inbox: queue.Queue[tuple[Scope, str, bytes] | None] = queue.Queue()
        self._manifests: dict[str, dict[Scope, Manifest]] = {}
        self._done: set[tuple[int, str | None]] = set()  # manifests already dealt with
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.malformed = 0
        self.last_report: UpdateReport | None = None

    # ------------------------------------------------------------------ the outside

    def offer(self, scope: Scope, model: str, payload: bytes) -> None:
        """A manifest message arrived (any thread; returns at once). Empty = cleared."""
        self._inbox.put((scope, model, payload))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tandem-updater", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _emit(self, manifest: Manifest, state: UpdateState, reason: str = "") -> None:
        log.info("%s %s: %s %s", self.device, manifest.ref, state.value, reason)
        report = UpdateReport(
            device=self.device,
            model=manifest.model,
            version=manifest.version,
            state=state,
            reason=reason,
            active_version=self.agent.model.manifest.version,
            ts=datetime.now(timezone.utc),
        )
        self.last_report = report
        self._report(report)
        if state == self.settings.test_hold_state and self.settings.test_hold_s:
            self._stop.wait(self.settings.test_hold_s)

    # ------------------------------------------------------------------- the worker

    def _run(self) -> None:
        try:
            self._resume_job()
        except Exception:
            log.exception("resuming the interrupted update failed")
        while not self._stop.is_set():
            item = self._inbox.get()
            if item is None:
                return
            self._take(item)
            deadline = time.monotonic() + self.settings.settle_s
            while (left := deadline - time.monotonic()) > 0:  # let retained siblings arrive
                try:
                    more = self._inbox.get(timeout=left)
                except queue.Empty:
                    break
                if more is None:
                    return
                self._take(more)
            try:
                self._consider()
            except Exception:  # one bad manifest must not stop future updates
                log.exception("update handling failed")

    def _take(self, item: tuple[Scope, str, bytes]) -> None:
        scope, model, payload = item
        scopes = self._manifests.setdefault(model, {})
        if not payload:
            scopes.pop(scope, None)
            return
        try:
            manifest = Manifest.from_json(payload)
        except TandemError as exc:
            self.malformed += 1
            log.warning("malformed manifest on %s scope for %s: %s", scope, model, exc.message)
            return
        if manifest.model != model:
            self.malformed += 1
            log.warning("manifest for %s published under model %s: ignored", manifest.model, model)
            return
        scopes[scope] = manifest

    def _consider(self) -> None:
        served = self.agent.model.manifest
        scopes = self._manifests.get(served.model)
        if not scopes:
            return
        best = max(scopes, key=lambda s: SCOPE_RANK[s])
        self.process(scopes[best])

    # --------------------------------------------------------------------- one job

    def process(self, manifest: Manifest, resuming: bool = False) -> UpdateState | None:
        """Take one manifest through the job states; returns the final state, or None when
        there was nothing to do (already serving it, already refused it)."""
        served = self.agent.model.manifest
        key = (manifest.version, manifest.signature)
        if manifest.model != served.model:
            return None
        if manifest.version == served.version and manifest.edge.sha256 == served.edge.sha256:
            return None
        if key in self._done and not resuming:
            return None
        job = self.store.job(manifest.model)
        resuming = resuming or (
            job is not None
            and job.manifest.version == manifest.version
            and job.manifest.signature == manifest.signature
        )
        try:
            self._verify(manifest, resuming)
        except _RejectedError as exc:
            self._done.add(key)
            self._emit(manifest, UpdateState.REJECTED, exc.reason)
            return UpdateState.REJECTED
        self._done.add(key)
        if not resuming:
            self.store.accept(manifest.model, manifest.version)
        self.store.save_job(manifest, UpdateState.QUEUED.value)
        self._emit(manifest, UpdateState.QUEUED)
        state, reason = self._install(manifest)
        self._finish(manifest, state, reason)
        return state

    def _finish(self, manifest: Manifest, state: UpdateState, reason: str) -> None:
        """Report the terminal state, then forget the job (a crash in between repeats the
        report at the next start, never loses it)."""
        self._emit(manifest, state, reason)
        self.store.clear_job(manifest.model)
        if state == UpdateState.ACTIVE:
            self.store.prune(manifest.model)

    def _verify(self, manifest: Manifest, resuming: bool) -> None:
        if self.trust is None:
            raise _RejectedError("no trust store configured: updates are disabled")
        try:
            self.trust.verify(manifest)
        except SignatureError as exc:
            raise _RejectedError(f"signature: {exc.message}") from None
        if manifest.expires is not None and manifest.expires <= datetime.now(timezone.utc):
            raise _RejectedError(f"expired at {manifest.expires.isoformat()}")
        highest = self.store.highest_accepted(manifest.model)
        if not resuming and manifest.version <= highest:
            raise _RejectedError(
                f"version {manifest.version} is not newer than {highest}: replayed or old"
            )
        if _version_tuple(manifest.min_agent_version) > _version_tuple(__version__):
            raise _RejectedError(f"needs agent {manifest.min_agent_version}, this is {__version__}")
        served = self.agent.model.manifest
        if manifest.input.shape[-1] != served.input.shape[-1]:
            raise _RejectedError(
                f"input contract changed: {manifest.input.shape[-1]} features, "
                f"callers send {served.input.shape[-1]}"
            )
        if manifest.edge.format != FORMATS[self.backend.kind]:
            raise _RejectedError(
                f"{manifest.edge.format} artifact, this device runs {self.backend.kind}"
            )

    def _install(self, manifest: Manifest) -> tuple[UpdateState, str]:
        """DOWNLOADING .. health watch. Returns the terminal state and its reason."""
        model_name = manifest.model
        slot = self.store.slot_path(model_name, self.store.slot_name(manifest))
        if not slot.is_dir():
            self.store.save_job(manifest, UpdateState.DOWNLOADING.value)
            self._emit(manifest, UpdateState.DOWNLOADING)
            try:
                staged = self.downloader.fetch(
                    self._artifact_url(manifest),
                    self.store.staging_file(manifest),
                    manifest.edge.size,
                    manifest.edge.sha256,
                )
            except DigestError as exc:
                return UpdateState.FAILED, f"digest: {exc.message}"
            except (DownloadError, httpx.HTTPError) as exc:
                return UpdateState.FAILED, f"download: {exc}"
            slot = self.store.install(manifest, staged)
        self.store.save_job(manifest, UpdateState.VERIFYING.value)
        self._emit(manifest, UpdateState.VERIFYING)
        try:
            new = load_model(slot, self.backend)
        except (ModelLoadError, ContractError) as exc:
            shutil.rmtree(slot, ignore_errors=True)
            return UpdateState.FAILED, f"validation: {exc.message}"
        self.store.save_job(manifest, UpdateState.ACTIVATING.value)
        self._emit(manifest, UpdateState.ACTIVATING)
        self.store.activate(model_name, slot)
        old = self.agent.activate(new)
        return self._watch(manifest, new, old)

    def _watch(
        self, manifest: Manifest, new: LoadedModel, old: LoadedModel | None
    ) -> tuple[UpdateState, str]:
        problem = self._health_problem(new)
        if problem is None:
            if old is not None:
                old.close()
            return UpdateState.ACTIVE, ""
        log.warning("%s failed its health watch: %s", manifest.ref, problem)
        previous = self.store.rollback(manifest.model)
        if old is None and previous is not None:
            old = load_model(previous, self.backend)
        if old is not None:
            self.agent.activate(old)
        new.close()
        return UpdateState.ROLLED_BACK, f"health watch: {problem}"

    def _health_problem(self, model: LoadedModel) -> str | None:
        s = self.settings
        deadline = time.monotonic() + s.health_watch_s
        while True:
            h = self.agent.health
            total = h.served + h.errors
            if total >= s.health_min_requests:
                if h.errors / total > s.max_error_rate:
                    return f"error rate {h.errors / total:.0%} > {s.max_error_rate:.0%}"
                if (
                    s.max_unsure_rate is not None
                    and h.served
                    and (h.unsure / h.served > s.max_unsure_rate)
                ):
                    return (
                        f"{h.unsure / h.served:.0%} of answers below the threshold "
                        f"(> {s.max_unsure_rate:.0%})"
                    )
            if time.monotonic() >= deadline or self._stop.is_set():
                break
            self._stop.wait(min(0.1, max(0.0, deadline - time.monotonic())))
        try:
            check_golden(model)
        except ModelLoadError as exc:
            return f"golden drift: {exc.message}"
        return None

    def _artifact_url(self, manifest: Manifest) -> str:
        url = manifest.edge.url or (
            f"/registry/{manifest.model}/{manifest.version}/{manifest.edge.file}"
        )
        if url.startswith(("http://", "https://")):
            return url
        if not self.registry_url:
            raise DownloadError("the manifest's artifact URL is relative and no registry is set")
        return urljoin(self.registry_url.rstrip("/") + "/", url.lstrip("/"))

    # ------------------------------------------------------------------ restarts

    def _resume_job(self) -> None:
        """At start: finish the job a crash interrupted."""
        served = self.agent.model.manifest
        job = self.store.job(served.model)
        if job is None:
            return
        manifest = job.manifest
        log.info("resuming %s, interrupted in %s", manifest.ref, job.state)
        if served.version == manifest.version and served.edge.sha256 == manifest.edge.sha256:
            # the pointer had moved: the crash came during the health watch
            self._done.add((manifest.version, manifest.signature))
            state, reason = self._watch(manifest, self.agent.model, None)
            self._finish(manifest, state, reason)
            return
        self.process(manifest, resuming=True)
