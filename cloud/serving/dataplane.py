"""The cloud's OIP data plane: metadata and readiness from the repository, inference on
ONNX Runtime in a worker thread (the event loop never runs a model)."""

from __future__ import annotations

import asyncio
from typing import Any

from cloud import __version__
from cloud.serving.repository import MODEL_FILE, ModelRepository
from shared.errors import ModelNotReadyError, TandemError
from shared.oip.types import (
    SERVER_EXTENSIONS,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelReadyDoc,
    ServerMetadata,
    triton_model_config,
)


class CloudDataPlane:
    def __init__(self, repository: ModelRepository, *, simulated_delay_ms: float = 0.0) -> None:
        """``simulated_delay_ms``: a wide-area round trip added to every inference, for the
        demo and benchmarks only (``CloudSettings.testing``)."""
        self.repository = repository
        self.delay_s = simulated_delay_ms / 1000.0

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

    def model_config(self, name: str, version: str | None) -> dict[str, Any]:
        """Triton's model configuration of a serving version: its tensors (an image input
        with its ``format``), and its ``config.toml`` as ``config.pbtxt`` would say it
        (``cloud/serving/config.py``)."""
        batcher = self.repository.batcher(name, version)
        model, config = batcher.model, batcher.config
        ort = self.repository.ort
        doc = triton_model_config(
            name,
            "onnxruntime_onnx",
            model.inputs,
            model.outputs,
            batcher.batch_limit,
            backend="onnxruntime",
            default_model_filename=MODEL_FILE,
            **config.triton_sections(
                batcher.batching, any(p.startswith(("CUDA", "Tensorrt")) for p in model.providers)
            ),
            parameters={
                "intra_op_thread_count": {"string_value": str(ort.intra_op_threads)},
                "inter_op_thread_count": {"string_value": str(ort.inter_op_threads)},
            },
        )
        for tensor in doc["input"]:  # an image input says its layout, as Triton's does
            image = model.images.get(tensor["name"])
            if image is not None and image.spec.image is not None:
                tensor["format"] = f"FORMAT_{image.spec.image.layout}"
        return doc

    def model_ready(self, name: str, version: str | None) -> ModelReadyDoc:
        state = self.repository.state(name, version)
        return ModelReadyDoc(
            name=name, version=state.version, ready=state.model is not None, reason=state.error
        )

    async def infer(self, name: str, version: str | None, request: InferRequest) -> InferResponse:
        """Failures to find a serving version are counted here, the rest by the batcher."""
        try:
            batcher = self.repository.batcher(name, version)
        except TandemError as exc:
            # a name or version that does not exist is counted without it: clients choose
            # them, and every label value would be kept forever
            known = isinstance(exc, ModelNotReadyError)
            model = name if known or self.repository.has(name) else ""
            label = (version or "latest") if known else ""
            self.repository.metrics.failed(model, label, exc.http_status)
            raise
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return await batcher.infer(request)
