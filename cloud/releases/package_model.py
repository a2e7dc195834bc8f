"""``tandem-cloud model package --name NAME``: any TFLite or ONNX model into a signed v2
release, with no template.

1. The artifact is loaded in its own runtime (TFLite interpreter or ONNX Runtime, told
   apart by the file's bytes): tensor names, shapes, dtypes and quantization come from it,
   and from a ``.tflite``'s TFLite Metadata its image inputs, box outputs and embedded
   label files (``cloud.releases.tflite_file``).
2. The contract file and flags complete the contract (``cloud.releases.contract_builder``;
   the file's format is ``cloud.releases.contract_file``).
3. The model runs once on zeros of its declared input shapes (the agent's load check) and
   on each golden sample (``cloud.releases.golden``); the outputs are decoded as the agent
   will decode them (``shared.decode``), so a decoding that cannot work, or a golden that
   does not give its expected label, stops the release here.
4. The manifest is signed and published with the artifact and its bundle files (labels,
   golden inputs and outputs), each listed with its digest.

Every failure is a ``ContractError`` with a message.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from cloud.releases.contract_builder import ContractSources, build_contract
from cloud.releases.contract_file import Contract, load_contract
from cloud.releases.golden import GoldenInput, make_golden
from cloud.releases.registry import Registry
from cloud.releases.runner import TFLiteRunner, check_runs, open_model
from shared.contract import BundleFile, Confidence, Decoding, Task, Tolerance
from shared.decode import Classification, build_decoder
from shared.errors import ContractError
from shared.manifest import CloudTarget, EdgeArtifact, Manifest, RoutingDefaults, utc_now
from shared.signing import SigningKey

#: Decoded pixels a golden image may have (the agent's default ``images.max_pixels``).
MAX_PIXELS = 40_000_000


@dataclass
class ModelPackageRequest:
    """One ``model package --name`` call. Flags win over the contract file."""

    edge: Path
    name: str
    contract: Path | None = None
    task: Task | None = None
    labels: Path | None = None
    golden: list[Path] = field(default_factory=list)
    version: int | None = None
    cloud_model: str | None = None
    cloud_version: str | None = None
    threshold: float | None = None
    expires_days: float | None = 365.0
    min_agent_version: str | None = None
    max_pixels: int = MAX_PIXELS


def _cloud(request: ModelPackageRequest, contract: Contract) -> CloudTarget | None:
    entry = contract.spec.cloud
    values = entry.model_dump(exclude_none=True) if entry else {}
    if request.cloud_model:
        values |= {"model": request.cloud_model, "version": request.cloud_version}
    elif request.cloud_version:
        values["version"] = request.cloud_version
    if not values:
        return None
    try:
        return CloudTarget.model_validate(values)
    except ValidationError as exc:
        raise ContractError(f"cloud target: {exc.errors()[0]['msg']}") from None


def _routing(request: ModelPackageRequest, contract: Contract) -> RoutingDefaults:
    base = contract.spec.routing or RoutingDefaults()
    if request.threshold is None:
        return base
    try:
        return RoutingDefaults.model_validate({**base.model_dump(), "threshold": request.threshold})
    except ValidationError as exc:
        raise ContractError(f"--threshold: {exc.errors()[0]['msg']}") from None


def package_model(request: ModelPackageRequest, key: SigningKey, registry: Registry) -> Manifest:
    """Validate, sign and publish one v2 release; returns its signed manifest."""
    try:
        blob = request.edge.read_bytes()
    except OSError as exc:
        raise ContractError(f"cannot read {request.edge}: {exc}") from None
    contract = load_contract(request.contract)
    spec = contract.spec
    runner = open_model(blob)
    tflite = runner.file if isinstance(runner, TFLiteRunner) else None
    built = build_contract(
        runner.inputs,
        runner.outputs,
        tflite,
        ContractSources(contract, request.task, request.labels),
    )
    check_runs(runner, list(built.inputs))
    samples = [GoldenInput(contract.path(g.file), g.label) for g in spec.golden]
    samples += [GoldenInput(p) for p in request.golden]
    golden = make_golden(
        runner, built.task, built.inputs, built.outputs, samples, request.max_pixels
    )
    files = dict(built.files)
    for name, data in golden.files.items():
        if name in files:
            raise ContractError(f"two bundle files would be named {name}")
        files[name] = data
    latest = registry.versions(request.name)
    version = request.version if request.version is not None else (latest[-1] + 1 if latest else 1)
    created = utc_now()
    edge_file = f"model.{runner.format}"
    try:
        manifest = Manifest(
            model=request.name,
            version=version,
            created=created,
            expires=created + timedelta(days=request.expires_days)
            if request.expires_days
            else None,
            edge=EdgeArtifact(
                format=runner.format,
                file=edge_file,
                url=f"/registry/{request.name}/{version}/{edge_file}",
                sha256=hashlib.sha256(blob).hexdigest(),
                size=len(blob),
            ),
            cloud=_cloud(request, contract),
            task=built.task,
            inputs=built.inputs,
            outputs=built.outputs,
            files=[
                BundleFile(name=n, sha256=hashlib.sha256(d).hexdigest(), size=len(d))
                for n, d in files.items()
            ],
            golden_cases=golden.cases,
            decoding=spec.decoding or Decoding(),
            confidence=spec.confidence or Confidence(),
            tolerance=spec.tolerance or Tolerance(),
            streaming=spec.streaming
            if spec.streaming is not None
            else bool(tflite and tflite.stateful),
            routing=_routing(request, contract),
            min_agent_version=request.min_agent_version or "0.1.0",
        )
    except ValidationError as exc:
        raise ContractError(
            f"the release's manifest is invalid: {exc.errors()[0]['msg']}"
        ) from None
    _check_decodes(manifest, built.labels, golden.outputs, samples)
    signed = key.sign(manifest)
    registry.publish(signed, blob, files)
    return signed


def _check_decodes(
    manifest: Manifest,
    labels: dict[str, dict[int, str]],
    outputs: list[dict[str, np.ndarray]],
    samples: list[GoldenInput],
) -> None:
    """Decode every golden output as a device will; a sample with an expected label must
    give it (classification)."""
    decoder = build_decoder(manifest, labels)
    for i, got in enumerate(outputs):
        prediction = decoder.decode(got, None)
        want = samples[i].label if i < len(samples) else None
        if want is None:
            continue
        if not isinstance(prediction, Classification):
            raise ContractError(
                f"golden {samples[i].path.name}: an expected label is for a classification "
                f"model, this one is {manifest.task}"
            )
        if prediction.label != want:
            raise ContractError(
                f"golden {samples[i].path.name}: the model says {prediction.label!r}, "
                f"expected {want!r}"
            )
