"""The agent's local OIP endpoint (``tandem-agent serve``): the same protocol as the cloud, so
one client (tritonclient, httpx, curl) talks to both.

Input: one FP32 tensor named as the manifest's input, the model's raw features as
``[batch, features]`` (or ``[features]``), at most ``routing.max_batch_rows`` rows: checked as
tandem-cloud and Triton check theirs (400 otherwise). Request parameters ``mode``
(edge|cloud|auto) and ``deadline_ms`` steer routing; the rows are one request
(``Agent.infer_batch``): one local invoke, one deadline, at most one cloud call.
Outputs: ``probabilities``, ``label``, ``confidence``, ``source`` and ``reason`` per row;
for a single row the response parameters carry the same fields as the Python API's
``InferenceResult`` (plus model versions and the latency breakdown).

Imports FastAPI (the ``serve`` extra): ``import agent`` never loads this module.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from agent.inference.backends import BACKENDS
from agent.inference.core import Agent
from agent.inference.result import InferenceResult
from agent.inference.routing import ROUTE_MODES
from agent.version import __version__
from shared.errors import InvalidRequestError, ModelNotFoundError
from shared.oip.http import add_oip_routes, docs_routes_last, install_error_handlers
from shared.oip.types import (
    SERVER_EXTENSIONS,
    InferRequest,
    InferResponse,
    InferTensor,
    ModelMetadata,
    ModelReadyDoc,
    Param,
    ServerMetadata,
    TensorMetadata,
    triton_model_config,
)

OUTPUTS = ("probabilities", "label", "confidence", "source", "reason")
#: The input's datatype, as the metadata declares it: raw features, whatever the model's
#: own (quantized) input tensor is.
INPUT_DATATYPE = "FP32"


class AgentDataPlane:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(
            name="tandem-agent", version=__version__, extensions=list(SERVER_EXTENSIONS)
        )

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return True  # an Agent exists only with a loaded, golden-checked model

    def _check_model(self, name: str, version: str | None) -> None:
        m = self.agent.model.manifest
        if name != m.model:
            raise ModelNotFoundError(f"unknown model {name!r}; this agent serves {m.model!r}")
        if version is not None and version != str(m.version):
            raise ModelNotFoundError(
                f"model {name!r} has no version {version!r} here (serving {m.version})"
            )

    def model_metadata(self, name: str, version: str | None) -> ModelMetadata:
        self._check_model(name, version)
        m = self.agent.model.manifest
        return ModelMetadata(
            name=m.model,
            versions=[str(m.version)],
            platform=f"tandem_{m.edge.format}",
            inputs=[
                TensorMetadata(
                    name=m.input.name, datatype=INPUT_DATATYPE, shape=[-1, m.input.shape[-1]]
                )
            ],
            outputs=[
                TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, len(m.labels)]),
                TensorMetadata(name="label", datatype="BYTES", shape=[-1]),
                TensorMetadata(name="confidence", datatype="FP32", shape=[-1]),
                TensorMetadata(name="source", datatype="BYTES", shape=[-1]),
                TensorMetadata(name="reason", datatype="BYTES", shape=[-1]),
            ],
        )

    def model_config(self, name: str, version: str | None) -> dict[str, Any]:
        """Triton's model configuration (``GET /v2/models/{m}/config``): what tritonclient's
        ``get_model_config`` reads. Batched, so dims leave the batch dimension out."""
        meta = self.model_metadata(name, version)
        return triton_model_config(
            meta.name,
            BACKENDS[self.agent.settings.backend.kind].triton_platform,
            meta.inputs,
            meta.outputs,
            self.agent.settings.routing.max_batch_rows,
        )

    def model_ready(self, name: str, version: str | None) -> ModelReadyDoc:
        self._check_model(name, version)
        return ModelReadyDoc(name=name, version=str(self.agent.model.manifest.version), ready=True)

    async def infer(self, name: str, version: str | None, request: InferRequest) -> InferResponse:
        self._check_model(name, version)
        rows = self._rows(request)
        mode, deadline = _routing_params(
            request.parameters, self.agent.settings.routing.max_deadline_ms
        )
        results = await run_in_threadpool(
            self.agent.infer_batch, rows, deadline_ms=deadline, mode=mode
        )
        return _response(self.agent, request, results)

    def _rows(self, request: InferRequest) -> np.ndarray:
        m = self.agent.model.manifest
        if len(request.inputs) != 1:
            raise InvalidRequestError(
                f"model {m.model!r} takes exactly one input ({m.input.name!r}), "
                f"got {len(request.inputs)}"
            )
        tensor = request.inputs[0]
        if tensor.name != m.input.name:
            raise InvalidRequestError(
                f"model {m.model!r} has no input {tensor.name!r}; inputs are {[m.input.name]}"
            )
        if tensor.datatype != INPUT_DATATYPE:
            raise InvalidRequestError(
                f"input {tensor.name!r} must be {INPUT_DATATYPE}, got {tensor.datatype}"
            )
        features = self.agent.model.features
        max_rows = self.agent.settings.routing.max_batch_rows
        data = tensor.data
        if data.ndim == 1:
            data = data.reshape(1, -1)
        if data.ndim != 2 or data.shape[1] != features or data.shape[0] == 0:
            raise InvalidRequestError(
                f"input must have shape [batch, {features}], got {list(tensor.data.shape)}"
            )
        if data.shape[0] > max_rows:
            raise InvalidRequestError(
                f"batch of {data.shape[0]} rows exceeds max_batch_size {max_rows}"
            )
        rows = data.astype(np.float32, copy=False)
        if not np.isfinite(rows).all():
            raise InvalidRequestError("input holds NaN or infinite values")
        return rows


def _routing_params(params: dict[str, Param], max_deadline_ms: float) -> tuple[Any, float | None]:
    mode = params.get("mode")
    if mode is not None and mode not in ROUTE_MODES:
        raise InvalidRequestError(f"parameter 'mode' must be one of {ROUTE_MODES}")
    deadline = params.get("deadline_ms")
    if deadline is None:
        return mode, None
    # NaN fails both comparisons, Infinity (a literal, or a number past 1e308) the second;
    # an integer too large for a float compares exactly
    if isinstance(deadline, (bool, str)) or not 0 < deadline <= max_deadline_ms:
        raise InvalidRequestError(
            f"parameter 'deadline_ms' must be a positive number of at most {max_deadline_ms:g}"
        )
    return mode, float(deadline)


def _response(agent: Agent, request: InferRequest, results: list[InferenceResult]) -> InferResponse:
    wanted = OUTPUTS if request.outputs is None else [o.name for o in request.outputs]
    unknown = set(wanted) - set(OUTPUTS)
    if unknown:
        raise InvalidRequestError(f"unknown outputs {sorted(unknown)}; outputs are {list(OUTPUTS)}")
    columns: dict[str, np.ndarray] = {
        "probabilities": np.stack([r.probabilities for r in results]).astype(np.float32),
        "label": np.array([r.label.encode() for r in results], dtype=object),
        "confidence": np.array([r.confidence for r in results], dtype=np.float32),
        "source": np.array([r.source.encode() for r in results], dtype=object),
        "reason": np.array([r.reason.encode() for r in results], dtype=object),
    }
    params: dict[str, Param] = {"edge_model": agent.model.manifest.ref}
    if len(results) == 1:
        r = results[0]
        params.update(
            label=r.label,
            confidence=r.confidence,
            source=r.source,
            reason=r.reason,
            edge_model=r.edge_model,
            latency_total_ms=r.latency.total_ms,
        )
        if r.cloud_model:
            params["cloud_model"] = r.cloud_model
        if r.latency.local_ms is not None:
            params["latency_local_ms"] = r.latency.local_ms
        if r.latency.cloud_ms is not None:
            params["latency_cloud_ms"] = r.latency.cloud_ms
    else:
        params["escalated"] = sum(r.source == "cloud" for r in results)
    m = agent.model.manifest
    return InferResponse(
        model_name=m.model,
        model_version=str(m.version),
        outputs=[InferTensor.of(name, columns[name]) for name in wanted],
        parameters=params,
    )


def create_app(agent: Agent) -> FastAPI:
    app = FastAPI(title="tandem-agent", version=__version__)
    install_error_handlers(app)
    server = agent.settings.server
    add_oip_routes(
        app.router,
        AgentDataPlane(agent),
        server.max_body_bytes,
        max_json_bytes=server.max_json_bytes,
    )
    docs_routes_last(app)
    app.state.agent = agent
    return app
