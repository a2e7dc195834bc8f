"""A Triton-layout model repository: ``<root>/<model>/<version>/model.onnx``.

Version folders are positive integers; a request without a version gets the highest version
that loaded. A version that fails to load is kept with its error, reported by its readiness
route and logged, and never stops the others from serving.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from cloud.onnx_model import OnnxModel
from cloud.settings import OrtSettings
from shared.errors import ContractError, ModelNotFoundError, ModelNotReadyError
from shared.identifiers import IDENTIFIER_RE

log = logging.getLogger(__name__)
MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class VersionState:
    version: str
    model: OnnxModel | None
    error: str | None


class ModelRepository:
    def __init__(self, root: Path, ort_settings: OrtSettings) -> None:
        self.root = root
        self._ort = ort_settings
        self._lock = threading.Lock()
        self._models: dict[str, dict[str, VersionState]] = {}

    def scan(self) -> None:
        """Load every version folder under the root (at start-up)."""
        if not self.root.is_dir():
            raise ContractError(f"model repository {self.root} is not a directory")
        found: dict[str, dict[str, VersionState]] = {}
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if not IDENTIFIER_RE.match(model_dir.name):
                log.warning("skipping %s: not a valid model name", model_dir)
                continue
            versions = {}
            for vdir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
                if vdir.name.isdigit() and int(vdir.name) > 0:
                    versions[vdir.name] = self._load(model_dir.name, vdir)
            if versions:
                found[model_dir.name] = versions
        with self._lock:
            self._models = found

    def _load(self, name: str, vdir: Path) -> VersionState:
        try:
            model = OnnxModel(name, vdir.name, vdir / MODEL_FILE, self._ort)
        except ContractError as exc:
            log.error("model %s version %s failed to load: %s", name, vdir.name, exc.message)
            return VersionState(vdir.name, None, exc.message)
        log.info("loaded model %s version %s", name, vdir.name)
        return VersionState(vdir.name, model, None)

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[VersionState]:
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFoundError(f"unknown model {name!r}")
        return sorted(versions.values(), key=lambda v: int(v.version))

    def state(self, name: str, version: str | None) -> VersionState:
        """The named version, or the highest version that loaded (else the highest)."""
        versions = self.versions(name)
        if version is None:
            ready = [v for v in versions if v.model is not None]
            return (ready or versions)[-1]
        for v in versions:
            if v.version == version:
                return v
        raise ModelNotFoundError(f"model {name!r} has no version {version!r}")

    def get(self, name: str, version: str | None) -> OnnxModel:
        state = self.state(name, version)
        if state.model is None:
            raise ModelNotReadyError(
                f"model {name!r} version {state.version} is not ready: {state.error}"
            )
        return state.model
