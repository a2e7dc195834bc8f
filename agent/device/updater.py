"""Model updates: from a signed manifest on MQTT to a new model serving, or a clean refusal.

Manifests arrive (retained) at fleet, group and device scope; the most specific one present
wins. A worker thread, never paho's network thread, takes them through the job states:

0. whatever arrives ends in a job state or a counted, logged rejection (``malformed``):
   payloads above ``max_manifest_bytes`` are refused unread, unparsable ones counted, and
   the thread survives any exception (caught per message and per round). Manifests are
   told apart by the digest of their whole content, so a tampered copy that kept the
   genuine one's version and signature is refused without blocking the genuine one.
1. verify, in this order: signature against the pinned trust store; ``created`` and
   ``expires`` carry a time zone; expiry; version strictly above the highest ever accepted
   (persisted: a restart does not reopen the door to a replay); compatibility
   (``min_agent_version`` by PEP 440, input contract, artifact format).
   Any failure: ``REJECTED`` with the reason, nothing downloaded.
2. ``DOWNLOADING``: streamed into staging, resumable, size-capped, digest-checked.
3. ``VERIFYING``: the slot is loaded in a fresh interpreter; contract and golden samples.
4. ``ACTIVATING``: the store's pointer moves (one atomic rename), the agent swaps models
   between two requests; in-flight requests finish on the old interpreter.
5. health watch: error rate, share of unsure answers, golden drift at the end. Passing:
   ``ACTIVE``; failing: pointer and agent go back to the previous model, ``ROLLED_BACK``.

Shadow candidates (``offer_shadow``: the retained shadow topics, the same signed manifests)
go through the same verification, download and validation steps (the same functions), but
never write the serving pointer, the job record or the anti-rollback record: a verified,
validated candidate lands in the store's shadow folder and is handed to the
``ShadowRunner``, which runs it beside the serving model. Its checks differ in one place:
its version must be above the *serving* version and not below the accepted floor (it need
not pass the floor itself: the rollout that later activates it must, and a shadow that
raised it would make that activation a replay). It is dropped when its topic is cleared,
when another candidate replaces it, and when the serving model reaches its version; a
refused or failed one is logged and leaves serving untouched. Shadow states are logged and
kept in ``last_shadow``, never published: the update topic is the controller's record of
activations. An update to a version whose candidate is in the shadow folder adopts its
files instead of downloading them again.

The job is recorded in the store once, when it is queued, and cleared when it ends; a
``kill -9`` at any point resumes it at the next start (with the partial download) instead of
starting over or being refused. Where it had got to is read from the store, not from the
record: a slot exists whole or not at all, the pointer has moved or not. The store's
docstring says what a power cut may take and why that is harmless.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urljoin

import httpx

from agent.device.download import Downloader
from agent.device.store import ModelStore
from agent.errors import DigestError, DownloadError, ModelLoadError, UpdateRejectedError
from agent.inference.backends import BACKENDS, BaseBackendSettings
from agent.inference.core import Agent
from agent.inference.model import LoadedModel, check_golden, load_model
from agent.settings import AgentTestingSettings, UpdateSettings
from agent.version import __version__, older_than
from shared.errors import ContractError, TandemError
from shared.manifest import Manifest
from shared.signing import SignatureError, TrustStore, manifest_digest
from shared.topics import SCOPE_RANK, Scope
from shared.update import UpdateReport, UpdateState

if TYPE_CHECKING:
    from agent.inference.shadow import ShadowRunner

log = logging.getLogger(__name__)


#: Digests of refused unsigned/forged manifests remembered (so a retained one is reported
#: once, not at every message); bounded, since anyone who can publish can make new ones.
REFUSED_MEMORY = 256


def _aware(value: datetime | None) -> bool:
    return value is None or value.utcoffset() is not None


class _StepFailedError(Exception):
    """A download or validation step failed; ``reason`` is the job's FAILED reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: One inbox item: (a shadow candidate?, scope, model, payload).
_Item = tuple[bool, Scope, str, bytes]


class Updater:
    def __init__(
        self,
        agent: Agent,
        store: ModelStore,
        trust: TrustStore | None,
        settings: UpdateSettings,
        *,
        device: str,
        backend: BaseBackendSettings,
        report: Callable[[UpdateReport], None],
        http: httpx.Client,
        registry_url: str | None,
        hold: AgentTestingSettings | None = None,
    ) -> None:
        self.agent = agent
        self.store = store
        self.trust = trust
        self.settings = settings
        self.device = device
        self.backend = backend
        self._hold = hold
        self._report = report
        self.downloader = Downloader(http, settings.download)
        self.registry_url = settings.registry_url or registry_url
        self._inbox: queue.Queue[_Item | None] = queue.Queue()
        self._manifests: dict[str, dict[Scope, Manifest]] = {}
        self._shadows: dict[str, dict[Scope, Manifest]] = {}
        #: Where shadow candidates run (None: shadow manifests are ignored). The service
        #: sets it.
        self.shadow: ShadowRunner | None = None
        self._shadow_manifest: Manifest | None = None
        # shadow manifests refused or failed, by digest (not retried until they change)
        self._shadow_refused: OrderedDict[str, None] = OrderedDict()
        #: The last shadow job state (logged, never published).
        self.last_shadow: UpdateReport | None = None
        # Manifests already dealt with, by digest of their whole content: the signed ones
        # (installed or refused on their merits), and a bounded memory of forged ones. A
        # forged copy must never stand in for the genuine manifest it was copied from.
        self._done: set[str] = set()
        self._refused: OrderedDict[str, None] = OrderedDict()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.malformed = 0
        self.last_report: UpdateReport | None = None

    # ------------------------------------------------------------------ the outside

    def offer(self, scope: Scope, model: str, payload: bytes) -> None:
        """A manifest message arrived (any thread; returns at once). Empty = cleared."""
        self._inbox.put((False, scope, model, payload))

    def offer_shadow(self, scope: Scope, model: str, payload: bytes) -> None:
        """A shadow-topic message arrived (any thread; returns at once). Empty = cleared."""
        self._inbox.put((True, scope, model, payload))

    def start(self) -> None:
        """Start the worker (and the shadow's, whose candidates this installs)."""
        if self.shadow is not None:
            self.shadow.start()
        self._thread = threading.Thread(target=self._run, name="tandem-updater", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.shadow is not None:
            self.shadow.stop()  # and its candidate closed

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
        if self._hold is not None and state == self._hold.hold_update_state:
            self._stop.wait(self._hold.hold_s)

    # ------------------------------------------------------------------- the worker

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (it must, whatever arrives)."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._resume_job()
        except Exception:
            log.exception("resuming the interrupted update failed")
        while not self._stop.is_set():
            try:
                if not self._round():
                    return
            except Exception:  # a bug must cost one round, never every future update
                log.exception("update handling failed")

    def _round(self) -> bool:
        """Take one message and its retained siblings, then act on the best. False: stop."""
        item = self._inbox.get()
        if item is None:
            return False
        self._take_safely(item)
        deadline = time.monotonic() + self.settings.settle_s
        while (left := deadline - time.monotonic()) > 0:  # let retained siblings arrive
            try:
                more = self._inbox.get(timeout=left)
            except queue.Empty:
                break
            if more is None:
                return False
            self._take_safely(more)
        self._consider()
        try:
            self._consider_shadow()  # after the update: an activation may have made it moot
        except Exception:
            log.exception("shadow handling failed")
        return True

    def _take_safely(self, item: _Item) -> None:
        try:
            self._take(item)
        except Exception as exc:  # whatever a payload does, it is counted, never fatal
            self._malformed(item[0], item[1], item[2], f"{type(exc).__name__}: {exc}")
            log.debug("payload handling raised", exc_info=True)

    def _malformed(self, shadow: bool, scope: Scope, model: str, why: str) -> None:
        """Count and log a payload that is no manifest. It also clears its scope: the
        latest word on that topic is unreadable, as it will be after a restart."""
        self.malformed += 1
        (self._shadows if shadow else self._manifests).get(model, {}).pop(scope, None)
        kind = "shadow manifest" if shadow else "manifest"
        log.warning("malformed %s on %s scope for %s: %s", kind, scope, model, why)

    def _take(self, item: _Item) -> None:
        shadow, scope, model, payload = item
        scopes = (self._shadows if shadow else self._manifests).setdefault(model, {})
        if not payload:
            scopes.pop(scope, None)
            return
        if len(payload) > self.settings.max_manifest_bytes:  # refused unread
            limit = self.settings.max_manifest_bytes
            self._malformed(shadow, scope, model, f"{len(payload)} bytes, more than {limit}")
            return
        try:
            manifest = Manifest.from_json(payload)
        except TandemError as exc:
            self._malformed(shadow, scope, model, exc.message[:500])
            return
        if manifest.model != model:
            self._malformed(shadow, scope, model, f"a manifest for {manifest.model}")
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
        if manifest.model != served.model:
            return None
        if manifest.version == served.version and manifest.edge.sha256 == served.edge.sha256:
            return None
        digest = manifest_digest(manifest)
        if digest in self._refused or (digest in self._done and not resuming):
            return None
        job = self.store.job(manifest.model)
        resuming = resuming or (job is not None and manifest_digest(job.manifest) == digest)
        try:
            self._verify(manifest, resuming)
        except UpdateRejectedError as exc:
            self._remember(digest, verified=exc.verified)
            self._emit(manifest, UpdateState.REJECTED, exc.reason)
            return UpdateState.REJECTED
        self._done.add(digest)
        # the job record is the acceptance while the job runs (``highest_accepted`` counts
        # it); ``_finish`` moves it into the anti-rollback record
        self.store.save_job(manifest, UpdateState.QUEUED.value)
        self._emit(manifest, UpdateState.QUEUED)
        try:
            state, reason = self._install(manifest)
        except Exception as exc:  # a job always ends in a state, even on a bug
            log.exception("installing %s failed", manifest.ref)
            state, reason = UpdateState.FAILED, f"unexpected {type(exc).__name__}: {exc}"
        self._finish(manifest, state, reason)
        return state

    def _remember(self, digest: str, *, verified: bool) -> None:
        if verified:
            self._done.add(digest)
            return
        self._refused[digest] = None
        while len(self._refused) > REFUSED_MEMORY:
            self._refused.popitem(last=False)

    def _finish(self, manifest: Manifest, state: UpdateState, reason: str) -> None:
        """Report the terminal state, then forget the job (a crash in between repeats the
        report at the next start, never loses it). Its acceptance outlives it, recorded
        first."""
        self._emit(manifest, state, reason)
        self.store.confirm(manifest.model)  # the watch, if it came to one, is over
        self.store.accept(manifest.model, manifest.version)
        self.store.clear_job(manifest.model)
        if state == UpdateState.ACTIVE:
            self.store.prune(manifest.model)

    def _verify(self, manifest: Manifest, resuming: bool, *, shadow: bool = False) -> None:
        """Raise ``UpdateRejectedError`` with the reason unless this device may install it
        (``shadow``: as a shadow candidate)."""
        if self.trust is None:
            raise UpdateRejectedError(
                "no trust store configured: updates are disabled", verified=False
            )
        try:
            self.trust.verify(manifest)
        except SignatureError as exc:
            raise UpdateRejectedError(f"signature: {exc.message}", verified=False) from None
        try:
            self._check(manifest, resuming, shadow)
        except UpdateRejectedError:
            raise
        except Exception as exc:  # a check that cannot be made is a refusal, with its reason
            log.exception("checking %s failed", manifest.ref)
            raise UpdateRejectedError(f"cannot check: {type(exc).__name__}: {exc}") from None

    def _check(self, manifest: Manifest, resuming: bool, shadow: bool = False) -> None:
        """The checks after the signature: time, anti-rollback, compatibility."""
        for name, value in (("created", manifest.created), ("expires", manifest.expires)):
            if not _aware(value):  # comparing it with the clock would be a guess
                raise UpdateRejectedError(f"{name} {value} has no time zone")
        if manifest.expires is not None and manifest.expires <= datetime.now(timezone.utc):
            raise UpdateRejectedError(f"expired at {manifest.expires.isoformat()}")
        highest = self.store.highest_accepted(manifest.model)
        if shadow:
            serving = self.agent.model.manifest.version
            if manifest.version <= serving:
                raise UpdateRejectedError(
                    f"version {manifest.version} is not newer than the serving {serving}"
                )
            if manifest.version < highest:
                raise UpdateRejectedError(
                    f"version {manifest.version} is below the accepted {highest}: old"
                )
        elif not resuming and manifest.version <= highest:
            raise UpdateRejectedError(
                f"version {manifest.version} is not newer than {highest}: replayed or old"
            )
        try:
            too_old = older_than(manifest.min_agent_version)
        except ValueError as exc:
            raise UpdateRejectedError(str(exc)) from None
        if too_old:
            raise UpdateRejectedError(
                f"needs agent {manifest.min_agent_version}, this is {__version__}"
            )
        problem = contract_change(self.agent.model.manifest, manifest)
        if problem is not None:
            raise UpdateRejectedError(f"input contract changed: {problem}")
        if manifest.edge.format != BACKENDS[self.backend.kind].edge_format:
            raise UpdateRejectedError(
                f"{manifest.edge.format} artifact, this device runs {self.backend.kind}"
            )

    def _install(self, manifest: Manifest) -> tuple[UpdateState, str]:
        """DOWNLOADING .. health watch. Returns the terminal state and its reason."""
        model_name = manifest.model
        slot = self.store.slot_path(model_name, self.store.slot_name(manifest))
        if not slot.is_dir():
            adopted = self.store.adopt_shadow(manifest)
            if adopted is not None:
                log.info("%s: the shadow candidate's files become its slot", manifest.ref)
                slot = adopted
            else:
                self._emit(manifest, UpdateState.DOWNLOADING)
                try:
                    slot = self.store.install(manifest, *self._fetch(manifest))
                except _StepFailedError as exc:
                    return UpdateState.FAILED, exc.reason
        self._emit(manifest, UpdateState.VERIFYING)
        try:
            new = self._validate(slot)
        except _StepFailedError as exc:
            return UpdateState.FAILED, exc.reason
        self._emit(manifest, UpdateState.ACTIVATING)
        self.store.activate(model_name, slot, watching=True)
        old = self.agent.activate(new)
        return self._watch(manifest, new, old)

    def _fetch(self, manifest: Manifest) -> tuple[Path, dict[str, Path]]:
        """Download the artifact and bundle files into staging (resumable, size-capped,
        digest-checked): the staged artifact and bundle files, for ``store.install``.
        Raises ``_StepFailedError``."""
        artifact_url = self._artifact_url(manifest)
        try:
            staged = self.downloader.fetch(
                artifact_url,
                self.store.staging_file(manifest),
                manifest.edge.size,
                manifest.edge.sha256,
            )
            bundle = {
                f.name: self.downloader.fetch(
                    urljoin(artifact_url, f.name),
                    self.store.staging_file(manifest, f.name),
                    f.size,
                    f.sha256,
                )
                for f in manifest.files
            }
        except DigestError as exc:
            raise _StepFailedError(f"digest: {exc.message}") from None
        except (DownloadError, httpx.HTTPError) as exc:
            raise _StepFailedError(f"download: {exc}") from None
        return staged, bundle

    def _validate(self, folder: Path) -> LoadedModel:
        """Load an installed folder in a fresh interpreter: I/O contract and golden
        samples. A folder that fails is deleted. Raises ``_StepFailedError``."""
        try:
            return load_model(folder, self.backend, self.agent.max_pixels)
        except (ModelLoadError, ContractError) as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise _StepFailedError(f"validation: {exc.message}") from None

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
            old = load_model(previous, self.backend, self.agent.max_pixels)
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
        except (ModelLoadError, ContractError) as exc:
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

    # ---------------------------------------------------------------- the shadow

    def _consider_shadow(self) -> None:
        """Make the shadow follow the most specific shadow manifest of the served model:
        drop it when moot or gone, replace it when another arrives."""
        if self.shadow is None:
            return
        served = self.agent.model.manifest
        installed = self._shadow_manifest
        if installed is not None and installed.version <= served.version:
            self._drop_shadow(f"serving {served.ref} reached it")
        scopes = self._shadows.get(served.model)
        best = scopes[max(scopes, key=lambda s: SCOPE_RANK[s])] if scopes else None
        installed = self._shadow_manifest
        if best is None:
            if installed is not None:
                self._drop_shadow("its shadow topic was cleared")
            return
        digest = manifest_digest(best)
        if installed is not None and manifest_digest(installed) == digest:
            return
        if digest in self._shadow_refused:
            return
        if installed is not None:
            self._drop_shadow(f"replaced by {best.ref}")
        self.process_shadow(best)

    def process_shadow(self, manifest: Manifest) -> UpdateState:
        """Verify, download and validate a shadow candidate, then hand it to the
        ``ShadowRunner``. Returns ``ACTIVE`` (it runs as the shadow), ``REJECTED`` or
        ``FAILED``; serving is untouched in every case."""
        assert self.shadow is not None
        digest = manifest_digest(manifest)
        try:
            self._verify(manifest, False, shadow=True)
        except UpdateRejectedError as exc:
            return self._shadow_refuse(digest, manifest, UpdateState.REJECTED, exc.reason)
        self._shadow_state(manifest, UpdateState.QUEUED)
        held = self.store.shadow_of(manifest)  # installed before a restart
        self.store.clear_shadow(manifest.model, keep=held.name if held else None)
        try:
            folder = held
            if folder is None:
                self._shadow_state(manifest, UpdateState.DOWNLOADING)
                folder = self.store.install(manifest, *self._fetch(manifest), shadow=True)
            self._shadow_state(manifest, UpdateState.VERIFYING)
            model = self._validate(folder)
        except _StepFailedError as exc:
            self.store.clear_shadow(manifest.model)
            return self._shadow_refuse(digest, manifest, UpdateState.FAILED, exc.reason)
        except Exception as exc:  # a job always ends in a state, even on a bug
            log.exception("installing the shadow %s failed", manifest.ref)
            self.store.clear_shadow(manifest.model)
            reason = f"unexpected {type(exc).__name__}: {exc}"
            return self._shadow_refuse(digest, manifest, UpdateState.FAILED, reason)
        self.shadow.install(model)
        self._shadow_manifest = manifest
        self._shadow_state(manifest, UpdateState.ACTIVE, "running as the shadow")
        return UpdateState.ACTIVE

    def _shadow_refuse(
        self, digest: str, manifest: Manifest, state: UpdateState, reason: str
    ) -> UpdateState:
        self._shadow_refused[digest] = None
        while len(self._shadow_refused) > REFUSED_MEMORY:
            self._shadow_refused.popitem(last=False)
        self._shadow_state(manifest, state, reason)
        return state

    def _shadow_state(self, manifest: Manifest, state: UpdateState, reason: str = "") -> None:
        """Log a shadow job state and keep it in ``last_shadow`` (never published)."""
        level = logging.WARNING if state in (UpdateState.REJECTED, UpdateState.FAILED) else 0
        log.log(
            level or logging.INFO,
            "%s shadow %s: %s %s",
            self.device,
            manifest.ref,
            state.value,
            reason,
        )
        self.last_shadow = UpdateReport(
            device=self.device,
            model=manifest.model,
            version=manifest.version,
            state=state,
            reason=reason,
            active_version=self.agent.model.manifest.version,
            ts=datetime.now(timezone.utc),
        )

    def _drop_shadow(self, why: str) -> None:
        assert self.shadow is not None
        manifest, self._shadow_manifest = self._shadow_manifest, None
        if manifest is not None:  # its files first: the candidate runs from memory
            self.store.clear_shadow(manifest.model)
        self.shadow.clear()
        if manifest is not None:
            log.info("%s shadow %s dropped: %s", self.device, manifest.ref, why)

    # ------------------------------------------------------------------ restarts

    def _resume_job(self) -> None:
        """At start: finish the job a crash interrupted."""
        served = self.agent.model.manifest
        job = self.store.job(served.model)
        if job is None:
            pointer = self.store.pointer(served.model)
            if pointer and pointer.watching and pointer.current == self.store.slot_name(served):
                # a power cut took the job record during the health watch: the commit says
                # a watch was on, and the served slot's manifest is the job's
                log.info("resuming the health watch of %s", served.ref)
                self._resume_watch(served)
            return
        manifest = job.manifest
        log.info("resuming %s, interrupted after %s", manifest.ref, job.state)
        if served.version == manifest.version and served.edge.sha256 == manifest.edge.sha256:
            self._resume_watch(manifest)  # the pointer had moved: the crash came in the watch
            return
        self.process(manifest, resuming=True)

    def _resume_watch(self, manifest: Manifest) -> None:
        self._done.add(manifest_digest(manifest))
        state, reason = self._watch(manifest, self.agent.model, None)
        self._finish(manifest, state, reason)


def contract_change(served: Manifest, new: Manifest) -> str | None:
    """What a release changes in the contract callers of the served model rely on (its
    task, every input's name, kind and full shape, every output's name and role), or None.
    A 224 -> 192 input or a new input name breaks callers that send tensors of the model's
    shape. What the agent itself absorbs may change: datatype, quantization, an image's
    normalisation or colour order (the agent preprocesses per the new manifest)."""
    if new.task != served.task:
        return f"task {served.task} -> {new.task}"
    if served.is_v1 or new.is_v1:  # v1 promised only the number of features
        have, want = served.inputs[0].shape[-1], new.inputs[0].shape[-1]
        if len(served.inputs) != len(new.inputs) or have != want:
            return f"{want} features, callers send {have}"
        return None
    old = {t.name: t for t in served.inputs}
    now = {t.name: t for t in new.inputs}
    if old.keys() != now.keys():
        return f"inputs {sorted(old)} -> {sorted(now)}"
    for name, a in old.items():
        b = now[name]
        if a.shape != b.shape or a.kind != b.kind:
            return f"input {name!r} {a.kind}{a.shape} -> {b.kind}{b.shape}"
    outputs_old = {(o.name, o.role) for o in served.outputs}
    outputs_new = {(o.name, o.role) for o in new.outputs}
    if outputs_old != outputs_new:
        return f"outputs {sorted(outputs_old)} -> {sorted(outputs_new)}"
    return None
