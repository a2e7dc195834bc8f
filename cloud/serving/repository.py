"""A Triton-layout model repository, live: ``<root>/<model>/<version>/model.onnx``.

Version folders are positive integers; an optional ``<root>/<model>/config.toml`` sets the
model's batching, queue and version policy (``cloud/serving/config.py``). ``scan`` compares
the folders with what is loaded: new versions load, removed ones unload (requests already
holding them finish), unchanged ones stay as they are. The server rescans every
``repo_poll_s`` and on ``POST /v2/repository/...`` (Triton's repository extension). A
version that fails to load is kept with its error, reported by its readiness route and
logged, and never stops the others from serving; a request without a version gets the
highest version that loaded.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from cloud.serving.batcher import Batcher
from cloud.serving.config import ModelConfig
from cloud.serving.metrics import ServerMetrics
from cloud.serving.model import OnnxModel
from cloud.serving.settings import OrtSettings
from shared.errors import ContractError, ModelNotFoundError, ModelNotReadyError
from shared.identifiers import IDENTIFIER_RE

log = logging.getLogger(__name__)
MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class VersionState:
    version: str
    model: OnnxModel | None
    error: str | None
    batcher: Batcher | None = None
    mtime: float = 0.0


class ModelRepository:
    def __init__(
        self, root: Path, ort_settings: OrtSettings, metrics: ServerMetrics | None = None
    ) -> None:
        self.root = root
        self.ort = ort_settings
        self.metrics = metrics or ServerMetrics()
        self._lock = threading.Lock()
        self._scan_lock = threading.Lock()
        self._models: dict[str, dict[str, VersionState]] = {}
        # derived from _models at each scan, so a request does no sorting
        self._sorted: dict[str, list[VersionState]] = {}
        self._default: dict[str, VersionState] = {}
        self.unloaded: set[str] = set()  # models unloaded through the API stay unloaded

    def scan(self) -> None:
        """Bring what is loaded in line with the folders (and the unload list)."""
        if not self.root.is_dir():
            raise ContractError(f"model repository {self.root} is not a directory")
        with self._scan_lock:
            found: dict[str, dict[str, VersionState]] = {}
            for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
                name = model_dir.name
                if not IDENTIFIER_RE.match(name) or name in self.unloaded:
                    continue
                versions = self._scan_model(model_dir)
                if versions:
                    found[name] = versions
            with self._lock:
                gone = {
                    f"{m}/{v}"
                    for m, vs in self._models.items()
                    for v in vs
                    if v not in found.get(m, {})
                }
                ordered = {
                    m: sorted(vs.values(), key=lambda v: int(v.version)) for m, vs in found.items()
                }
                self._models, self._sorted = found, ordered
                self._default = {
                    m: ([v for v in vs if v.model is not None] or vs)[-1]
                    for m, vs in ordered.items()
                }
            for key in sorted(gone):
                log.info("unloaded %s", key)

    def _scan_model(self, model_dir: Path) -> dict[str, VersionState]:
        name = model_dir.name
        current = self._models.get(name, {})
        try:
            config = ModelConfig.load(model_dir)
        except ContractError as exc:
            log.error("model %s: %s", name, exc.message)
            return {"1": VersionState("1", None, exc.message)}
        on_disk = {
            int(p.name): p
            for p in model_dir.iterdir()
            if p.is_dir() and p.name.isdigit() and int(p.name) > 0
        }
        out = {}
        for number in config.selects(sorted(on_disk)):
            vdir = on_disk[number]
            path = vdir / MODEL_FILE
            mtime = path.stat().st_mtime if path.exists() else 0.0
            old = current.get(vdir.name)
            if old is not None and old.mtime == mtime and old.model is not None:
                out[vdir.name] = old
                continue
            out[vdir.name] = self._load(name, vdir, config, mtime)
        return out

    def _load(self, name: str, vdir: Path, config: ModelConfig, mtime: float) -> VersionState:
        try:
            model = OnnxModel(
                name, vdir.name, vdir / MODEL_FILE, self.ort, config.instances, config.inputs
            )
        except ContractError as exc:
            log.error("model %s version %s failed to load: %s", name, vdir.name, exc.message)
            return VersionState(vdir.name, None, exc.message, None, mtime)
        log.info(
            "loaded model %s version %s (batching %s)",
            name,
            vdir.name,
            "on" if model.batchable and config.max_batch_size > 1 else "off",
        )
        return VersionState(vdir.name, model, None, Batcher(model, config, self.metrics), mtime)

    def load(self, name: str) -> None:
        """Triton's repository ``load``: (re)load one model from its folder."""
        if not (self.root / name).is_dir():
            raise ModelNotFoundError(f"no model {name!r} in the repository")
        self.unloaded.discard(name)
        self.scan()

    def unload(self, name: str) -> None:
        self.versions(name)  # 404 if unknown
        self.unloaded.add(name)
        self.scan()

    def index(self) -> list[dict[str, str]]:
        out = []
        for p in sorted(q for q in self.root.iterdir() if q.is_dir()) if self.root.is_dir() else []:
            if not IDENTIFIER_RE.match(p.name):
                continue
            versions = self._models.get(p.name, {})
            if not versions:
                out.append({"name": p.name, "state": "UNAVAILABLE", "reason": "unloaded"})
            for v in versions.values():
                out.append(
                    {
                        "name": p.name,
                        "version": v.version,
                        "state": "READY" if v.model else "UNAVAILABLE",
                        "reason": v.error or "",
                    }
                )
        return out

    def has(self, name: str) -> bool:
        """Whether ``name`` has versions here (loaded or not)."""
        return name in self._sorted

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[VersionState]:
        versions = self._sorted.get(name)
        if not versions:
            raise ModelNotFoundError(f"unknown model {name!r}")
        return list(versions)

    def state(self, name: str, version: str | None) -> VersionState:
        """The named version, or the highest version that loaded (else the highest)."""
        if version is None:
            default = self._default.get(name)
            if default is None:
                raise ModelNotFoundError(f"unknown model {name!r}")
            return default
        found = self._models.get(name, {}).get(version)
        if found is None:
            self.versions(name)  # 404 for the model first
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}")
        return found

    def get(self, name: str, version: str | None) -> OnnxModel:
        return self._ready(name, version).model  # type: ignore[return-value]

    def batcher(self, name: str, version: str | None) -> Batcher:
        return self._ready(name, version).batcher  # type: ignore[return-value]

    def _ready(self, name: str, version: str | None) -> VersionState:
        state = self.state(name, version)
        if state.model is None or state.batcher is None:
            raise ModelNotReadyError(
                f"model {name!r} version {state.version} is not ready: {state.error}"
            )
        return state


def repository_router(repository: ModelRepository) -> APIRouter:
    """Triton's model repository extension: index, load, unload."""
    router = APIRouter(prefix="/v2/repository", tags=["repository"])

    @router.post("/index")
    async def index() -> list[dict[str, str]]:
        return await run_in_threadpool(repository.index)

    @router.post("/models/{name}/load")
    async def load(name: str) -> dict[str, str]:
        await run_in_threadpool(repository.load, name)
        return {"name": name, "state": "loaded"}

    @router.post("/models/{name}/unload")
    async def unload(name: str) -> dict[str, str]:
        await run_in_threadpool(repository.unload, name)
        return {"name": name, "state": "unloaded"}

    return router
