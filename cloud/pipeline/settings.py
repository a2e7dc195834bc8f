"""What ``tandem-cloud model optimize`` does, as settings: one ``OptimizeSettings``, built
in ``main()`` from flags and an optional TOML file and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.identifiers import Identifier


class OptimizeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: Path = Field(description="split file: x, y, train, calib, test (cloud/pipeline/data.py)")
    teacher: Path = Field(description="the cloud model (ONNX, probabilities out): the teacher")
    out: Path = Field(description="folder for this run: variants, report, bundle")
    model: Identifier = "digits"
    cloud_model: str = "digits-cloud"
    cloud_version: str | None = "1"
    labels: list[str] | None = Field(default=None, description="None: the class numbers")
    hidden: list[int] = Field(
        default_factory=lambda: [128, 64], min_length=1, description="edge MLP hidden widths"
    )
    epochs: int = Field(default=120, ge=1)
    seed: int = 7
    distill_temperature: float = Field(default=4.0, gt=0)
    distill_alpha: float = Field(default=0.7, ge=0, le=1)
    sparsities: list[float] = Field(default_factory=lambda: [0.5, 0.8])
    prune_epochs: int = Field(default=30, ge=1)
    int8_io: bool = True
    max_escalation: float | None = Field(
        default=0.20, gt=0, le=1, description="escalation budget; None: no budget"
    )
    min_relative_accuracy: float | None = Field(
        default=0.995, gt=0, le=1, description="hybrid accuracy as a share of cloud-only"
    )
    guarantee_epsilon: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="set: the shipped threshold is the guaranteed one (cloud/pipeline/"
        "guarantee.py): the edge's own answers wrong at most this share, with probability "
        "1 - guarantee_delta; the budget's threshold is still reported beside it",
    )
    guarantee_delta: float = Field(default=0.1, gt=0, lt=1)
    guarantee_reference: Literal["cloud", "labels"] = Field(
        default="cloud",
        description="what 'wrong' means: not the cloud model's answer (what a device's audit "
        "sample can check in the field, where only cloud answers exist), or not the label",
    )
    onednn: bool = Field(
        default=False,
        description="TensorFlow's oneDNN kernels (cloud/pipeline/determinism.py): off, so "
        "the figures do not depend on whether this CPU makes TensorFlow switch them on",
    )

    latency_calls: int = Field(default=300, ge=10)
    golden_count: int = Field(default=6, ge=1)

    @field_validator("max_escalation", "min_relative_accuracy", "guarantee_epsilon", mode="before")
    @classmethod
    def _none(cls, value: object) -> object:
        """``"none"`` (TOML and flags have no null): that side of the target is not set."""
        return None if isinstance(value, str) and value.lower() == "none" else value


class RetrainSettings(BaseModel):
    """What ``tandem-cloud model retrain`` does (``cloud/pipeline/retrain.py``): the serving
    release's model distilled again from the original training split plus field samples,
    calibrated like ``optimize`` does, packaged as the next release."""

    model_config = ConfigDict(extra="forbid")

    model: Identifier
    data: Path = Field(description="the split file optimize used (x, y, train, calib, test)")
    teacher: Path = Field(
        description="the cloud model (ONNX, probabilities out): labels field data"
    )
    out: Path = Field(description="folder for this run: field.npz, bundle, report.json")
    max_field_samples: int = Field(
        default=2000, ge=1, description="the newest this many field samples are used"
    )
    field_test_share: float = Field(
        default=0.25, ge=0, lt=1, description="field samples held out for the report"
    )
    field_calib_share: float = Field(
        default=0.25,
        ge=0,
        lt=1,
        description="field samples added to the calibration split, so the threshold fits the field",
    )
    field_oversample: int = Field(
        default=1, ge=1, description="each field training sample is seen this many times"
    )
    hidden: list[int] | None = Field(
        default=None,
        description="edge MLP hidden widths; None: the serving model's, each widened to at "
        "least min_hidden_width",
    )
    min_hidden_width: int = Field(
        default=64,
        ge=1,
        description="with hidden None, the narrowest hidden layer the candidate gets: the "
        "digits' serving 64-8-10 cannot learn the field and stay sure where it is right "
        "(docs/benchmarks.md, 'One cycle'); 64-64-10 is 6.8 kB int8. 1: the serving widths",
    )
    epochs: int = Field(default=120, ge=1)
    seed: int = 7
    distill_temperature: float = Field(default=4.0, gt=0)
    distill_alpha: float = Field(default=0.7, ge=0, le=1)
    int8_io: bool = True
    serving_version: int | None = Field(
        default=None,
        ge=1,
        description="the release the fleet serves: retrained, and the one the candidate must "
        "match (threshold_rule 'match') and is reported against; None: the latest",
    )
    threshold_rule: Literal["match", "budget"] = Field(
        default="match",
        description="'match': the threshold escalating least at which the candidate's hybrid "
        "accuracy, on the calibration split and on the field's calibration share each, is at "
        "least the serving model's at its own threshold (less match_tolerance); 'budget': "
        "max_escalation and min_relative_accuracy, as optimize does. guarantee_epsilon, when "
        "set, wins over both",
    )
    match_tolerance: float = Field(
        default=0.0, ge=0, lt=1, description="hybrid accuracy the match rule may give up"
    )
    match_weighting: Literal["captured", "importance"] = Field(
        default="captured",
        description="the field's calibration share as captured (each sample once: mostly the "
        "serving model's escalations), or importance-weighted to stand for the requests "
        "served (an audit counts 1 / audit_rate times: unbiased, but a handful of audits "
        "then carries half the weight)",
    )
    audit_rate: float = Field(
        default=0.02, gt=0, le=1, description="the devices' audit rate (importance weighting)"
    )
    max_escalation: float | None = Field(default=0.20, gt=0, le=1)
    min_relative_accuracy: float | None = Field(default=0.995, gt=0, le=1)
    guarantee_epsilon: float | None = Field(default=None, gt=0, lt=1)
    guarantee_delta: float = Field(default=0.1, gt=0, lt=1)
    guarantee_reference: Literal["cloud", "labels"] = "cloud"
    onednn: bool = False
    golden_count: int = Field(default=6, ge=1)

    @field_validator("max_escalation", "min_relative_accuracy", "guarantee_epsilon", mode="before")
    @classmethod
    def _none(cls, value: object) -> object:
        return None if isinstance(value, str) and value.lower() == "none" else value
