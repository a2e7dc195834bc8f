"""The model manifest: everything a device needs to run, check and route one model release.

A manifest names the edge artifact (file, digest, size), the cloud target it escalates to (an
OIP model name and version), the input/output contract, labels, preprocessing, routing
defaults and golden samples that prove an artifact computes what its builder saw. The
build script writes one beside each demo model; issue 3's signed updates carry the same
document with ``key_id`` and ``signature`` filled in.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.errors import ContractError
from shared.identifiers import Identifier
from shared.oip.types import DATATYPES

MANIFEST_SCHEMA: Literal["tandem.manifest/v1"] = "tandem.manifest/v1"
MANIFEST_FILE = "manifest.json"
OutputKind = Literal["probabilities", "logits"]
#: Edge artifact formats; the agent has a backend for each (``agent.inference.backends``).
EdgeFormat = Literal["tflite", "onnx"]
ConfidenceMetric = Literal["max_prob", "margin", "entropy"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Quantization(_Frozen):
    """Affine quantization of a tensor: ``real = scale * (q - zero_point)``."""

    scale: float = Field(gt=0)
    zero_point: int


class TensorSpec(_Frozen):
    """A tensor of the contract. ``-1`` in ``shape`` is a dynamic dimension (the batch)."""

    name: str = Field(min_length=1)
    shape: list[int]
    datatype: str
    quantization: Quantization | None = None

    @model_validator(mode="after")
    def _check(self) -> TensorSpec:
        if self.datatype not in DATATYPES:
            raise ValueError(f"unknown datatype {self.datatype!r}")
        if any(d < -1 or d == 0 for d in self.shape):
            raise ValueError(f"shape {self.shape} may hold only positive sizes and -1")
        return self

    def accepts(self, shape: tuple[int, ...] | list[int]) -> bool:
        """Whether ``shape`` fits this spec: a concrete shape, or a runtime's signature, where
        ``-1`` too is a dynamic dimension and fits whatever the spec says. The one fit check:
        the backends check their tensors with it."""
        return len(shape) == len(self.shape) and all(
            want in (-1, have) or have == -1 for want, have in zip(self.shape, shape, strict=False)
        )


class Preprocessing(_Frozen):
    """What the agent does to raw features before the model: ``x * scale + offset``."""

    scale: float = 1.0
    offset: float = 0.0


class RoutingDefaults(_Frozen):
    """The builder's recommended confidence metric, threshold and temperature."""

    metric: ConfidenceMetric = "max_prob"
    threshold: float = Field(default=0.8, ge=0.0, le=1.0)
    temperature: float = Field(default=1.0, gt=0.0)


class GoldenSample(_Frozen):
    """A raw input and the probabilities the edge artifact gave for it when it was built."""

    input: list[float]
    expected: list[float]
    label: int = Field(ge=0)


class EdgeArtifact(_Frozen):
    format: EdgeFormat
    file: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    url: str | None = None
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(gt=0)


class CloudTarget(_Frozen):
    """The OIP model the agent escalates to, and the tensors it exchanges with it."""

    model: str = Field(min_length=1)
    version: str | None = None
    input: str = "input"
    output: str = "probabilities"
    output_kind: OutputKind = "probabilities"


class Manifest(_Frozen):
    schema_: Literal["tandem.manifest/v1"] = Field(default=MANIFEST_SCHEMA, alias="schema")
    model: Identifier
    version: int = Field(ge=1)
    created: datetime
    expires: datetime | None = None
    edge: EdgeArtifact
    cloud: CloudTarget | None = None
    input: TensorSpec
    output: TensorSpec
    output_kind: OutputKind
    labels: list[str] = Field(min_length=2)
    preprocessing: Preprocessing = Preprocessing()
    routing: RoutingDefaults = RoutingDefaults()
    golden: list[GoldenSample] = []
    min_agent_version: str = "0.1.0"
    key_id: str | None = None
    signature: str | None = None

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        if not self.input.shape or not self.output.shape:
            raise ValueError("input and output need at least one dimension")
        classes = self.output.shape[-1]
        if classes != len(self.labels):
            raise ValueError(
                f"output has {classes} classes but there are {len(self.labels)} labels"
            )
        features = self.input.shape[-1]
        for i, g in enumerate(self.golden):
            if len(g.input) != features or len(g.expected) != classes or g.label >= classes:
                raise ValueError(f"golden sample {i} does not fit the contract")
        return self

    @property
    def ref(self) -> str:
        """``model:version``, as results and telemetry name a model."""
        return f"{self.model}:{self.version}"

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2, exclude_none=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and validate a manifest document. Manifests arrive from the network, so
        whatever fails while reading one (bad JSON or UTF-8, wrong types, nesting deep
        enough for ``RecursionError``) is the document's fault: a ``ContractError``."""
        try:
            return cls.model_validate(json.loads(text))
        except RecursionError:
            raise ContractError("invalid manifest: nested too deeply") from None
        except (ValueError, ValidationError) as exc:
            raise ContractError(f"invalid manifest: {exc}") from None
        except Exception as exc:  # any other failure is the document's too
            raise ContractError(f"invalid manifest: {type(exc).__name__}: {exc}") from None

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST_FILE
        try:
            text = path.read_text()
        except OSError as exc:
            raise ContractError(f"cannot read manifest {path}: {exc}") from None
        return cls.from_json(text)


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)
