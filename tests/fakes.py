"""Fakes for unit tests: a tiny manifest, a model on FakeBackend, and a scripted OIP cloud."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from agent.inference.backends.fake import FakeBackend
from agent.inference.cloud_client import CloudClient
from agent.inference.model import LoadedModel
from shared.manifest import (
    MANIFEST_SCHEMA_V1,
    CloudTarget,
    EdgeArtifact,
    Manifest,
    RoutingDefaults,
    TensorSpec,
    utc_now,
)
from shared.oip.codec import decode_request, encode_response, parse_header_length
from shared.oip.types import InferResponse, InferTensor, ServerMetadata

LABELS = ["a", "b", "c"]


def manifest(threshold: float = 0.8, version: int = 1) -> Manifest:
    return Manifest(
        schema=MANIFEST_SCHEMA_V1,
        model="toy",
        version=version,
        created=utc_now(),
        edge=EdgeArtifact(
            format="tflite", file="model.tflite", sha256=hashlib.sha256(b"x").hexdigest(), size=1
        ),
        cloud=CloudTarget(model="toy-cloud", version="7"),
        input=TensorSpec(name="input", shape=[-1, 4], datatype="FP32"),
        output=TensorSpec(name="logits", shape=[-1, 3], datatype="FP32"),
        output_kind="logits",
        labels=LABELS,
        routing=RoutingDefaults(threshold=threshold),
    )


def confident_logits(x: np.ndarray) -> np.ndarray:
    """Class 0 with a confidence set by the first feature: x0=10 → ~1.0, x0=0 → 1/3."""
    return np.stack([x[:, 0], np.zeros(len(x)), np.zeros(len(x))], axis=1)


def fake_model(
    fn: Callable[[np.ndarray], np.ndarray] = confident_logits,
    threshold: float = 0.8,
    version: int = 1,
) -> LoadedModel:
    m = manifest(threshold, version)
    backend = FakeBackend(fn)
    backend.load(Path("model.tflite"), m)
    return LoadedModel(
        manifest=m, backend=backend, features=4, scale=1.0, offset=0.0, labels=tuple(LABELS)
    )


class ScriptedCloud:
    """An OIP server in an httpx MockTransport: answers class 2, or what ``behaviour`` says."""

    def __init__(self) -> None:
        self.behaviour = "ok"  # ok | timeout | refuse | garbage | an HTTP status ("503")
        self.error = "nope"  # the message of an error status
        self.calls = 0
        self.token_seen: str | None = None
        self.rows: list[int] = []  # rows of each infer request answered
        self.timeouts: list[float] = []  # each infer request's read timeout, in seconds
        self.extensions: list[str] | None = None  # GET /v2 answers these; None: 404

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path == "/v2":
            if self.extensions is None:
                return httpx.Response(404, json={"error": "no such route"})
            meta = ServerMetadata(name="scripted", version="0", extensions=self.extensions)
            return httpx.Response(200, content=meta.model_dump_json())
        self.calls += 1
        self.token_seen = request.headers.get("authorization")
        self.timeouts.append(request.extensions["timeout"]["read"])
        if self.behaviour == "timeout":
            raise httpx.ReadTimeout("slow", request=request)
        if self.behaviour == "refuse":
            raise httpx.ConnectError("refused", request=request)
        if self.behaviour.isdigit():
            return httpx.Response(int(self.behaviour), json={"error": self.error})
        if self.behaviour == "garbage":
            return httpx.Response(200, content=b"{]")
        req = decode_request(request.content, parse_header_length(request.headers))
        n = req.inputs[0].data.shape[0]
        self.rows.append(n)
        probs = np.tile(np.array([[0.05, 0.05, 0.9]], np.float32), (n, 1))
        resp = InferResponse(
            model_name="toy-cloud",
            model_version="7",
            outputs=[InferTensor.of("probabilities", probs)],
        )
        body, headers = encode_response(resp, req)
        return httpx.Response(200, content=body, headers=headers)

    def client(self, token: str | None = None, **options: Any) -> CloudClient:
        return CloudClient(
            "http://cloud.test",
            token=token,
            transport=httpx.MockTransport(self.handler),
            **options,
        )
