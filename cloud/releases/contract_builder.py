"""The model contract of a release, read from the artifact and completed by the operator.

Precedence, field by field: the command line's flags (``--task``, ``--labels``), then the
contract file (``cloud.releases.contract_file``), then the model's TFLite Metadata, then
what the task implies. Tensor names, shapes, dtypes and quantization always come from the
runtime, never from the operator: a contract that contradicts the artifact is refused.

What the task implies, for outputs the operator and the metadata left unnamed:

- ``classification``/``multilabel``: the one output is ``scores`` (several outputs must be
  named);
- ``regression``: every output is a ``value``; ``segmentation``: the one output a ``mask``;
  ``custom``: every output ``raw``;
- ``detection``: the standard post-processed SSD head is recognised by shape (boxes
  ``[1, N, 4]``, ``[1]`` count, the output with value labels or ``class`` in its name the
  classes, the other ``[1, N]`` the scores); raw-anchor heads need their roles and
  ``[decoding]`` from the contract file.

Without a task anywhere, a model with box outputs is a detector, one whose metadata marks
an output as an image a segmenter, and a model with one labelled output a classifier; any
other model must be given ``--task``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from cloud.releases.contract_file import Contract, InputEntry, OutputEntry
from cloud.releases.tflite_file import TensorMetadata, TFLiteFile
from shared.bundle import MAX_LABELS_BYTES, parse_labels
from shared.contract import (
    TASKS,
    AudioSpec,
    Colour,
    ImageSpec,
    InputSpec,
    Layout,
    OutputRole,
    OutputSpec,
    Task,
    TensorSpec,
)
from shared.errors import ContractError

#: Output roles whose values a labels file names.
_LABELLED: frozenset[OutputRole] = frozenset({"scores", "classes", "mask"})
_IMAGE_KEYS = ("layout", "colour", "resize", "mean", "std")
_AUDIO_KEYS = ("sample_rate", "window")


@dataclass
class ContractSources:
    """What the operator said: the contract file and the flags that override it."""

    contract: Contract = field(default_factory=Contract)
    task: Task | None = None
    labels: Path | None = None


@dataclass
class BuiltContract:
    task: Task
    inputs: list[InputSpec]
    outputs: list[OutputSpec]
    #: Bundle files made here (labels), by bundle name.
    files: dict[str, bytes]
    #: Each labelled output's labels, by output name.
    labels: dict[str, dict[int, str]]


def build_contract(
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    tflite: TFLiteFile | None,
    sources: ContractSources,
) -> BuiltContract:
    """The contract of a model whose runtime reports ``inputs``/``outputs``."""
    spec = sources.contract.spec
    _check_names("input", spec.inputs, inputs)
    _check_names("output", spec.outputs, outputs)
    in_meta = _meta(tflite.input_meta if tflite else [], len(inputs))
    out_meta = _meta(tflite.output_meta if tflite else [], len(outputs))
    fmt_onnx = tflite is None
    built_in = [
        _input(t, spec.inputs.get(t.name, InputEntry()), m, fmt_onnx)
        for t, m in zip(inputs, in_meta)
    ]
    entries = {t.name: spec.outputs.get(t.name, OutputEntry()) for t in outputs}
    roles: dict[str, OutputRole] = {}
    for t, m in zip(outputs, out_meta):
        role = entries[t.name].role or _meta_role(m)
        if role is not None:
            roles[t.name] = role
    labels_for = _label_sources(outputs, out_meta, entries, roles, sources, tflite)
    task = sources.task or spec.task or _infer_task(outputs, roles, out_meta, labels_for)
    _default_roles(task, outputs, roles, labels_for, out_meta)
    files: dict[str, bytes] = {}
    names: dict[str, str] = {}  # source key -> bundle name
    labels: dict[str, dict[int, str]] = {}
    built_out = []
    for t, m in zip(outputs, out_meta):
        entry, role = entries[t.name], roles[t.name]
        file_name = None
        source = labels_for.get(t.name)
        if source is not None and role not in _LABELLED:
            if source.explicit:
                raise ContractError(
                    f"output {t.name!r} is a {role} output: it has no labels "
                    f"(labels go with {', '.join(sorted(_LABELLED))} outputs)"
                )
            source = None  # metadata labels on an output whose role takes none
        if source is not None:
            parsed = parse_labels(source.name, source.data)
            _check_fit(t, role, source, parsed)
            key = source.key
            if key not in names:
                names[key] = _unique(_bundle_name(source.name), set(files))
                files[names[key]] = source.data
            file_name = names[key]
            labels[t.name] = parsed
        try:
            built_out.append(
                OutputSpec(
                    **t.model_dump(),
                    role=role,
                    activation=entry.activation or "probabilities",
                    # the one anchors decoder (ssd_anchors) regresses centre, size
                    box_format=entry.box_format
                    or m.box_format
                    or ("cxcywh" if role == "anchors" else "yxyx"),
                    normalized=entry.normalized
                    if entry.normalized is not None
                    else m.box_normalized,
                    labels=file_name,
                )
            )
        except ValidationError as exc:
            raise ContractError(f"output {t.name!r}: {_first(exc)}") from None
    return BuiltContract(task, built_in, built_out, files, labels)


def _check_names(what: str, named: Mapping[str, object], tensors: list[TensorSpec]) -> None:
    have = [t.name for t in tensors]
    unknown = sorted(set(named) - set(have))
    if unknown:
        raise ContractError(
            f"the contract file names {what}(s) {unknown} that the model does not have; its "
            f"{what}s are {have}"
        )


def _meta_role(meta: TensorMetadata) -> OutputRole | None:
    """The role the metadata implies: bounding boxes, or class ids (value labels)."""
    if meta.boxes:
        return "boxes"
    labels = meta.labels_file()
    return "classes" if labels is not None and labels.kind == "value" else None


def _meta(meta: list[TensorMetadata], n: int) -> list[TensorMetadata]:
    """The metadata of each tensor, in the subgraph's order (none if it does not match)."""
    return meta if len(meta) == n else [TensorMetadata() for _ in range(n)]


def _first(exc: ValidationError) -> str:
    error = exc.errors()[0]
    return str(error["msg"]).removeprefix("Value error, ")


def _input(t: TensorSpec, entry: InputEntry, meta: TensorMetadata, onnx: bool) -> InputSpec:
    shape = t.shape
    if entry.shape is not None:
        if any(d < -1 or d == 0 for d in entry.shape) or not t.accepts(entry.shape):
            raise ContractError(
                f"input {t.name!r}: shape {entry.shape} does not fit the model's {t.shape}"
            )
        shape = entry.shape
    image_keys = [k for k in _IMAGE_KEYS if getattr(entry, k) is not None]
    audio_keys = [k for k in _AUDIO_KEYS if getattr(entry, k) is not None]
    kind = entry.kind or (
        "image" if meta.image or image_keys else "audio" if audio_keys else "tensor"
    )
    if kind != "image" and image_keys:
        raise ContractError(f"input {t.name!r}: {image_keys} are for an image input")
    if kind != "audio" and audio_keys:
        raise ContractError(f"input {t.name!r}: {audio_keys} are for an audio input")
    image = audio = None
    try:
        if kind == "image":
            if len(shape) != 4:
                raise ContractError(
                    f"input {t.name!r} has shape {shape}; an image input is 4-D "
                    '(set kind = "tensor", or fix its shape)'
                )
            layout: Layout = entry.layout or ("NCHW" if onnx and _channels_first(shape) else "NHWC")
            channels = shape[1] if layout == "NCHW" else shape[3]
            colour: Colour = entry.colour or meta.colour or ("GRAY" if channels == 1 else "RGB")
            mean, std = _pixel_normalisation(t, entry.mean, entry.std, meta.mean, meta.std)
            image = ImageSpec(
                layout=layout,
                colour=colour,
                resize=entry.resize or "squash",
                mean=mean,
                std=std,
            )
        elif kind == "audio":
            if entry.sample_rate is None:
                raise ContractError(f"audio input {t.name!r} needs sample_rate")
            audio = AudioSpec(sample_rate=entry.sample_rate, window=entry.window)
        return InputSpec(
            name=t.name,
            shape=shape,
            datatype=t.datatype,
            quantization=t.quantization,
            kind=kind,
            image=image,
            audio=audio,
            scale=entry.scale if entry.scale is not None else 1.0,
            offset=entry.offset if entry.offset is not None else 0.0,
            probe=entry.probe if entry.probe is not None else 0.0,
        )
    except ValidationError as exc:
        raise ContractError(f"input {t.name!r}: {_first(exc)}") from None


def _pixel_normalisation(
    t: TensorSpec,
    mean: list[float] | None,
    std: list[float] | None,
    meta_mean: list[float] | None,
    meta_std: list[float] | None,
) -> tuple[list[float], list[float]]:
    """An image input's mean/std: the contract file's, else (for a float input) the
    metadata's, else what feeds the pixels in as they are. A quantized uint8 input takes
    raw pixels (TFLite Metadata's normalisation is for float inputs, TFLite Support does not
    apply it to quantized ones): mean = zero point, std = 1 / scale makes the quantized
    value the pixel itself (mean 0, std 1 would saturate every pixel above 0 at 255 on a
    (1/128, 128) input, and the model would answer the same for every picture)."""
    if mean is not None or std is not None:
        return mean or [0.0], std or [1.0]
    if t.datatype == "UINT8" and t.quantization is not None:
        q = t.quantization
        return [float(q.zero_point)], [1.0 / q.scale]
    return meta_mean or [0.0], meta_std or [1.0]


def _channels_first(shape: list[int]) -> bool:
    return shape[1] in (1, 3) and shape[3] not in (1, 3)


@dataclass(frozen=True)
class _Labels:
    name: str  # the file's own name (its suffix says the format)
    data: bytes
    key: str  # identifies the source, so one file used twice is bundled once
    explicit: bool  # the operator named it (a misfit is an error, not a metadata quirk)


def _read_labels(path: Path) -> _Labels:
    try:
        size = path.stat().st_size
        if size > MAX_LABELS_BYTES:
            raise ContractError(f"labels file {path} is {size} bytes; at most {MAX_LABELS_BYTES}")
        data = path.read_bytes()
    except OSError as exc:
        raise ContractError(f"cannot read labels file {path}: {exc}") from None
    return _Labels(path.name, data, f"file:{path.resolve()}", explicit=True)


def _label_sources(
    outputs: list[TensorSpec],
    meta: list[TensorMetadata],
    entries: dict[str, OutputEntry],
    roles: dict[str, OutputRole],
    sources: ContractSources,
    tflite: TFLiteFile | None,
) -> dict[str, _Labels]:
    """Which labels each output gets: its own entry's, else the model's metadata's; the
    flag's (or the file's top-level ``labels``) go to the one output that takes labels."""
    found: dict[str, _Labels] = {}
    for t, m in zip(outputs, meta):
        entry = entries[t.name].labels
        if entry == "":
            continue
        if entry is not None:
            found[t.name] = _read_labels(sources.contract.path(entry))
            continue
        associated = m.labels_file()
        if associated is not None and tflite is not None:
            data = tflite.embedded.get(associated.name)
            if data is None:
                raise ContractError(
                    f"the model's metadata names label file {associated.name!r} for output "
                    f"{t.name!r}, but the model does not carry it"
                )
            found[t.name] = _Labels(associated.name, data, f"embedded:{associated.name}", False)
    general = sources.labels or (
        sources.contract.path(sources.contract.spec.labels)
        if sources.contract.spec.labels
        else None
    )
    if general is not None:
        found_general = _read_labels(general)
        target = _general_target(outputs, {**(_ssd_head(outputs) or {}), **roles})
        found[target] = found_general
    return found


def _general_target(outputs: list[TensorSpec], roles: dict[str, OutputRole]) -> str:
    """The output a model-wide labels file is for: the one whose role takes labels (classes
    before scores), or the only output."""
    if len(outputs) == 1:
        return outputs[0].name
    for role in ("classes", "scores", "mask"):
        named = [t.name for t in outputs if roles.get(t.name) == role]
        if len(named) == 1:
            return named[0]
    raise ContractError(
        f"the model has outputs {[t.name for t in outputs]}: say which one the labels are "
        'for in the contract file ([outputs.NAME] labels = "FILE")'
    )


def _infer_task(
    outputs: list[TensorSpec],
    roles: dict[str, OutputRole],
    meta: list[TensorMetadata],
    labels: dict[str, _Labels],
) -> Task:
    if {"boxes", "anchors"} & set(roles.values()) or _ssd_head(outputs) is not None:
        return "detection"
    if any(m.image for m in meta):
        return "segmentation"
    if len(outputs) == 1 and labels:
        return "classification"
    raise ContractError(
        "the model does not say what it is for: give --task (or task in the contract file), "
        f"one of {', '.join(TASKS)}"
    )


def _ssd_head(outputs: list[TensorSpec]) -> dict[str, OutputRole] | None:
    """Roles of a post-processed SSD head (TFLite_Detection_PostProcess): boxes [1,N,4],
    classes and scores [1,N], count [1]; None if ``outputs`` are not one."""
    if len(outputs) != 4:
        return None
    boxes = [t for t in outputs if len(t.shape) == 3 and t.shape[-1] == 4]
    count = [t for t in outputs if len(t.shape) == 1]
    rows = [t for t in outputs if len(t.shape) == 2]
    if len(boxes) != 1 or len(count) != 1 or len(rows) != 2:
        return None
    named = [t for t in rows if re.search("class", t.name, re.IGNORECASE)]
    # TFLite_Detection_PostProcess gives boxes, classes, scores, count in that order
    classes = named[0] if len(named) == 1 else rows[0]
    scores = next(t for t in rows if t is not classes)
    return {
        boxes[0].name: "boxes",
        classes.name: "classes",
        scores.name: "scores",
        count[0].name: "count",
    }


def _default_roles(
    task: Task,
    outputs: list[TensorSpec],
    roles: dict[str, OutputRole],
    labels: dict[str, _Labels],
    meta: list[TensorMetadata],
) -> None:
    """Fill ``roles`` for the outputs nobody named, as ``task`` implies (module docstring)."""
    free = [t for t in outputs if t.name not in roles]
    if not free:
        return
    if task == "detection":
        head = _ssd_head(outputs)
        if head is not None and all(roles.get(n, r) == r for n, r in head.items()):
            roles.update(head)
            return
        raise ContractError(
            f"say the role of detection outputs {[t.name for t in free]} in the contract file "
            "([outputs.NAME] role = boxes | scores | classes | count | anchors)"
        )
    single: dict[Task, OutputRole] = {
        "classification": "scores",
        "multilabel": "scores",
        "segmentation": "mask",
    }
    every: dict[Task, OutputRole] = {"regression": "value", "custom": "raw"}
    if task in every:
        roles.update({t.name: every[task] for t in free})
        return
    role = single[task]
    if role in roles.values():
        roles.update({t.name: "raw" for t in free})
        return
    if len(free) == 1:
        roles[free[0].name] = role
        return
    labelled = [t.name for t in free if t.name in labels]
    if len(labelled) == 1:
        roles[labelled[0]] = role
        roles.update({t.name: "raw" for t in free if t.name != labelled[0]})
        return
    raise ContractError(
        f"a {task} model with outputs {[t.name for t in free]}: say which is the {role} "
        f'output in the contract file ([outputs.NAME] role = "{role}")'
    )


def _check_fit(t: TensorSpec, role: OutputRole, source: _Labels, labels: dict[int, str]) -> None:
    """A labels file names the last axis of a scores/mask output: it must have as many
    entries (a JSON map may leave gaps, but no id past the axis)."""
    if not labels:
        raise ContractError(f"labels file {source.name} for output {t.name!r} has no labels")
    if min(labels) < 0:
        raise ContractError(f"labels file {source.name} has a negative class id")
    if role == "classes" or (role == "mask" and len(t.shape) == 3) or not t.shape:
        return  # the labels name values (class ids), not an axis
    classes = t.shape[-1]
    if classes < 1:
        return  # a dynamic class axis: checked against the golden outputs
    # a .txt names every index (line i, index i); a .json map may leave gaps
    fits = max(labels) < classes and (source.name.endswith(".json") or max(labels) == classes - 1)
    if not fits:
        raise ContractError(
            f"labels file {source.name} has {len(labels)} labels (ids up to {max(labels)}) "
            f"but output {t.name!r} has {classes} classes (shape {t.shape})"
        )


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _bundle_name(name: str) -> str:
    base = _UNSAFE.sub("_", Path(name).name).lstrip(".-") or "labels.txt"
    return base if base.endswith((".txt", ".json")) else base + ".txt"


def _unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    stem, dot, suffix = name.rpartition(".")
    n = 2
    while f"{stem}-{n}{dot}{suffix}" in taken:
        n += 1
    return f"{stem}-{n}{dot}{suffix}"
