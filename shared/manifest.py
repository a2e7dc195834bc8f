"""The model manifest: everything a device needs to run, check and route one model release.

A manifest names the edge artifact (file, digest, size), the cloud target it escalates to (an
OIP model name and version), the model contract (``shared.contract``: task, inputs and
outputs by name, decoding and confidence knobs), the bundle files that go with the artifact
(labels, golden samples, each with its digest), routing defaults, and the signature.

Two schemas load. ``tandem.manifest/v2`` is what packaging writes. ``tandem.manifest/v1``
(one flat input, one classifier output, labels and golden samples inline) still loads, and
is read through the same v2 view (``inputs``/``outputs``/``task``): its fields are filled
from the v1 ones. A v1 document keeps its own shape where it matters, in its JSON and in
the bytes its signature covers (``signed_fields``), so releases signed before v2 verify.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.contract import (
    BundleFile,
    CloudSend,
    Confidence,
    Decoding,
    GoldenCase,
    InputSpec,
    OutputSpec,
    Quantization,
    Task,
    TensorSpec,
    Tolerance,
)
from shared.errors import ContractError
from shared.identifiers import Identifier

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_SCHEMA",
    "MANIFEST_SCHEMA_V1",
    "CloudTarget",
    "EdgeArtifact",
    "GoldenSample",
    "Guarantee",
    "Manifest",
    "Preprocessing",
    "Quantization",
    "RoutingDefaults",
    "TensorSpec",
    "utc_now",
]

SchemaId = Literal["tandem.manifest/v1", "tandem.manifest/v2"]
MANIFEST_SCHEMA_V1: Literal["tandem.manifest/v1"] = "tandem.manifest/v1"
MANIFEST_SCHEMA: Literal["tandem.manifest/v2"] = "tandem.manifest/v2"
MANIFEST_FILE = "manifest.json"
OutputKind = Literal["probabilities", "logits"]
#: Edge artifact formats; the agent has a backend for each (``agent.inference.backends``).
EdgeFormat = Literal["tflite", "onnx"]
ConfidenceMetric = Literal["max_prob", "margin", "entropy"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Preprocessing(_Frozen):
    """v1: what the agent does to raw features before the model: ``x * scale + offset``."""

    scale: float = 1.0
    offset: float = 0.0


class Guarantee(_Frozen):
    """What the threshold promises, when it was chosen for a bound rather than a budget
    (``cloud.pipeline.guarantee``): of the answers the edge gives itself (confidence at or
    above the threshold), at most ``epsilon`` are wrong, with probability at least
    ``1 - delta`` over the draw of the calibration set. "Wrong" means "not the cloud
    model's answer" when ``reference`` is ``cloud``, or "not the true label". The agent
    checks it live on its audit sample (``Telemetry.audit``)."""

    epsilon: float = Field(gt=0.0, lt=1.0)
    delta: float = Field(gt=0.0, lt=1.0)
    reference: Literal["labels", "cloud"] = "labels"
    method: str = Field(default="clopper-pearson fixed-sequence", max_length=100)
    calibration_samples: int = Field(ge=0)
    calibration_error: float = Field(ge=0.0, le=1.0, description="of the edge's own answers")
    coverage: float = Field(ge=0.0, le=1.0, description="share the edge answers itself")


class RoutingDefaults(_Frozen):
    """The builder's recommended confidence metric, threshold and temperature, and the
    guarantee the threshold carries, if any."""

    metric: ConfidenceMetric = "max_prob"
    threshold: float = Field(default=0.8, ge=0.0, le=1.0)
    temperature: float = Field(default=1.0, gt=0.0)
    guarantee: Guarantee | None = None


class GoldenSample(_Frozen):
    """v1: a raw input and the probabilities the edge artifact gave for it when it was built."""

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
    """The OIP model the agent escalates to, and the tensors it exchanges with it.

    ``input`` is the cloud model's input name; ``send`` what goes in it (v2, see
    ``shared.contract.CloudSend``). ``output``/``output_kind`` name a classifier's scores
    output; ``outputs`` (v2) gives the cloud's outputs when they differ from the edge's."""

    model: str = Field(min_length=1)
    version: str | None = None
    input: str = "input"
    output: str = "probabilities"
    output_kind: OutputKind = "probabilities"
    send: CloudSend = "tensor"
    outputs: list[OutputSpec] | None = None


#: The fields of a v1 document: its JSON and its signed bytes hold these and only these.
_V1_FIELDS: dict[str, Any] = {
    **dict.fromkeys(
        (
            "schema_",
            "model",
            "version",
            "created",
            "expires",
            "edge",
            "input",
            "output",
            "output_kind",
            "labels",
            "preprocessing",
            "routing",
            "golden",
            "min_agent_version",
            "key_id",
            "signature",
        ),
        True,
    ),
    "cloud": {"model", "version", "input", "output", "output_kind"},
}
_V1_ONLY = ("input", "output", "output_kind", "labels", "preprocessing", "golden")
_V2_ONLY = (
    "task",
    "inputs",
    "outputs",
    "files",
    "golden_cases",
    "decoding",
    "confidence",
    "tolerance",
    "streaming",
)
#: Which output roles each task needs (one of the alternatives).
_TASK_ROLES: dict[str, tuple[frozenset[str], ...]] = {
    "classification": (frozenset({"scores"}),),
    "multilabel": (frozenset({"scores"}),),
    "detection": (frozenset({"boxes", "scores"}), frozenset({"anchors", "scores"})),
    "segmentation": (frozenset({"mask"}),),
    "regression": (frozenset({"value"}),),
    "custom": (frozenset(),),
}


class Manifest(_Frozen):
    schema_: SchemaId = Field(default=MANIFEST_SCHEMA, alias="schema")
    model: Identifier
    version: int = Field(ge=1)
    created: datetime
    expires: datetime | None = None
    edge: EdgeArtifact
    cloud: CloudTarget | None = None
    # --- v2: the contract
    task: Task = "classification"
    inputs: list[InputSpec] = Field(default=[], max_length=64)
    outputs: list[OutputSpec] = Field(default=[], max_length=64)
    files: list[BundleFile] = Field(default=[], max_length=1000)
    golden_cases: list[GoldenCase] = Field(default=[], max_length=100)
    decoding: Decoding = Decoding()
    confidence: Confidence = Confidence()
    tolerance: Tolerance = Tolerance()
    #: The model carries state from one call to the next (a streaming keyword spotter):
    #: the agent runs it on one interpreter, one call at a time, in arrival order.
    streaming: bool = False
    # --- v1 only (a v1 document's inline contract; None in v2)
    input: TensorSpec | None = None
    output: TensorSpec | None = None
    output_kind: OutputKind | None = None
    labels: list[str] | None = None
    preprocessing: Preprocessing | None = None
    golden: list[GoldenSample] = []
    # ---
    routing: RoutingDefaults = RoutingDefaults()
    min_agent_version: str = "0.1.0"
    key_id: str | None = None
    signature: str | None = None

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _upgrade_v1(cls, data: Any) -> Any:
        """A v1 document: refuse v2 fields in it, and fill the v2 view from its v1 ones."""
        if not isinstance(data, dict):
            return data
        if data.get("schema", data.get("schema_")) != MANIFEST_SCHEMA_V1:
            return data
        stray = [k for k in _V2_ONLY if k in data]
        if stray:
            raise ValueError(f"a v1 manifest has no {stray}")
        cloud = data.get("cloud")
        if isinstance(cloud, dict) and {"send", "outputs"} & cloud.keys():
            raise ValueError("a v1 manifest's cloud target has no send/outputs")
        for key in ("input", "output", "output_kind", "labels"):
            if data.get(key) is None:
                raise ValueError(f"a v1 manifest needs {key!r}")
        pre = data.get("preprocessing") or {}
        if isinstance(pre, BaseModel):
            pre = pre.model_dump()
        spec_in = data["input"]
        spec_out = data["output"]
        if isinstance(spec_in, BaseModel):
            spec_in = spec_in.model_dump()
        if isinstance(spec_out, BaseModel):
            spec_out = spec_out.model_dump()
        if not isinstance(spec_in, dict) or not isinstance(spec_out, dict):
            return data  # the field validators say what is wrong
        return {
            "preprocessing": Preprocessing(),
            **data,
            "inputs": [{**spec_in, "kind": "tensor", **(pre if isinstance(pre, dict) else {})}],
            "outputs": [{**spec_out, "role": "scores", "activation": data["output_kind"]}],
        }

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        return self._check_v1() if self.schema_ == MANIFEST_SCHEMA_V1 else self._check_v2()

    def _check_v1(self) -> Manifest:
        assert self.input is not None and self.output is not None and self.labels is not None
        if self.cloud is not None and (self.cloud.send != "tensor" or self.cloud.outputs):
            raise ValueError("a v1 manifest's cloud target has no send/outputs")
        if not self.input.shape or not self.output.shape:
            raise ValueError("input and output need at least one dimension")
        classes = self.output.shape[-1]
        if len(self.labels) < 2 or classes != len(self.labels):
            raise ValueError(
                f"output has {classes} classes but there are {len(self.labels)} labels"
            )
        features = self.input.shape[-1]
        for i, g in enumerate(self.golden):
            if len(g.input) != features or len(g.expected) != classes or g.label >= classes:
                raise ValueError(f"golden sample {i} does not fit the contract")
        return self

    def _check_v2(self) -> Manifest:
        stray = [k for k in _V1_ONLY if getattr(self, k) not in (None, [])]
        if stray:
            raise ValueError(f"{stray} are v1 fields; a v2 manifest says inputs/outputs")
        if not self.inputs or not self.outputs:
            raise ValueError("a v2 manifest needs at least one input and one output")
        names = [t.name for t in self.inputs] + [t.name for t in self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"tensor names must be unique, got {names}")
        files = {f.name for f in self.files}
        if len(files) != len(self.files):
            raise ValueError("bundle file names must be unique")
        if self.edge.file in files or MANIFEST_FILE in files:
            raise ValueError(f"a bundle file may not be named {self.edge.file} or manifest.json")
        wanted = [o.labels for o in self.outputs if o.labels]
        wanted += [n for g in self.golden_cases for n in (g.input, g.expected)]
        missing = sorted({n for n in wanted if n not in files})
        if missing:
            raise ValueError(f"{missing} are named but not listed in files")
        roles = {o.role for o in self.outputs}
        needs = _TASK_ROLES[self.task]
        if not any(need <= roles for need in needs):
            options = " or ".join(str(sorted(n)) for n in needs)
            raise ValueError(f"a {self.task} model needs outputs with roles {options}")
        if "anchors" in roles and self.decoding.decoder is None:
            raise ValueError("an anchors output needs decoding.decoder")
        return self

    @property
    def ref(self) -> str:
        """``model:version``, as results and telemetry name a model."""
        return f"{self.model}:{self.version}"

    @property
    def is_v1(self) -> bool:
        return self.schema_ == MANIFEST_SCHEMA_V1

    def signed_fields(self) -> dict[str, Any] | None:
        """The fields a document of this schema holds (None: all of them)."""
        return _V1_FIELDS if self.is_v1 else None

    def document(self) -> dict[str, Any]:
        """The manifest as the JSON values of its schema's document (what is stored, sent
        and signed)."""
        doc: dict[str, Any] = self.model_dump(
            mode="json", by_alias=True, include=self.signed_fields()
        )
        # fields added after releases were signed are left out at their default, so that
        # the bytes a signature covers stay those of the document as it was signed
        routing = doc.get("routing")
        if isinstance(routing, dict) and routing.get("guarantee", 0) is None:
            del routing["guarantee"]
        return doc

    def file(self, name: str) -> BundleFile:
        for f in self.files:
            if f.name == name:
                return f
        raise ContractError(f"{self.ref} has no bundle file {name!r}")

    def to_json(self) -> str:
        return (
            self.model_dump_json(
                by_alias=True, indent=2, exclude_none=True, include=self.signed_fields()
            )
            + "\n"
        )

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
