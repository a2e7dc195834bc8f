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

Any other model (an image classifier, a detector, several inputs): inputs by the manifest's
names, in the model's real shape, or for an image input a ``UINT8`` frame ``[H, W, C]`` of
any size or the encoded JPEG/PNG as a ``BYTES`` tensor (several ``BYTES`` elements: one
request each). Outputs: the decoded result's tensors (``shared.decode``: ``boxes``,
``scores``, ``labels`` for a detector; ``mask`` and per-class areas for segmentation...)
plus ``confidence``, ``source`` and ``reason``; the parameters as above, and ``result``,
the whole typed result as JSON.

Imports FastAPI (the ``serve`` extra): ``import agent`` never loads this module.
"""

from __future__ import annotations

import json
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
from shared.manifest import Manifest
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
        if not self.agent.model.flat:
            return ModelMetadata(
                name=m.model,
                versions=[str(m.version)],
                platform=f"tandem_{m.edge.format}",
                inputs=[
                    TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
                    for t in m.inputs
                ],
                outputs=_any_outputs(m),
            )
        spec_in = m.inputs[0]
        return ModelMetadata(
            name=m.model,
            versions=[str(m.version)],
            platform=f"tandem_{m.edge.format}",
            inputs=[
                TensorMetadata(
                    name=spec_in.name, datatype=INPUT_DATATYPE, shape=[-1, spec_in.shape[-1]]
                )
            ],
            outputs=[
                TensorMetadata(
                    name="probabilities",
                    datatype="FP32",
                    shape=[-1, len(self.agent.model.labels)],
                ),
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
        return await run_in_threadpool(self.infer_blocking, name, version, request)

    def infer_blocking(
        self, name: str, version: str | None, request: InferRequest
    ) -> InferResponse:
        """One request, in the worker thread the routes run it in (decoding and encoding
        included: one hop per request, ``shared.oip.http.BlockingDataPlane``)."""
        self._check_model(name, version)
        mode, deadline = _routing_params(
            request.parameters, self.agent.settings.routing.max_deadline_ms
        )
        if not self.agent.model.flat:
            items = self._items(request)
            results = self.agent.infer_batch(items, deadline_ms=deadline, mode=mode)
            return _any_response(self.agent, request, results)
        rows = self._rows(request)
        results = self.agent.infer_batch(rows, deadline_ms=deadline, mode=mode)
        return _response(self.agent, request, results)

    def _items(self, request: InferRequest) -> list[Any]:
        """The requests in an OIP request to a non-flat model: one, or one per element of
        a ``BYTES`` tensor of encoded images for a single-input model."""
        m = self.agent.model.manifest
        names = [t.name for t in m.inputs]
        given = {t.name: t for t in request.inputs}
        unknown = sorted(given.keys() - set(names))
        if unknown or len(given) != len(request.inputs):
            raise InvalidRequestError(
                f"model {m.model!r} has inputs {names}; got {[t.name for t in request.inputs]}"
            )
        missing = [n for n in names if n not in given]
        if missing:
            raise InvalidRequestError(f"model {m.model!r} needs inputs {missing} too")
        values: dict[str, Any] = {}
        for n, tensor in given.items():
            data = tensor.data
            if tensor.datatype == "BYTES":
                blobs = [bytes(b) for b in data.reshape(-1)]
                if not blobs:
                    raise InvalidRequestError(f"input {n!r} holds no encoded image")
                if len(names) == 1:
                    max_rows = self.agent.settings.routing.max_batch_rows
                    if len(blobs) > max_rows:
                        raise InvalidRequestError(
                            f"{len(blobs)} images in one request; at most {max_rows}"
                        )
                    return blobs
                values[n] = blobs[0]
            elif tensor.datatype == "UINT8" and data.ndim == 4 and data.shape[0] == 1:
                values[n] = data[0]  # a frame with its batch dimension
            else:
                values[n] = data
        return [values[names[0]] if len(names) == 1 else values]

    def _rows(self, request: InferRequest) -> np.ndarray:
        m = self.agent.model.manifest
        input_name = m.inputs[0].name
        if len(request.inputs) != 1:
            raise InvalidRequestError(
                f"model {m.model!r} takes exactly one input ({input_name!r}), "
                f"got {len(request.inputs)}"
            )
        tensor = request.inputs[0]
        if tensor.name != input_name:
            raise InvalidRequestError(
                f"model {m.model!r} has no input {tensor.name!r}; inputs are {[input_name]}"
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
    return _reply(agent, columns, wanted, _parameters(agent, results))


def _parameters(agent: Agent, results: list[InferenceResult]) -> dict[str, Param]:
    """The response parameters: for one result the fields of ``InferenceResult`` (and,
    beyond a flat classifier, ``task`` and the whole result as JSON); for several, how many
    went to the cloud."""
    params: dict[str, Param] = {"edge_model": agent.model.manifest.ref}
    if len(results) != 1:
        params["escalated"] = sum(r.source == "cloud" for r in results)
        return params
    (r,) = results
    params.update(
        confidence=r.confidence,
        source=r.source,
        reason=r.reason,
        edge_model=r.edge_model,
        latency_total_ms=r.latency.total_ms,
    )
    if r.index >= 0:
        params["label"] = r.label
    if r.cloud_model:
        params["cloud_model"] = r.cloud_model
    if r.latency.local_ms is not None:
        params["latency_local_ms"] = r.latency.local_ms
    if r.latency.cloud_ms is not None:
        params["latency_cloud_ms"] = r.latency.cloud_ms
    if r.prediction is not None:
        params["task"] = r.task
        params["result"] = json.dumps(r.to_dict(), separators=(",", ":"))
    return params


def _reply(
    agent: Agent, columns: dict[str, np.ndarray], wanted: Any, params: dict[str, Param]
) -> InferResponse:
    m = agent.model.manifest
    return InferResponse(
        model_name=m.model,
        model_version=str(m.version),
        outputs=[InferTensor.of(name, columns[name]) for name in wanted],
        parameters=params,
    )


def _any_outputs(m: Manifest) -> list[TensorMetadata]:
    """What infer returns for a non-flat model: its task's result tensors (the prediction
    type's ``TENSORS``; a custom model's raw outputs) and the routing columns."""
    from shared.decode import predictions

    by_task = {
        cls.task: cls.TENSORS
        for cls in (
            predictions.Classification,
            predictions.MultiLabel,
            predictions.Detections,
            predictions.Segmentation,
            predictions.Regression,
        )
    }
    tensors = by_task.get(m.task) or tuple((o.name, "FP32", o.shape) for o in m.outputs)
    routing = (("confidence", "FP32", [-1]), ("source", "BYTES", [-1]), ("reason", "BYTES", [-1]))
    return [TensorMetadata(name=n, datatype=d, shape=list(s)) for n, d, s in (*tensors, *routing)]


def _any_response(
    agent: Agent, request: InferRequest, results: list[InferenceResult]
) -> InferResponse:
    """Outputs of a non-flat model's results: the typed result's tensors (one request: as
    they are; several: stacked when they stack) and the routing columns."""
    first = results[0]
    columns: dict[str, np.ndarray] = {}
    tensors = [r.prediction.to_tensors() for r in results]
    for key in tensors[0]:
        parts = [t[key] for t in tensors]
        if len(parts) == 1:
            columns[key] = parts[0]
        elif all(p.shape == parts[0].shape for p in parts):
            columns[key] = np.stack(parts)
    columns["confidence"] = np.array([r.confidence for r in results], dtype=np.float32)
    columns["source"] = np.array([r.source.encode() for r in results], dtype=object)
    columns["reason"] = np.array([r.reason.encode() for r in results], dtype=object)
    wanted = list(columns) if request.outputs is None else [o.name for o in request.outputs]
    unknown = [w for w in wanted if w not in columns]
    if unknown:
        raise InvalidRequestError(f"unknown outputs {unknown}; outputs are {list(columns)}")
    params = _parameters(agent, results)
    params["task"] = first.task
    return _reply(agent, columns, wanted, params)


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
