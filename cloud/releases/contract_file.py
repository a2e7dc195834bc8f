"""The contract file (``--contract FILE.toml``): what packaging cannot read from the model.

The artifact itself gives every tensor's name, shape (dynamic dimensions as -1), dtype and
quantization; a ``.tflite`` with TFLite Metadata also gives its image inputs (colour space,
normalisation mean/std), bounding-box outputs (corner order, normalised or not) and its
embedded label files. The contract file adds the rest, all of it optional. Tensors are
named as the model names them (quote names with ``:`` or ``/`` in them); file paths are
relative to the contract file. An example: ``docs/examples/face_detector.toml``.

.. code-block:: toml

    task = "detection"   # classification | multilabel | detection | segmentation |
                         # regression | custom  (or --task)
    labels = "labels.txt"  # (or --labels) the labels of the model's one scores/classes/mask
                           # output; .txt one per line, or .json {"id": "label"}
    # streaming = true     # the model keeps state between calls (read from a .tflite's
                           # variables; say it for an ONNX model that does)

    [inputs.input]         # per input, by name
    kind = "image"         # tensor | image | audio
    shape = [1, 128, 128, 3]  # fix dynamic dimensions (must fit the model's signature)
    layout = "NHWC"        # image: NHWC | NCHW
    colour = "RGB"         # image: RGB | BGR | GRAY
    resize = "squash"      # image: squash | crop | letterbox
    mean = [127.5]         # image: (x - mean) / std per channel, on 0..255 pixels
    std = [127.5]
    # sample_rate = 16000  # audio: Hz; window = 512 samples per call
    # scale = 1.0          # tensor: x * scale + offset before quantization
    # offset = 0.0
    # probe = 16000        # the value of the load-time probe for this input (default 0:
                           # zeros; a sample-rate input may refuse them)

    [outputs.regressors]   # per output, by name
    role = "anchors"       # scores | boxes | classes | count | mask | value | anchors | raw
    [outputs.classificators]
    role = "scores"
    activation = "sigmoid" # probabilities | logits | sigmoid
    labels = "face.txt"    # this output's labels ("" drops labels the metadata gave)
    # box_format = "yxyx"  # boxes: yxyx | xyxy | xywh | cxcywh;  normalized = true

    [decoding]             # shared.contract.Decoding
    decoder = "ssd_anchors"
    box_scale = 128
    score_threshold = 0.5
    iou = 0.3
    [decoding.anchors]
    strides = [8, 16, 16, 16]
    anchors_per_cell = [2, 2, 2, 2]

    [confidence]           # shared.contract.Confidence
    floor = 0.1
    [tolerance]            # the devices' golden check: atol, iou, mask_agreement
    iou = 0.9
    [routing]              # metric, threshold, temperature
    threshold = 0.6
    [cloud]                # the OIP model to escalate to (or --cloud-model)
    model = "faces-cloud"
    send = "encoded"       # tensor | frame | encoded
    input = "image"

    [[golden]]             # golden samples (or --golden FILE ...)
    file = "face.png"      # an image, a .npy for the one input, a .npz by input name
    label = "face"         # classification: the label it must give (optional)

Unknown keys are errors (a misspelt key would otherwise be silently ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.contract import (
    Activation,
    BoxFormat,
    CloudSend,
    Colour,
    Confidence,
    Decoding,
    InputKind,
    Layout,
    OutputRole,
    ResizeMode,
    Task,
    Tolerance,
)
from shared.errors import ContractError
from shared.manifest import OutputKind, RoutingDefaults
from shared.settings_files import SettingsError, describe, load_toml


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InputEntry(_Strict):
    kind: InputKind | None = None
    shape: list[int] | None = None
    layout: Layout | None = None
    colour: Colour | None = None
    resize: ResizeMode | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    sample_rate: int | None = Field(default=None, gt=0)
    window: int | None = Field(default=None, gt=0)
    scale: float | None = None
    offset: float | None = None
    probe: float | None = None


class OutputEntry(_Strict):
    role: OutputRole | None = None
    activation: Activation | None = None
    box_format: BoxFormat | None = None
    normalized: bool | None = None
    labels: str | None = None


class GoldenEntry(_Strict):
    file: str = Field(min_length=1)
    label: str | None = None


class CloudEntry(_Strict):
    model: str = Field(min_length=1)
    version: str | None = None
    input: str | None = None
    output: str | None = None
    output_kind: OutputKind | None = None
    send: CloudSend | None = None


class ContractFile(_Strict):
    task: Task | None = None
    labels: str | None = None
    inputs: dict[str, InputEntry] = {}
    outputs: dict[str, OutputEntry] = {}
    decoding: Decoding | None = None
    confidence: Confidence | None = None
    tolerance: Tolerance | None = None
    streaming: bool | None = None
    routing: RoutingDefaults | None = None
    cloud: CloudEntry | None = None
    golden: list[GoldenEntry] = []


@dataclass(frozen=True)
class Contract:
    """A contract file as read, with its paths resolved against its folder."""

    spec: ContractFile = field(default_factory=ContractFile)
    base: Path = Path()

    def path(self, relative: str) -> Path:
        return self.base / relative


def load_contract(path: Path | None) -> Contract:
    """Read a contract file (None: the empty contract). ``ContractError`` if it cannot be."""
    if path is None:
        return Contract()
    try:
        data: dict[str, Any] = load_toml(path)
    except SettingsError as exc:
        raise ContractError(f"contract file {path}: {exc.message}") from None
    try:
        spec = ContractFile.model_validate(data)
    except ValidationError as exc:
        raise ContractError(f"contract file {path}: {describe(exc)}") from None
    return Contract(spec, path.parent)
