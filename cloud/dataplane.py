"""The cloud's OIP data plane: metadata and readiness from the repository, inference on
ONNX Runtime in a worker thread (the event loop never runs a model)."""

from __future__ import annotations

import asyncio

from cloud import __version__
from cloud.repository import ModelRepository
from cloud.settings import CloudSettings
from shared.errors import TandemError
from shared.oip import (
    SERVER_EXTENSIONS,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelReadyDoc,
    ServerMetadata,
)


class CloudDataPlane:
    def __init__(self, settings: CloudSettings, repository: ModelRepository) -> None:
        self.settings = settings
        self.repository = repository

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(
            name="tandem-cloud",
            version=__version__,
            extensions=[*SERVER_EXTENSIONS, "model_repository"],
        )

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Ready when every model has at least one loaded version."""
        return all(
            any(v.model is not None for v in self.repository.versions(name))
            for name in self.repository.names()
        )

    def model_metadata(self, name: str, version: str | None) -> ModelMetadata:
        model = self.repository.get(name, version)
        return ModelMetadata(
            name=name,
            versions=[v.version for v in self.repository.versions(name)],
            platform="onnxruntime_onnx",
            inputs=model.inputs,
            outputs=model.outputs,
        )

    def model_ready(self, name: str, version: str | None) -> ModelReadyDoc:
        state = self.repository.state(name, version)
        return ModelReadyDoc(
            name=name, version=state.version, ready=state.model is not None, reason=state.error
        )

    async def infer(self, name: str, version: str | None, request: InferRequest) -> InferResponse:
        """Successes are counted by the batcher (once per batch), failures here."""
        batcher = None
        try:
            batcher = self.repository.batcher(name, version)
            if self.settings.simulated_delay_ms:
                await asyncio.sleep(self.settings.simulated_delay_ms / 1000.0)
            return await batcher.infer(request)
        except TandemError as exc:
            label = batcher.model.version if batcher is not None else version or "latest"
            self.repository.metrics.requests.inc(name, label, str(exc.http_status))
            raise
