"""The model contract, v2: what a model takes and gives, by tensor *name*, and what it is for.

A v1 manifest knew one kind of model (a flat feature vector into a classifier). v2 describes
any model a device owner brings:

- ``task`` picks the output decoder, the result type and the confidence rule;
- every input has a ``kind``: a plain ``tensor``, an ``image`` (layout, colour order, resize
  mode and per-channel mean/std, the TFLite Metadata convention ``(x - mean) / std``) or
  ``audio`` (sample rate and window);
- every output has a ``role`` (scores, boxes, classes, count, mask, value, anchors, raw), so
  a detector's four tensors are told apart by what they mean, never by their order;
- labels and golden samples are *files of the bundle* listed with their digests, so a signed
  manifest published on MQTT stays a few kilobytes whatever the model.

The types here are the wire format (pydantic, frozen, ``extra="forbid"``); reading the files
they point at is ``shared.bundle``'s job.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.oip.types import DATATYPES, numpy_dtype

Task = Literal["classification", "multilabel", "detection", "segmentation", "regression", "custom"]
TASKS: tuple[Task, ...] = (
    "classification",
    "multilabel",
    "detection",
    "segmentation",
    "regression",
    "custom",
)
InputKind = Literal["tensor", "image", "audio"]
Layout = Literal["NHWC", "NCHW"]
Colour = Literal["RGB", "BGR", "GRAY"]
#: ``squash``: stretch to the model's size; ``crop``: centre crop to its aspect, then resize;
#: ``letterbox``: fit inside and pad (boxes are mapped back through the padding).
ResizeMode = Literal["squash", "crop", "letterbox"]
OutputRole = Literal["scores", "boxes", "classes", "count", "mask", "value", "anchors", "raw"]
#: How a ``scores``/``mask`` output is to be read: already probabilities, logits for a
#: softmax, or independent logits for a sigmoid (multilabel, detection anchors).
Activation = Literal["probabilities", "logits", "sigmoid"]
#: Corner order of a ``boxes`` output.
BoxFormat = Literal["yxyx", "xyxy", "xywh", "cxcywh"]
#: What the agent sends the cloud when it escalates: the preprocessed model input (as the
#: edge model takes it, in float32), the caller's uint8 frame, or the encoded image bytes
#: (an OIP ``BYTES`` tensor).
CloudSend = Literal["tensor", "frame", "encoded"]

_FILE = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Quantization(_Frozen):
    """Affine quantization of a tensor: ``real = scale * (q - zero_point)``."""

    scale: float = Field(gt=0)
    zero_point: int


class TensorSpec(_Frozen):
    """A tensor of the contract. ``-1`` in ``shape`` is a dynamic dimension."""

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

    def same_tensor(self, other: TensorSpec) -> bool:
        """Same name, shape, datatype and quantization: what callers of a served model rely
        on (the updater refuses a release whose tensors differ from the serving ones)."""
        return (
            self.name == other.name
            and self.shape == other.shape
            and self.datatype == other.datatype
            and self.quantization == other.quantization
        )


class ImageSpec(_Frozen):
    """How a picture becomes this input: decoded, converted to ``colour``, resized to the
    tensor's height and width with ``resize``, then ``(x - mean) / std`` per channel (one
    value is used for every channel), then quantized if the tensor is."""

    layout: Layout = "NHWC"
    colour: Colour = "RGB"
    resize: ResizeMode = "squash"
    mean: list[float] = Field(default=[0.0], min_length=1, max_length=4)
    std: list[float] = Field(default=[1.0], min_length=1, max_length=4)

    @model_validator(mode="after")
    def _check(self) -> ImageSpec:
        if any(s == 0 for s in self.std):
            raise ValueError("image std may not be 0")
        return self

    @property
    def channels(self) -> int:
        return 1 if self.colour == "GRAY" else 3


class AudioSpec(_Frozen):
    """A waveform input: ``sample_rate`` Hz, ``window`` samples per call (None: the
    tensor's last dimension)."""

    sample_rate: int = Field(gt=0)
    window: int | None = Field(default=None, gt=0)


class InputSpec(TensorSpec):
    """One input of the model. ``scale``/``offset`` (``x * scale + offset``) apply to a
    ``tensor`` input before quantization: the v1 preprocessing, kept for feature vectors."""

    kind: InputKind = "tensor"
    image: ImageSpec | None = None
    audio: AudioSpec | None = None
    scale: float = 1.0
    offset: float = 0.0
    #: What the load-time probe (``probe_inputs``) fills this input with: 0, unless the
    #: model refuses zeros there (a sample-rate input that must be 16000).
    probe: float = 0.0

    @model_validator(mode="after")
    def _check_kind(self) -> InputSpec:
        if (self.kind == "image") != (self.image is not None):
            raise ValueError(f"input {self.name!r}: an image spec goes with kind 'image' only")
        if (self.kind == "audio") != (self.audio is not None):
            raise ValueError(f"input {self.name!r}: an audio spec goes with kind 'audio' only")
        if self.image is not None:
            if len(self.shape) != 4:
                raise ValueError(f"image input {self.name!r} needs a 4-D shape, has {self.shape}")
            h, w, c = self.image_dims
            if h < 1 or w < 1:
                raise ValueError(f"image input {self.name!r} needs a fixed height and width")
            if c != self.image.channels:
                raise ValueError(
                    f"image input {self.name!r} has {c} channels, {self.image.colour} has "
                    f"{self.image.channels}"
                )
        return self

    @property
    def image_dims(self) -> tuple[int, int, int]:
        """(height, width, channels) of an image input, whatever its layout."""
        if self.image is not None and self.image.layout == "NCHW":
            return self.shape[2], self.shape[3], self.shape[1]
        return self.shape[1], self.shape[2], self.shape[3]


class OutputSpec(TensorSpec):
    """One output of the model and what it means.

    - ``scores``: class scores, read per ``activation``; the last axis is the class axis;
    - ``boxes``: ``[..., 4]`` in ``box_format``, normalised to [0, 1] unless ``normalized``
      is false (then in the model's input pixels);
    - ``classes``: class ids per detection; ``count``: how many detections are valid;
    - ``mask``: per-pixel class scores ``[1, H, W, C]`` (or ``[1, H, W]`` of class ids);
    - ``value``: regression values; ``anchors``: raw anchor regressors, decoded by the
      named ``decoder`` of the manifest's ``decoding``; ``raw``: passed through.

    ``labels`` names the bundle file of this output's labels (classes, scores, mask).
    """

    role: OutputRole = "scores"
    activation: Activation = "probabilities"
    box_format: BoxFormat = "yxyx"
    normalized: bool = True
    labels: str | None = Field(default=None, pattern=_FILE)


class Anchors(_Frozen):
    """SSD anchors generated as MediaPipe's ``SsdAnchorsCalculator`` does (fixed anchor
    size, ``anchor_offset`` 0.5): one ``[x_center, y_center]`` per anchor in [0, 1]."""

    strides: list[int] = Field(min_length=1)
    anchors_per_cell: list[int] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Anchors:
        if len(self.strides) != len(self.anchors_per_cell):
            raise ValueError("anchors: one anchors_per_cell per stride")
        return self


class Decoding(_Frozen):
    """How outputs become a typed result, per task.

    Detection: candidates under ``score_threshold`` are not reported; NMS at ``iou`` keeps
    at most ``max_detections``. ``decoder`` names the decoder of raw-anchor outputs
    (``ssd_anchors``: MediaPipe/BlazeFace-style regressors over generated anchors, with
    ``box_scale`` the size boxes are regressed in). ``top_k``: classification results carry
    the best k labels.
    """

    score_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    iou: float = Field(default=0.5, gt=0.0, le=1.0)
    max_detections: int = Field(default=100, ge=1, le=10_000)
    top_k: int = Field(default=5, ge=1, le=100)
    decoder: Literal["ssd_anchors"] | None = None
    anchors: Anchors | None = None
    box_scale: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> Decoding:
        if (self.decoder == "ssd_anchors") != (self.anchors is not None):
            raise ValueError("the ssd_anchors decoder needs anchors, and only it takes them")
        return self


class Confidence(_Frozen):
    """Task-specific knobs of the confidence rule (see ``agent.inference.confidence``).

    Detection: the least decisive candidate scoring at least ``floor`` (only among
    ``classes_of_interest`` if given). Segmentation: the ``quantile`` of per-pixel max
    probability."""

    floor: float = Field(default=0.1, ge=0.0, le=1.0)
    classes_of_interest: list[int] | None = None
    quantile: float = Field(default=0.05, ge=0.0, le=1.0)


class Tolerance(_Frozen):
    """How close a device's output must be to the golden one: probabilities/values within
    ``atol`` (and the same top-1), boxes matched at ``iou``, masks agreeing on
    ``mask_agreement`` of their pixels."""

    atol: float = Field(default=0.02, ge=0)
    iou: float = Field(default=0.9, gt=0, le=1)
    mask_agreement: float = Field(default=0.98, gt=0, le=1)


class BundleFile(_Frozen):
    """A file of the release besides the edge artifact (labels, golden inputs/outputs)."""

    name: str = Field(pattern=_FILE, max_length=200)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class GoldenCase(_Frozen):
    """One golden sample: ``input`` a bundle file (an image, a ``.npy`` for the one input,
    or a ``.npz`` holding one array per input name) and ``expected`` a ``.npz`` of the
    real-valued outputs by name as the edge artifact gave them when it was packaged."""

    input: str = Field(pattern=_FILE)
    expected: str = Field(pattern=_FILE)


class CloudContract(_Frozen):
    """What the cloud model takes on escalation (``send``) and under which input name; its
    outputs have the edge model's names and roles unless ``outputs`` says otherwise."""

    send: CloudSend = "tensor"
    input: str = "input"
    outputs: list[OutputSpec] | None = None


def probe_inputs(specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """The load-time probe: each input's declared shape (a dynamic dimension: 1) and dtype,
    filled with its ``probe`` value. Packaging and the agent both run a model on it once,
    so a model the runtime cannot run is refused before it serves a request."""
    return {
        s.name: np.full(
            [d if d > 0 else 1 for d in s.shape], s.probe, dtype=numpy_dtype(s.datatype)
        )
        for s in specs
    }
