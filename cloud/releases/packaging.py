"""``tandem-cloud model package``: turn an edge TFLite model into a signed release.

The operator gives the artifact, a template manifest (labels, tensor names, output kind,
preprocessing, routing defaults, and golden *inputs with their expected labels*), the cloud
model to escalate to and a version. Packaging runs the artifact in the real TFLite
interpreter: the input/output contract recorded in the manifest is read from the artifact
itself (shapes, datatypes, quantization), every golden input must give its expected label,
and the probabilities it gives are recorded so each device can check that its own runtime
reproduces them. Then the manifest is signed and the release written to the registry.

Checks the artifact with its own small runner rather than the agent's backend (``cloud``
does not import ``agent``): two implementations agreeing is itself a check.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from cloud.releases.registry import Registry
from shared.bundle import read_file
from shared.errors import ContractError
from shared.manifest import (
    MANIFEST_SCHEMA_V1,
    CloudTarget,
    EdgeArtifact,
    GoldenSample,
    Manifest,
    Preprocessing,
    Quantization,
    RoutingDefaults,
    TensorSpec,
    utc_now,
)
from shared.signing import SigningKey

_DTYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int8): "INT8", np.dtype(np.uint8): "UINT8"}


def _interpreter(blob: bytes) -> Any:
    for name in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            cls = importlib.import_module(name).Interpreter
            break
        except ImportError:
            continue
    else:
        try:
            cls = importlib.import_module("tensorflow").lite.Interpreter
        except ImportError:
            raise ContractError(
                "packaging runs the model: install tflite-runtime or ai-edge-litert"
            ) from None
    try:
        interp = cls(model_content=blob)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ContractError(f"not a loadable TFLite model: {exc}") from None
    return interp


def tensor_spec(detail: dict[str, Any], name: str) -> TensorSpec:
    dtype = np.dtype(detail["dtype"])
    if dtype not in _DTYPES:
        raise ContractError(f"tensor {name} has dtype {dtype}; Tandem serves FP32/INT8/UINT8")
    scale, zero = detail["quantization"]
    return TensorSpec(
        name=name,
        shape=[int(d) for d in detail["shape_signature"]],
        datatype=_DTYPES[dtype],
        quantization=Quantization(scale=float(scale), zero_point=int(zero)) if scale else None,
    )


def run_tflite(blob: bytes, template: Manifest, rows: np.ndarray) -> np.ndarray:
    """Probabilities for raw input rows, computed as a device computes them."""
    interp = _interpreter(blob)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    pre = template.preprocessing or Preprocessing()
    probs = []
    for row in rows.astype(np.float32):
        x = row[None, :] * pre.scale + pre.offset
        scale, zero = inp["quantization"]
        if scale and inp["dtype"] != np.float32:
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.rint(x / scale + zero), info.min, info.max)
        interp.set_tensor(inp["index"], x.astype(inp["dtype"]))
        interp.invoke()
        y = interp.get_tensor(out["index"])[0].astype(np.float64)
        scale, zero = out["quantization"]
        if scale and out["dtype"] != np.float32:
            y = (y - zero) * scale
        if template.output_kind == "logits":
            y = np.exp(y - y.max())
            y = y / y.sum()
        probs.append(y)
    return np.stack(probs)


@dataclass
class PackageRequest:
    edge: Path
    template: Manifest
    version: int | None = None
    cloud: CloudTarget | None = None
    routing: RoutingDefaults | None = None
    expires_days: float | None = 365.0
    min_agent_version: str | None = None


def package(request: PackageRequest, key: SigningKey, registry: Registry) -> Manifest:
    """Validate, sign and publish one release; returns its manifest."""
    template = request.template
    if (
        not template.is_v1
        or template.input is None
        or template.output is None
        or template.labels is None
    ):
        raise ContractError(
            "a template is a v1 manifest (input, output, labels, golden); a model without "
            "one is packaged from its own contract (--name, --contract)"
        )
    try:
        blob = request.edge.read_bytes()
    except OSError as exc:
        raise ContractError(f"cannot read {request.edge}: {exc}") from None
    interp = _interpreter(blob)
    inputs, outputs = interp.get_input_details(), interp.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ContractError("the edge model must have exactly one input and one output")
    in_spec = tensor_spec(inputs[0], template.input.name)
    out_spec = tensor_spec(outputs[0], template.output.name)
    if in_spec.shape[-1] != template.input.shape[-1]:
        raise ContractError(
            f"the model takes {in_spec.shape[-1]} features, the template {template.input.shape[-1]}"
        )
    if out_spec.shape[-1] != len(template.labels):
        raise ContractError(
            f"the model has {out_spec.shape[-1]} outputs for {len(template.labels)} labels"
        )
    if not template.golden:
        raise ContractError("the template has no golden samples: a release must carry some")
    rows = np.asarray([g.input for g in template.golden], dtype=np.float32)
    probs = run_tflite(blob, template, rows)
    for i, (g, p) in enumerate(zip(template.golden, probs)):
        if int(p.argmax()) != g.label:
            raise ContractError(
                f"golden sample {i}: the model says {template.labels[int(p.argmax())]!r}, "
                f"expected {template.labels[g.label]!r}"
            )
    latest = registry.versions(template.model)
    version = request.version if request.version is not None else (latest[-1] + 1 if latest else 1)
    created = utc_now()
    file = "model.tflite"
    manifest = Manifest(
        schema=MANIFEST_SCHEMA_V1,
        model=template.model,
        version=version,
        created=created,
        expires=created + timedelta(days=request.expires_days) if request.expires_days else None,
        edge=EdgeArtifact(
            format="tflite",
            file=file,
            url=f"/registry/{template.model}/{version}/{file}",
            sha256=hashlib.sha256(blob).hexdigest(),
            size=len(blob),
        ),
        cloud=request.cloud or template.cloud,
        input=in_spec,
        output=out_spec,
        output_kind=template.output_kind,
        labels=template.labels,
        preprocessing=template.preprocessing,
        routing=request.routing or template.routing,
        golden=[
            GoldenSample(input=g.input, expected=[round(float(v), 6) for v in p], label=g.label)
            for g, p in zip(template.golden, probs)
        ],
        min_agent_version=request.min_agent_version or template.min_agent_version,
    )
    signed = key.sign(manifest)
    registry.publish(signed, blob)
    return signed


def rollback_release(
    registry: Registry,
    model: str,
    key: SigningKey,
    to_version: int | None = None,
    expires_days: float | None = 365.0,
) -> Manifest:
    """A new release (latest + 1) that points at an earlier release's artifact: the release
    before the latest, or ``to_version``. Devices install it like any update, so the
    anti-rollback rule (versions only go up) is never bent. Its bundle files (labels,
    golden samples) are copied into the new release, checked against their digests, so it
    serves them at its own ``/registry/{model}/{version}/{file}`` like any release."""
    versions = registry.versions(model)
    if len(versions) < 2 and to_version is None:
        raise ContractError(f"{model} has no earlier release to roll back to")
    target_version = to_version if to_version is not None else versions[-2]
    target = registry.manifest(model, target_version)
    created = utc_now()
    version = versions[-1] + 1
    manifest = target.model_copy(
        update={
            "version": version,
            "created": created,
            "expires": created + timedelta(days=expires_days) if expires_days else None,
            "edge": target.edge.model_copy(
                update={
                    "url": target.edge.url
                    or f"/registry/{model}/{target_version}/{target.edge.file}"
                }
            ),
            "key_id": None,
            "signature": None,
        }
    )
    folder = registry.release_dir(model, target_version)
    files = {f.name: read_file(target, folder, f.name) for f in target.files}
    signed = key.sign(manifest)
    registry.publish(signed, None, files)  # the artifact stays where it is
    return signed
